//! The distribution connection in a child process with no privileges. leaktrace runs as root
//! beside a node whose owner may be hostile; the code that reads the node's bytes (the
//! handshake, frames, the term decoder) then runs as `nobody`, with no capabilities, no way to
//! regain any (`PR_SET_NO_NEW_PRIVS`) and a cap on its address space. The parent dials the
//! node (in its network namespace when it has its own) and hands the connected socket over;
//! the cookie goes over a socket pair, never in argv or the environment. Replies come back as
//! terms the parent decodes with the same bounded decoder: the child is trusted no more than
//! the node.

use std::{
    ffi::OsStr,
    io::{Read, Write},
    net::TcpStream,
    os::{
        fd::{AsRawFd, FromRawFd, RawFd},
        unix::{net::UnixStream, process::CommandExt},
    },
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use erl_dist::term::{Atom, Binary, FixInteger, List, Term, Tuple};

use crate::vm::{
    client::{CALL_TIMEOUT, Direct, MAX_FRAME, VmError, cap_text},
    term::{atom, int, tuple},
    wire,
};

/// The hidden first argument that makes the leaktrace binary the connection's child process.
pub const CHILD_ARG: &str = "__leaktrace-vm-connection";
/// The fds the child finds the node's socket and its control socket on.
const DIST_FD: RawFd = 3;
const CONTROL_FD: RawFd = 4;
/// The child's address space: a frame (32 MiB), a decoded reply (96 MiB budget, plus malloc's
/// due), its copy on the way back, two threads' stacks and arenas, with room to spare.
const CHILD_ADDRESS_SPACE: u64 = 1 << 30;
/// The uid and gid the child runs as (`nobody`).
const NOBODY: u32 = 65534;
/// How much longer than a call's own limit the parent waits for the child's answer (the child
/// enforces the limit itself).
const GRACE: Duration = Duration::from_secs(2);
/// Largest message the child may send: a frame's worth and its envelope.
const MAX_MESSAGE: usize = MAX_FRAME + (64 << 10);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Makes every later [`crate::vm::VmClient::connect`] put the connection in a child process (the
/// leaktrace binary calls this; library users and unit tests keep it in-process).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// When this process was started as the connection's child, runs it and returns its exit code.
pub fn run_if_child() -> Option<u8> {
    let arg = std::env::args_os().nth(1)?;
    (arg == OsStr::new(CHILD_ARG)).then(child_main)
}

fn message(term: &Term) -> Vec<u8> {
    let mut v = vec![0; 4];
    // Encoding our own terms into a Vec cannot fail.
    let _ = term.encode(&mut v);
    let n = u32::try_from(v.len() - 4).unwrap_or(u32::MAX);
    v[..4].copy_from_slice(&n.to_be_bytes());
    v
}

/// One message, refused past `cap` bytes before anything is allocated for it.
fn read_message(s: &mut impl Read, cap: usize) -> Result<Term, String> {
    let mut len = [0; 4];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > cap {
        return Err(format!("a message of {len} bytes, over the {cap}-byte cap"));
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    wire::decode(&body).map_err(|e| e.to_string())
}

fn bin(s: &str) -> Term {
    Binary::from(s.as_bytes().to_vec()).into()
}

fn text(t: &Term) -> String {
    match t {
        Term::Binary(b) => cap_text(&String::from_utf8_lossy(&b.bytes)),
        _ => String::new(),
    }
}

fn error_term(e: &VmError) -> Term {
    let (kind, call, text, after) = match e {
        VmError::Timeout { call, after } => ("timeout", call.as_str(), String::new(), *after),
        VmError::ReplyOverCap { call, what } => {
            ("over_cap", call.as_str(), what.clone(), Duration::ZERO)
        }
        VmError::Refused { reason, .. } => ("refused", "", reason.clone(), Duration::ZERO),
        VmError::Call { call, reason } => ("call", call.as_str(), reason.clone(), Duration::ZERO),
        other => ("call", "", other.to_string(), Duration::ZERO),
    };
    Tuple::from(vec![
        Atom::from(kind).into(),
        bin(call),
        bin(&text),
        FixInteger::from(i32::try_from(after.as_millis()).unwrap_or(i32::MAX)).into(),
    ])
    .into()
}

fn error_from(t: &Term, node: &str) -> VmError {
    let Some([kind, call, what, after]) = tuple(t) else {
        return VmError::Call {
            call: String::new(),
            reason: "the VM connection process sent a malformed error".into(),
        };
    };
    let call = text(call);
    let what = text(what);
    match atom(kind) {
        Some("timeout") => VmError::Timeout {
            call,
            after: Duration::from_millis(
                int(after).and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
            ),
        },
        Some("over_cap") => VmError::ReplyOverCap { call, what },
        Some("refused") => VmError::Refused {
            node: node.to_owned(),
            reason: what,
        },
        _ => VmError::Call { call, reason: what },
    }
}

/// Drops everything the connection does not need: supplementary groups, root's uid and gid (to
/// `nobody`), every capability, the right to gain any back; caps the address space.
fn drop_privileges() -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain system calls on this process, with valid arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(os("PR_SET_PDEATHSIG"));
        }
        // Shown in ps and /proc/PID/status instead of "exe".
        libc::prctl(libc::PR_SET_NAME, c"leaktrace-vm".as_ptr());
        let limit = libc::rlimit {
            rlim_cur: CHILD_ADDRESS_SPACE,
            rlim_max: CHILD_ADDRESS_SPACE,
        };
        if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
            return Err(os("RLIMIT_AS"));
        }
        if libc::geteuid() == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(os("setgroups"));
            }
            if libc::setresgid(NOBODY, NOBODY, NOBODY) != 0 {
                return Err(os("setresgid"));
            }
            // Leaving uid 0 clears the permitted and effective capabilities.
            if libc::setresuid(NOBODY, NOBODY, NOBODY) != 0 {
                return Err(os("setresuid"));
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os("PR_SET_NO_NEW_PRIVS"));
        }
        // And whatever is left (a non-root caller's): none effective, permitted or inheritable.
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            // _LINUX_CAPABILITY_VERSION_3: two Data structs (64 capability bits).
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0 {
            return Err(os("capset"));
        }
    }
    Ok(())
}

/// The child: drops its privileges, takes the cookie, shakes hands with the node over the socket
/// it was given, then serves calls one at a time until the parent goes.
fn child_main() -> u8 {
    // SAFETY: the parent put these two fds in place for us (Sandboxed::start) and nothing else
    // in this process owns them.
    let (dist, mut control) = unsafe {
        (
            TcpStream::from_raw_fd(DIST_FD),
            UnixStream::from_raw_fd(CONTROL_FD),
        )
    };
    if let Err(e) = drop_privileges() {
        control_write(
            &control,
            &error_term(&VmError::Call {
                call: "the VM connection process".into(),
                reason: format!("cannot drop its privileges ({e})"),
            }),
        );
        return 1;
    }
    let hello = match read_message(&mut control, 64 << 10) {
        Ok(t) => t,
        Err(_) => return 1,
    };
    let (node, cookie) = match tuple(&hello) {
        Some([tag, node, cookie]) if atom(tag) == Some("hello") => (text(node), text_raw(cookie)),
        _ => return 1,
    };
    let direct = match Direct::over(dist, &node, &cookie) {
        Ok(d) => d,
        Err(e) => {
            control_write(&control, &error_term(&e));
            return 0;
        }
    };
    drop(cookie);
    control_write(&control, &Atom::from("ok").into());
    loop {
        let Ok(request) = read_message(&mut control, 16 << 20) else {
            return 0;
        };
        let Some([tag, id, module, function, args, limit_ms]) = tuple(&request) else {
            return 1;
        };
        if atom(tag) != Some("call") {
            return 1;
        }
        let (Some(module), Some(function)) = (atom(module), atom(function)) else {
            return 1;
        };
        let args = match args {
            Term::List(l) => l.elements.clone(),
            _ => Vec::new(),
        };
        let limit = Duration::from_millis(
            int(limit_ms)
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(CALL_TIMEOUT.as_millis() as u64),
        );
        let reply = match direct.call_within(limit, module, function, args) {
            Ok(v) => Tuple::from(vec![
                Atom::from("reply").into(),
                id.clone(),
                Atom::from("ok").into(),
                v,
            ]),
            Err(e) => Tuple::from(vec![
                Atom::from("reply").into(),
                id.clone(),
                Atom::from("error").into(),
                error_term(&e),
            ]),
        };
        if !control_write(&control, &reply.into()) {
            return 0;
        }
    }
}

fn text_raw(t: &Term) -> String {
    match t {
        Term::Binary(b) => String::from_utf8_lossy(&b.bytes).into_owned(),
        _ => String::new(),
    }
}

fn control_write(mut s: &UnixStream, t: &Term) -> bool {
    s.write_all(&message(t)).is_ok()
}

/// The parent's side: the child, and the socket pair to it.
pub(crate) struct Sandboxed {
    child: Mutex<Child>,
    /// Calls go one at a time: a request, then its reply.
    control: Mutex<UnixStream>,
    node: String,
    next_id: AtomicU32,
    ended: Mutex<Option<VmError>>,
    pid: u32,
}

fn os_error(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::Call {
        call: "the VM connection process".into(),
        reason: format!("{what}: {e}"),
    }
}

impl Sandboxed {
    /// Starts the child with the connected `socket`, hands it the cookie and waits for the
    /// handshake's outcome.
    pub(crate) fn start(socket: TcpStream, node: &str, cookie: &str) -> Result<Sandboxed, VmError> {
        let (mut ours, theirs) = UnixStream::pair().map_err(|e| os_error("socket pair", e))?;
        // Above the fds the child gets them on, so that putting one in place cannot overwrite
        // the other.
        let high = |fd: RawFd| {
            // SAFETY: duplicates an fd we own; the copy is closed below.
            let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            (d >= 0)
                .then_some(d)
                .ok_or_else(|| os_error("dup", std::io::Error::last_os_error()))
        };
        let dist = high(socket.as_raw_fd())?;
        let control = match high(theirs.as_raw_fd()) {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: our own duplicate.
                unsafe { libc::close(dist) };
                return Err(e);
            }
        };
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg(CHILD_ARG)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; it clears close-on-exec on the copies.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(dist, DIST_FD) < 0 || libc::dup2(control, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // SAFETY: our own duplicates; the child has its copies.
        unsafe {
            libc::close(dist);
            libc::close(control);
        }
        drop(theirs);
        drop(socket);
        let mut child = spawned.map_err(|e| os_error("cannot start it", e))?;
        let pid = child.id();
        let started = Instant::now();
        let hello = Tuple::from(vec![Atom::from("hello").into(), bin(node), bin(cookie)]);
        let answer = if control_write(&ours, &hello.into()) {
            let _ = ours.set_read_timeout(Some(crate::vm::client::CONNECT_TIMEOUT + GRACE));
            read_message(&mut ours, 64 << 10)
        } else {
            Err("the process went away".into())
        };
        let failed = |e: VmError, child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        };
        match answer {
            Ok(t) if atom(&t) == Some("ok") => {}
            Ok(t) => return failed(error_from(&t, node), &mut child),
            Err(e) => {
                return failed(
                    os_error(
                        &format!("no handshake after {:.1}s", started.elapsed().as_secs_f64()),
                        e,
                    ),
                    &mut child,
                );
            }
        }
        Ok(Sandboxed {
            child: Mutex::new(child),
            control: Mutex::new(ours),
            node: node.to_owned(),
            next_id: AtomicU32::new(1),
            ended: Mutex::new(None),
            pid,
        })
    }

    /// The child's PID.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn end(&self, e: VmError) -> VmError {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        ended.get_or_insert(e.clone());
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        e
    }

    /// As [`crate::vm::VmClient::call_within`], through the child.
    pub(crate) fn call_within(
        &self,
        limit: Duration,
        module: &str,
        function: &str,
        args: Vec<Term>,
    ) -> Result<Term, VmError> {
        let name = format!("{module}:{function}/{}", args.len());
        if let Some(e) = self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(e);
        }
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as i32 & i32::MAX;
        let request = Tuple::from(vec![
            Atom::from("call").into(),
            FixInteger::from(id).into(),
            Atom::from(module).into(),
            Atom::from(function).into(),
            List::from(args).into(),
            FixInteger::from(i32::try_from(limit.as_millis()).unwrap_or(i32::MAX)).into(),
        ]);
        if !control_write(&control, &request.into()) {
            return Err(self.end(os_error("it went away", &name)));
        }
        let deadline = Instant::now() + limit + GRACE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || control.set_read_timeout(Some(left)).is_err() {
                // The child enforces the limit itself: one that says nothing is stuck.
                return Err(self.end(VmError::Timeout {
                    call: name,
                    after: limit,
                }));
            }
            let reply = match read_message(&mut *control, MAX_MESSAGE) {
                Ok(r) => r,
                Err(e) => return Err(self.end(os_error(&format!("{name}: no reply"), e))),
            };
            let Term::Tuple(Tuple { elements }) = reply else {
                return Err(self.end(os_error(&name, "a malformed reply")));
            };
            let Ok([tag, rid, status, value]) = <[Term; 4]>::try_from(elements) else {
                return Err(self.end(os_error(&name, "a malformed reply")));
            };
            if atom(&tag) != Some("reply") || int(&rid) != Some(i64::from(id)) {
                // The answer to a call given up on.
                continue;
            }
            return match atom(&status) {
                Some("ok") => Ok(value),
                _ => {
                    let e = error_from(&value, &self.node);
                    if matches!(e, VmError::ReplyOverCap { .. }) {
                        return Err(self.end(e));
                    }
                    Err(e)
                }
            };
        }
    }
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_from_the_child_as_they_were() {
        for e in [
            VmError::Timeout {
                call: "erlang:memory/0".into(),
                after: Duration::from_millis(2500),
            },
            VmError::ReplyOverCap {
                call: "erlang:processes/0".into(),
                what: "a reply nested deeper than 64 levels".into(),
            },
            VmError::Refused {
                node: "a@b".into(),
                reason: "cookie mismatch".into(),
            },
            VmError::Call {
                call: "ets:all/0".into(),
                reason: "{error,notsup}".into(),
            },
        ] {
            let bytes = message(&error_term(&e));
            let back = read_message(&mut &bytes[..], 1 << 20).unwrap();
            assert_eq!(error_from(&back, "a@b").to_string(), e.to_string());
        }
    }

    #[test]
    fn a_message_over_the_cap_is_refused_unread() {
        let mut bytes = 3_000_000_000u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let e = read_message(&mut &bytes[..], MAX_MESSAGE).unwrap_err();
        assert!(e.contains("over the"), "{e}");
    }
}
