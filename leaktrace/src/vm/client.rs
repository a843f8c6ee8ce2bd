//! A hidden distribution node talking to the target over `erpc` (the erl_rpc crate): it calls
//! read-only BIFs and loads no code. erl_rpc runs on smol, so the connection lives on its own
//! thread; calls block the caller for at most [`CALL_TIMEOUT`].

use std::{thread, time::Duration};

use erl_dist::term::{Atom, List, Term};
use erl_rpc::{CallError, ConnectError, RpcClient, RpcClientHandle};
use futures::FutureExt;

use crate::vm::discover::NodeAddress;

/// Longest wait for one call: a busy node answers read-only BIFs in milliseconds.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the VM view is missing. Messages say what to do; none contains the cookie.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    /// No node name anywhere in the node's start-up arguments, and no epmd name is served by
    /// the process.
    #[error(
        "the node is not distributed: no -sname/-name on its command line or in ERL_FLAGS, and {epmd}; if it starts distribution later, pass --node"
    )]
    NotDistributed {
        /// The process.
        pid: u32,
        /// What epmd said: "none of the 3 names epmd lists (a, b, c) is served by PID 123".
        epmd: String,
    },
    /// No cookie could be found, or the files found were refused.
    #[error(
        "no cookie found (not in --cookie, --cookie-file, the node's -setcookie, RELEASE_COOKIE, or ~/.erlang.cookie of its user{}): pass --cookie-file",
        refusals(refused)
    )]
    NoCookie {
        /// Why candidate files were not used ("~/.erlang.cookie of uid 1000 is a symlink: refused").
        refused: Vec<String>,
    },
    /// `--cookie-file` could not be used.
    #[error("cannot use --cookie-file {path}: {reason}")]
    CookieFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The node runs in another network namespace (a container) that could not be entered.
    #[error("no way to the node's 127.0.0.1: {reason}")]
    OtherNetns {
        /// The process.
        pid: u32,
        /// Why, and what to do (from [`crate::namespace::NamespaceError`]).
        reason: String,
    },
    /// The node name found is not registered with epmd.
    #[error(
        "node {node} (from {how}) is not registered with epmd on 127.0.0.1:{epmd_port} (it lists: {}): has the node started distribution yet? Otherwise check the name (--node)",
        listing(listed)
    )]
    NotRegistered {
        /// Node name.
        node: String,
        /// Where the name came from.
        how: String,
        /// epmd's port.
        epmd_port: u16,
        /// Names epmd lists.
        listed: Vec<String>,
    },
    /// epmd has the name on a port the process does not listen on.
    #[error(
        "epmd has node {node} on port {port}, but PID {pid} does not listen there (it listens on {listening}): another process registered that name, or --node names another node"
    )]
    NotServedByPid {
        /// Node name.
        node: String,
        /// Port epmd gave.
        port: u16,
        /// The process.
        pid: u32,
        /// Ports the process listens on.
        listening: String,
    },
    /// The process serves several registered names.
    #[error("PID {pid} serves several node names registered with epmd ({}): pass --node NAME", candidates.join(", "))]
    Ambiguous {
        /// The process.
        pid: u32,
        /// `name (port N)` each.
        candidates: Vec<String>,
    },
    /// The process's sockets cannot be read, so the epmd names cannot be matched to it.
    #[error(
        "cannot see which ports PID {pid} listens on ({reason}), so cannot tell which of the names epmd lists ({}) is its node: pass --node",
        listing(listed)
    )]
    CannotMatch {
        /// The process.
        pid: u32,
        /// Why.
        reason: String,
        /// Names epmd lists.
        listed: Vec<String>,
    },
    /// The node's distribution port does not accept connections.
    #[error("node {node} does not accept connections on 127.0.0.1:{port} ({reason})")]
    Unreachable {
        /// Node.
        node: String,
        /// Port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// epmd did not answer.
    #[error("epmd is not reachable on {host} ({reason}): is the node distributed on this host?")]
    Epmd {
        /// Host asked.
        host: String,
        /// Why.
        reason: String,
    },
    /// epmd does not know the node.
    #[error("epmd on this host does not know node {0}: check the node name (--node)")]
    NodeNotFound(String),
    /// The handshake failed: nearly always a wrong cookie.
    #[error(
        "node {node} refused the connection ({reason}): wrong cookie? pass the right one with --cookie-file"
    )]
    Refused {
        /// Node.
        node: String,
        /// Why.
        reason: String,
    },
    /// A call did not answer in time.
    #[error("the node did not answer {call} within {:.1}s", after.as_secs_f64())]
    Timeout {
        /// The call.
        call: String,
        /// How long it waited.
        after: Duration,
    },
    /// A call failed or the connection dropped.
    #[error("{call} failed: {reason}")]
    Call {
        /// The call.
        call: String,
        /// Why.
        reason: String,
    },
    /// The reply had an unexpected shape (another OTP release?).
    #[error("unexpected reply to {call}: {reason}")]
    Shape {
        /// The call.
        call: String,
        /// What was wrong.
        reason: String,
    },
}

impl VmError {
    /// Whether retrying cannot help (wrong cookie, no cookie, another namespace, ...). Not
    /// permanent: a node that has not registered with epmd or started distribution yet
    /// (`NotDistributed`, `NotRegistered`, `Epmd`, `Unreachable`), or a slow answer.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            VmError::NoCookie { .. }
                | VmError::CookieFile { .. }
                | VmError::Refused { .. }
                | VmError::OtherNetns { .. }
                | VmError::NotServedByPid { .. }
                | VmError::Ambiguous { .. }
                | VmError::CannotMatch { .. }
        )
    }
}

fn refusals(refused: &[String]) -> String {
    if refused.is_empty() {
        String::new()
    } else {
        format!("; {}", refused.join("; "))
    }
}

fn listing(names: &[String]) -> String {
    if names.is_empty() {
        "no names".into()
    } else {
        names.join(", ")
    }
}

/// A live connection to one node.
pub struct VmClient {
    handle: RpcClientHandle,
    node: String,
}

impl std::fmt::Debug for VmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmClient")
            .field("node", &self.node)
            .finish()
    }
}

async fn timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    futures::select! {
        v = fut.fuse() => Some(v),
        _ = FutureExt::fuse(smol::Timer::after(d)) => None,
    }
}

impl VmClient {
    /// Connects as a hidden node to the node found by [`crate::vm::discover::find_node`]: always
    /// to 127.0.0.1 at `addr.port`, whatever host `addr.name` carries; for a node in another
    /// network namespace (a container), that namespace's 127.0.0.1, dialled from a thread that
    /// joined it (the socket stays there; the connection then runs on any thread). The cookie
    /// is used for the handshake and then dropped.
    pub fn connect(addr: &NodeAddress, cookie: &str) -> Result<VmClient, VmError> {
        let node = addr.name.clone();
        // erl_rpc dials the host part of the name it is given: make that 127.0.0.1.
        let local = format!("{}@127.0.0.1", addr.alive());
        let dial = || {
            smol::block_on(timeout(
                CONNECT_TIMEOUT,
                RpcClient::connect_with_port(&local, addr.port, cookie),
            ))
        };
        let result = match &addr.netns {
            None => dial(),
            Some(ns) => ns.run(dial).map_err(|e| VmError::OtherNetns {
                pid: ns.pid,
                reason: e.to_string(),
            })?,
        };
        let client = match result {
            None => {
                return Err(VmError::Refused {
                    node,
                    reason: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                });
            }
            Some(Ok(c)) => c,
            Some(Err(ConnectError::IoError(e))) => {
                return Err(VmError::Unreachable {
                    node,
                    port: addr.port,
                    reason: e.to_string(),
                });
            }
            Some(Err(e)) => {
                return Err(VmError::Refused {
                    node,
                    reason: e.to_string(),
                });
            }
        };
        set_nodelay_towards(addr.port);
        let handle = client.handle();
        thread::Builder::new()
            .name("leaktrace-vm".into())
            .spawn(move || {
                // Ends when every handle is dropped or the node goes away.
                let _ = smol::block_on(client.run());
            })
            .map_err(|e| VmError::Call {
                call: "connection thread".into(),
                reason: e.to_string(),
            })?;
        Ok(VmClient { handle, node })
    }

    /// Node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Calls `module:function(args...)` on the node, waiting at most [`CALL_TIMEOUT`].
    pub fn call(&self, module: &str, function: &str, args: Vec<Term>) -> Result<Term, VmError> {
        self.call_within(CALL_TIMEOUT, module, function, args)
    }

    /// Calls `module:function(args...)` on the node, waiting at most `limit`. A late answer
    /// is dropped when it comes.
    pub fn call_within(
        &self,
        limit: Duration,
        module: &str,
        function: &str,
        args: Vec<Term>,
    ) -> Result<Term, VmError> {
        let name = format!("{module}:{function}/{}", args.len());
        let mut handle = self.handle.clone();
        let call = handle.call(Atom::from(module), Atom::from(function), List::from(args));
        match smol::block_on(timeout(limit, call)) {
            None => Err(VmError::Timeout {
                call: name,
                after: limit,
            }),
            Some(Ok(term)) => Ok(term),
            Some(Err(CallError::ErrorResponse { reason })) => Err(VmError::Call {
                call: name,
                reason: format!("{reason}"),
            }),
            Some(Err(e)) => Err(VmError::Call {
                call: name,
                reason: e.to_string(),
            }),
        }
    }
}

/// Sets TCP_NODELAY on this process's connections to 127.0.0.1:`port`. erl_rpc does not expose
/// its socket, and without it every request waits on Nagle's algorithm and the peer's delayed
/// ACK (~40 ms a call: a census of twenty calls took a second on an idle node).
fn set_nodelay_towards(port: u16) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: getpeername writes at most `len` bytes into `addr`; setsockopt reads one int.
        unsafe {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getpeername(fd, (&raw mut addr).cast(), &mut len) != 0
                || i32::from(addr.sin_family) != libc::AF_INET
                || u16::from_be(addr.sin_port) != port
                || u32::from_be(addr.sin_addr.s_addr) != u32::from(std::net::Ipv4Addr::LOCALHOST)
            {
                continue;
            }
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}
