//! A hidden distribution node talking to the target over `erpc`: it calls read-only BIFs and
//! loads no code. The node's owner may replace any module a call goes through, so every reply is
//! hostile input: frames are read with a size cap before anything is allocated for them, and
//! decoded by the bounded decoder of [`crate::vm::wire`]. Calls block the caller for at most
//! [`CALL_TIMEOUT`]; one thread per connection reads the node's frames and answers its ticks.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use erl_dist::{
    DistributionFlags,
    handshake::{ClientSideHandshake, HandshakeError, HandshakeStatus},
    node::{Creation, LocalNode, NodeName},
    term::{Atom, FixInteger, List, Pid, Reference, Term, Tuple},
};

use crate::vm::{
    discover::NodeAddress,
    wire::{self, WireError},
};

/// Longest wait for one call: a busy node answers read-only BIFs in milliseconds.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// A reply went over one of the caps on what leaktrace reads from a node (see
    /// [`crate::vm::wire`]): the node is not answering what was asked, so the view stops.
    #[error(
        "the node's replies exceeded a cap: {what} ({call}): the VM view is off, tracing goes on with OS-level evidence (is the node's erpc the one its OTP release ships?)"
    )]
    ReplyOverCap {
        /// The call (or calls) waiting when the reply came.
        call: String,
        /// What was exceeded ("a reply nested deeper than 64 levels").
        what: String,
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
                | VmError::ReplyOverCap { .. }
        )
    }
}

/// Longest text kept from a node in one message (error reasons, a term's prefix).
pub const MAX_TEXT: usize = crate::recording::vm::MAX_REASON;

/// `text` cut to at most [`MAX_TEXT`] bytes on a character boundary, with "…" when cut.
pub fn cap_text(text: &str) -> String {
    crate::recording::vm::cut_text(text)
}

/// A term as text, cut like [`cap_text`]: formatting stops once the cap is reached, so a large
/// term costs no more than its prefix.
pub fn term_text(term: &Term) -> String {
    struct Capped(String);
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = (MAX_TEXT + 1).saturating_sub(self.0.len());
            if s.len() <= room {
                self.0.push_str(s);
                return Ok(());
            }
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.0.push_str(&s[..end]);
            // Pad so that cap_text sees the text was cut.
            while self.0.len() <= MAX_TEXT {
                self.0.push(' ');
            }
            Err(std::fmt::Error)
        }
    }
    let mut out = Capped(String::new());
    // An error here only means the cap was reached.
    let _ = std::fmt::write(&mut out, format_args!("{term}"));
    cap_text(&out.0)
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

const CONNECT_TIMEOUT_MSG: &str = "no answer within";
/// Largest frame read from the node. The biggest real reply (the process list of a node near
/// the default limit of 262,144 processes) takes under 10 MB.
pub const MAX_FRAME: usize = 32 << 20;
/// Most calls waiting at once; a caller waits for its own, so more means something is wrong.
const MAX_PENDING: usize = 64;
/// The pass-through tag of a frame without a distribution header (no atom cache negotiated).
const PASS_THROUGH: u8 = 112;
const OP_MONITOR_P_EXIT: i32 = 21;
const OP_SPAWN_REQUEST: i32 = 29;
const OP_SPAWN_REPLY: i32 = 31;

/// A call waiting for its reply.
struct Pending {
    call: String,
    reply: mpsc::SyncSender<Result<Term, VmError>>,
}

/// What the reading thread and the callers share.
struct State {
    /// Calls waiting, by the words of their request reference.
    pending: HashMap<Vec<u32>, Pending>,
    /// Why the connection ended, once it has: every later call fails with it.
    ended: Option<VmError>,
}

struct Connection {
    /// Frames are written whole under this lock (calls, and the reading thread's ticks).
    writer: Mutex<TcpStream>,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    /// Ends the connection with `error`: every waiting call gets it, later calls too.
    fn end(&self, error: VmError) {
        let pending = {
            let mut s = lock(&self.state);
            if s.ended.is_none() {
                s.ended = Some(error.clone());
            }
            std::mem::take(&mut s.pending)
        };
        for (_, p) in pending {
            let _ = p.reply.try_send(Err(error.clone()));
        }
        let _ = lock(&self.writer).shutdown(Shutdown::Both);
    }

    /// The names of the calls waiting, for an error that cannot be told apart by call.
    fn waiting_calls(&self) -> String {
        let s = lock(&self.state);
        let mut names: Vec<&str> = s.pending.values().map(|p| p.call.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        match names.len() {
            0 => "a late reply".into(),
            _ => cap_text(&names.join(", ")),
        }
    }

    /// Ends the connection for a reply that cannot be read.
    fn refuse(&self, error: WireError) {
        let call = self.waiting_calls();
        let error = if error.is_cap() {
            VmError::ReplyOverCap {
                call,
                what: error.to_string(),
            }
        } else {
            VmError::Call {
                call,
                reason: cap_text(&error.to_string()),
            }
        };
        self.end(error);
    }

    /// The call (`m:f/a`) waiting on `key`, for messages; empty when none is.
    fn call_of(&self, key: &[u32]) -> String {
        lock(&self.state)
            .pending
            .get(key)
            .map(|p| p.call.clone())
            .unwrap_or_default()
    }

    fn answer(&self, key: &[u32], result: Result<Term, VmError>) {
        let waiting = lock(&self.state).pending.remove(key);
        // A reply nobody waits for (its call timed out, or never made) is dropped.
        if let Some(p) = waiting {
            let _ = p.reply.try_send(result);
        }
    }
}

/// Reads the node's frames until the connection ends.
fn read_frames(conn: &Connection, mut socket: TcpStream) {
    loop {
        let mut len = [0u8; 4];
        if let Err(e) = socket.read_exact(&mut len) {
            conn.end(closed(&e));
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            // A tick: answering it is what keeps the node from dropping us.
            let mut w = lock(&conn.writer);
            if w.write_all(&[0; 4]).is_err() {
                drop(w);
                conn.end(VmError::Call {
                    call: "tick".into(),
                    reason: "the connection closed".into(),
                });
                return;
            }
            continue;
        }
        if len > MAX_FRAME {
            conn.refuse(WireError::TooLarge {
                bytes: len as u64,
                cap: MAX_FRAME,
            });
            return;
        }
        let mut frame = vec![0u8; len];
        if let Err(e) = socket.read_exact(&mut frame) {
            conn.end(closed(&e));
            return;
        }
        if let Err(e) = handle_frame(conn, &frame) {
            conn.refuse(e);
            return;
        }
    }
}

fn closed(e: &std::io::Error) -> VmError {
    VmError::Call {
        call: "the connection".into(),
        reason: cap_text(&format!("the connection to the node closed ({e})")),
    }
}

/// One frame: pass-through tag, control term, maybe a payload (not read: no message we act on
/// has one).
fn handle_frame(conn: &Connection, frame: &[u8]) -> Result<(), WireError> {
    let Some((&tag, body)) = frame.split_first() else {
        return Err(WireError::Malformed("an empty frame".into()));
    };
    if tag != PASS_THROUGH {
        return Err(WireError::Malformed(format!(
            "frame tag {tag}, expected {PASS_THROUGH}"
        )));
    }
    let control = wire::Decoder::new(body).term()?;
    let Term::Tuple(Tuple { elements }) = control else {
        return Ok(());
    };
    let Some(Term::FixInteger(FixInteger { value: op })) = elements.first() else {
        return Ok(());
    };
    match (*op, elements.as_slice()) {
        // {21, FromProc, ToPid, Ref, Reason}: the process erpc spawned has exited; Ref is the
        // request's. erpc:execute_call/4 exits with {Ref, return, Value} on success.
        (OP_MONITOR_P_EXIT, [_, _, _, Term::Reference(r), reason]) => {
            let result = match reason {
                Term::Tuple(t) if t.elements.len() == 3 && is_atom(&t.elements[1], "return") => {
                    Ok(t.elements[2].clone())
                }
                other => Err(other),
            };
            let key = r.id.clone();
            let call = conn.call_of(&key);
            conn.answer(
                &key,
                result.map_err(|reason| VmError::Call {
                    call,
                    reason: term_text(reason),
                }),
            );
        }
        // {31, ReqId, To, Flags, Result}: an atom result means the spawn failed.
        (OP_SPAWN_REPLY, [_, Term::Reference(r), _, _, Term::Atom(why)]) => {
            let key = r.id.clone();
            let call = conn.call_of(&key);
            conn.answer(
                &key,
                Err(VmError::Call {
                    call,
                    reason: cap_text(&format!("the node refused to spawn erpc: {}", why.name)),
                }),
            );
        }
        // Anything else (a spawn that succeeded, messages we never asked for) is ignored.
        _ => {}
    }
    Ok(())
}

fn is_atom(t: &Term, name: &str) -> bool {
    matches!(t, Term::Atom(a) if a.name == name)
}

/// A live connection to one node: in this process, or through the unprivileged child process
/// of [`crate::vm::sandbox`] (the default of the leaktrace binary).
pub struct VmClient {
    node: String,
    transport: Transport,
}

enum Transport {
    Direct(Direct),
    Sandboxed(crate::vm::sandbox::Sandboxed),
}

/// The distribution connection itself, in this process.
pub(crate) struct Direct {
    conn: Arc<Connection>,
    /// Our own node name as the node named us, and the creation it gave.
    local: Atom,
    creation: u32,
    next_ref: AtomicU32,
    /// Mixed into references so that they differ across connections.
    salt: u32,
}

impl std::fmt::Debug for VmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmClient")
            .field("node", &self.node)
            .finish()
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // Ends the reading thread (its read fails) and tells the node we are gone.
        let _ = lock(&self.conn.writer).shutdown(Shutdown::Both);
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
        let target = SocketAddr::from(([127, 0, 0, 1], addr.port));
        let dial = || TcpStream::connect_timeout(&target, CONNECT_TIMEOUT);
        let dialled = match &addr.netns {
            None => dial(),
            Some(ns) => ns.run(dial).map_err(|e| VmError::OtherNetns {
                pid: ns.pid,
                reason: e.to_string(),
            })?,
        };
        let socket = dialled.map_err(|e| VmError::Unreachable {
            node: node.clone(),
            port: addr.port,
            reason: e.to_string(),
        })?;
        let transport = if crate::vm::sandbox::enabled() {
            Transport::Sandboxed(crate::vm::sandbox::Sandboxed::start(socket, &node, cookie)?)
        } else {
            Transport::Direct(Direct::over(socket, &node, cookie)?)
        };
        Ok(VmClient { node, transport })
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
        match &self.transport {
            Transport::Direct(d) => d.call_within(limit, module, function, args),
            Transport::Sandboxed(s) => s.call_within(limit, module, function, args),
        }
    }

    /// The PID of the process holding the distribution connection, when it is not this one.
    pub fn connection_pid(&self) -> Option<u32> {
        match &self.transport {
            Transport::Direct(_) => None,
            Transport::Sandboxed(s) => Some(s.pid()),
        }
    }
}

impl Direct {
    /// The handshake over a connected `socket` to `node`, and the thread reading its frames.
    pub(crate) fn over(socket: TcpStream, node: &str, cookie: &str) -> Result<Direct, VmError> {
        let node = node.to_owned();
        let refused = |reason: String| VmError::Refused {
            node: node.clone(),
            reason: cap_text(&reason),
        };
        let io = |e: std::io::Error| refused(e.to_string());
        // Without it every request waits on Nagle's algorithm and the peer's delayed ACK
        // (~40 ms a call: a census of twenty calls took a second on an idle node).
        socket.set_nodelay(true).map_err(io)?;
        socket.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
        socket.set_write_timeout(Some(CALL_TIMEOUT)).map_err(io)?;

        let (local, creation, socket) = handshake(socket, cookie).map_err(|e| match e {
            HandshakeError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                refused(format!(
                    "{CONNECT_TIMEOUT_MSG} {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            }
            other => refused(other.to_string()),
        })?;
        // From now on the reading thread waits as long as the node is quiet: ticks keep it
        // honest, and dropping the client shuts the socket down under it.
        socket.set_read_timeout(None).map_err(io)?;
        let reader = socket.try_clone().map_err(io)?;
        let conn = Arc::new(Connection {
            writer: Mutex::new(socket),
            state: Mutex::new(State {
                pending: HashMap::new(),
                ended: None,
            }),
        });
        let for_thread = conn.clone();
        thread::Builder::new()
            .name("leaktrace-vm".into())
            .spawn(move || read_frames(&for_thread, reader))
            .map_err(|e| VmError::Call {
                call: "connection thread".into(),
                reason: e.to_string(),
            })?;
        let salt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().rotate_left(16);
        Ok(Direct {
            conn,
            local,
            creation,
            next_ref: AtomicU32::new(1),
            salt,
        })
    }

    /// As [`VmClient::call_within`].
    pub(crate) fn call_within(
        &self,
        limit: Duration,
        module: &str,
        function: &str,
        args: Vec<Term>,
    ) -> Result<Term, VmError> {
        let name = format!("{module}:{function}/{}", args.len());
        let request = self.make_ref();
        let key = request.id.clone();
        let frame = self
            .spawn_request(request, module, function, args)
            .map_err(|e| VmError::Call {
                call: name.clone(),
                reason: format!("cannot encode the request: {e}"),
            })?;
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut s = lock(&self.conn.state);
            if let Some(e) = &s.ended {
                return Err(e.clone());
            }
            if s.pending.len() >= MAX_PENDING {
                return Err(VmError::Call {
                    call: name,
                    reason: format!("{MAX_PENDING} calls are already waiting for the node"),
                });
            }
            s.pending.insert(
                key.clone(),
                Pending {
                    call: name.clone(),
                    reply: tx,
                },
            );
        }
        if let Err(e) = lock(&self.conn.writer).write_all(&frame) {
            lock(&self.conn.state).pending.remove(&key);
            return Err(VmError::Call {
                call: name,
                reason: cap_text(&format!("cannot send the request: {e}")),
            });
        }
        match rx.recv_timeout(limit) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.conn.state).pending.remove(&key);
                Err(VmError::Timeout {
                    call: name,
                    after: limit,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(lock(&self.conn.state)
                .ended
                .clone()
                .unwrap_or_else(|| VmError::Call {
                    call: name,
                    reason: "the connection closed".into(),
                })),
        }
    }

    fn pid(&self) -> Pid {
        Pid::new(self.local.clone(), 0, 0, self.creation)
    }

    fn make_ref(&self) -> Reference {
        let n = self.next_ref.fetch_add(1, Ordering::Relaxed);
        Reference {
            node: self.local.clone(),
            id: vec![n, self.salt, self.salt.rotate_left(13) ^ n.rotate_left(7)],
            creation: self.creation,
        }
    }

    /// The frame of `SPAWN_REQUEST` for `erpc:execute_call(Ref, M, F, A)` with a monitor (the
    /// request reference is the monitor's): the process exits with `{Ref, return, Value}`.
    fn spawn_request(
        &self,
        request: Reference,
        module: &str,
        function: &str,
        args: Vec<Term>,
    ) -> Result<Vec<u8>, String> {
        let control = Term::from(Tuple::from(vec![
            FixInteger::from(OP_SPAWN_REQUEST).into(),
            request.into(),
            self.pid().into(),
            self.pid().into(),
            Tuple::from(vec![
                Atom::from("erpc").into(),
                Atom::from("execute_call").into(),
                FixInteger::from(4).into(),
            ])
            .into(),
            List::from(vec![Atom::from("monitor").into()]).into(),
        ]));
        let payload = Term::from(List::from(vec![
            self.make_ref().into(),
            Atom::from(module).into(),
            Atom::from(function).into(),
            List::from(args).into(),
        ]));
        let mut frame = vec![0, 0, 0, 0, PASS_THROUGH];
        control.encode(&mut frame).map_err(|e| e.to_string())?;
        payload.encode(&mut frame).map_err(|e| e.to_string())?;
        let len = u32::try_from(frame.len() - 4).unwrap_or(u32::MAX);
        frame[..4].copy_from_slice(&len.to_be_bytes());
        Ok(frame)
    }
}

/// The distribution handshake as a hidden node named by the peer (NAME_ME). Handshake messages
/// carry u16 lengths, so they are bounded. Neither the atom cache in the distribution header
/// nor fragments are offered: every frame afterwards is then one pass-through message.
fn handshake(socket: TcpStream, cookie: &str) -> Result<(Atom, u32, TcpStream), HandshakeError> {
    let host = "localhost";
    let tentative: NodeName = NodeName::new("leaktrace", host)?;
    let mut local = LocalNode::new(tentative, Creation::random());
    let flags = local.flags
        | DistributionFlags::NAME_ME
        | DistributionFlags::SPAWN
        | DistributionFlags::DIST_MONITOR
        | DistributionFlags::DIST_MONITOR_NAME;
    let unwanted =
        DistributionFlags::DIST_HDR_ATOM_CACHE.bits() | DistributionFlags::FRAGMENTS.bits();
    local.flags = DistributionFlags::from_bits_truncate(flags.bits() & !unwanted);
    smol::block_on(async move {
        let mut hs =
            ClientSideHandshake::new(futures::io::AllowStdIo::new(socket), local.clone(), cookie);
        let status = hs.execute_send_name(6).await?;
        let HandshakeStatus::Named { name, creation } = status else {
            return Err(HandshakeError::UnknownStatus {
                status: format!("{status:?} (expected a name for a NAME_ME node)"),
            });
        };
        let (socket, _peer) = hs.execute_rest(true).await?;
        let me = NodeName::new(&name, host)?;
        Ok((
            Atom::from(me.to_string()),
            creation.get(),
            socket.into_inner(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use erl_dist::handshake::ServerSideHandshake;

    use super::*;

    #[test]
    fn text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(400);
        let cut = cap_text(&long);
        assert!(cut.len() <= MAX_TEXT + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(cap_text("short"), "short");
    }

    #[test]
    fn a_huge_term_formats_as_a_short_prefix() {
        let big = Term::from(List::from(vec![Term::from(Atom::from("x")); 1_000_000]));
        let started = std::time::Instant::now();
        let text = term_text(&big);
        assert!(text.len() <= MAX_TEXT + "…".len(), "{}", text.len());
        assert!(text.starts_with("['x','x'"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    fn frame(control: Term, payload: Option<Term>) -> Vec<u8> {
        let mut f = vec![0, 0, 0, 0, PASS_THROUGH];
        control.encode(&mut f).unwrap();
        if let Some(p) = payload {
            p.encode(&mut f).unwrap();
        }
        let n = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&n.to_be_bytes());
        f
    }

    /// One frame's body (empty for a tick).
    fn read_frame(s: &mut impl Read) -> Vec<u8> {
        let mut len = [0; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        body
    }

    /// The request reference of a SPAWN_REQUEST frame.
    fn request_ref(body: &[u8]) -> Reference {
        let control = wire::Decoder::new(&body[1..]).term().unwrap();
        match control {
            Term::Tuple(t) => match &t.elements[..] {
                [op, Term::Reference(r), ..] if *op == Term::from(FixInteger::from(29)) => {
                    (**r).clone()
                }
                other => panic!("not a spawn request: {other:?}"),
            },
            other => panic!("not a tuple: {other}"),
        }
    }

    fn monitor_exit(r: Reference, reason: Term) -> Vec<u8> {
        let pid = Pid::new(Atom::from("fake@localhost"), 5, 0, 1);
        frame(
            Tuple::from(vec![
                FixInteger::from(21).into(),
                pid.clone().into(),
                pid.into(),
                r.into(),
                reason,
            ])
            .into(),
            None,
        )
    }

    /// A node on 127.0.0.1 that completes the handshake (cookie "c") and then plays `script`;
    /// the flags we offered come back over the channel.
    fn fake_node(
        script: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) -> (NodeAddress, mpsc::Receiver<u64>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (ftx, frx) = mpsc::channel();
        thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            let local = LocalNode::new("fake@localhost".parse().unwrap(), Creation::random());
            let shook = smol::block_on(async {
                let mut hs =
                    ServerSideHandshake::new(futures::io::AllowStdIo::new(socket), local, "c");
                // A client that names itself is refused (it must ask to be named).
                if hs.execute_recv_name().await?.is_some() {
                    return Err(HandshakeError::NotAllowed);
                }
                hs.execute_rest(HandshakeStatus::Named {
                    name: "leaktrace_1".into(),
                    creation: Creation::new(7),
                })
                .await
            });
            // A failed handshake (the wrong-cookie test) just drops the connection.
            let Ok((socket, peer)) = shook else { return };
            ftx.send(peer.flags.bits()).unwrap();
            let mut socket = socket.into_inner();
            script(&mut socket);
            // Hold the connection until the client goes.
            let _ = socket.read(&mut [0; 1]);
        });
        let addr = NodeAddress {
            name: "fake@localhost".into(),
            port,
            how: "test".into(),
            netns: None,
        };
        (addr, frx)
    }

    #[test]
    fn ticks_are_answered_strays_ignored_and_an_over_cap_frame_ends_the_view() {
        let (addr, flags) = fake_node(|s| {
            // A tick must come back.
            s.write_all(&[0; 4]).unwrap();
            // The first call may come before the answer to the tick.
            let (first, second) = (read_frame(s), read_frame(s));
            let request = match (first.is_empty(), second.is_empty()) {
                (true, false) => second,
                (false, true) => first,
                _ => panic!("the tick was not answered"),
            };
            // The first call: strays first (a reply for nobody, a message we never asked
            // for), then its answer.
            let r = request_ref(&request);
            let stranger = Reference {
                node: Atom::from("x@y"),
                id: vec![1, 2, 3],
                creation: 1,
            };
            s.write_all(&monitor_exit(stranger, Atom::from("late").into()))
                .unwrap();
            s.write_all(&frame(
                Tuple::from(vec![FixInteger::from(2).into(), Atom::from("x").into()]).into(),
                Some(Atom::from("hello").into()),
            ))
            .unwrap();
            let ok = Tuple::from(vec![
                Atom::from("ref").into(),
                Atom::from("return").into(),
                FixInteger::from(42).into(),
            ]);
            s.write_all(&monitor_exit(r, ok.into())).unwrap();
            // The second call: a frame declaring 3 GB, never sent.
            let _ = read_frame(s);
            s.write_all(&3_000_000_000u32.to_be_bytes()).unwrap();
        });
        let c = VmClient::connect(&addr, "c").expect("handshake with the fake node");
        let offered = flags.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(offered & DistributionFlags::DIST_HDR_ATOM_CACHE.bits(), 0);
        assert_eq!(offered & DistributionFlags::FRAGMENTS.bits(), 0);
        assert_ne!(offered & DistributionFlags::SPAWN.bits(), 0);
        let v = c.call("erlang", "node", vec![]).expect("first call");
        assert_eq!(v, Term::from(FixInteger::from(42)));
        let e = c.call("erlang", "processes", vec![]).unwrap_err();
        assert!(
            matches!(&e, VmError::ReplyOverCap { call, what }
                if call == "erlang:processes/0" && what == "a reply of 3000 MB, over the 32 MiB cap"),
            "{e}"
        );
        assert!(e.is_permanent());
        // The connection is gone: later calls fail at once, with the same reason.
        let started = std::time::Instant::now();
        let again = c.call("erlang", "node", vec![]).unwrap_err();
        assert!(matches!(again, VmError::ReplyOverCap { .. }), "{again}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn an_error_reply_is_a_call_error_with_a_capped_reason() {
        let (addr, _flags) = fake_node(|s| {
            let r = request_ref(&read_frame(s));
            let reason = Tuple::from(vec![
                Atom::from("error").into(),
                erl_dist::term::Binary::from(vec![b'a'; 100_000]).into(),
            ]);
            s.write_all(&monitor_exit(r, reason.into())).unwrap();
        });
        let c = VmClient::connect(&addr, "c").unwrap();
        let e = c.call("erlang", "node", vec![]).unwrap_err();
        assert!(matches!(e, VmError::Call { .. }), "{e}");
        assert!(
            e.to_string().len() < 2 * MAX_TEXT,
            "{}",
            e.to_string().len()
        );
    }

    #[test]
    fn a_wrong_cookie_is_refused() {
        let (addr, _flags) = fake_node(|_| {});
        let e = VmClient::connect(&addr, "not-c").unwrap_err();
        assert!(matches!(e, VmError::Refused { .. }), "{e}");
    }
}
