//! Builds the eBPF programs (leaktrace-ebpf) with aya-build and places the object in OUT_DIR,
//! where `src/probes.rs` embeds it.
//!
//! `AYA_BUILD_SKIP=1` writes an empty object instead, for `cargo check` and unit tests on a
//! machine without the eBPF toolchain; such a binary refuses to trace and says how to build it.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-check-cfg=cfg(leaktrace_ebpf_stub)");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out_dir.join("leaktrace"), b"").context("writing the stub eBPF object")?;
        println!("cargo:rustc-cfg=leaktrace_ebpf_stub");
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: this leaktrace has no eBPF programs and cannot trace"
        );
        return Ok(());
    }
    if which::which("bpf-linker").is_err() {
        bail!(
            "bpf-linker is not installed, so the eBPF programs cannot be built: run `cargo xtask setup` \
             (or `cargo xtask build`), which installs it and the nightly toolchain"
        );
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "leaktrace-ebpf")
        .ok_or_else(|| anyhow!("leaktrace-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` to install the nightly toolchain, rust-src and bpf-linker")
}
