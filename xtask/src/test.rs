//! `cargo xtask test`: every tier, in one build. Privileged tiers (eBPF, real nodes) fail rather
//! than skip under CI or as root, so a green run means they ran.
use crate::{setup, shell};

/// Runs formatting and lint checks, then all tests of the workspace in release mode.
pub fn run() -> anyhow::Result<()> {
    shell::step("format check");
    shell::run(shell::cargo().args(["fmt", "--all", "--check"]))?;
    shell::step("lints");
    shell::run(
        shell::cargo()
            .args([
                "clippy",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env_remove("AYA_BUILD_SKIP"),
    )?;
    let require = std::env::var_os("CI").is_some() || setup::is_root();
    shell::step(&format!(
        "tests: unit, replay, eBPF and end to end{}",
        if require {
            " (privileged tiers required)"
        } else {
            " (privileged tiers skip without root)"
        }
    ));
    let mut test = shell::cargo();
    test.args(["test", "--release", "--no-fail-fast"])
        .env_remove("AYA_BUILD_SKIP");
    if require {
        test.env("LEAKTRACE_REQUIRE_PRIVILEGED", "1");
    }
    shell::run(&mut test)?;
    shell::step("all test tiers passed");
    Ok(())
}
