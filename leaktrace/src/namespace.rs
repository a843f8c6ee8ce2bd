//! The target's namespaces. A node in a container (Docker, Kubernetes, `unshare`) runs in its
//! own PID, mount, network and UTS namespaces and is traced from the host by its host PID:
//! - files it maps are named by paths of its own mount namespace, opened here through
//!   `/proc/PID/map_files` (the very file mapped) or `/proc/PID/root` ([`host_path`]);
//! - its 127.0.0.1 is the container's loopback, reached from a thread of our own that joined
//!   its network (and UTS) namespace with `setns` ([`in_target_namespaces`], [`NetNamespace`]);
//!   a socket stays in the namespace it was created in, so the connection made there can be
//!   used from any thread afterwards;
//! - its PID inside the container is the `NSpid` line of `/proc/PID/status` ([`Container`]).
//!
//! `setns` acts on the calling thread only, so the rest of leaktrace (the tokio runtime, the
//! probes) stays in its own namespaces.

use std::{
    fs::{self, File},
    io::Read,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

/// Largest `/proc/PID/status` read for the `NSpid` line.
const STATUS_CAP: u64 = 64 * 1024;

/// Why a namespace of the target could not be entered. Messages say what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NamespaceError {
    /// `/proc/PID/ns/KIND` could not be opened or joined.
    #[error(
        "cannot enter the {kind} namespace of PID {pid} ({reason}): leaktrace needs CAP_SYS_ADMIN to join a container's namespaces; run it as root, or inside the container's namespaces (nsenter -t {pid} -n -u leaktrace ...)"
    )]
    Enter {
        /// The target.
        pid: u32,
        /// `net` or `uts`.
        kind: &'static str,
        /// The system's reason.
        reason: String,
    },
    /// The namespace found at discovery is no longer the target's.
    #[error(
        "the network namespace of PID {pid} changed since its node was found (the process was replaced?): run leaktrace again"
    )]
    Changed {
        /// The target.
        pid: u32,
    },
    /// The thread that joins the namespace could not run.
    #[error("cannot start a thread to enter the namespaces of PID {pid}: {reason}")]
    Thread {
        /// The target.
        pid: u32,
        /// Why.
        reason: String,
    },
}

/// Device and inode of `/proc/{who}/ns/{kind}`: the identity of one namespace.
fn ns_id(who: &str, kind: &str) -> Option<(u64, u64)> {
    let meta = fs::metadata(format!("/proc/{who}/ns/{kind}")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether `pid` lives in another namespace of `kind` (`net`, `mnt`, `pid`, `uts`) than
/// leaktrace; `None` when either side cannot be read (the process is gone, or no privilege).
pub fn is_other(pid: u32, kind: &str) -> Option<bool> {
    Some(ns_id("self", kind)? != ns_id(&pid.to_string(), kind)?)
}

/// The path leaktrace opens to reach the file `path` that `pid` maps (`path` as the target
/// sees it, from `/proc/PID/maps`). In another mount namespace, the link
/// `/proc/PID/map_files/START-END` of a mapping of that path: the kernel resolves it to the
/// very file mapped, with no path walk in the container's tree at all (it needs
/// CAP_SYS_ADMIN, which uprobes on such kernels need anyway). Else, or when no such mapping is
/// readable, `/proc/PID/root/PATH`, which also covers a chroot.
pub fn host_path(pid: u32, path: &str) -> PathBuf {
    if is_other(pid, "mnt") == Some(true)
        && let Some(link) = crate::native::read_maps(pid)
            .into_iter()
            .filter(|m| m.path == path)
            .map(|m| PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)))
            .find(|link| fs::metadata(link).is_ok())
    {
        return link;
    }
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// How a target process is contained, as far as leaktrace cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    /// In another PID namespace.
    pub pid_ns: bool,
    /// In another mount namespace.
    pub mount_ns: bool,
    /// In another network namespace.
    pub net_ns: bool,
    /// In another UTS namespace (its own host name).
    pub uts_ns: bool,
    /// Its PID as the container sees it (innermost `NSpid`), when it differs from the host PID.
    pub inner_pid: Option<u32>,
}

impl Container {
    /// Reads the namespaces of `pid`; unreadable ones count as shared.
    pub fn of(pid: u32) -> Container {
        let other = |kind| is_other(pid, kind) == Some(true);
        Container {
            pid_ns: other("pid"),
            mount_ns: other("mnt"),
            net_ns: other("net"),
            uts_ns: other("uts"),
            inner_pid: inner_pid(pid).filter(|p| *p != pid),
        }
    }

    /// True when the target shares none of the namespaces looked at.
    pub fn is_plain(&self) -> bool {
        !(self.pid_ns || self.mount_ns || self.net_ns || self.uts_ns)
    }

    /// One sentence for the report's source notes (None for a plain process).
    pub fn note(&self, pid: u32) -> Option<String> {
        if self.is_plain() {
            return None;
        }
        let kinds: Vec<&str> = [
            (self.pid_ns, "PID"),
            (self.mount_ns, "mount"),
            (self.net_ns, "network"),
            (self.uts_ns, "UTS"),
        ]
        .into_iter()
        .filter_map(|(other, name)| other.then_some(name))
        .collect();
        let mut note = format!(
            "PID {pid} runs in its own {} namespace{} (a container)",
            kinds.join(", "),
            if kinds.len() == 1 { "" } else { "s" }
        );
        if let Some(inner) = self.inner_pid {
            note.push_str(&format!(", where it is PID {inner}"));
        }
        if self.mount_ns {
            note.push_str(&format!(
                "; its files are read through /proc/{pid}/map_files and /proc/{pid}/root, and named by their paths inside the container"
            ));
        }
        if self.net_ns {
            note.push_str("; the VM connection is made inside its network namespace");
        }
        Some(note)
    }
}

/// The report's source notes about how `pid` is contained, taken at attach: its namespaces
/// (when it is in a container) and why its memory cgroup gives no figures (when it does not).
pub fn container_notes(pid: u32) -> Vec<String> {
    let mut notes: Vec<String> = Container::of(pid).note(pid).into_iter().collect();
    if let Err(why) = crate::cgroup::locate(pid) {
        notes.push(format!(
            "cgroup memory not measured (no cgroup_memory, cgroup_anon, cgroup_file): {why}"
        ));
    }
    notes
}

/// The PID of `pid` inside its innermost PID namespace: the last field of the `NSpid` line of
/// `/proc/PID/status` (Linux 4.1+). `None` when unreadable.
pub fn inner_pid(pid: u32) -> Option<u32> {
    let mut status = String::new();
    File::open(format!("/proc/{pid}/status"))
        .ok()?
        .take(STATUS_CAP)
        .read_to_string(&mut status)
        .ok()?;
    parse_nspid(&status)
}

/// The innermost PID of a `/proc/PID/status` text's `NSpid` line.
pub fn parse_nspid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// A network namespace other than leaktrace's, in which a node listens: held as the PID whose
/// namespace it is plus the namespace's identity, so that joining it later checks it is still
/// the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetNamespace {
    /// The process whose namespace it is.
    pub pid: u32,
    id: (u64, u64),
}

impl NetNamespace {
    /// The network namespace of `pid` when it is not leaktrace's own (None: shared, or
    /// unreadable, in which case the node is looked for in leaktrace's own).
    pub fn of_target(pid: u32) -> Option<NetNamespace> {
        let id = ns_id(&pid.to_string(), "net")?;
        (ns_id("self", "net")? != id).then_some(NetNamespace { pid, id })
    }

    /// Runs `f` on a thread of its own that joined this network namespace (and the target's
    /// UTS namespace, when it has its own) first. Sockets `f` creates stay in the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NamespaceError> {
        let pid = self.pid;
        let expected = self.id;
        run_joined(
            pid,
            true,
            is_other(pid, "uts") == Some(true),
            Some(expected),
            f,
        )
    }
}

/// Runs `f` inside the network and UTS namespaces of `pid` (each only when it differs from
/// leaktrace's): on a thread of its own that joined them, else on the calling thread. Inside,
/// `127.0.0.1` is the target's loopback and the host name is the target's.
pub fn in_target_namespaces<T: Send>(
    pid: u32,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NamespaceError> {
    let net = is_other(pid, "net") == Some(true);
    let uts = is_other(pid, "uts") == Some(true);
    if !net && !uts {
        return Ok(f());
    }
    run_joined(pid, net, uts, None, f)
}

fn run_joined<T: Send>(
    pid: u32,
    net: bool,
    uts: bool,
    expected_net: Option<(u64, u64)>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NamespaceError> {
    std::thread::scope(|scope| {
        let joined = std::thread::Builder::new()
            .name("leaktrace-netns".into())
            .spawn_scoped(scope, move || {
                if net {
                    join(pid, "net", libc::CLONE_NEWNET, expected_net)?;
                }
                if uts {
                    join(pid, "uts", libc::CLONE_NEWUTS, None)?;
                }
                Ok(f())
            })
            .map_err(|e| NamespaceError::Thread {
                pid,
                reason: e.to_string(),
            })?;
        joined.join().unwrap_or_else(|_| {
            Err(NamespaceError::Thread {
                pid,
                reason: "it panicked".into(),
            })
        })
    })
}

/// Joins the namespace `kind` of `pid` on the calling thread, checking its identity first when
/// `expected` is given.
fn join(
    pid: u32,
    kind: &'static str,
    nstype: i32,
    expected: Option<(u64, u64)>,
) -> Result<(), NamespaceError> {
    let fail = |reason: String| NamespaceError::Enter { pid, kind, reason };
    let file = File::open(format!("/proc/{pid}/ns/{kind}")).map_err(|e| fail(e.to_string()))?;
    if let Some(id) = expected {
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        if (meta.dev(), meta.ino()) != id {
            return Err(NamespaceError::Changed { pid });
        }
    }
    // SAFETY: setns takes a namespace descriptor we own for the duration of the call; it
    // changes this thread's namespace only (net and UTS may be joined by one thread of many).
    if unsafe { libc::setns(file.as_raw_fd(), nstype) } != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nspid_is_the_innermost_pid() {
        let status = "Name:\tbeam.smp\nTgid:\t4242\nNSpid:\t4242\t7\nNSpgid:\t4242\t7\n";
        assert_eq!(parse_nspid(status), Some(7));
        assert_eq!(parse_nspid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(parse_nspid("Name:\tx\n"), None);
        assert_eq!(parse_nspid("NSpid:\tbogus\n"), None);
    }

    #[test]
    fn own_process_is_plain() {
        let me = std::process::id();
        assert_eq!(is_other(me, "net"), Some(false));
        assert_eq!(is_other(me, "mnt"), Some(false));
        assert_eq!(is_other(99_999_999, "net"), None);
        let c = Container::of(me);
        assert!(c.is_plain(), "{c:?}");
        assert_eq!(c.note(me), None);
        assert_eq!(NetNamespace::of_target(me), None);
        // Shared namespaces: f runs here, on this thread.
        let here = std::thread::current().id();
        assert_eq!(
            in_target_namespaces(me, || std::thread::current().id()).unwrap(),
            here
        );
        // In the same mount namespace a mapped file is reached through the target's root.
        assert_eq!(
            host_path(me, "/usr/lib/x.so"),
            PathBuf::from(format!("/proc/{me}/root/usr/lib/x.so"))
        );
    }

    #[test]
    fn note_names_the_namespaces_and_the_inner_pid() {
        let c = Container {
            pid_ns: true,
            mount_ns: true,
            net_ns: true,
            uts_ns: false,
            inner_pid: Some(1),
        };
        let note = c.note(4242).unwrap();
        assert!(note.contains("PID, mount, network namespaces"), "{note}");
        assert!(note.contains("where it is PID 1"), "{note}");
        assert!(note.contains("/proc/4242/root"), "{note}");
        assert!(note.contains("inside its network namespace"), "{note}");
    }

    /// Needs root: a thread joins a fresh network namespace (made by `unshare`) and binds
    /// 127.0.0.1 there without touching ours.
    #[test]
    fn joins_another_network_namespace_on_its_own_thread() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let Ok(mut child) = std::process::Command::new("unshare")
            .args(["--net", "sleep", "30"])
            .spawn()
        else {
            eprintln!("skipped: no unshare");
            return;
        };
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let ns = loop {
            if let Some(ns) = NetNamespace::of_target(pid) {
                break Some(ns);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let result = ns.map(|ns| {
            ns.run(|| fs::read_link("/proc/thread-self/ns/net").map(|l| l.display().to_string()))
        });
        let _ = child.kill();
        let _ = child.wait();
        let inside = result
            .expect("unshare --net never left our namespace")
            .expect("joined")
            .expect("read own thread's namespace");
        let ours = fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(inside, ours.display().to_string());
        assert_eq!(
            fs::read_link("/proc/self/ns/net").unwrap(),
            ours,
            "the process left its namespace"
        );
    }
}
