//! Privilege check, done before anything touches the kernel or the target: it names what is
//! missing, capability by capability, and how to grant it.
//!
//! What tracing needs:
//! - CAP_BPF to load the eBPF programs and create their maps (CAP_SYS_ADMIN covers it);
//! - CAP_PERFMON to open the uprobe perf events (CAP_SYS_ADMIN covers it). Linux 6.16 (commit
//!   ba677dbe77af, "perf: Revert to requiring CAP_SYS_ADMIN for uprobes", backported to the
//!   stable kernels in July 2025) takes that back: uprobes need CAP_SYS_ADMIN itself. Which rule
//!   the running kernel applies is asked of the kernel (see [`uprobes_need_sys_admin`]);
//! - CAP_SYS_PTRACE to read the memory, maps and pagemap of a process whose capabilities are not
//!   a subset of ours (every root-owned beam.smp) or that belongs to another user;
//! - as a user other than root, write access to the lock directory (see [`crate::lock`]); and
//!   CAP_DAC_READ_SEARCH for the carriers' residency (/proc/PID/pagemap is mode 0400, owned by
//!   the target's user), which is optional: without it the run warns and goes on.

use std::{ffi::CString, fs, path::Path};

use crate::error::Error;

/// `PERF_FLAG_FD_CLOEXEC` of perf_event_open(2).
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// Lock directory of [`crate::lock`]: a user other than root must be able to create files in it.
const LOCK_DIR: &str = "/run/leaktrace";

/// A capability tracing may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Bit number in the capability sets.
    pub bit: u32,
    /// Its name, as in capabilities(7).
    pub name: &'static str,
    /// Its name for setpriv and setcap (`cap_` + this).
    short: &'static str,
    /// What leaktrace does with it.
    pub why: &'static str,
}

/// CAP_SYS_PTRACE: read another process's memory and maps.
pub const CAP_SYS_PTRACE: Capability = Capability {
    bit: 19,
    name: "CAP_SYS_PTRACE",
    short: "sys_ptrace",
    why: "to read the target's memory and maps",
};
/// CAP_SYS_ADMIN: implies CAP_BPF and CAP_PERFMON; since Linux 6.16 required for uprobes.
pub const CAP_SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    short: "sys_admin",
    why: "to attach uprobes: this kernel allows them only with CAP_SYS_ADMIN, as Linux 6.16+ and the stable kernels patched since July 2025 do",
};
/// CAP_PERFMON: open perf events (uprobes, before Linux 6.16).
pub const CAP_PERFMON: Capability = Capability {
    bit: 38,
    name: "CAP_PERFMON",
    short: "perfmon",
    why: "to attach uprobes",
};
/// CAP_BPF: load eBPF programs and create maps.
pub const CAP_BPF: Capability = Capability {
    bit: 39,
    name: "CAP_BPF",
    short: "bpf",
    why: "to load the eBPF programs",
};

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

fn has(caps: u64, cap: Capability) -> bool {
    caps & (1u64 << cap.bit) != 0
}

/// The capabilities tracing needs on a kernel where uprobes need CAP_SYS_ADMIN (`admin_uprobes`)
/// or only CAP_PERFMON.
pub fn needed(admin_uprobes: bool) -> Vec<Capability> {
    if admin_uprobes {
        vec![CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE]
    } else {
        vec![CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE]
    }
}

/// What capability set `caps` lacks to load uprobes and read another process's memory, on a
/// kernel where uprobes need CAP_SYS_ADMIN (`admin_uprobes`) or only CAP_PERFMON.
pub fn missing(caps: u64, admin_uprobes: bool) -> Vec<Capability> {
    let admin = has(caps, CAP_SYS_ADMIN);
    let mut out = Vec::new();
    // CAP_SYS_ADMIN covers BPF and perf on every kernel; since 5.8 CAP_BPF + CAP_PERFMON do
    // too, except uprobes since 6.16.
    if !admin {
        for cap in [CAP_BPF, CAP_PERFMON] {
            if !has(caps, cap) {
                out.push(cap);
            }
        }
        if admin_uprobes {
            out.push(CAP_SYS_ADMIN);
        }
    }
    // Reading /proc/PID/mem of a process with more capabilities than ours, or of another
    // user's, needs CAP_SYS_PTRACE.
    if !has(caps, CAP_SYS_PTRACE) {
        out.push(CAP_SYS_PTRACE);
    }
    out
}

/// Whether capability set `caps` allows tracing on a kernel where uprobes need CAP_SYS_ADMIN
/// (`admin_uprobes`) or only CAP_PERFMON.
pub fn caps_suffice(caps: u64, admin_uprobes: bool) -> bool {
    missing(caps, admin_uprobes).is_empty()
}

/// Whether this kernel refuses uprobes to a process holding CAP_PERFMON without CAP_SYS_ADMIN.
///
/// With CAP_PERFMON and without CAP_SYS_ADMIN, asks the kernel: a uprobe perf event on a path
/// that does not exist fails with EACCES at the capability check, before the path is looked up
/// (ENOENT), so nothing is ever placed. Otherwise the answer cannot be had that way and the
/// kernel version decides (6.16+), which misses older kernels with the backport; with
/// CAP_SYS_ADMIN the answer only shapes the advice given with another missing capability.
fn uprobes_need_sys_admin(caps: u64) -> bool {
    if has(caps, CAP_PERFMON)
        && !has(caps, CAP_SYS_ADMIN)
        && let Some(denied) = uprobe_perf_event_denied()
    {
        return denied;
    }
    kernel_at_least(6, 16)
}

/// Opens a uprobe perf event on a missing file for this process: `Some(true)` when refused for
/// lack of privilege, `Some(false)` when the kernel got past the check, `None` when there is
/// no uprobe PMU to ask.
fn uprobe_perf_event_denied() -> Option<bool> {
    let pmu_type: u32 = fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let path = CString::new("/proc/self/leaktrace-privilege-check/none").ok()?;
    // struct perf_event_attr, PERF_ATTR_SIZE_VER5 (112 bytes) in u64 words: type and size in
    // word 0, flags in word 5, config1 (uprobe_path) in word 7, config2 (probe_offset) in word 8.
    let mut attr = [0u64; 14];
    attr[0] = u64::from(pmu_type) | (112u64 << 32);
    // disabled, exclude_kernel (no kernel profiling check in the way), exclude_hv.
    attr[5] = 1 | (1 << 5) | (1 << 6);
    attr[7] = path.as_ptr() as u64;
    // SAFETY: attr is a valid perf_event_attr of the size it declares; path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            0 as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return Some(false);
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    Some(errno == Some(libc::EACCES))
}

/// Whether the running kernel's version is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

/// Whether this process may create its lock file: in [`LOCK_DIR`], or in /run when the
/// directory is still to be made. Root passes by its capabilities.
fn lock_dir_writable() -> bool {
    let dir = if Path::new(LOCK_DIR).is_dir() {
        LOCK_DIR
    } else {
        "/run"
    };
    let Ok(c) = CString::new(dir) else {
        return false;
    };
    // SAFETY: c is a valid C string.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

/// The error naming `missing` of `needed`, with how to grant them.
fn not_privileged(needed: &[Capability], missing: &[Capability]) -> Error {
    let names: Vec<&str> = needed.iter().map(|c| c.name).collect();
    let short: Vec<&str> = needed.iter().map(|c| c.short).collect();
    let plus = short
        .iter()
        .map(|s| format!("+{s}"))
        .collect::<Vec<_>>()
        .join(",");
    let setcap = short
        .iter()
        .map(|s| format!("cap_{s}"))
        .collect::<Vec<_>>()
        .join(",");
    Error::NotPrivileged {
        needed: join_and(&names),
        missing: missing
            .iter()
            .map(|c| format!("{} ({})", c.name, c.why))
            .collect::<Vec<_>>()
            .join(", "),
        fix: format!(
            "run it with sudo; or as root with only these: `sudo setpriv --bounding-set=-all,{plus} --inh-caps=-all -- leaktrace ...`; or as another user: `sudo setpriv --reuid=USER --init-groups --inh-caps=-all,{plus} --ambient-caps=-all,{plus} -- leaktrace ...` (or `sudo setcap {setcap}+ep $(command -v leaktrace)`)"
        ),
    }
}

fn join_and(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Fails with [`Error::NotPrivileged`], naming each missing capability (or the lock
/// directory), unless this process may trace.
pub fn require() -> Result<(), Error> {
    let caps = effective_caps();
    let admin_uprobes = uprobes_need_sys_admin(caps);
    let missing = missing(caps, admin_uprobes);
    if !missing.is_empty() {
        return Err(not_privileged(&needed(admin_uprobes), &missing));
    }
    if !lock_dir_writable() {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        return Err(Error::NotPrivileged {
            needed: format!("write access to its lock directory {LOCK_DIR}"),
            missing: format!("write access to {LOCK_DIR} for uid {uid}"),
            fix: format!(
                "run it as uid 0 with only the capabilities: `sudo setpriv --bounding-set=-all,{caps} --inh-caps=-all -- leaktrace ...`; or, on a host where only uid {uid} traces, give it the directory: `sudo install -d -m 0700 -o {uid} {LOCK_DIR}` (root's runs then refuse that directory)",
                caps = needed(admin_uprobes)
                    .iter()
                    .map(|c| format!("+{}", c.short))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dropping what is no longer needed

/// Capability names by bit number, as in capabilities(7) (Linux 5.9+: up to
/// CAP_CHECKPOINT_RESTORE).
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Bit of a capability by its name.
fn bit(name: &str) -> u32 {
    CAP_NAMES
        .iter()
        .position(|n| *n == name)
        .expect("a capability of CAP_NAMES") as u32
}

/// The set of the named capabilities.
fn mask(names: &[&str]) -> u64 {
    names.iter().fold(0, |m, n| m | (1u64 << bit(n)))
}

/// Names of the capabilities in `mask`, lowest bit first (`CAP_40+1` past the table).
pub fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            CAP_NAMES
                .get(b as usize)
                .map_or_else(|| format!("CAP_{b}"), |n| (*n).to_owned())
        })
        .collect()
}

/// What a tracing thread keeps once its probes are placed: reading the target's memory, maps
/// and pagemap (`/proc/PID/mem` is 0600 and needs ptrace access: CAP_SYS_PTRACE with
/// CAP_DAC_READ_SEARCH), and opening its objects through `/proc/PID/map_files` to name
/// allocation sites (CAP_CHECKPOINT_RESTORE, which the kernel accepts there instead of
/// CAP_SYS_ADMIN since Linux 5.9).
pub fn tracing_keeps() -> u64 {
    mask(&[
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
        "CAP_CHECKPOINT_RESTORE",
    ])
}

/// What placing probes needs on top (loading programs, opening uprobe perf events), kept
/// while probes may still attach later in the run (`--native auto` before it triggers,
/// `--blocks sampled`, whose windows re-attach their probes).
pub fn attaching_keeps() -> u64 {
    mask(&["CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON"])
}

/// Stopping a command started as another user (`run --user`).
pub fn stopping_keeps() -> u64 {
    mask(&["CAP_KILL"])
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two words.
const CAP_V3: u32 = 0x2008_0522;

/// Permitted and effective sets of the calling thread.
fn thread_sets() -> std::io::Result<(u64, u64)> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and two data words, as capget(2) asks.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].permitted, data[1].permitted),
        join(data[0].effective, data[1].effective),
    ))
}

/// Effective capabilities of the calling thread.
pub fn thread_effective() -> u64 {
    thread_sets().map_or(0, |(_, e)| e)
}

/// Reduces the calling thread's capabilities to `keep` (those of it it holds): permitted and
/// effective sets, no inheritable or ambient ones, and the bounding set cut to match, so that
/// nothing it runs later gets them back. Capabilities are per thread on Linux: threads created
/// afterwards inherit the reduced sets, threads that exist already keep theirs (each drops its
/// own). Returns the effective set now held.
pub fn keep_only(keep: u64) -> std::io::Result<u64> {
    let (permitted, _) = thread_sets()?;
    let kept = keep & permitted;
    for b in 0..64u64 {
        if kept & (1 << b) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only. Bits the kernel does not know fail with
        // EINVAL; without CAP_SETPCAP the bounding set stays (permitted still shrinks).
        unsafe {
            if libc::prctl(libc::PR_CAPBSET_READ, b as libc::c_ulong, 0, 0, 0) == 1 {
                libc::prctl(libc::PR_CAPBSET_DROP, b as libc::c_ulong, 0, 0, 0);
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: kept as u32,
            permitted: kept as u32,
            inheritable: 0,
        },
        CapData {
            effective: (kept >> 32) as u32,
            permitted: (kept >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: a v3 header and two data words, as capset(2) asks.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(thread_effective())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_match_their_bits() {
        assert_eq!(names(1 << 21), ["CAP_SYS_ADMIN"]);
        assert_eq!(bit("CAP_BPF"), CAP_BPF.bit);
        assert_eq!(bit("CAP_PERFMON"), CAP_PERFMON.bit);
        assert_eq!(bit("CAP_SYS_PTRACE"), CAP_SYS_PTRACE.bit);
        assert_eq!(
            names(tracing_keeps()),
            [
                "CAP_DAC_READ_SEARCH",
                "CAP_SYS_PTRACE",
                "CAP_CHECKPOINT_RESTORE"
            ]
        );
        assert_eq!(names(1 << 45), ["CAP_45"]);
    }

    #[test]
    fn a_thread_drops_what_it_does_not_keep() {
        // In a thread of its own: capabilities are per thread, the others keep theirs.
        let before = thread_effective();
        let (now, after_in_thread) = std::thread::spawn(|| {
            let now = keep_only(mask(&["CAP_SYS_PTRACE"])).unwrap();
            (now, thread_effective())
        })
        .join()
        .unwrap();
        assert_eq!(now, after_in_thread);
        assert_eq!(now, before & mask(&["CAP_SYS_PTRACE"]));
        assert_eq!(
            thread_effective(),
            before,
            "the calling thread keeps its own"
        );
    }

    fn set(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |s, c| s | (1 << c.bit))
    }

    #[test]
    fn capability_sets() {
        for admin_uprobes in [false, true] {
            assert!(!caps_suffice(0, admin_uprobes));
            assert!(caps_suffice(u64::MAX, admin_uprobes));
            assert!(caps_suffice(
                set(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE]),
                admin_uprobes
            ));
            assert!(!caps_suffice(set(&[CAP_BPF, CAP_PERFMON]), admin_uprobes));
        }
        let three = set(&[CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE]);
        assert!(caps_suffice(three, false));
        assert!(!caps_suffice(three, true));
    }

    #[test]
    fn each_missing_capability_is_named() {
        let three = [CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE];
        for drop in three {
            let caps = set(&three) & !(1 << drop.bit);
            assert_eq!(missing(caps, false), vec![drop]);
            let with_admin_rule = missing(caps, true);
            assert!(with_admin_rule.contains(&drop), "{with_admin_rule:?}");
        }
        assert_eq!(missing(set(&three), true), vec![CAP_SYS_ADMIN]);
        assert_eq!(
            missing(set(&[CAP_SYS_ADMIN]), true),
            vec![CAP_SYS_PTRACE],
            "CAP_SYS_ADMIN implies CAP_BPF and CAP_PERFMON"
        );
        assert_eq!(
            missing(0, true),
            vec![CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE]
        );
    }

    #[test]
    fn message_names_the_missing_and_how_to_grant() {
        let msg = not_privileged(&needed(false), &[CAP_PERFMON]).to_string();
        assert!(msg.contains("needs root"), "{msg}");
        assert!(
            msg.contains("missing: CAP_PERFMON (to attach uprobes)"),
            "{msg}"
        );
        assert!(
            msg.contains("--bounding-set=-all,+bpf,+perfmon,+sys_ptrace --inh-caps=-all"),
            "{msg}"
        );
        assert!(
            msg.contains("cap_bpf,cap_perfmon,cap_sys_ptrace+ep"),
            "{msg}"
        );
        assert_eq!(join_and(&["a", "b", "c"]), "a, b and c");
    }

    #[test]
    fn uprobe_check_places_nothing() {
        // Runs as whoever runs the tests: either answer is fine, it must just not fail or leave
        // an event behind (the path does not exist).
        let _ = uprobe_perf_event_denied();
        assert!(kernel_at_least(2, 6));
        assert!(!kernel_at_least(99, 0));
    }
}
