//! Shared gate for privileged tiers: skip with a printed reason when not privileged, fail
//! instead when LEAKTRACE_REQUIRE_PRIVILEGED=1 (CI sets it), so CI never passes on skips.

/// True when the test should run; prints why and returns false when it may skip.
pub fn privileged(test: &str) -> bool {
    if leaktrace::privilege::require().is_ok() {
        return true;
    }
    if std::env::var("LEAKTRACE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!(
            "{test}: needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE) and LEAKTRACE_REQUIRE_PRIVILEGED=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: not privileged (run as root to load eBPF programs)");
    false
}
