//! The traced process: checks that a PID is a live beam.smp and reads what the report needs
//! (executable, OTP release, node name) from procfs.

pub mod breakdown;
pub mod glibc_heap;
pub mod open;
pub mod perf_map;

use std::{
    fs,
    io::{self, Read},
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
    /// Why the OTP release is unknown (a refused or missing `OTP_VERSION`), for the report.
    pub otp_release_unknown: Option<String>,
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
    let (otp_release, otp_release_unknown) = match otp_release(pid, &exe, &cmdline) {
        Ok(release) => (Some(release), None),
        Err(why) => (None, Some(why)),
    };
    Ok(TargetProcess {
        pid,
        image: PathBuf::from(format!("/proc/{pid}/exe")),
        otp_release,
        otp_release_unknown,
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

/// Most entries of a `releases` directory looked at.
const RELEASES_CAP: usize = 64;
/// Largest `OTP_VERSION` file read.
const OTP_VERSION_CAP: u64 = 64;
/// Largest `/proc/PID/maps` read: a target with millions of mappings cannot make the tracer
/// read (and hold) without end.
pub const MAPS_CAP: u64 = 16 << 20;

/// `/proc/PID/maps` of `pid`, at most [`MAPS_CAP`] bytes (a cut last line is dropped).
pub fn maps_text(pid: u32) -> io::Result<String> {
    let mut raw = Vec::new();
    fs::File::open(format!("/proc/{pid}/maps"))?
        .take(MAPS_CAP)
        .read_to_end(&mut raw)?;
    if raw.len() as u64 == MAPS_CAP
        && let Some(end) = raw.iter().rposition(|b| *b == b'\n')
    {
        raw.truncate(end + 1);
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// OTP release of `pid` (e.g. "25"): from `DIR/releases/*/OTP_VERSION`, where DIR is
/// `-root DIR` from its command line, else (or when that gives nothing) the directory above
/// `erts-X/bin` of its executable `exe`. The paths are the node's, so they are opened inside
/// `/proc/PID/root` (its own tree, also in a container) with no symlink followed anywhere,
/// the directory listing is capped, and `OTP_VERSION` is read only if it is a small regular
/// file owned by root or the node's user. The error says why the release is unknown.
pub fn otp_release(pid: u32, exe: &Path, cmdline: &[String]) -> Result<String, open::Refusal> {
    let from_flag = flag_value(cmdline, "-root").map(PathBuf::from);
    let from_exe = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .filter(|dir| from_flag.as_ref() != Some(dir));
    let mut first_refusal = None;
    for otp_root in [from_flag, from_exe].into_iter().flatten() {
        match release_in(pid, &otp_root) {
            Ok(release) => return Ok(release),
            Err(why) => {
                first_refusal.get_or_insert(why);
            }
        }
    }
    Err(first_refusal.unwrap_or_else(|| {
        "no -root on its command line and no OTP directory above its executable".into()
    }))
}

/// The release in `otp_root/releases/*/OTP_VERSION`, as [`otp_release`] reads it.
fn release_in(pid: u32, otp_root: &Path) -> Result<String, open::Refusal> {
    use std::os::fd::AsRawFd;

    use open::{FileRule, open_dir_in_root, read_in_root};

    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let releases = otp_root.join("releases");
    let dir = open_dir_in_root(&root, &releases)
        .map_err(|why| format!("{}: {why}", releases.display()))?;
    let uid = crate::vm::discover::target_uid(pid).ok_or("the node's uid is unreadable")?;
    let rule = FileRule {
        owners: &[0, uid],
        node_uid: uid,
        cap: OTP_VERSION_CAP,
    };
    let entries = fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(|e| format!("{}: cannot be listed ({e})", releases.display()))?;
    let mut last_refusal = None;
    for entry in entries.take(RELEASES_CAP) {
        let Ok(entry) = entry else { continue };
        let file = releases.join(entry.file_name()).join("OTP_VERSION");
        match read_in_root(&root, None, &file, rule) {
            Ok(raw) => {
                let version = String::from_utf8_lossy(&raw);
                let version = version.trim();
                if !version.is_empty()
                    && version.len() < 32
                    && version.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Ok(version.to_owned());
                }
                last_refusal = Some(format!("{}: not a version number", file.display()));
            }
            Err(why) => last_refusal = Some(format!("{}: {why}", file.display())),
        }
    }
    Err(last_refusal.unwrap_or_else(|| format!("{} holds no release", releases.display())))
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
    fn own_release_refusal_names_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let x = dir.path().join("releases/x");
        fs::create_dir_all(&x).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", x.join("OTP_VERSION")).unwrap();
        let root = dir.path().to_str().unwrap();
        let cmd = args(&["beam.smp", "--", "-root", root]);
        let e = otp_release(std::process::id(), Path::new("/nonexistent"), &cmd).unwrap_err();
        assert!(e.contains("OTP_VERSION") && e.contains("symlink"), "{e}");
        fs::remove_file(x.join("OTP_VERSION")).unwrap();
        fs::write(x.join("OTP_VERSION"), "26.1\n").unwrap();
        // Owned by this test's user, which is the process's own uid: accepted.
        assert_eq!(
            otp_release(std::process::id(), Path::new("/nonexistent"), &cmd).as_deref(),
            Ok("26.1")
        );
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
