//! The target's memory cgroup: what the OOM killer of a container reads. A node's RSS is only
//! part of what its cgroup is charged (page cache of the files it writes, kernel memory,
//! other processes of the container), and the limit applies to the charge: the ledger carries
//! the cgroup's figures beside RSS.
//!
//! The cgroup is the target's line in `/proc/PID/cgroup` for the memory controller, found in
//! the hierarchy where leaktrace's own `/proc/self/mountinfo` has that controller mounted:
//! - cgroup v2 (`0::/path`, a `cgroup2` mount whose `cgroup.controllers` lists `memory`):
//!   `memory.current`, and `anon` / `file` of `memory.stat`;
//! - cgroup v1 (`N:memory:/path`, a `cgroup` mount with the `memory` option):
//!   `memory.usage_in_bytes`, and `total_rss` / `total_cache` of `memory.stat` (this cgroup
//!   and its children, as the usage counts them).
//!
//! The root cgroup (the whole machine) and a missing memory controller give no figures, and the
//! report says why. Every read is capped.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use crate::recording::Recording;

/// Largest `/proc/self/mountinfo` read.
const MOUNTINFO_CAP: u64 = 4 << 20;
/// Largest `/proc/PID/cgroup` read.
const PROC_CGROUP_CAP: u64 = 64 * 1024;
/// Largest cgroup file read (`memory.stat` is about 1.5 KiB).
const CGROUP_FILE_CAP: u64 = 64 * 1024;

/// Which cgroup hierarchy holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1, a hierarchy of its own for `memory`.
    V1,
    /// cgroup v2, the unified hierarchy.
    V2,
}

impl Version {
    fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A mounted cgroup hierarchy that may hold the memory controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// v1 (with the `memory` option) or v2.
    pub version: Version,
    /// The cgroup the mount shows at its top (`/` unless leaktrace runs in a cgroup namespace
    /// or the mount is a bind of a sub-tree).
    pub root: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = field
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts of a `/proc/self/mountinfo` text: v1 mounts with the `memory` option,
/// and every cgroup2 mount (whether it has the memory controller is read from the mount).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (root, mountpoint) = (fields.get(3)?, fields.get(4)?);
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next()?;
            let options = after.next().unwrap_or("");
            let version = match fstype {
                "cgroup" if options.split(',').any(|o| o == "memory") => Version::V1,
                "cgroup2" => Version::V2,
                _ => return None,
            };
            Some(Mount {
                version,
                root: unescape(root),
                mountpoint: PathBuf::from(unescape(mountpoint)),
            })
        })
        .collect()
}

/// The target's cgroup path for `version` from a `/proc/PID/cgroup` text: the line naming the
/// `memory` controller (v1) or the unified line `0::` (v2).
pub fn parse_proc_cgroup(text: &str, version: Version) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
            Version::V2 => id == "0" && controllers.is_empty(),
        };
        wanted.then(|| path.to_owned())
    })
}

fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    let mut text = String::new();
    File::open(path)?.take(cap).read_to_string(&mut text)?;
    Ok(text)
}

/// The hierarchy holding the memory controller, as leaktrace's mount table shows it: a v1
/// `memory` mount, else a cgroup2 mount that offers `memory`. Read once: the mounts of
/// leaktrace do not change while it runs.
fn memory_mount() -> Result<&'static Mount, &'static str> {
    static MOUNT: OnceLock<Result<Mount, &'static str>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let text = read_capped(Path::new("/proc/self/mountinfo"), MOUNTINFO_CAP)
                .map_err(|_| "/proc/self/mountinfo is unreadable")?;
            let mounts = parse_mountinfo(&text);
            if let Some(v1) = mounts.iter().find(|m| m.version == Version::V1) {
                return Ok(v1.clone());
            }
            mounts
                .into_iter()
                .find(|m| {
                    m.version == Version::V2
                        && read_capped(&m.mountpoint.join("cgroup.controllers"), CGROUP_FILE_CAP)
                            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
                })
                .ok_or("no memory cgroup controller is mounted (neither a cgroup v1 memory hierarchy nor cgroup2 with memory)")
        })
        .as_ref()
        .map_err(|e| *e)
}

/// The version and mount point of the hierarchy holding the memory controller, as leaktrace
/// sees it; the error says why there is none.
pub fn memory_hierarchy() -> Result<(Version, PathBuf), String> {
    memory_mount()
        .map(|m| (m.version, m.mountpoint.clone()))
        .map_err(str::to_owned)
}

/// Where the target's memory cgroup is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// v1 or v2.
    pub version: Version,
    /// The cgroup, as `/proc/PID/cgroup` names it.
    pub cgroup: String,
    /// Its directory.
    pub dir: PathBuf,
}

impl Location {
    /// "cgroup v2 /system.slice/app.service (/sys/fs/cgroup/system.slice/app.service)".
    pub fn describe(&self) -> String {
        format!(
            "cgroup {} {} ({})",
            self.version.as_str(),
            crate::vm::epmd::printable(&self.cgroup),
            crate::vm::epmd::printable(&self.dir.display().to_string())
        )
    }
}

/// The directory of `cgroup` under `mount`, refusing paths that would leave it.
pub fn cgroup_dir(mount: &Mount, cgroup: &str) -> Result<PathBuf, String> {
    if cgroup.ends_with(" (deleted)") {
        return Err(format!("the cgroup {cgroup} was removed"));
    }
    let rel = if mount.root == "/" {
        cgroup
    } else {
        cgroup
            .strip_prefix(mount.root.as_str())
            .filter(|r| r.is_empty() || r.starts_with('/'))
            .ok_or_else(|| {
                format!(
                    "the cgroup {cgroup} is outside what leaktrace's mount of the hierarchy shows ({})",
                    mount.root
                )
            })?
    };
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(format!(
            "the cgroup path {cgroup} is not a plain path: refused"
        ));
    }
    if parts.is_empty() && mount.root == "/" {
        return Err(format!(
            "the target is in the root memory cgroup ({}): its figures are the whole machine's, not a container's",
            mount.version.as_str()
        ));
    }
    Ok(parts
        .iter()
        .fold(mount.mountpoint.clone(), |d, p| d.join(p)))
}

/// Finds the memory cgroup of `pid`; the error says why there is none to read.
pub fn locate(pid: u32) -> Result<Location, String> {
    let mount = memory_mount().map_err(str::to_owned)?;
    let text = read_capped(Path::new(&format!("/proc/{pid}/cgroup")), PROC_CGROUP_CAP)
        .map_err(|e| format!("/proc/{pid}/cgroup is unreadable ({e})"))?;
    let cgroup = parse_proc_cgroup(&text, mount.version).ok_or_else(|| {
        format!(
            "/proc/{pid}/cgroup has no {} memory line",
            mount.version.as_str()
        )
    })?;
    let dir = cgroup_dir(mount, &cgroup)?;
    Ok(Location {
        version: mount.version,
        cgroup,
        dir,
    })
}

/// One reading of a memory cgroup, bytes; `None` where a file or key was missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// What the cgroup is charged: `memory.current` (v2), `memory.usage_in_bytes` (v1).
    pub memory: Option<u64>,
    /// Anonymous memory: `anon` (v2), `total_rss` (v1).
    pub anon: Option<u64>,
    /// Page cache, shared memory included: `file` (v2), `total_cache` (v1).
    pub file: Option<u64>,
}

/// The value of `key` in a `memory.stat` text.
pub fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A byte figure no machine exceeds: a larger value is not a reading (v1 reports
/// "unlimited" as 2^63 rounded to pages, for one).
const PLAUSIBLE_MAX: u64 = 1 << 56;

impl Location {
    /// Reads the figures now.
    pub fn read(&self) -> Figures {
        let file = |name: &str| read_capped(&self.dir.join(name), CGROUP_FILE_CAP).ok();
        let (usage, anon_key, file_key) = match self.version {
            Version::V2 => ("memory.current", "anon", "file"),
            Version::V1 => ("memory.usage_in_bytes", "total_rss", "total_cache"),
        };
        let stat = file("memory.stat").unwrap_or_default();
        let sane = |v: Option<u64>| v.filter(|v| *v < PLAUSIBLE_MAX);
        Figures {
            memory: sane(file(usage).and_then(|t| t.trim().parse().ok())),
            anon: sane(stat_value(&stat, anon_key)),
            file: sane(stat_value(&stat, file_key)),
        }
    }
}

/// The memory cgroup figures of `pid` now (all `None` without a readable cgroup). The cgroup
/// is looked up every time: a process can be moved to another one.
pub fn read(pid: u32) -> Figures {
    locate(pid).map(|l| l.read()).unwrap_or_default()
}

/// The report's lines about the cgroup: where it is and its figures at the start and the end
/// beside RSS (nothing when no sample has them).
pub fn ledger_lines(r: &Recording) -> Vec<String> {
    let measured: Vec<_> = r
        .samples
        .iter()
        .filter(|s| s.cgroup_memory.is_some())
        .collect();
    let (Some(first), Some(last)) = (measured.first(), measured.last()) else {
        return Vec::new();
    };
    let b = |v: Option<u64>| v.map_or("—".into(), |v| crate::units::human_bytes(v as f64));
    vec![format!(
        "{}: memory {} → {} (anon {}, file {} at the end), beside RSS {} → {}: the cgroup's charge is what its limit and the OOM killer read",
        r.target.cgroup.as_deref().unwrap_or("cgroup"),
        b(first.cgroup_memory),
        b(last.cgroup_memory),
        b(last.cgroup_anon),
        b(last.cgroup_file),
        b(first.rss),
        b(last.rss),
    )]
}

/// [`ledger_lines`] each escaped by `escape` and led by `prefix`, for the terminal summary
/// and report.md (one call beside where they show RSS).
pub fn render(r: &Recording, prefix: &str, escape: fn(&str) -> String) -> String {
    ledger_lines(r)
        .iter()
        .map(|l| format!("{prefix}{}", escape(l)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:40 /kube/pod\\0401 /mnt/my\\040cg rw - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mountinfo_finds_memory_v1_and_cgroup2_mounts() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(
            m,
            vec![
                Mount {
                    version: Version::V1,
                    root: "/".into(),
                    mountpoint: "/sys/fs/cgroup/memory".into()
                },
                Mount {
                    version: Version::V2,
                    root: "/".into(),
                    mountpoint: "/sys/fs/cgroup/unified".into()
                },
                Mount {
                    version: Version::V2,
                    root: "/kube/pod 1".into(),
                    mountpoint: "/mnt/my cg".into()
                },
            ]
        );
        assert!(parse_mountinfo("garbage\n1 2 3\n").is_empty());
    }

    #[test]
    fn proc_cgroup_lines_by_version() {
        let text =
            "9:name=systemd:/\n4:memory,hugetlb:/docker/abc\n1:cpu:/\n0::/system.slice/x.service\n";
        assert_eq!(
            parse_proc_cgroup(text, Version::V1).as_deref(),
            Some("/docker/abc")
        );
        assert_eq!(
            parse_proc_cgroup(text, Version::V2).as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(parse_proc_cgroup("0::/\n", Version::V1), None);
    }

    #[test]
    fn cgroup_dirs_stay_inside_the_mount() {
        let v2 = Mount {
            version: Version::V2,
            root: "/".into(),
            mountpoint: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            cgroup_dir(&v2, "/system.slice/a.service").unwrap(),
            PathBuf::from("/sys/fs/cgroup/system.slice/a.service")
        );
        let root = cgroup_dir(&v2, "/").unwrap_err();
        assert!(root.contains("root memory cgroup"), "{root}");
        assert!(cgroup_dir(&v2, "/a/../../etc").is_err());
        assert!(cgroup_dir(&v2, "/a (deleted)").is_err());
        let sub = Mount {
            version: Version::V2,
            root: "/kube".into(),
            mountpoint: "/cg".into(),
        };
        assert_eq!(
            cgroup_dir(&sub, "/kube/pod1").unwrap(),
            PathBuf::from("/cg/pod1")
        );
        // Inside a cgroup namespace's own top, the top is a cgroup like any other.
        assert_eq!(cgroup_dir(&sub, "/kube").unwrap(), PathBuf::from("/cg"));
        assert!(cgroup_dir(&sub, "/kubelet/x").is_err());
        assert!(cgroup_dir(&sub, "/other").is_err());
    }

    #[test]
    fn stat_keys() {
        let stat = "cache 373596160\nrss 420335616\ntotal_cache 1\ntotal_rss 2\nanon 5\nfile x\n";
        assert_eq!(stat_value(stat, "total_rss"), Some(2));
        assert_eq!(stat_value(stat, "rss"), Some(420335616));
        assert_eq!(stat_value(stat, "anon"), Some(5));
        assert_eq!(stat_value(stat, "file"), None);
        assert_eq!(stat_value(stat, "total"), None);
    }

    #[test]
    fn ledger_lines_show_the_cgroup_beside_rss_and_old_recordings_none() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/recordings/healthy.json");
        let mut r = Recording::read(&path).expect("recording");
        // A recording made before the cgroup lines existed reads, and shows none.
        assert!(ledger_lines(&r).is_empty());
        assert_eq!(render(&r, "\n  cgroup: ", str::to_owned), "");
        r.target.cgroup = Some("cgroup v2 /kube/pod1 (/sys/fs/cgroup/kube/pod1)".into());
        let n = r.samples.len() as u64;
        for (i, s) in r.samples.iter_mut().enumerate() {
            s.cgroup_memory = Some((100 + i as u64) << 20);
            s.cgroup_anon = Some(60 << 20);
            s.cgroup_file = Some(30 << 20);
        }
        let lines = ledger_lines(&r);
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert!(line.starts_with("cgroup v2 /kube/pod1"), "{line}");
        assert!(line.contains("memory 100.0 MiB → "), "{line}");
        assert!(line.contains(&format!("{}.0 MiB", 100 + n - 1)), "{line}");
        assert!(line.contains("anon 60.0 MiB, file 30.0 MiB"), "{line}");
        assert!(line.contains("beside RSS"), "{line}");
        assert_eq!(render(&r, "> ", str::to_owned), format!("> {line}"));
    }

    #[test]
    fn own_cgroup_reads_plausibly_when_there_is_one() {
        match locate(std::process::id()) {
            Ok(l) => {
                let f = l.read();
                let memory = f.memory.expect("memory figure of a located cgroup");
                assert!(memory > 0, "{l:?} {f:?}");
                assert!(f.anon.is_some() && f.file.is_some(), "{l:?} {f:?}");
                assert!(l.describe().contains(&l.cgroup));
            }
            Err(why) => eprintln!("no memory cgroup here: {why}"),
        }
        assert_eq!(read(99_999_999), Figures::default());
    }
}
