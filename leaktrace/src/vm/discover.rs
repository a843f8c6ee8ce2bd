//! Finds how to reach the target node without asking the operator: its name from its start-up
//! arguments (command line, `ERL_*FLAGS`, `-args_file`) or, failing that, the epmd name whose
//! port the process itself listens on; the cookie from where Erlang itself looks.
//!
//! The target is treated as hostile: every path it names is opened inside its own root
//! (`/proc/PID/root`, `openat2` with `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`), first as `O_PATH` so that nothing but a regular file owned by the
//! expected user is ever opened for reading; reads are capped; and nothing but 127.0.0.1 is
//! ever contacted, whatever host its node name carries.

use std::{
    collections::{BTreeSet, HashSet},
    fs::{self, File},
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
};

use crate::{
    namespace::{self, NetNamespace},
    vm::{client::VmError, epmd},
};

/// Most bytes read from `/proc/PID/cmdline` and `/proc/PID/environ`.
pub const PROC_CAP: u64 = 1 << 20;
/// Largest cookie file accepted.
pub const COOKIE_CAP: u64 = 4 * 1024;
/// Largest `-args_file` accepted.
pub const ARGS_FILE_CAP: u64 = 64 * 1024;
/// Largest `/etc/passwd` read.
pub const PASSWD_CAP: u64 = 1 << 20;
/// Most rows read from `/proc/PID/net/tcp{,6}`.
const TCP_ROWS_CAP: usize = 1 << 20;
/// Variables erlexec takes extra arguments from.
const FLAG_VARS: [&str; 3] = ["ERL_AFLAGS", "ERL_FLAGS", "ERL_ZFLAGS"];

/// Where the cookie came from (reported; the cookie itself never is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieSource {
    /// `--cookie`.
    Flag,
    /// `--cookie-file`.
    File,
    /// The node's `-setcookie` on its command line.
    CommandLine,
    /// `-setcookie` in `ERL_AFLAGS`/`ERL_FLAGS`/`ERL_ZFLAGS` of the node's environment.
    FlagsVariable,
    /// `-setcookie` in an `-args_file` of the node.
    ArgsFile,
    /// `RELEASE_COOKIE` in the node's environment.
    Environment,
    /// `~/.erlang.cookie` of the node's user.
    HomeFile,
}

impl CookieSource {
    /// Human description.
    pub fn describe(self) -> &'static str {
        match self {
            CookieSource::Flag => "--cookie",
            CookieSource::File => "--cookie-file",
            CookieSource::CommandLine => "the node's -setcookie",
            CookieSource::FlagsVariable => {
                "-setcookie in the node's ERL_FLAGS/ERL_AFLAGS/ERL_ZFLAGS"
            }
            CookieSource::ArgsFile => "-setcookie in the node's -args_file",
            CookieSource::Environment => "RELEASE_COOKIE in the node's environment",
            CookieSource::HomeFile => "~/.erlang.cookie of the node's user",
        }
    }
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Cookie(String);

impl Cookie {
    /// Wraps a cookie value.
    pub fn new(value: impl Into<String>) -> Cookie {
        Cookie(value.into().trim().to_owned())
    }

    /// The value, for the handshake only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cookie(<redacted>)")
    }
}

/// How the node of a PID was found (reported to the user; never contains the cookie).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    /// Node name as the node knows itself: `alive@host` (host part: the -sname short host /
    /// -name host, or for epmd-found nodes this machine's short hostname).
    pub name: String,
    /// Distribution listen port of the node (from epmd).
    pub port: u16,
    /// One sentence: how it was found.
    pub how: String,
    /// The network namespace the node listens in, when it is not leaktrace's (a container):
    /// its 127.0.0.1 is reached from a thread that joined it.
    pub netns: Option<NetNamespace>,
}

impl NodeAddress {
    /// The alive part of the name (before the `@`).
    pub fn alive(&self) -> &str {
        self.name.split('@').next().unwrap_or(&self.name)
    }
}

/// The host name of the calling thread's UTS namespace: this machine's, or inside
/// [`namespace::in_target_namespaces`] the container's (what its `-sname` nodes are named after).
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn short_hostname() -> String {
    let h = hostname();
    h.split('.').next().unwrap_or(&h).to_owned()
}

// ---------------------------------------------------------------------------------------------
// /proc readers (capped)

fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.take(cap).read_to_end(&mut buf)?;
    Ok(buf)
}

fn nul_split(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// `/proc/PID/cmdline`, capped at [`PROC_CAP`].
pub fn read_cmdline(pid: u32) -> Vec<String> {
    read_capped(Path::new(&format!("/proc/{pid}/cmdline")), PROC_CAP)
        .map(|raw| nul_split(&raw))
        .unwrap_or_default()
}

/// `/proc/PID/environ`, capped at [`PROC_CAP`].
pub fn read_environ(pid: u32) -> Vec<(String, String)> {
    read_capped(Path::new(&format!("/proc/{pid}/environ")), PROC_CAP)
        .map(|raw| {
            nul_split(&raw)
                .into_iter()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Real uid of `pid` (first field of the `Uid:` line of `/proc/PID/status`).
pub fn target_uid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Safe reads inside the target's root: the one safe open, in `crate::target::open`

use crate::target::open::{self as safe_open, open_in_root};
pub use crate::target::open::{
    FileRule, Refusal, open_dir_in_root, read_in_root, read_operator_file,
};
// The tests below make FIFOs by path.
#[cfg(test)]
use std::{ffi::CString, os::unix::ffi::OsStrExt};

// ---------------------------------------------------------------------------------------------
// Start-up arguments: command line, ERL_*FLAGS, -args_file

/// One place the node's start-up arguments come from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ArgSource {
    /// For messages: "the command line", "ERL_FLAGS in the node's environment", ...
    place: String,
    kind: SourceKind,
    args: Vec<String>,
    /// Whether the node's own user could have written these arguments: its command line and
    /// environment, or an args file it owns. A cookie is taken only from such a source: a
    /// root-only file the node names is not the node's to hand to leaktrace.
    node_owned: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceKind {
    CommandLine,
    Variable,
    ArgsFile,
}

/// Arguments of an args file: lines, `#` to end of line is a comment, whitespace-separated.
fn parse_args_file(text: &str) -> Vec<String> {
    text.lines()
        .flat_map(|l| l.split('#').next().unwrap_or("").split_whitespace())
        .map(str::to_owned)
        .collect()
}

/// Emulator flags only: what follows `-extra` is plain arguments for the program.
fn flags_part(args: &[String]) -> &[String] {
    let end = args
        .iter()
        .position(|a| a == "-extra")
        .unwrap_or(args.len());
    &args[..end]
}

/// Values following `flag` up to the next `-flag` (first occurrence).
fn flag_values<'a>(args: &'a [String], flag: &str) -> Option<Vec<&'a str>> {
    let args = flags_part(args);
    let i = args.iter().position(|a| a == flag)?;
    Some(
        args[i + 1..]
            .iter()
            .take_while(|a| !a.starts_with('-'))
            .map(String::as_str)
            .collect(),
    )
}

fn all_flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    let args = flags_part(args);
    args.iter()
        .enumerate()
        .filter(|(_, a)| *a == flag)
        .filter_map(|(i, _)| args.get(i + 1))
        .filter(|v| !v.starts_with('-'))
        .map(String::as_str)
        .collect()
}

/// The node's start-up arguments from its command line, `ERL_AFLAGS`/`ERL_FLAGS`/`ERL_ZFLAGS`,
/// and any `-args_file` those name (and those files name, one level deep). `read_file` reads
/// an args file named by the target (safely) and says whether the node's user owns it; its
/// refusal is kept in `problems`.
fn start_args(
    cmdline: &[String],
    env: &[(String, String)],
    mut read_file: impl FnMut(&str) -> Result<(Vec<u8>, bool), Refusal>,
    problems: &mut Vec<String>,
) -> Vec<ArgSource> {
    let mut sources = vec![ArgSource {
        place: "the command line".into(),
        kind: SourceKind::CommandLine,
        args: cmdline.to_vec(),
        node_owned: true,
    }];
    for var in FLAG_VARS {
        if let Some(v) = env_get(env, var) {
            sources.push(ArgSource {
                place: format!("{var} in the node's environment"),
                kind: SourceKind::Variable,
                args: v.split_whitespace().map(str::to_owned).collect(),
                node_owned: true,
            });
        }
    }
    let mut seen = HashSet::new();
    let mut next = 0;
    for _ in 0..2 {
        let upto = sources.len();
        let files: Vec<String> = sources[next..upto]
            .iter()
            .flat_map(|s| all_flag_values(&s.args, "-args_file"))
            .map(str::to_owned)
            .collect();
        next = upto;
        for f in files {
            if !seen.insert(f.clone()) {
                continue;
            }
            let shown = epmd::printable(&f);
            match read_file(&f) {
                Ok((raw, node_owned)) => sources.push(ArgSource {
                    place: format!("args file {shown} (-args_file)"),
                    kind: SourceKind::ArgsFile,
                    args: parse_args_file(&String::from_utf8_lossy(&raw)),
                    node_owned,
                }),
                Err(why) => problems.push(format!("args file {shown} {why}")),
            }
        }
    }
    sources
}

/// A node name from start-up arguments: (alive, display name, how).
fn name_from_sources(sources: &[ArgSource], host: &str) -> Option<(String, String, String)> {
    for s in sources {
        for flag in ["-sname", "-name"] {
            let Some(v) = flag_values(&s.args, flag).and_then(|v| v.first().copied()) else {
                continue;
            };
            let (alive, display) = match v.split_once('@') {
                Some((a, _)) => (a.to_owned(), v.to_owned()),
                None if flag == "-sname" => {
                    let short = host.split('.').next().unwrap_or(host);
                    (v.to_owned(), format!("{v}@{short}"))
                }
                None => (v.to_owned(), format!("{v}@{host}")),
            };
            let how = match s.kind {
                SourceKind::CommandLine => format!("{flag} on the command line"),
                _ => format!("{flag} in {}", s.place),
            };
            return Some((alive, epmd::printable(&display), how));
        }
    }
    None
}

/// Node name from a beam command line: `-sname foo` -> `foo@<short hostname>`, `-name` as given
/// (`foo@host` kept as is).
pub fn node_from_cmdline(cmdline: &[String], hostname: &str) -> Option<String> {
    let sources = [ArgSource {
        place: "the command line".into(),
        kind: SourceKind::CommandLine,
        args: cmdline.to_vec(),
        node_owned: true,
    }];
    name_from_sources(&sources, hostname).map(|(_, name, _)| name)
}

/// How to read the target's files: its root, cwd, and uid.
struct TargetFs {
    root: PathBuf,
    cwd: PathBuf,
    uid: Option<u32>,
}

impl TargetFs {
    fn of(pid: u32) -> TargetFs {
        TargetFs {
            root: PathBuf::from(format!("/proc/{pid}/root")),
            cwd: PathBuf::from(format!("/proc/{pid}/cwd")),
            uid: target_uid(pid),
        }
    }

    /// An args file and whether the node's user owns it (else root does): the owner is read
    /// from the very file opened and read, so a file swapped meanwhile is judged by what was
    /// read.
    fn read_args_file(&self, f: &str) -> Result<(Vec<u8>, bool), Refusal> {
        use std::os::unix::fs::MetadataExt as _;
        let uid = self
            .uid
            .ok_or("cannot be checked: the node's uid is unknown")?;
        let rule = FileRule {
            owners: &[uid, 0],
            node_uid: uid,
            cap: ARGS_FILE_CAP,
        };
        let file = open_in_root(&self.root, Some(&self.cwd), Path::new(f), rule)?;
        let owner = file
            .metadata()
            .map_err(|e| format!("cannot be examined ({e})"))?
            .uid();
        Ok((safe_open::read_capped(file, rule.cap)?, owner == uid))
    }
}

// ---------------------------------------------------------------------------------------------
// Listening sockets

/// LISTEN rows (state `0A`) of a `/proc/net/tcp` or `tcp6` table: (local port, inode).
pub fn parse_tcp_listen(table: &str) -> Vec<(u16, u64)> {
    table.lines().filter_map(parse_tcp_row).collect()
}

fn parse_tcp_row(line: &str) -> Option<(u16, u64)> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    if cols.len() < 10 || cols[3] != "0A" {
        return None;
    }
    let port = u16::from_str_radix(cols[1].rsplit_once(':')?.1, 16).ok()?;
    let inode = cols[9].parse().ok()?;
    Some((port, inode))
}

/// Socket inodes among the open files of `pid`.
fn socket_inodes(pid: u32) -> std::io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(link) = fs::read_link(entry?.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if let Some(n) = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.insert(n);
        }
    }
    Ok(inodes)
}

/// TCP ports `pid` itself listens on (in its own network namespace).
pub fn listen_ports(pid: u32) -> std::io::Result<BTreeSet<u16>> {
    let inodes = socket_inodes(pid)?;
    let mut ports = BTreeSet::new();
    let mut any_table = false;
    for table in ["tcp", "tcp6"] {
        let Ok(f) = File::open(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        any_table = true;
        for line in BufReader::new(f).lines().take(TCP_ROWS_CAP) {
            let line = line?;
            if let Some((port, inode)) = parse_tcp_row(&line)
                && inodes.contains(&inode)
            {
                ports.insert(port);
            }
        }
    }
    if !any_table {
        return Err(std::io::Error::other("no /proc/PID/net/tcp table"));
    }
    Ok(ports)
}

/// Most processes looked at for the owner of a port.
const PROCESS_SCAN_CAP: usize = 1 << 20;

/// The processes of this network namespace with a socket listening on TCP `port`: who serves a
/// node named by the operator alone (`vm --node NAME`), so that the same rules as for a PID
/// apply to it (its cookie from what its own user can read; a name answered by some other
/// process is not trusted).
pub fn pids_listening_on(port: u16) -> std::io::Result<Vec<u32>> {
    let mut inodes = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(f) = File::open(format!("/proc/self/net/{table}")) else {
            continue;
        };
        for line in BufReader::new(f).lines().take(TCP_ROWS_CAP) {
            if let Some((p, inode)) = parse_tcp_row(&line?)
                && p == port
                && inode != 0
            {
                inodes.insert(inode);
            }
        }
    }
    let mut pids = Vec::new();
    if inodes.is_empty() {
        return Ok(pids);
    }
    for entry in fs::read_dir("/proc")?.take(PROCESS_SCAN_CAP).flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if socket_inodes(pid).is_ok_and(|own| !own.is_disjoint(&inodes)) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

fn epmd_port_of(env: &[(String, String)]) -> u16 {
    env_get(env, "ERL_EPMD_PORT")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(epmd::DEFAULT_PORT)
}

fn ask_epmd(port: u16) -> Result<epmd::Names, VmError> {
    epmd::names(port).map_err(|e| VmError::Epmd {
        host: format!("127.0.0.1:{port}"),
        reason: e.to_string(),
    })
}

fn ports_list(ports: &BTreeSet<u16>) -> String {
    if ports.is_empty() {
        "no TCP port".into()
    } else {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// find_node

/// Finds the node served by `pid` and its distribution port. `given` (`--node NAME@HOST` or
/// just `NAME`) wins; then `-sname`/`-name` on the command line, in `ERL_AFLAGS`/`ERL_FLAGS`/
/// `ERL_ZFLAGS` of its environment, or in an `-args_file`; else the one epmd name whose port
/// `pid` itself listens on. The port always comes from epmd on 127.0.0.1 (at `ERL_EPMD_PORT`
/// of the node's environment, default 4369), and is checked to be one `pid` listens on.
///
/// A node in a container is looked for from inside its network and UTS namespaces (epmd on
/// the container's 127.0.0.1, `-sname` completed with the container's host name); the address
/// keeps the namespace for [`crate::vm::client::VmClient::connect`], and says the PID the
/// container knows the node by.
pub fn find_node(pid: u32, given: Option<&str>) -> Result<NodeAddress, VmError> {
    let netns = NetNamespace::of_target(pid);
    let mut addr =
        namespace::in_target_namespaces(pid, || find_node_here(pid, given)).map_err(|e| {
            VmError::OtherNetns {
                pid,
                reason: e.to_string(),
            }
        })??;
    if let Some(ns) = netns {
        addr.how.push_str("; reached inside its network namespace");
        addr.netns = Some(ns);
    }
    if let Some(inner) = namespace::inner_pid(pid).filter(|p| *p != pid) {
        addr.how
            .push_str(&format!("; PID {pid} is PID {inner} inside its container"));
    }
    Ok(addr)
}

/// [`find_node`] in the calling thread's namespaces.
fn find_node_here(pid: u32, given: Option<&str>) -> Result<NodeAddress, VmError> {
    let env = read_environ(pid);
    let epmd_port = epmd_port_of(&env);
    let named = match given {
        Some(g) => {
            let (alive, display) = match g.split_once('@') {
                Some((a, _)) => (a.to_owned(), g.to_owned()),
                None => (g.to_owned(), format!("{g}@{}", short_hostname())),
            };
            Some((alive, epmd::printable(&display), "--node".to_owned()))
        }
        None => {
            let cmdline = read_cmdline(pid);
            let fs = TargetFs::of(pid);
            let mut problems = Vec::new();
            let sources = start_args(&cmdline, &env, |f| fs.read_args_file(f), &mut problems);
            for p in &problems {
                log::info!("node of PID {pid}: {p}");
            }
            name_from_sources(&sources, &hostname())
        }
    };
    let listening = listen_ports(pid);
    match named {
        Some((alive, name, how)) => {
            let names = ask_epmd(epmd_port)?;
            let Some(entry) = names.find(&alive) else {
                return Err(VmError::NotRegistered {
                    node: name,
                    how,
                    epmd_port,
                    listed: names.listing(),
                });
            };
            let port = entry.port;
            let how = match &listening {
                Ok(ports) if !ports.contains(&port) => {
                    return Err(VmError::NotServedByPid {
                        node: name,
                        port,
                        pid,
                        listening: ports_list(ports),
                    });
                }
                Ok(_) => format!(
                    "{how}; epmd (port {epmd_port}) has it on port {port}, which PID {pid} listens on"
                ),
                Err(e) => format!(
                    "{how}; epmd (port {epmd_port}) has it on port {port} (not checked against PID {pid}'s sockets: {e})"
                ),
            };
            Ok(NodeAddress {
                name,
                port,
                how,
                netns: None,
            })
        }
        None => {
            let names = match epmd::names(epmd_port) {
                Ok(n) => n,
                Err(e) => {
                    return Err(VmError::NotDistributed {
                        pid,
                        epmd: format!("epmd does not answer on 127.0.0.1:{epmd_port} ({e})"),
                    });
                }
            };
            let ports = listening.map_err(|e| VmError::CannotMatch {
                pid,
                reason: e.to_string(),
                listed: names.listing(),
            })?;
            let served: Vec<&epmd::EpmdName> = names
                .names
                .iter()
                .filter(|n| ports.contains(&n.port))
                .collect();
            match served.as_slice() {
                [] => Err(VmError::NotDistributed {
                    pid,
                    epmd: if names.names.is_empty() {
                        format!("epmd (port {epmd_port}) lists no names")
                    } else {
                        format!(
                            "none of the {} names epmd lists ({}) is served by PID {pid}",
                            names.names.len(),
                            names.listing().join(", ")
                        )
                    },
                }),
                [one] => {
                    let alive = epmd::printable(&one.name);
                    Ok(NodeAddress {
                        name: format!("{alive}@{}", short_hostname()),
                        port: one.port,
                        how: format!(
                            "epmd (port {epmd_port}) lists {} name{}; only {alive} listens on a port PID {pid} owns ({})",
                            names.names.len(),
                            if names.names.len() == 1 { "" } else { "s" },
                            one.port
                        ),
                        netns: None,
                    })
                }
                many => Err(VmError::Ambiguous {
                    pid,
                    candidates: many
                        .iter()
                        .map(|n| format!("{} (port {})", epmd::printable(&n.name), n.port))
                        .collect(),
                }),
            }
        }
    }
}

/// The address of a node named by the operator alone (no PID): its port from the epmd on
/// 127.0.0.1 (at `ERL_EPMD_PORT` of our own environment, default 4369). Only local nodes.
pub fn find_node_by_name(given: &str) -> Result<NodeAddress, VmError> {
    let epmd_port = std::env::var("ERL_EPMD_PORT")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(epmd::DEFAULT_PORT);
    let (alive, display) = match given.split_once('@') {
        Some((a, _)) => (a.to_owned(), given.to_owned()),
        None => (given.to_owned(), format!("{given}@{}", short_hostname())),
    };
    let names = ask_epmd(epmd_port)?;
    match names.find(&alive) {
        Some(e) => Ok(NodeAddress {
            name: epmd::printable(&display),
            port: e.port,
            how: format!("--node; epmd (port {epmd_port}) has it on port {}", e.port),
            netns: None,
        }),
        None => Err(VmError::NotRegistered {
            node: epmd::printable(&display),
            how: "--node".into(),
            epmd_port,
            listed: names.listing(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// find_cookie

/// Own cookie from `-setcookie C` (`-setcookie Node C` sets another node's cookie: skipped).
fn setcookie(args: &[String]) -> Option<String> {
    let args = flags_part(args);
    args.iter()
        .enumerate()
        .filter(|(_, a)| *a == "-setcookie")
        .find_map(|(i, _)| {
            let vals: Vec<&String> = args[i + 1..]
                .iter()
                .take_while(|a| !a.starts_with('-'))
                .collect();
            (vals.len() == 1).then(|| vals[0].clone())
        })
}

/// The home directory of `uid` from `/etc/passwd` inside `root`.
fn home_from_passwd(root: &Path, uid: u32) -> Result<Option<PathBuf>, Refusal> {
    let raw = read_in_root(
        root,
        None,
        Path::new("/etc/passwd"),
        FileRule {
            owners: &[0, uid],
            node_uid: uid,
            cap: PASSWD_CAP,
        },
    )?;
    let text = String::from_utf8_lossy(&raw);
    let uid = uid.to_string();
    Ok(text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 5 && f[2] == uid && f[5].starts_with('/')).then(|| PathBuf::from(f[5]))
    }))
}

/// Reads `HOME/.erlang.cookie` inside `root` for a node running as `uid`: a regular file,
/// owned by `uid`, no symlink anywhere, at most [`COOKIE_CAP`] bytes.
pub fn cookie_from_home(root: &Path, home: &Path, uid: u32) -> Result<Cookie, Refusal> {
    cookie_file_in_root(root, &home.join(".erlang.cookie"), uid, "~/.erlang.cookie")
}

fn cookie_file_in_root(root: &Path, path: &Path, uid: u32, label: &str) -> Result<Cookie, Refusal> {
    let shown = epmd::printable(&path.to_string_lossy());
    let raw = read_in_root(
        root,
        None,
        path,
        FileRule {
            owners: &[uid],
            node_uid: uid,
            cap: COOKIE_CAP,
        },
    )
    .map_err(|why| format!("{label} of uid {uid} ({shown}) {why}"))?;
    let text = String::from_utf8(raw)
        .map_err(|_| format!("{label} of uid {uid} ({shown}) is not text: refused"))?;
    let cookie = Cookie::new(text.lines().next().unwrap_or(""));
    if cookie.expose().is_empty() {
        return Err(format!("{label} of uid {uid} ({shown}) is empty"));
    }
    Ok(cookie)
}

/// `~/.erlang.cookie`, or when it does not exist the XDG place OTP 23+ also reads
/// (`$XDG_CONFIG_HOME/erlang/.erlang.cookie`, default `~/.config/erlang/.erlang.cookie`).
fn home_cookie(
    root: &Path,
    home: &Path,
    xdg_config: Option<&str>,
    uid: u32,
) -> Result<Cookie, Refusal> {
    let first = match cookie_from_home(root, home, uid) {
        Err(why) if why.ends_with("does not exist") => why,
        other => return other,
    };
    let config = xdg_config
        .filter(|x| x.starts_with('/'))
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".config"));
    let xdg = config.join("erlang/.erlang.cookie");
    match cookie_file_in_root(root, &xdg, uid, "$XDG_CONFIG_HOME/erlang/.erlang.cookie") {
        Err(why) if why.ends_with("does not exist") => Err(first),
        other => other,
    }
}

/// Cookie for the node of `pid`, in Erlang's own order of precedence: `--cookie`,
/// `--cookie-file`, the node's `-setcookie` (command line, `ERL_*FLAGS`, `-args_file`),
/// `RELEASE_COOKIE`, then `~/.erlang.cookie` of the node's user, read safely inside its root.
pub fn find_cookie(
    pid: u32,
    flag: Option<&Cookie>,
    file: Option<&Path>,
) -> Result<(Cookie, CookieSource), VmError> {
    if let Some(c) = flag {
        return Ok((c.clone(), CookieSource::Flag));
    }
    if let Some(path) = file {
        let raw = read_operator_file(path, COOKIE_CAP).map_err(|reason| VmError::CookieFile {
            path: path.display().to_string(),
            reason,
        })?;
        let text = String::from_utf8(raw).map_err(|_| VmError::CookieFile {
            path: path.display().to_string(),
            reason: "not text".into(),
        })?;
        return Ok((
            Cookie::new(text.lines().next().unwrap_or("")),
            CookieSource::File,
        ));
    }
    let cmdline = read_cmdline(pid);
    let env = read_environ(pid);
    let fs = TargetFs::of(pid);
    let mut refused = Vec::new();
    let sources = start_args(&cmdline, &env, |f| fs.read_args_file(f), &mut refused);
    for s in &sources {
        if let Some(c) = setcookie(&s.args) {
            if !s.node_owned {
                refused.push(format!(
                    "the -setcookie in {} is not used: that file belongs to root, not to the node's user, who may not even be able to read it",
                    s.place
                ));
                continue;
            }
            let src = match s.kind {
                SourceKind::CommandLine => CookieSource::CommandLine,
                SourceKind::Variable => CookieSource::FlagsVariable,
                SourceKind::ArgsFile => CookieSource::ArgsFile,
            };
            return Ok((Cookie::new(c), src));
        }
    }
    if let Some(c) = env_get(&env, "RELEASE_COOKIE") {
        return Ok((Cookie::new(c), CookieSource::Environment));
    }
    let Some(uid) = fs.uid else {
        refused.push(format!("the uid of PID {pid} is unknown"));
        return Err(VmError::NoCookie { refused });
    };
    let home = env_get(&env, "HOME")
        .filter(|h| h.starts_with('/'))
        .map(PathBuf::from)
        .or_else(|| {
            flag_values(&cmdline, "-home")
                .and_then(|v| v.first().copied())
                .filter(|h| h.starts_with('/'))
                .map(PathBuf::from)
        });
    let home = match home {
        Some(h) => Some(h),
        None => match home_from_passwd(&fs.root, uid) {
            Ok(h) => h,
            Err(why) => {
                refused.push(format!("/etc/passwd {why}"));
                None
            }
        },
    };
    match home {
        Some(home) => match home_cookie(&fs.root, &home, env_get(&env, "XDG_CONFIG_HOME"), uid) {
            Ok(c) => return Ok((c, CookieSource::HomeFile)),
            Err(why) => refused.push(why),
        },
        None => refused.push(format!("no home directory known for uid {uid}")),
    }
    Err(VmError::NoCookie { refused })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        os::unix::fs::{PermissionsExt, symlink},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn node_names() {
        assert_eq!(
            node_from_cmdline(&args(&["beam.smp", "-sname", "demo"]), "vm.example.com").as_deref(),
            Some("demo@vm")
        );
        assert_eq!(
            node_from_cmdline(&args(&["-sname", "a@b"]), "vm").as_deref(),
            Some("a@b")
        );
        assert_eq!(
            node_from_cmdline(&args(&["-name", "a@10.0.0.1"]), "vm").as_deref(),
            Some("a@10.0.0.1")
        );
        assert_eq!(node_from_cmdline(&args(&["-noshell"]), "vm"), None);
        assert_eq!(
            node_from_cmdline(&args(&["-noshell", "-extra", "-sname", "x"]), "vm"),
            None
        );
    }

    #[test]
    fn names_from_variables_and_args_files() {
        let env = vec![
            ("HOME".to_owned(), "/root".to_owned()),
            (
                "ERL_FLAGS".to_owned(),
                " -sname  fromenv -setcookie c1 ".to_owned(),
            ),
        ];
        let mut problems = Vec::new();
        let s = start_args(
            &args(&["beam.smp"]),
            &env,
            |_| unreachable!(),
            &mut problems,
        );
        let (alive, name, how) = name_from_sources(&s, "vm.example.com").unwrap();
        assert_eq!((alive.as_str(), name.as_str()), ("fromenv", "fromenv@vm"));
        assert_eq!(how, "-sname in ERL_FLAGS in the node's environment");
        assert_eq!(setcookie(&s[1].args).as_deref(), Some("c1"));

        let env = vec![(
            "ERL_ZFLAGS".to_owned(),
            "-args_file /etc/app/vm.args".to_owned(),
        )];
        let read = |f: &str| -> Result<(Vec<u8>, bool), Refusal> {
            match f {
                "/etc/app/vm.args" => Ok((
                    b"# comment -sname no\n-args_file nested.args\n-noshell # x\n".to_vec(),
                    true,
                )),
                "nested.args" => Ok((
                    b"-name app@host.example\n-setcookie Node other\n".to_vec(),
                    true,
                )),
                "/missing" => Err("does not exist".into()),
                _ => panic!("unexpected {f}"),
            }
        };
        let mut problems = Vec::new();
        let s = start_args(
            &args(&["beam.smp", "-args_file", "/missing"]),
            &env,
            read,
            &mut problems,
        );
        assert_eq!(problems, vec!["args file /missing does not exist"]);
        let (alive, name, how) = name_from_sources(&s, "vm").unwrap();
        assert_eq!((alive.as_str(), name.as_str()), ("app", "app@host.example"));
        assert_eq!(how, "-name in args file nested.args (-args_file)");
        // `-setcookie Node Cookie` is another node's cookie.
        assert!(s.iter().all(|s| setcookie(&s.args).is_none()));
    }

    #[test]
    fn tcp_table() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1111 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13822 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:A113 0100007F:1111 01 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(parse_tcp_listen(t), vec![(0x1111, 13822)]);
        let t6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000000000000:A113 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_tcp_listen(t6), vec![(0xA113, 5555)]);
        assert!(parse_tcp_listen("garbage\n0: x y 0A").is_empty());
    }

    #[test]
    fn own_listen_ports() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ports = listen_ports(std::process::id()).unwrap();
        assert!(ports.contains(&port), "{port} not in {ports:?}");
    }

    #[test]
    fn cookie_precedence_and_redaction() {
        let flag = Cookie::new("flagged");
        let (c, src) = find_cookie(1, Some(&flag), None).unwrap();
        assert_eq!((c.expose(), src), ("flagged", CookieSource::Flag));
        assert!(!format!("{c:?}").contains("flagged"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cookie");
        fs::write(&f, "fromfile\n").unwrap();
        let (c, src) = find_cookie(1, None, Some(&f)).unwrap();
        assert_eq!((c.expose(), src), ("fromfile", CookieSource::File));
        let e = find_cookie(1, None, Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        fs::write(&f, vec![b'x'; 5000]).unwrap();
        assert!(find_cookie(1, None, Some(&f)).is_err());
    }

    /// A temp dir standing in for /proc/PID/root, with HOME at /home/u.
    fn fake_root() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home/u");
        fs::create_dir_all(&home).unwrap();
        (dir, PathBuf::from("/home/u"))
    }

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
    }

    #[test]
    fn home_cookie_checks() {
        if !is_root() {
            eprintln!("skipped: needs root to chown test files");
            return;
        }
        let uid = 4242;
        let (dir, home) = fake_root();
        let root = dir.path();
        let real = root.join("home/u/.erlang.cookie");

        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");

        fs::write(&real, "secret\n").unwrap();
        chown(&real, uid);
        fs::set_permissions(&real, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            cookie_from_home(root, &home, uid).unwrap().expose(),
            "secret"
        );

        // Owned by someone else.
        chown(&real, 0);
        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(
            e.contains("is owned by uid 0, not the node's uid 4242: refused"),
            "{e}"
        );
        chown(&real, uid);

        // Not readable by its owner.
        fs::set_permissions(&real, fs::Permissions::from_mode(0o200)).unwrap();
        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(e.contains("not readable by its owner"), "{e}");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();

        // Too large.
        fs::write(&real, vec![b'a'; COOKIE_CAP as usize + 1]).unwrap();
        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(e.contains("more than"), "{e}");

        // A symlink as the file, to a file the node's uid owns elsewhere.
        fs::remove_file(&real).unwrap();
        let elsewhere = root.join("elsewhere");
        fs::write(&elsewhere, "x").unwrap();
        chown(&elsewhere, uid);
        symlink(&elsewhere, &real).unwrap();
        std::os::unix::fs::lchown(&real, Some(uid), None).unwrap();
        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(
            e.contains("of uid 4242") && e.contains("symlink: refused"),
            "{e}"
        );
        fs::remove_file(&real).unwrap();

        // A symlinked directory on the way (HOME -> /etc-like dir outside).
        let other = root.join("other");
        fs::create_dir(&other).unwrap();
        let f = other.join(".erlang.cookie");
        fs::write(&f, "x").unwrap();
        chown(&f, uid);
        symlink("/other", root.join("home/link")).unwrap();
        let e = cookie_from_home(root, Path::new("/home/link"), uid).unwrap_err();
        assert!(e.contains("symlink: refused"), "{e}");

        // `..` cannot leave the root: /../../<tmp> resolves to <root>/<tmp>.
        let outside = tempfile::NamedTempFile::new().unwrap();
        let e = read_in_root(
            root,
            None,
            &Path::new("/../../..").join(outside.path().strip_prefix("/").unwrap()),
            FileRule {
                owners: &[0],
                node_uid: 0,
                cap: 10,
            },
        )
        .unwrap_err();
        assert!(e.contains("does not exist"), "{e}");

        // A FIFO: refused at once, never blocks.
        let fifo = root.join("home/u/.erlang.cookie");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        chown(&fifo, uid);
        let t = Instant::now();
        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
        fs::remove_file(&fifo).unwrap();

        // A directory.
        fs::create_dir(&fifo).unwrap();
        let e = cookie_from_home(root, &home, uid).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        fs::remove_dir(&fifo).unwrap();

        // passwd: owned by root is fine, the home comes from it.
        let etc = root.join("etc");
        fs::create_dir(&etc).unwrap();
        fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nu:x:4242:4242::/home/u:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(
            home_from_passwd(root, uid).unwrap(),
            Some(PathBuf::from("/home/u"))
        );
        chown(&etc.join("passwd"), 1234);
        assert!(
            home_from_passwd(root, uid)
                .unwrap_err()
                .contains("uid 1234")
        );

        // No ~/.erlang.cookie: the XDG place OTP 23+ also reads.
        let e = home_cookie(root, &home, None, uid).unwrap_err();
        assert!(
            e.starts_with("~/.erlang.cookie") && e.ends_with("does not exist"),
            "{e}"
        );
        let xdg = root.join("home/u/.config/erlang");
        fs::create_dir_all(&xdg).unwrap();
        fs::write(xdg.join(".erlang.cookie"), "xdgcookie\n").unwrap();
        chown(&xdg.join(".erlang.cookie"), uid);
        assert_eq!(
            home_cookie(root, &home, None, uid).unwrap().expose(),
            "xdgcookie"
        );
        chown(&xdg.join(".erlang.cookie"), 0);
        let e = home_cookie(root, &home, Some("/home/u/.config"), uid).unwrap_err();
        assert!(e.contains("XDG") && e.contains("owned by uid 0"), "{e}");
    }

    // ---- against real nodes -----------------------------------------------------------------

    struct Node(Child);

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn erl_available() -> bool {
        if !is_root() {
            eprintln!("skipped: needs root");
            return false;
        }
        if which::which("erl").is_err() {
            eprintln!("skipped: no erl on PATH");
            return false;
        }
        true
    }

    fn start_node(args: &[&str]) -> Node {
        let child = Command::new("erl")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("erl starts");
        Node(child)
    }

    /// Waits until `find_node` succeeds (the node registers with epmd a moment after start).
    fn wait_node(pid: u32, given: Option<&str>) -> NodeAddress {
        let t = Instant::now();
        loop {
            match find_node(pid, given) {
                Ok(a) => return a,
                Err(e) if t.elapsed() > Duration::from_secs(20) => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn node_atom(addr: &NodeAddress, cookie: &str) -> String {
        let c = crate::vm::VmClient::connect(addr, cookie).expect("connects");
        let t = c.call("erlang", "node", vec![]).expect("erlang:node()");
        match t {
            erl_dist::term::Term::Atom(a) => a.name,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn real_node_with_sname() {
        if !erl_available() {
            return;
        }
        let alive = format!("lt_disc_test_{}", std::process::id());
        let node = start_node(&["-sname", &alive, "-setcookie", "abc", "-noshell"]);
        let pid = node.0.id();
        let addr = wait_node(pid, None);
        eprintln!("{addr:?}");
        let short = short_hostname();
        assert_eq!(addr.name, format!("{alive}@{short}"));
        assert!(
            addr.how.starts_with("-sname on the command line"),
            "{}",
            addr.how
        );
        assert!(addr.how.contains("which PID"), "{}", addr.how);
        let (cookie, src) = find_cookie(pid, None, None).unwrap();
        assert_eq!((cookie.expose(), src), ("abc", CookieSource::CommandLine));
        assert_eq!(node_atom(&addr, cookie.expose()), addr.name);
        // --node NAME alone, and a wrong cookie is a refusal.
        let given = wait_node(pid, Some(&alive));
        assert_eq!(
            (given.port, given.how.starts_with("--node")),
            (addr.port, true)
        );
        let e = crate::vm::VmClient::connect(&addr, "wrong").unwrap_err();
        assert!(matches!(e, VmError::Refused { .. }), "{e}");
        // A registered name PID does not serve.
        let e = find_node(std::process::id(), Some(&alive)).unwrap_err();
        eprintln!("{e}");
        assert!(matches!(e, VmError::NotServedByPid { .. }), "{e}");
        let e = find_node(pid, Some("lt_no_such_node")).unwrap_err();
        eprintln!("{e}");
        assert!(e.to_string().contains("not registered"), "{e}");
        // find_node_by_name, as `vm snapshot --node` without a PID.
        assert_eq!(find_node_by_name(&alive).unwrap().port, addr.port);
    }

    #[test]
    fn real_node_distributed_by_itself() {
        if !erl_available() {
            return;
        }
        let alive = format!("lt_selfdist_{}", std::process::id());
        // No -setcookie: the cookie comes from $HOME/.erlang.cookie, read inside /proc/PID/root.
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join(".erlang.cookie");
        fs::write(&file, "homecookie").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o400)).unwrap();
        // Retries, as boot code would: epmd may be starting (another test's node) just then.
        let eval = format!(
            "Start = fun S() -> case net_kernel:start([{alive}, shortnames]) of \
             {{ok, _}} -> ok; _ -> timer:sleep(200), S() end end, \
             Start(), timer:sleep(infinity)."
        );
        let child = Command::new("erl")
            .args(["-noshell", "-eval", &eval])
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("erl starts");
        let node = Node(child);
        let pid = node.0.id();
        assert!(
            !read_cmdline(pid)
                .iter()
                .any(|a| a == "-sname" || a == "-name")
        );
        let addr = wait_node(pid, None);
        eprintln!("{addr:?}");
        assert_eq!(addr.name, format!("{alive}@{}", short_hostname()));
        assert!(
            addr.how.contains(&format!(
                "only {alive} listens on a port PID {pid} owns ({})",
                addr.port
            )),
            "{}",
            addr.how
        );
        let (cookie, src) = find_cookie(pid, None, None).unwrap();
        assert_eq!(
            (cookie.expose(), src),
            ("homecookie", CookieSource::HomeFile)
        );
        assert_eq!(node_atom(&addr, cookie.expose()), addr.name);
    }

    #[test]
    fn real_node_not_distributed() {
        if !erl_available() {
            return;
        }
        let node = start_node(&["-noshell"]);
        let pid = node.0.id();
        std::thread::sleep(Duration::from_millis(1500));
        let e = find_node(pid, None).unwrap_err();
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(msg.contains("not distributed"), "{msg}");
        assert!(
            msg.contains(&format!("PID {pid}")) || msg.contains("epmd"),
            "{msg}"
        );
    }
}
