//! Nodes in containers: beam.smp in its own PID, mount, network (and UTS) namespaces, made with
//! `unshare --net --mount --pid --fork --mount-proc`, traced from the host by its host PID. They
//! must get the verdicts plain nodes get: the native probes reach libc and the NIF through the
//! container's files, the VM view dials the container's 127.0.0.1 from inside its network
//! namespace with the cookie from the container's own home (a tmpfs only the container sees),
//! and the ledger carries the memory cgroup's figures beside RSS.
//!
//! Every namespace dies with the node (it is PID 1 of its PID namespace, so killing it kills
//! epmd and everything else inside; the mounts go with the mount namespace); cgroups made here
//! are removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    assert_native_leak, attach_vm, culprit_names, fixtures, leaktrace, native_context, privileged,
    serial, stderr,
};

/// How a containerized node is set up.
#[derive(Default)]
struct Setup {
    /// `-sname`: distributed (epmd starts inside the container's network namespace).
    sname: Option<&'static str>,
    /// Host name inside its own UTS namespace.
    hostname: Option<&'static str>,
    /// HOME on a tmpfs mounted inside the container only: its `.erlang.cookie` exists nowhere
    /// else.
    private_home: bool,
    /// Erlang installed at /opt/otp inside the container, and /usr/lib/erlang hidden there;
    /// the node runs with a copy of libc at /opt/lib (a file of the container's own): its
    /// paths name files the host does not have at those paths.
    otp_at_opt: bool,
    /// `cgroup.procs` of a memory cgroup to start in (before the namespaces are made).
    cgroup_procs: Option<PathBuf>,
}

/// A beam.smp node in fresh namespaces, killed (with everything in its namespaces) on drop.
struct ContainerNode {
    unshare: Child,
    /// Host PID of beam.smp (PID 1 inside).
    beam: u32,
    /// Mount point of the private home (exists on the host, empty there).
    _home: Option<tempfile::TempDir>,
}

/// The script run as PID 1 of the new namespaces: bring up `lo`, set what `Setup` asks, exec
/// the emulator. Values come in through the environment, never spliced into the script.
const INSIDE: &str = r#"set -e
ip link set lo up
if [ -n "$LT_HOSTNAME" ]; then hostname "$LT_HOSTNAME"; fi
if [ -n "$LT_HOME" ]; then mount -t tmpfs -o mode=0755 lt-home "$LT_HOME"; export HOME="$LT_HOME"; fi
if [ -n "$LT_OTP_AT_OPT" ]; then
  mount -t tmpfs lt-opt /opt
  mkdir /opt/otp
  mount --bind /usr/lib/erlang /opt/otp
  mount -t tmpfs lt-hide /usr/lib/erlang
  mkdir /opt/lib
  cp -L /lib/*-linux-gnu/libc.so.6 /opt/lib/
  export LD_LIBRARY_PATH=/opt/lib
  BINDIR=$(echo /opt/otp/erts-*/bin)
  export ROOTDIR=/opt/otp BINDIR EMU=beam PROGNAME=erl
  exec "$BINDIR/erlexec" "$@"
fi
exec erl "$@"
"#;

impl ContainerNode {
    fn start(setup: Setup, eval: &str) -> ContainerNode {
        let home = setup
            .private_home
            .then(|| tempfile::tempdir().expect("home mount point"));
        let mut cmd = Command::new("sh");
        // Join the cgroup first, so that everything the node ever allocates is charged there.
        cmd.args([
            "-c",
            r#"if [ -n "$LT_CGROUP_PROCS" ]; then echo $$ > "$LT_CGROUP_PROCS"; fi; exec "$@""#,
            "sh",
            "unshare",
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
        ]);
        if setup.hostname.is_some() {
            cmd.arg("--uts");
        }
        cmd.args(["sh", "-c", INSIDE, "sh"]);
        if let Some(name) = setup.sname {
            cmd.args(["-sname", name]);
        }
        cmd.args(["-noshell", "-pa"])
            .arg(fixtures())
            .args(["-eval", eval])
            .env("LT_HOSTNAME", setup.hostname.unwrap_or(""))
            .env(
                "LT_HOME",
                home.as_ref()
                    .map_or(PathBuf::new(), |h| h.path().to_owned()),
            )
            .env("LT_OTP_AT_OPT", if setup.otp_at_opt { "1" } else { "" })
            .env(
                "LT_CGROUP_PROCS",
                setup.cgroup_procs.clone().unwrap_or_default(),
            )
            .stdin(Stdio::null());
        let unshare = cmd.spawn().expect("start unshare (util-linux)");
        let mut node = ContainerNode {
            beam: 0,
            unshare,
            _home: home,
        };
        node.beam = node.wait_for_beam();
        if let Some(name) = setup.sname {
            node.wait_registered(name);
        }
        node
    }

    /// The host PID of beam.smp: unshare's only child, once it has exec'd the emulator.
    fn wait_for_beam(&mut self) -> u32 {
        let unshare = self.unshare.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let child: Option<u32> =
                fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                    .ok()
                    .and_then(|c| c.split_whitespace().next()?.parse().ok());
            if let Some(pid) = child
                && fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|e| e.to_string_lossy().ends_with("beam.smp"))
            {
                return pid;
            }
            if let Ok(Some(status)) = self.unshare.try_wait() {
                panic!("the container exited ({status}) before beam.smp started");
            }
            assert!(
                Instant::now() < deadline,
                "no beam.smp under unshare (PID {unshare}) after 20 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the epmd inside the container lists `name`.
    fn wait_registered(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("nsenter")
                .args(["-t", &self.beam.to_string(), "-n", "epmd", "-names"])
                .output();
            if out.is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!("name {name} "))
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {name} never registered with the container's epmd"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ContainerNode {
    fn drop(&mut self) {
        // PID 1 of its PID namespace: its death kills everything else in there.
        if self.beam != 0 {
            // SAFETY: kill has no memory effects; the PID is our grandchild, still unreaped.
            unsafe { libc::kill(self.beam as i32, libc::SIGKILL) };
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// A memory cgroup made for one test, removed (its processes killed first) on drop.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    /// A child of leaktrace's own memory cgroup (or of the hierarchy's top), `None` (with the
    /// reason printed) where this machine has no memory controller to make one in.
    fn create() -> Option<TestCgroup> {
        let (version, mountpoint) = match leaktrace::cgroup::memory_hierarchy() {
            Ok(h) => h,
            Err(why) => {
                eprintln!("no memory cgroup hierarchy: {why}");
                return None;
            }
        };
        let parent = leaktrace::cgroup::locate(std::process::id()).map_or(mountpoint, |l| l.dir);
        let dir = parent.join(format!("leaktrace-test-{}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cg = TestCgroup { dir };
        let usage = match version {
            leaktrace::cgroup::Version::V1 => "memory.usage_in_bytes",
            leaktrace::cgroup::Version::V2 => "memory.current",
        };
        if !cg.dir.join(usage).exists() {
            // cgroup v2 without memory in the parent's subtree_control.
            eprintln!(
                "{} has no {usage}: memory is not delegated to it",
                cg.dir.display()
            );
            return None;
        }
        Some(cg)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = fs::read_to_string(self.procs()).unwrap_or_default();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill has no memory effects; these are processes this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("could not remove {}", self.dir.display());
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn context(out: &Output, report: &Value) -> String {
    format!(
        "{}\ntarget: {:#}\nvm: {:#}",
        native_context(out, report),
        report["target"],
        report["vm"]["found_by"]
    )
}

/// Requires the source note that says the target runs in a container, as PID 1 there.
fn assert_container_noted(report: &Value, ctx: &str) {
    let notes = report["source_notes"].as_array().expect("source_notes");
    assert!(
        notes.iter().any(|n| n.as_str().is_some_and(|n| {
            n.contains("namespaces (a container)") && n.contains("where it is PID 1")
        })),
        "no container note: {ctx}"
    );
}

/// The plain `leaking_nif_is_a_native_leak`, in a container: same verdict, same culprit.
#[test]
fn containerized_leaking_nif_is_a_native_leak() {
    if !privileged("containerized_leaking_nif_is_a_native_leak") {
        return;
    }
    let _s = serial();
    let node = ContainerNode::start(Setup::default(), "lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let (out, report) = attach_vm(node.beam, "8s", &[]);
    let ctx = context(&out, &report);
    assert_eq!(report["verdict"]["kind"], "native_leak", "{ctx}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert_eq!(report["target"]["pid"], node.beam, "{ctx}");
    assert_eq!(report["sources"]["carrier_probes"], true, "{ctx}");
    assert!(report["native"]["attached_at_s"].is_number(), "{ctx}");
    assert_eq!(
        report["verdict"]["culprits"][0]["name"], "lt_nif.so: leak",
        "{ctx}"
    );
    assert_container_noted(&report, &ctx);
    drop(node);
}

/// The plain `growing_ets_table_is_vm_growth_naming_the_table`, in a container with its own
/// host name and a home only it sees: the VM view finds the node inside the container's
/// network namespace, names it after the container's host, reads the cookie there.
#[test]
fn containerized_growing_ets_table_is_vm_growth_naming_the_table() {
    if !privileged("containerized_growing_ets_table_is_vm_growth_naming_the_table") {
        return;
    }
    let _s = serial();
    let setup = Setup {
        sname: Some("lt_ct_table"),
        hostname: Some("ltbox"),
        private_home: true,
        ..Default::default()
    };
    let node = ContainerNode::start(setup, "lt_vm:grow_table(4000, 50)");
    // The cookie erl wrote is in the container's tmpfs, not at the same path on the host.
    let home = node._home.as_ref().expect("private home").path().to_owned();
    assert!(
        !home.join(".erlang.cookie").exists(),
        "the container's home leaked to the host"
    );
    thread::sleep(Duration::from_secs(1));
    let (out, report) = attach_vm(node.beam, "8s", &[]);
    let ctx = context(&out, &report);
    assert_eq!(report["sources"]["vm_connection"], true, "{ctx}");
    assert_eq!(report["vm"]["node"], "lt_ct_table@ltbox", "{ctx}");
    let found_by = report["vm"]["found_by"].as_str().unwrap_or_default();
    assert!(
        found_by.contains("inside its network namespace") && found_by.contains("is PID 1"),
        "{ctx}"
    );
    assert!(
        report["source_notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n
                .as_str()
                .is_some_and(|n| n.contains("cookie from ~/.erlang.cookie")))),
        "{ctx}"
    );
    assert_eq!(report["verdict"]["kind"], "vm_growth", "{ctx}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    let names = culprit_names(&report);
    assert!(
        names.iter().any(|n| n.contains("lt_growing")),
        "culprits: {names:?}\n{ctx}"
    );
    assert_container_noted(&report, &ctx);
    drop(node);
}

fn meminfo_total() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("MemTotal")
        * 1024
}

/// A node started in a memory cgroup of its own: every sample carries the cgroup's figures,
/// physically possible (above zero, within the machine) and covering the node's anonymous
/// memory, which is all charged there; the terminal summary and report.md show them.
#[test]
fn containerized_node_has_its_cgroup_memory_beside_rss() {
    if !privileged("containerized_node_has_its_cgroup_memory_beside_rss") {
        return;
    }
    let _s = serial();
    let Some(cgroup) = TestCgroup::create() else {
        assert_ne!(
            std::env::var("LEAKTRACE_REQUIRE_PRIVILEGED").as_deref(),
            Ok("1"),
            "no memory cgroup could be made for the test"
        );
        eprintln!("SKIPPED containerized_node_has_its_cgroup_memory_beside_rss: see above");
        return;
    };
    let setup = Setup {
        cgroup_procs: Some(cgroup.procs()),
        ..Default::default()
    };
    let node = ContainerNode::start(setup, "lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let out_dir = tempfile::tempdir().unwrap();
    let dir = out_dir.path().to_str().unwrap();
    let beam = node.beam.to_string();
    // Without --json: stdout is the terminal summary, report.json goes to --out.
    let out = leaktrace(&[
        "attach",
        "--pid",
        &beam,
        "--duration",
        "4s",
        "--interval",
        "500ms",
        "--no-vm",
        "--native",
        "off",
        "--out",
        dir,
    ]);
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let report: Value = fs::read(out_dir.path().join("report.json"))
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_else(|| panic!("no report.json: {summary}\nstderr: {}", stderr(&out)));
    let ctx = format!("{}\nsummary:\n{summary}", context(&out, &report));
    let name = cgroup
        .dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let described = report["target"]["cgroup"].as_str().unwrap_or_default();
    assert!(described.contains(&name), "{described:?}: {ctx}");
    let total = meminfo_total();
    let samples = report["samples"].as_array().expect("samples");
    assert!(samples.len() >= 6, "{ctx}");
    for s in samples {
        let figure = |k: &str| {
            s[k].as_u64()
                .unwrap_or_else(|| panic!("{k} missing in {s:#}\n{ctx}"))
        };
        let (memory, anon, file, rss_anon) = (
            figure("cgroup_memory"),
            figure("cgroup_anon"),
            figure("cgroup_file"),
            figure("rss_anon"),
        );
        assert!(memory > 0 && memory <= total, "{s:#}");
        assert!(anon <= memory && file <= memory, "{s:#}");
        // All the node's anonymous memory is charged to its cgroup (the kernel's counters are
        // batched per CPU: allow a little).
        assert!(
            memory + (4 << 20) >= rss_anon && anon + (4 << 20) >= rss_anon * 9 / 10,
            "cgroup {memory} (anon {anon}) below the node's rss_anon {rss_anon}: {s:#}"
        );
    }
    let md = fs::read_to_string(out_dir.path().join("report.md")).unwrap();
    assert!(
        md.lines()
            .any(|l| l.contains(&name) && l.contains("beside RSS")),
        "report.md has no cgroup line:\n{md}"
    );
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("  cgroup: ") && l.contains(&name) && l.contains("beside RSS")),
        "the terminal summary has no cgroup line: {ctx}"
    );
    drop(node);
    drop(cgroup);
}

/// A container whose Erlang lives at /opt/otp and whose libc is its own copy at /opt/lib, paths
/// the host does not have (and whose /usr/lib/erlang is hidden): probes, symbols, the image and
/// the OTP release are all reached through the container's files (a probe on the host's libc
/// would never fire: the leak would go unseen); the NIF leak is named as on a plain node.
#[test]
fn container_with_its_own_otp_path_is_traced_through_its_root() {
    if !privileged("container_with_its_own_otp_path_is_traced_through_its_root") {
        return;
    }
    let _s = serial();
    assert!(
        !Path::new("/opt/otp").exists(),
        "/opt/otp exists on the host: the test would prove nothing"
    );
    let setup = Setup {
        otp_at_opt: true,
        ..Default::default()
    };
    let node = ContainerNode::start(setup, "lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let (out, report) = attach_vm(node.beam, "8s", &["--no-vm", "--native", "on"]);
    let ctx = context(&out, &report);
    let exe = report["target"]["exe"].as_str().unwrap_or_default();
    assert!(exe.starts_with("/opt/otp/erts-"), "{exe}: {ctx}");
    assert!(
        report["target"]["otp_release"]
            .as_str()
            .is_some_and(|r| r.starts_with('2')),
        "OTP release not read inside the container: {ctx}"
    );
    assert_eq!(report["sources"]["carrier_probes"], true, "{ctx}");
    assert!(
        report["samples"]
            .as_array()
            .and_then(|s| s.last())
            .is_some_and(|s| s["carriers"].is_i64()),
        "{ctx}"
    );
    // The image was found mapped under its container path: its tables were read.
    assert!(
        report["source_notes"]
            .as_array()
            .is_some_and(|n| !n.iter().any(|n| n
                .as_str()
                .is_some_and(|n| n.contains("allocator names could not be read")))),
        "{ctx}"
    );
    assert_eq!(report["native"]["libc"], "/opt/lib/libc.so.6", "{ctx}");
    assert_native_leak(&out, &report, &ctx, ("lt_nif.so", "leak"), 8.0);
    assert_container_noted(&report, &ctx);
    drop(node);
}
