//! A hidden distribution node talking to the target over `erpc` (the erl_rpc crate): it calls
//! read-only BIFs and loads no code. erl_rpc runs on smol, so the connection lives on its own
//! thread; calls block the caller for at most [`CALL_TIMEOUT`].

use std::{thread, time::Duration};

use erl_dist::term::{Atom, List, Term};
use erl_rpc::{CallError, ConnectError, RpcClient, RpcClientHandle};
use futures::FutureExt;

/// Longest wait for one call: a busy node answers read-only BIFs in milliseconds.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the VM view is missing. Messages say what to do; none contains the cookie.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    /// The node was started without -sname/-name.
    #[error(
        "the node is not distributed (no -sname/-name on its command line): VM figures need a distributed node"
    )]
    NotDistributed,
    /// No cookie could be found.
    #[error(
        "no cookie found (not in --cookie, --cookie-file, the node's -setcookie, RELEASE_COOKIE, or ~/.erlang.cookie of its user): pass --cookie-file"
    )]
    NoCookie,
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
    #[error("the node did not answer {call} within {}s", CALL_TIMEOUT.as_secs())]
    Timeout {
        /// The call.
        call: String,
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
    /// Connects as a hidden node. The cookie is used for the handshake and then dropped.
    pub fn connect(node: &str, cookie: &str) -> Result<VmClient, VmError> {
        let host = node.split('@').nth(1).unwrap_or("localhost").to_owned();
        let result = smol::block_on(timeout(CONNECT_TIMEOUT, RpcClient::connect(node, cookie)));
        let client = match result {
            None => {
                return Err(VmError::Refused {
                    node: node.into(),
                    reason: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                });
            }
            Some(Ok(c)) => c,
            Some(Err(ConnectError::NodeNotFound { .. })) => {
                return Err(VmError::NodeNotFound(node.into()));
            }
            Some(Err(ConnectError::EpmdError(e))) => {
                return Err(VmError::Epmd {
                    host,
                    reason: e.to_string(),
                });
            }
            Some(Err(ConnectError::IoError(e))) => {
                return Err(VmError::Epmd {
                    host,
                    reason: e.to_string(),
                });
            }
            Some(Err(e)) => {
                return Err(VmError::Refused {
                    node: node.into(),
                    reason: e.to_string(),
                });
            }
        };
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
        Ok(VmClient {
            handle,
            node: node.into(),
        })
    }

    /// Node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Calls `module:function(args...)` on the node.
    pub fn call(&self, module: &str, function: &str, args: Vec<Term>) -> Result<Term, VmError> {
        let name = format!("{module}:{function}/{}", args.len());
        let mut handle = self.handle.clone();
        let call = handle.call(Atom::from(module), Atom::from(function), List::from(args));
        match smol::block_on(timeout(CALL_TIMEOUT, call)) {
            None => Err(VmError::Timeout { call: name }),
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
