//! The demo and bench workloads: the test NIF and Erlang modules of `leaktrace/tests/fixtures`,
//! compiled into `leaktrace-fixtures` of the cargo target directory, and nodes started from them.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::shell::{self, step};

/// Compiles lt_nif.so, lt_native.so (linking liblt_leaklib.so) and the .beam files; returns
/// their directory.
pub fn build() -> anyhow::Result<PathBuf> {
    let root = shell::workspace_root();
    let src = root.join("leaktrace/tests/fixtures");
    let out = target_dir().join("leaktrace-fixtures");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    step(&format!(
        "compiling the workload NIF and modules into {}",
        out.display()
    ));
    let erts = shell::output(Command::new("erl").args([
        "-noshell",
        "-eval",
        "io:format(\"~s\", [code:root_dir()]), halt().",
    ]))?;
    let erl_root = String::from_utf8_lossy(&erts.stdout).trim().to_owned();
    if !erts.status.success() || erl_root.is_empty() {
        bail!(
            "`erl` did not report its root directory: is Erlang/OTP installed? (`cargo xtask setup`)"
        );
    }
    shell::run(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(out.join("lt_nif.so"))
            .arg(src.join("lt_nif.c"))
            .arg(format!("-I{erl_root}/usr/include")),
    )?;
    // The native-attribution NIF and the plain library it links (found by its rpath).
    shell::run(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(out.join("liblt_leaklib.so"))
            .arg(src.join("lt_leaklib.c")),
    )?;
    shell::run(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(out.join("lt_native.so"))
            .arg(src.join("lt_native.c"))
            .arg(format!("-I{erl_root}/usr/include"))
            .arg(format!("-L{}", out.display()))
            .arg("-llt_leaklib")
            .arg(format!("-Wl,-rpath,{}", out.display()))
            .arg("-pthread"),
    )?;
    // The native bench NIF (`cargo xtask bench --native`).
    shell::run(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(out.join("lt_churn.so"))
            .arg(src.join("lt_churn.c"))
            .arg(format!("-I{erl_root}/usr/include")),
    )?;
    let mut erlc = Command::new("erlc");
    erlc.arg("-o").arg(&out);
    for module in [
        "lt_nif",
        "lt_native",
        "lt_load",
        "lt_vm",
        "lt_bench",
        "lt_prod",
        "lt_churn",
        "lt_soak",
    ] {
        erlc.arg(src.join(format!("{module}.erl")));
    }
    shell::run(&mut erlc)?;
    Ok(out)
}

/// The cargo target directory: `CARGO_TARGET_DIR` when set (relative to the workspace root, as
/// cargo reads it), else `target`. Builds, fixtures and bench scratch files all go there, so a
/// bench measures the binary its own cargo built, not one another build left in `target`.
pub fn target_dir() -> PathBuf {
    let root = shell::workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// The `erl` command line that runs `eval` on a node with the fixtures on its code path.
pub fn erl(dir: &std::path::Path, extra: &[&str], eval: &str) -> Command {
    let mut cmd = Command::new("erl");
    cmd.args(extra)
        .args(["-noshell", "-pa"])
        .arg(dir)
        .args(["-eval", eval]);
    cmd
}

/// A node started in the background; killed when dropped, so no node outlives the task.
pub struct Node {
    child: Child,
}

impl Node {
    /// Starts `cmd` and waits until its process has become beam.smp.
    pub fn start(mut cmd: Command) -> anyhow::Result<Node> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `{}`", shell::show(&cmd)))?;
        let node = Node { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs::read_link(format!("/proc/{}/exe", node.pid()))
            .is_ok_and(|exe| exe.to_string_lossy().ends_with("beam.smp"))
        {
            if Instant::now() > deadline {
                bail!(
                    "`{}` did not become beam.smp within 20 s",
                    shell::show(&cmd)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    /// The beam.smp PID (erl execs erlexec, which execs beam.smp).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
