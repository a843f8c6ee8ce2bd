//! Provisioning: installs what building, testing and demonstrating leaktrace needs, and only
//! what is missing. Safe to run again; each step says what it found or what it does.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::shell::{self, step};

/// Debian packages and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    (
        "erlang-base",
        "beam.smp, erl and erlc for the demo, tests and bench",
    ),
    ("erlang-dev", "erl_nif.h for the test NIFs"),
    (
        "erlang-runtime-tools",
        "standard runtime applications of a typical node",
    ),
    ("erlang-tools", "standard tools of a typical node"),
    ("gcc", "compiles the test NIFs"),
    ("bpftool", "inspects loaded eBPF programs in tests"),
    (
        "tmux",
        "runs leaktrace in a terminal to read its live view in tests",
    ),
    (
        "bpftrace",
        "runs the memleak-style baseline of `cargo xtask bench --native`",
    ),
    (
        "iproute2",
        "brings up loopback in the network namespaces of the container tests",
    ),
    (
        "util-linux",
        "unshare, nsenter and mount for the container tests",
    ),
];

/// bpf-linker release known to build against the nightly's LLVM with the pinned aya.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs every missing prerequisite.
pub fn provision() -> anyhow::Result<()> {
    step("checking prerequisites");
    debian_packages()?;
    rust_toolchains()?;
    bpf_linker()?;
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !deb_installed(name))
        .collect();
    if missing.is_empty() {
        eprintln!("    Debian packages: all present");
        return Ok(());
    }
    for (name, why) in PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        eprintln!("    missing {name}: {why}");
    }
    if which::which("apt-get").is_err() {
        bail!(
            "apt-get not found: install {} with this system's package manager, then run again",
            missing.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "installing {} needs root: run `sudo apt-get install -y {}` or run this task as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("installing {}", missing.join(" ")));
    shell::run(Command::new("apt-get").args(["update", "-qq"]))?;
    shell::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn deb_installed(name: &str) -> bool {
    shell::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", name]))
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

fn rust_toolchains() -> anyhow::Result<()> {
    if which::which("rustup").is_err() {
        bail!("rustup not found: install it from https://rustup.rs, then run again");
    }
    let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("    nightly toolchain: present");
    } else {
        step("installing the nightly toolchain (builds the eBPF programs)");
        shell::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    component(
        Some("nightly"),
        "rust-src",
        "-Z build-std=core for bpfel-unknown-none",
    )?;
    // The workspace's own toolchain builds the tool and runs fmt and clippy.
    component(None, "rustfmt", "cargo fmt --check in the test task")?;
    component(None, "clippy", "lints in the test task")?;
    Ok(())
}

/// Installs rustup component `name` on `toolchain` (None: the workspace's toolchain) if absent.
fn component(toolchain: Option<&str>, name: &str, why: &str) -> anyhow::Result<()> {
    let rustup = |args: &[&str]| {
        let mut cmd = Command::new("rustup");
        cmd.args(args).current_dir(shell::workspace_root());
        if let Some(t) = toolchain {
            cmd.args(["--toolchain", t]);
        }
        cmd
    };
    let on = toolchain.unwrap_or("the workspace toolchain");
    let installed = stdout(&mut rustup(&["component", "list", "--installed"]))?;
    if installed.lines().any(|l| l.starts_with(name)) {
        eprintln!("    {name} ({on}): present");
        return Ok(());
    }
    step(&format!("installing {name} on {on} ({why})"));
    shell::run(&mut rustup(&["component", "add", name]))
}

/// bpf-linker links the eBPF object with the nightly's own LLVM. It is found by rustc run under
/// `rustup run nightly`, which also puts that LLVM on the library path.
fn bpf_linker() -> anyhow::Result<()> {
    if shell::succeeds(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
        eprintln!("    bpf-linker: present");
        return Ok(());
    }
    let sysroot =
        stdout(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let (llvm, major) = nightly_llvm(&lib)?;
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} ({})",
        llvm.display()
    ));
    let prefix = shell::workspace_root().join("target/xtask/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    shell::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !shell::succeeds(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
    {
        bail!("bpf-linker was installed but does not run under `rustup run nightly`");
    }
    Ok(())
}

/// The nightly's shared LLVM (`libLLVM.so.22.1-rust-...` or `libLLVM-22-rust-...`) and its major.
fn nightly_llvm(lib: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let entries = fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let version = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"));
        if let Some(major) = version
            .and_then(|v| v.split(['.', '-']).next())
            .and_then(|m| m.parse::<u32>().ok())
        {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM in {}: reinstall the nightly toolchain (`rustup toolchain install nightly`)",
        lib.display()
    )
}

/// Builds the release binary; returns its path.
pub fn build_release() -> anyhow::Result<PathBuf> {
    step("building target/release/leaktrace (with its eBPF programs)");
    shell::run(
        shell::cargo()
            .args(["build", "--release", "--package", "leaktrace"])
            .env_remove("AYA_BUILD_SKIP"),
    )?;
    let bin = shell::workspace_root().join("target/release/leaktrace");
    eprintln!("    built {}", bin.display());
    Ok(bin)
}

fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let out = shell::output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            shell::show(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when running as root (euid 0), read from /proc so no libc binding is needed.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}
