//! The traced process: checks that a PID is a live beam.smp and reads what the report needs
//! (executable, OTP release, node name) from procfs.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::error::Error;

/// Start time of a process in clock ticks after boot (`/proc/PID/stat` field 22), `None` when
/// it is gone. The pair (PID, start time) names one process for its whole life.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A beam.smp process we may trace.
#[derive(Clone, Debug)]
pub struct TargetProcess {
    /// Process id.
    pub pid: u32,
    /// Resolved path of its executable (may be "(deleted)" after an upgrade).
    pub exe: PathBuf,
    /// Path to attach probes and read symbols through: `/proc/PID/exe` still names the running
    /// binary after a package upgrade replaced the file on disk.
    pub image: PathBuf,
    /// OTP release (e.g. "25"), from `ROOTDIR/releases/*/OTP_VERSION`.
    pub otp_release: Option<String>,
    /// `-sname`/`-name` from the command line.
    pub node: Option<String>,
}

/// True when `exe` is an Erlang emulator binary (`beam.smp`, `beam.debug.smp`, ...).
pub fn is_beam(exe: &Path) -> bool {
    exe.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("beam.") && n.contains("smp"))
}

/// Fails unless `/proc/PID` exists. Works without privileges, so a wrong PID is reported as
/// such before any privilege check.
pub fn require_exists(pid: u32) -> Result<(), Error> {
    if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(Error::NoSuchProcess { pid });
    }
    Ok(())
}

/// Inspects PID: it must exist and run beam.smp.
pub fn inspect(pid: u32) -> Result<TargetProcess, Error> {
    require_exists(pid)?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::NoSuchProcess { pid },
        _ => Error::TargetIo {
            pid,
            what: "the executable (/proc/PID/exe)".into(),
            source,
        },
    })?;
    if !is_beam(&exe) {
        return Err(Error::NotBeam {
            pid,
            exe: exe.display().to_string(),
        });
    }
    let cmdline = read_cmdline(pid).unwrap_or_default();
    // In a container the paths are the container's: read them inside its root.
    let otp_release = if crate::namespace::is_other(pid, "mnt") == Some(true) {
        otp_release_in_root(pid, &exe, &cmdline)
    } else {
        otp_release(&exe, &cmdline)
    };
    Ok(TargetProcess {
        pid,
        image: PathBuf::from(format!("/proc/{pid}/exe")),
        otp_release,
        node: node_name(&cmdline),
        exe,
    })
}

/// The NUL-separated command line of PID.
pub fn read_cmdline(pid: u32) -> io::Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Value following `flag` in an Erlang command line (`-sname foo`).
fn flag_value<'a>(cmdline: &'a [String], flag: &str) -> Option<&'a str> {
    cmdline
        .iter()
        .position(|a| a == flag)
        .and_then(|i| cmdline.get(i + 1))
        .map(String::as_str)
}

/// Node name from `-sname`/`-name`.
pub fn node_name(cmdline: &[String]) -> Option<String> {
    flag_value(cmdline, "-sname")
        .or_else(|| flag_value(cmdline, "-name"))
        .map(str::to_owned)
}

/// OTP release: `-root DIR` from the command line, else the directory above `erts-X/bin`;
/// then the single `DIR/releases/*/OTP_VERSION`.
pub fn otp_release(exe: &Path, cmdline: &[String]) -> Option<String> {
    let root = flag_value(cmdline, "-root")
        .map(PathBuf::from)
        .or_else(|| exe.parent()?.parent()?.parent().map(Path::to_path_buf))?;
    let mut releases = fs::read_dir(root.join("releases")).ok()?;
    releases.find_map(|entry| {
        let version = fs::read_to_string(entry.ok()?.path().join("OTP_VERSION")).ok()?;
        Some(version.trim().to_owned())
    })
}

/// Most entries of a `releases` directory looked at.
const RELEASES_CAP: usize = 64;
/// Largest `OTP_VERSION` file read.
const OTP_VERSION_CAP: u64 = 64;

/// [`otp_release`] of a target in another mount namespace: the directories are the
/// container's, opened inside `/proc/PID/root` with no symlink followed, and `OTP_VERSION`
/// read only if it is a small regular file owned by root or the node's user.
pub fn otp_release_in_root(pid: u32, exe: &Path, cmdline: &[String]) -> Option<String> {
    use std::os::fd::AsRawFd;

    use crate::vm::discover::{FileRule, open_dir_in_root, read_in_root};

    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let otp_root = flag_value(cmdline, "-root")
        .map(PathBuf::from)
        .or_else(|| exe.parent()?.parent()?.parent().map(Path::to_path_buf))?;
    let releases = otp_root.join("releases");
    let dir = open_dir_in_root(&root, &releases).ok()?;
    let uid = crate::vm::discover::target_uid(pid)?;
    let rule = FileRule {
        owners: &[0, uid],
        node_uid: uid,
        cap: OTP_VERSION_CAP,
    };
    fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .ok()?
        .take(RELEASES_CAP)
        .find_map(|entry| {
            let name = entry.ok()?.file_name();
            let file = releases.join(name).join("OTP_VERSION");
            let raw = read_in_root(&root, None, &file, rule).ok()?;
            let version = String::from_utf8(raw).ok()?;
            let version = version.trim();
            (!version.is_empty()
                && version.len() < 32
                && version.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| version.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recognises_emulator_names() {
        assert!(is_beam(Path::new(
            "/usr/lib/erlang/erts-13.1.5/bin/beam.smp"
        )));
        assert!(is_beam(Path::new("/x/beam.debug.smp")));
        assert!(!is_beam(Path::new("/usr/bin/bash")));
        assert!(!is_beam(Path::new(
            "/usr/lib/erlang/erts-13.1.5/bin/erlexec"
        )));
    }

    #[test]
    fn node_name_prefers_sname() {
        let cmd = args(&[
            "beam.smp", "--", "-root", "/r", "-sname", "demo", "-noshell",
        ]);
        assert_eq!(node_name(&cmd).as_deref(), Some("demo"));
        let cmd = args(&["beam.smp", "--", "-name", "a@h.example"]);
        assert_eq!(node_name(&cmd).as_deref(), Some("a@h.example"));
        assert_eq!(node_name(&args(&["beam.smp", "-sname"])), None);
    }

    #[test]
    fn missing_pid_is_reported_as_such() {
        // PID numbers above pid_max (4194304 at most) cannot exist.
        match inspect(99_999_999) {
            Err(Error::NoSuchProcess { pid }) => assert_eq!(pid, 99_999_999),
            other => panic!("expected NoSuchProcess, got {other:?}"),
        }
    }

    #[test]
    fn start_time_names_one_process() {
        let me = start_time(std::process::id()).unwrap();
        assert!(me > 0);
        assert_eq!(start_time(std::process::id()), Some(me));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn own_process_is_not_beam() {
        match inspect(std::process::id()) {
            Err(Error::NotBeam { exe, .. }) => assert!(!exe.is_empty()),
            other => panic!("expected NotBeam, got {other:?}"),
        }
    }
}
