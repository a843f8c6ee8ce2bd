//! Privilege check, done before anything touches the kernel or the target.

use std::fs;

use crate::error::Error;

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process (`CapEff` in /proc/self/status).
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether capability set `caps` allows loading uprobes and reading another process's memory.
pub fn caps_suffice(caps: u64) -> bool {
    let has = |c: u32| caps & (1u64 << c) != 0;
    // CAP_SYS_ADMIN covers BPF and perf on every kernel; since 5.8 CAP_BPF + CAP_PERFMON do too.
    // Reading /proc/PID/mem of another user's process needs CAP_SYS_PTRACE.
    (has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) && has(CAP_SYS_PTRACE)
}

/// Fails with [`Error::NotPrivileged`] unless this process may trace.
pub fn require() -> Result<(), Error> {
    if caps_suffice(effective_caps()) {
        Ok(())
    } else {
        Err(Error::NotPrivileged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        assert!(!caps_suffice(0));
        assert!(caps_suffice(u64::MAX));
        let bpf_perfmon_ptrace = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE);
        assert!(caps_suffice(bpf_perfmon_ptrace));
        assert!(!caps_suffice((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(caps_suffice((1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE)));
    }
}
