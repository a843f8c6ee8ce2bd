//! What a hostile node's owner can get from a tracer running as root, tried as that owner
//! would: root's capabilities left in threads that talk to the node, a command started as
//! root, a root-only args file's cookie handed to the node's handshake, a name on epmd served
//! by something other than a node.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{LEAKTRACE, Node, json, leaktrace, privileged, serial, stderr};

const SYS_PTRACE: u64 = 1 << 19;
const DAC_READ_SEARCH: u64 = 1 << 2;
const CHECKPOINT_RESTORE: u64 = 1 << 40;
const SYS_ADMIN: u64 = 1 << 21;
const PERFMON: u64 = 1 << 38;
const BPF: u64 = 1 << 39;

/// (thread name, CapEff) of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let name = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(eff) = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        {
            out.push((name.trim().to_owned(), eff));
        }
    }
    out
}

fn wait_child(mut child: Child, within: Duration) -> std::process::Output {
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("leaktrace did not end within {within:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn out_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("hostile-access")
        .join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

#[test]
fn capabilities_are_given_up_once_the_probes_are_placed() {
    if !privileged("capabilities_are_given_up_once_the_probes_are_placed") {
        return;
    }
    let _s = serial();
    let node = Node::distributed(
        "lt_caps",
        "T = ets:new(t, [public]), spawn(fun L() -> [ets:insert(T, {erlang:unique_integer(), lists:seq(1, 40)}) || _ <- lists:seq(1, 100)], timer:sleep(50), L() end), receive after infinity -> ok end.",
    );
    for (native, placed) in [("on", true), ("auto", false)] {
        let dir = out_dir(&format!("caps-{native}"));
        let child = Command::new(LEAKTRACE)
            .args([
                "attach",
                "--pid",
                &node.pid().to_string(),
                "--duration",
                "7s",
            ])
            .args(["--native", native, "--out"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let tracer = child.id();
        // Past attach and the VM view's connection, well before the end.
        thread::sleep(Duration::from_secs(4));
        let threads = thread_caps(tracer);
        let out = wait_child(child, Duration::from_secs(60));
        let ctx = format!(
            "--native {native}: threads {threads:x?}\nstderr: {}\nstdout: {}",
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            matches!(out.status.code(), Some(0..=3)),
            "exit {:?}: {ctx}",
            out.status
        );
        assert!(threads.len() >= 2, "{ctx}");
        let main = threads
            .iter()
            .find(|(n, _)| n == "leaktrace")
            .expect("the main thread");
        let reading = SYS_PTRACE | DAC_READ_SEARCH | CHECKPOINT_RESTORE;
        let attaching = SYS_ADMIN | PERFMON | BPF;
        if placed {
            assert_eq!(main.1, reading, "{ctx}");
        } else {
            // --native auto may still attach: what attaching needs is kept, nothing else.
            assert_eq!(main.1, reading | attaching, "{ctx}");
        }
        let report: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        let rec = &report;
        assert_eq!(rec["sources"]["vm_connection"], true, "{ctx}");
        let phases = rec["privileges"].as_array().expect("privileges recorded");
        let names: Vec<&str> = phases.iter().filter_map(|p| p["phase"].as_str()).collect();
        assert_eq!(names[0], "attach", "{names:?}");
        let tracing = phases
            .iter()
            .find(|p| p["phase"].as_str().unwrap_or("").starts_with("tracing"))
            .unwrap_or_else(|| panic!("no tracing phase: {names:?}"));
        let held: Vec<&str> = tracing["held"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(held.contains(&"CAP_SYS_ADMIN"), !placed, "{held:?}");
        assert!(held.contains(&"CAP_SYS_PTRACE"), "{held:?}");
        let md = fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("### Privileges"), "{md}");
        if placed {
            // The native probes read their maps after the drop and still name the node's
            // allocations.
            assert_eq!(rec["sources"]["native_probes"], true, "{ctx}");
        }
    }
}

#[test]
fn run_as_another_user_starts_the_node_without_root() {
    if !privileged("run_as_another_user_starts_the_node_without_root") {
        return;
    }
    let _s = serial();
    let child = Command::new(LEAKTRACE)
        .args([
            "run",
            "--user",
            "nobody",
            "--duration",
            "6s",
            "--no-vm",
            "--",
        ])
        .args(["erl", "-noshell", "-eval", "receive after 20000 -> ok end."])
        .current_dir("/tmp")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tracer = child.id();
    // The command is leaktrace's child; it execs beam.smp under the same PID.
    let deadline = Instant::now() + Duration::from_secs(20);
    let beam = loop {
        let kids = fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children"))
            .unwrap_or_default();
        let found = kids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| {
                fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e.to_string_lossy().ends_with("beam.smp"))
            });
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no beam.smp child of leaktrace");
        thread::sleep(Duration::from_millis(50));
    };
    let status = fs::read_to_string(format!("/proc/{beam}/status")).unwrap();
    // The command outlives the run (leaktrace leaves it running) and holds its stdout: stop
    // it once leaktrace is done, then read what leaktrace said.
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "leaktrace run did not end");
        thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").arg(beam.to_string()).status();
    let out = wait_child(child, Duration::from_secs(60));
    let ctx = format!("status:\n{status}\nstderr: {}", stderr(&out));
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{ctx}"
    );
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(cap_eff.ends_with("0000000000000000"), "{ctx}");
    assert!(matches!(out.status.code(), Some(0..=3)), "{ctx}");
}

/// A node run as `nobody`: its home and cwd are directories it owns.
struct NobodyNode {
    child: Child,
}

impl Drop for NobodyNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_root_only_args_file_gives_no_cookie() {
    if !privileged("a_root_only_args_file_gives_no_cookie") {
        return;
    }
    let _s = serial();
    const SECRET: &str = "rootonlysecret4711";
    let base = out_dir("argsfile");
    let (home, a, b) = (base.join("home"), base.join("a"), base.join("b"));
    for d in [&home, &a, &b] {
        fs::create_dir_all(d).unwrap();
    }
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
    for d in [&home, &a] {
        chown(d, Some(65534), Some(65534)).unwrap();
    }
    // The args file erlexec reads at boot: the node's own, harmless.
    fs::write(a.join("vm.args"), "# the node's own\n").unwrap();
    chown(a.join("vm.args"), Some(65534), Some(65534)).unwrap();
    // Root's file of the same name, unreadable to the node, with another cookie in it.
    fs::set_permissions(&b, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(b.join("vm.args"), format!("-setcookie {SECRET}\n")).unwrap();
    fs::set_permissions(b.join("vm.args"), fs::Permissions::from_mode(0o600)).unwrap();
    // The node names `-args_file vm.args` (relative) in ERL_AFLAGS, boots from its own
    // directory, then moves its cwd to root's: /proc/PID/cwd/vm.args is now root's file.
    let name = "lt_argsfile";
    let eval = format!(
        "ok = file:set_cwd(\"{}\"), receive after infinity -> ok end.",
        b.display()
    );
    let node = NobodyNode {
        child: Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(["erl", "-sname", name, "-noshell", "-eval", &eval])
            .env("HOME", &home)
            .env("ERL_AFLAGS", "-args_file vm.args")
            .current_dir(&a)
            .stdin(Stdio::null())
            .spawn()
            .expect("setpriv (util-linux)"),
    };
    let pid = node.child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let registered = Command::new("epmd")
            .arg("-names")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("name {name} ")));
        if cwd == b && registered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node never registered with its cwd moved (cwd {})",
            cwd.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The node's own cookie (~/.erlang.cookie it made) is the one to use: leaktrace connects.
    let out = leaktrace(&["vm", "--pid", &pid.to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!text.contains(SECRET), "{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    let dir = base.join("out");
    let out = leaktrace(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        "3s",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let report = json_or_dir(&out, &dir);
    assert!(matches!(out.status.code(), Some(0..=3)), "{}", stderr(&out));
    assert_eq!(
        report["vm"]["node"].as_str().map(|n| n.starts_with(name)),
        Some(true),
        "{report}"
    );
    for f in fs::read_dir(&dir).unwrap().flatten() {
        let mut body = String::new();
        let _ = fs::File::open(f.path()).and_then(|mut h| h.read_to_string(&mut body));
        assert!(
            !body.contains(SECRET),
            "{} holds the secret",
            f.path().display()
        );
    }
}

fn json_or_dir(out: &std::process::Output, dir: &Path) -> serde_json::Value {
    match fs::read_to_string(dir.join("report.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap(),
        Err(_) => json(out),
    }
}

/// Registers `name` with epmd on 127.0.0.1 for `port` (ALIVE2_REQ) and keeps the
/// registration while the returned stream lives: something that is not a node.
fn register_with_epmd(name: &str, port: u16) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", 4369)).unwrap();
    let mut body = vec![120u8];
    body.extend(port.to_be_bytes());
    body.push(77); // normal node
    body.push(0); // tcp
    body.extend(6u16.to_be_bytes());
    body.extend(5u16.to_be_bytes());
    body.extend((name.len() as u16).to_be_bytes());
    body.extend(name.as_bytes());
    body.extend(0u16.to_be_bytes());
    let mut req = (body.len() as u16).to_be_bytes().to_vec();
    req.extend(body);
    s.write_all(&req).unwrap();
    let mut resp = [0u8; 4];
    s.read_exact(&mut resp).unwrap();
    // ALIVE2_X_RESP (118, OTP 23+) or ALIVE2_RESP (121), result 0.
    assert!(
        matches!(resp[..2], [118, 0] | [121, 0]),
        "epmd refused the registration: {resp:?}"
    );
    s
}

#[test]
fn a_name_on_epmd_served_by_something_else_is_refused() {
    if !privileged("a_name_on_epmd_served_by_something_else_is_refused") {
        return;
    }
    let _s = serial();
    // epmd runs once a node has started; make sure one is up.
    let _up = Node::distributed("lt_epmd_up", "receive after infinity -> ok end.");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _registration = register_with_epmd("lt_impostor", port);
    let out = leaktrace(&["vm", "--node", "lt_impostor"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no beam.smp on this host listens there")
            && err.contains(&format!("PID {} does", std::process::id())),
        "{err}"
    );
    drop(listener);
    // A real node named alone is found through its process and reached with its cookie.
    let out = leaktrace(&["vm", "--node", "lt_epmd_up"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
