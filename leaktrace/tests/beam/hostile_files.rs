//! A hostile node owner against leaktrace, which runs as root: every file whose path the node
//! controls (its `-root DIR/releases/*/OTP_VERSION`, the objects it maps, its JIT's
//! `/tmp/perf-PID.map`) is made a symlink to a root-only secret, a FIFO, `/dev/zero` or a huge
//! sparse file. The node runs as `nobody` and owns what it controls. leaktrace must not print
//! the secret anywhere, must not hang, and must stay within bounded memory.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use leaktrace::target::perf_map::PerfMapSource;

use super::{LEAKTRACE, Node, fixtures, privileged, serial};

/// `nobody` on Debian.
const NOBODY: u32 = 65534;
/// What a root-only file holds: it must never show in anything leaktrace writes.
const SECRET: &str = "ROOT-ONLY-SECRET-7f3a9c";

/// A temporary directory everyone may traverse (the node runs as nobody).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn chown_nobody(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path; lchown changes a symlink itself, not its target.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), NOBODY, NOBODY) }, 0);
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "{path:?}");
}

/// A root-only file (mode 0600) holding [`SECRET`], shaped as a perf map line naming every
/// address, so that reading it anywhere would put it in a report.
fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("root-only");
    fs::write(&path, format!("0 7fffffffffff {SECRET}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A home directory of its own for the node's user (its cookie goes there).
fn nobody_home(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    fs::create_dir_all(&home).unwrap();
    chown_nobody(&home);
    home
}

/// Starts `program args` as nobody (no groups) in `home`; the child becomes beam.smp.
fn start_as_nobody(home: &Path, env: &[(&str, &Path)], program: &Path, args: &[&str]) -> Node {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
    ])
    .arg(program)
    .args(args)
    .env("HOME", home)
    .current_dir(home)
    .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("setpriv (util-linux)");
    let node = Node { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_link(format!("/proc/{}/exe", node.pid()))
        .is_ok_and(|e| e.to_string_lossy().contains("beam.smp"))
    {
        assert!(Instant::now() < deadline, "the node never ran beam.smp");
        thread::sleep(Duration::from_millis(20));
    }
    node
}

/// What a bounded run of leaktrace gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    /// Peak RSS of the leaktrace process (ru_maxrss), KiB.
    max_rss_kib: i64,
}

impl Run {
    fn evidence(&self) -> String {
        format!(
            "exit {:?} after {:.1} s, peak RSS {} MiB\nstderr: {}\nstdout: {}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.max_rss_kib / 1024,
            self.stderr,
            &self.stdout[..self.stdout.len().min(4000)]
        )
    }
}

/// Runs leaktrace with `args`, killing it (and failing) when it runs past `limit`; measures
/// its peak RSS with wait4.
fn run_bounded(args: &[&str], limit: Duration) -> Run {
    let out = tempfile::tempdir().unwrap();
    let (so, se) = (out.path().join("stdout"), out.path().join("stderr"));
    // Reaped by wait4 below, which also gives its rusage (Child::wait does not).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(LEAKTRACE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&so).unwrap())
        .stderr(fs::File::create(&se).unwrap())
        .spawn()
        .expect("run leaktrace");
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: our own child; status and usage outlive the call.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if started.elapsed() > limit {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!(
                "leaktrace {args:?} still ran after {limit:?}: killed\nstderr: {}",
                fs::read_to_string(&se).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Run {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: fs::read_to_string(&so).unwrap_or_default(),
        stderr: fs::read_to_string(&se).unwrap_or_default(),
        elapsed: started.elapsed(),
        max_rss_kib: usage.ru_maxrss,
    }
}

/// Fails when [`SECRET`] is in the run's output or in any file under `out`.
fn assert_secret_absent(run: &Run, out: Option<&Path>, what: &str) {
    assert!(
        !run.stdout.contains(SECRET) && !run.stderr.contains(SECRET),
        "{what}: the secret is in leaktrace's output\n{}",
        run.evidence()
    );
    let Some(out) = out else { return };
    let mut files = vec![out.to_path_buf()];
    let mut seen = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        seen += 1;
        let bytes = fs::read(&p).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{what}: the secret is in {}",
            p.display()
        );
    }
    assert!(seen > 0, "{what}: nothing written under {}", out.display());
}

fn assert_exit_0_to_3(run: &Run, what: &str) {
    assert!(
        matches!(run.code, Some(0..=3)),
        "{what}: not an exit 0-3\n{}",
        run.evidence()
    );
}

fn otp_root() -> PathBuf {
    PathBuf::from(
        String::from_utf8(
            Command::new("erl")
                .args([
                    "-noshell",
                    "-eval",
                    "io:format(\"~s\", [code:root_dir()]), halt().",
                ])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap(),
    )
}

/// The release of the real OTP install (what a node running it really is).
fn real_release(root: &Path) -> String {
    fs::read_dir(root.join("releases"))
        .unwrap()
        .find_map(|e| fs::read_to_string(e.ok()?.path().join("OTP_VERSION")).ok())
        .unwrap()
        .trim()
        .to_owned()
}

/// What the node's `OTP_VERSION` is made.
#[derive(Clone, Copy, Debug)]
enum Bait {
    SymlinkToSecret,
    Fifo,
    SymlinkToDevZero,
}

#[test]
fn otp_version_of_a_hostile_root_is_never_read() {
    if !privileged("otp_version_of_a_hostile_root_is_never_read") {
        return;
    }
    let _s = serial();
    let real = otp_root();
    let erts = fs::read_dir(&real)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("erts-"))
        .unwrap();
    let bin = real.join(&erts).join("bin");
    for (i, bait) in [Bait::SymlinkToSecret, Bait::Fifo, Bait::SymlinkToDevZero]
        .into_iter()
        .enumerate()
    {
        let what = format!("OTP_VERSION as {bait:?}");
        let dir = open_tempdir();
        let secret = secret_file(dir.path());
        // A -root of the node's own: the real install's directories by symlink, and a
        // releases/x/OTP_VERSION of its making.
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("releases/x")).unwrap();
        for entry in fs::read_dir(&real).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "releases" {
                std::os::unix::fs::symlink(entry.path(), root.join(entry.file_name())).unwrap();
            }
        }
        let version = root.join("releases/x/OTP_VERSION");
        match bait {
            Bait::SymlinkToSecret => std::os::unix::fs::symlink(&secret, &version).unwrap(),
            Bait::Fifo => mkfifo(&version),
            Bait::SymlinkToDevZero => std::os::unix::fs::symlink("/dev/zero", &version).unwrap(),
        }
        for p in [
            root.clone(),
            root.join("releases"),
            root.join("releases/x"),
            version,
        ] {
            chown_nobody(&p);
        }
        let home = nobody_home(dir.path());
        let name = format!("lt_hostile_rel{i}");
        let node = start_as_nobody(
            &home,
            &[("BINDIR", &bin), ("ROOTDIR", &root)],
            &bin.join("erlexec"),
            &[
                "-sname",
                &name,
                "-noshell",
                "-eval",
                "timer:sleep(infinity)",
            ],
        );
        let cmdline = fs::read(format!("/proc/{}/cmdline", node.pid())).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&format!("-root\0{}", root.display())),
            "the node was not started with -root {}",
            root.display()
        );
        // Distribution comes up a moment after beam.smp starts.
        thread::sleep(Duration::from_secs(2));
        let pid = node.pid().to_string();
        let out = dir.path().join("out");
        let attach = run_bounded(
            &[
                "attach",
                "--pid",
                &pid,
                "--duration",
                "3s",
                "--interval",
                "500ms",
                "--out",
                out.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        );
        assert_exit_0_to_3(&attach, &what);
        assert_secret_absent(&attach, Some(&out), &what);
        let report: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
        // The -root is refused; the install above the running executable is the real one.
        assert_eq!(
            report["target"]["otp_release"].as_str(),
            Some(real_release(&real).as_str()),
            "{what}\n{}",
            attach.evidence()
        );
        for json in [false, true] {
            let mut args = vec!["vm", "--pid", &pid];
            if json {
                args.push("--json");
            }
            let vm = run_bounded(&args, Duration::from_secs(60));
            assert_exit_0_to_3(&vm, &what);
            assert_secret_absent(&vm, None, &what);
        }
        eprintln!(
            "{what}: attach {:.1} s exit {:?}, release {}",
            attach.elapsed.as_secs_f64(),
            attach.code,
            report["target"]["otp_release"]
        );
        drop(node);
    }
}

/// The C library this test runs with (the node's is the same file).
fn own_libc() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libc.so"))
        })
        .map(PathBuf::from)
        .expect("this test maps a libc")
}

#[test]
fn mapped_objects_replaced_by_fifos_do_not_block_native_probes() {
    if !privileged("mapped_objects_replaced_by_fifos_do_not_block_native_probes") {
        return;
    }
    let _s = serial();
    let dir = open_tempdir();
    // The node's own copies: its NIF and the C library it runs with (LD_LIBRARY_PATH).
    let nif = dir.path().join("nif");
    let lib = dir.path().join("lib");
    fs::create_dir_all(&nif).unwrap();
    fs::create_dir_all(&lib).unwrap();
    for f in ["lt_native.so", "lt_native.beam"] {
        fs::copy(fixtures().join(f), nif.join(f)).unwrap();
    }
    let libc_name = own_libc().file_name().unwrap().to_owned();
    fs::copy(own_libc(), lib.join(&libc_name)).unwrap();
    for p in [
        nif.clone(),
        lib.clone(),
        nif.join("lt_native.so"),
        nif.join("lt_native.beam"),
        lib.join(&libc_name),
    ] {
        chown_nobody(&p);
    }
    let home = nobody_home(dir.path());
    let erl = which("erl");
    let node = start_as_nobody(
        &home,
        &[("LD_LIBRARY_PATH", &lib)],
        &erl,
        &[
            "-noshell",
            "-pa",
            nif.to_str().unwrap(),
            "-eval",
            "lt_native:leak_forever(leak_malloc, 262144, 20)",
        ],
    );
    let maps_path = format!("/proc/{}/maps", node.pid());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mapped = |name: &Path| {
        fs::read_to_string(&maps_path)
            .unwrap_or_default()
            .contains(&name.display().to_string())
    };
    while !(mapped(&nif.join("lt_native.so")) && mapped(&lib.join(&libc_name))) {
        assert!(
            Instant::now() < deadline,
            "the node never mapped its own NIF and libc:\n{}",
            fs::read_to_string(&maps_path).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The swap: each file removed, and FIFOs where it was and where " (deleted)" names it.
    for (d, f) in [
        (&nif, "lt_native.so".to_owned()),
        (&lib, libc_name.to_string_lossy().into_owned()),
    ] {
        fs::remove_file(d.join(&f)).unwrap();
        for name in [f.clone(), format!("{f} (deleted)")] {
            mkfifo(&d.join(&name));
            chown_nobody(&d.join(&name));
        }
    }
    let maps = fs::read_to_string(&maps_path).unwrap();
    for gone in [nif.join("lt_native.so"), lib.join(&libc_name)] {
        assert!(
            maps.contains(&format!("{} (deleted)", gone.display())),
            "{maps}"
        );
    }
    let out = dir.path().join("out");
    let run = run_bounded(
        &[
            "attach",
            "--pid",
            &node.pid().to_string(),
            "--duration",
            "6s",
            "--interval",
            "500ms",
            "--no-vm",
            "--native",
            "on",
            "--stacks",
            "8",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert_exit_0_to_3(&run, "FIFOs at mapped paths");
    assert!(
        run.elapsed < Duration::from_secs(6 + 12),
        "the run took {:.1} s for --duration 6s\n{}",
        run.elapsed.as_secs_f64(),
        run.evidence()
    );
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("no report.json on stdout ({e})\n{}", run.evidence()));
    assert!(out.join("report.json").is_file(), "{}", run.evidence());
    assert_eq!(
        report["sources"]["native_probes"],
        true,
        "native probes did not attach through the deleted libc's mapping\n{}",
        run.evidence()
    );
    let modules = report["native"]["modules"].to_string();
    // Named from the very file mapped (map_files), though its path is now a FIFO.
    let named = report["native"]["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["module"] == "lt_native.so" && m["function"] == "leak_malloc");
    assert!(
        named,
        "the NIF is not named lt_native.so: leak_malloc: {modules}\n{}",
        run.evidence()
    );
    eprintln!(
        "FIFOs at mapped paths: {:.1} s, exit {:?}, peak RSS {} MiB, verdict {}, modules {modules}",
        run.elapsed.as_secs_f64(),
        run.code,
        run.max_rss_kib / 1024,
        report["verdict"]["kind"]
    );
}

fn which(program: &str) -> PathBuf {
    PathBuf::from(
        String::from_utf8(
            Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim(),
    )
}

/// What the node's perf map is made.
#[derive(Clone, Copy, Debug)]
enum PerfBait {
    SymlinkToSecret,
    Sparse8G,
    Fifo,
}

/// Puts `bait` at `path` (owned by the node's user), with `dir` for its targets.
fn place_perf_bait(path: &Path, bait: PerfBait, dir: &Path) {
    let _ = fs::remove_file(path);
    match bait {
        PerfBait::SymlinkToSecret => {
            std::os::unix::fs::symlink(secret_file(dir), path).unwrap();
        }
        PerfBait::Sparse8G => {
            let f = fs::File::create(path).unwrap();
            f.set_len(8 << 30).unwrap();
        }
        PerfBait::Fifo => mkfifo(path),
    }
    chown_nobody(path);
}

/// The perf map reader itself, against a real process of nobody's: each bait refused at
/// once, a sane map of its user's read.
#[test]
fn perf_map_reader_refuses_what_a_node_owner_can_put_there() {
    if !privileged("perf_map_reader_refuses_what_a_node_owner_can_put_there") {
        return;
    }
    let mut sleeper = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "sleep",
            "60",
        ])
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    // Until setpriv has become nobody and exec'd sleep.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with("sleep")) {
        assert!(Instant::now() < deadline, "setpriv never ran sleep");
        thread::sleep(Duration::from_millis(10));
    }
    let dir = open_tempdir();
    let path = PathBuf::from(format!("/tmp/perf-{pid}.map"));
    for bait in [
        PerfBait::SymlinkToSecret,
        PerfBait::Sparse8G,
        PerfBait::Fifo,
    ] {
        place_perf_bait(&path, bait, dir.path());
        let mut source = PerfMapSource::new(pid);
        let started = Instant::now();
        let refused = source.refresh();
        assert!(started.elapsed() < Duration::from_secs(5), "{bait:?}");
        let why = refused.expect_err(&format!("{bait:?} was read"));
        assert!(source.map().is_empty(), "{bait:?}: {why}");
        assert!(!why.contains(SECRET), "{why}");
        eprintln!("{bait:?}: {why}");
    }
    // The node's own regular file is read.
    let _ = fs::remove_file(&path);
    fs::write(&path, "7f0000001000 40 $lists:reverse/2\n").unwrap();
    chown_nobody(&path);
    let mut source = PerfMapSource::new(pid);
    source.refresh().unwrap();
    assert_eq!(
        source.map().name(0x7f00_0000_1010),
        Some("$lists:reverse/2")
    );
    // Root's file at that path is not the node's: refused.
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), 0, 0) }, 0);
    let why = PerfMapSource::new(pid).refresh().unwrap_err();
    assert!(why.contains("owned by uid 0"), "{why}");
    let _ = fs::remove_file(&path);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn perf_map_of_a_hostile_node_is_never_read() {
    if !privileged("perf_map_of_a_hostile_node_is_never_read") {
        return;
    }
    let _s = serial();
    let erl = which("erl");
    for bait in [
        PerfBait::SymlinkToSecret,
        PerfBait::Sparse8G,
        PerfBait::Fifo,
    ] {
        let what = format!("perf map as {bait:?}");
        let dir = open_tempdir();
        let home = nobody_home(dir.path());
        // The node's own NIF (a file its user could truncate): named without mapping it.
        let nif = dir.path().join("nif");
        fs::create_dir_all(&nif).unwrap();
        chown_nobody(&nif);
        for f in ["lt_native.so", "lt_native.beam"] {
            fs::copy(fixtures().join(f), nif.join(f)).unwrap();
            chown_nobody(&nif.join(f));
        }
        let node = start_as_nobody(
            &home,
            &[],
            &erl,
            &[
                "+JPperf",
                "true",
                "-noshell",
                "-pa",
                nif.to_str().unwrap(),
                "-eval",
                "lt_native:leak_forever(leak_malloc, 262144, 20)",
            ],
        );
        let pid = node.pid();
        let path = PathBuf::from(format!("/tmp/perf-{pid}.map"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{what}: the node wrote no perf map"
            );
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_secs(1));
        place_perf_bait(&path, bait, dir.path());
        let out = dir.path().join("out");
        let run = run_bounded(
            &[
                "attach",
                "--pid",
                &pid.to_string(),
                "--duration",
                "4s",
                "--interval",
                "500ms",
                "--no-vm",
                "--native",
                "on",
                "--stacks",
                "8",
                "--out",
                out.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        );
        let _ = fs::remove_file(&path);
        let _ = fs::remove_file(format!("/tmp/jit-{pid}.dump"));
        assert_exit_0_to_3(&run, &what);
        assert_secret_absent(&run, Some(&out), &what);
        assert!(
            run.max_rss_kib < 256 * 1024,
            "{what}: peak RSS {} MiB\n{}",
            run.max_rss_kib / 1024,
            run.evidence()
        );
        let report: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
        let named = report["native"]["modules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["module"] == "lt_native.so" && m["function"] == "leak_malloc");
        assert!(
            named,
            "{what}: the node's own NIF is not named lt_native.so: leak_malloc: {}\n{}",
            report["native"]["modules"],
            run.evidence()
        );
        eprintln!(
            "{what}: {:.1} s, exit {:?}, peak RSS {} MiB",
            run.elapsed.as_secs_f64(),
            run.code,
            run.max_rss_kib / 1024
        );
        drop(node);
    }
}
