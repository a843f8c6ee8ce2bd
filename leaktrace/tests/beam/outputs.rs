//! The files a tracing run writes as root (`--out`, `--record`), against a real beam.smp: a
//! write that fails after the run (a full filesystem) still prints the verdict first, then a
//! clear error, exit 2, and nothing left in the kernel; a path that cannot be written is refused
//! before anything is attached.

use std::{
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use super::{Node, leaktrace, leftover_programs, privileged, serial, stderr};

/// A scratch directory for `name`, emptied.
fn scratch(name: &str) -> PathBuf {
    super::scratch_in("outputs", name)
}

/// A small tmpfs mounted at a directory, filled to the last byte; unmounted on drop, whatever
/// the test did.
struct FullTmpfs {
    dir: PathBuf,
}

impl FullTmpfs {
    fn mount(dir: &Path) -> FullTmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount(8)");
        assert!(out.status.success(), "mount tmpfs: {}", stderr(&out));
        let fs = FullTmpfs {
            dir: dir.to_path_buf(),
        };
        // More than it holds: the write fails part way with ENOSPC, the file keeps what fitted.
        let err = fs::write(dir.join("filler"), vec![0u8; 256 << 10]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        fs
    }
}

impl Drop for FullTmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.dir)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !umount(false) {
            // Busy (a process still in it): detach it now, freed when the last user goes.
            umount(true);
        }
    }
}

/// Names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Bytes of `pid`'s executable mappings of beam.smp that differ from the file: the int3 of
/// each uprobe still in place (0 once every probe is gone).
fn patched_bytes(pid: u32) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("target gone");
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = false;
    let mut differ = 0;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || !f[5].ends_with("/beam.smp") {
            continue;
        }
        let (start, end) = f[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = usize::from_str_radix(f[2], 16).unwrap();
        let file = fs::read(f[5]).unwrap();
        let len = ((end - start) as usize).min(file.len().saturating_sub(offset));
        let mut live = vec![0u8; len];
        mem.read_exact_at(&mut live, start).unwrap();
        differ += live
            .iter()
            .zip(&file[offset..offset + len])
            .filter(|(a, b)| a != b)
            .count();
        found = true;
    }
    assert!(found, "no executable mapping of beam.smp in {pid}");
    differ
}

/// Whether another leaktrace runs on this host (another test binary): its programs are loaded
/// too, so a count of loaded programs says nothing about ours then.
fn other_tracers_running() -> bool {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "leaktrace"))
}

/// Nothing of the run left: no uprobe in the target; no leaktrace program loaded (checked when
/// no other tracer runs).
fn assert_nothing_left(pid: u32, ctx: &str) {
    assert_eq!(patched_bytes(pid), 0, "uprobes left in the target: {ctx}");
    if !other_tracers_running() {
        assert_eq!(leftover_programs(), 0, "probes left behind: {ctx}");
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_full_filesystem_is_an_error_after_the_verdict_and_leaves_no_probe() {
    if !privileged("outputs::a_full_filesystem_is_an_error_after_the_verdict_and_leaves_no_probe") {
        return;
    }
    let _s = serial();
    let mnt = scratch("full");
    let full = FullTmpfs::mount(&mnt);
    let node = Node::start("lt_load:healthy_forever(10)");
    thread::sleep(Duration::from_secs(1));
    let record = mnt.join("run.json");
    let out = leaktrace(&[
        "attach",
        "--pid",
        &node.pid().to_string(),
        "--duration",
        "3s",
        "--interval",
        "500ms",
        "--no-vm",
        "--quiet",
        "--out",
        mnt.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
    ]);
    let (stdout, err) = (stdout(&out), stderr(&out));
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{err}");
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!err.contains("panicked"), "{ctx}");
    // The verdict, whole, on stdout; no "report:" line, as none was written.
    assert!(stdout.starts_with("verdict: "), "{ctx}");
    assert!(!stdout.contains("report: "), "{ctx}");
    // Then each failure, saying what, where and why, and that the verdict stands.
    let report_err = format!(
        "leaktrace: error: could not write the report to {}",
        mnt.display()
    );
    let record_err = format!(
        "leaktrace: error: could not write the recording to {}",
        record.display()
    );
    for expect in [&report_err, &record_err] {
        let line = err
            .lines()
            .find(|l| l.starts_with(expect.as_str()))
            .unwrap_or_else(|| panic!("no {expect:?}: {ctx}"));
        assert!(line.contains("No space left on device"), "{line}");
        assert!(line.ends_with("(the verdict above stands)"), "{line}");
    }
    // Nothing partial: no report, recording or temporary file beside the filler.
    assert_eq!(names_in(&mnt), ["filler"], "{ctx}");
    assert_nothing_left(node.pid(), &ctx);
    drop(node);
    drop(full);
    assert!(
        !fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "tmpfs still mounted"
    );
}

/// `attach` on `pid` for 30 s with `extra`: refused before attaching, it ends at once.
fn refused_before_attaching(pid: u32, extra: &[&str], expect: &str) {
    let started = Instant::now();
    let pid = pid.to_string();
    let mut args = vec![
        "attach",
        "--pid",
        &pid,
        "--duration",
        "30s",
        "--interval",
        "500ms",
        "--no-vm",
        "--quiet",
    ];
    args.extend(extra);
    let out = leaktrace(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
    assert!(err.contains(expect), "{extra:?}: {err}");
    assert!(!err.contains("verdict above"), "{extra:?}: {err}");
    assert!(out.stdout.is_empty(), "{extra:?}: no verdict, no trace");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{extra:?}: took {:?}: it traced",
        started.elapsed()
    );
    assert_nothing_left(pid.parse().unwrap(), &format!("{extra:?}"));
}

#[test]
fn unwritable_outputs_are_refused_before_anything_is_attached() {
    if !privileged("outputs::unwritable_outputs_are_refused_before_anything_is_attached") {
        return;
    }
    let _s = serial();
    let dir = scratch("unwritable");
    let node = Node::start("lt_load:healthy_forever(10)");
    let pid = node.pid();
    // --record in a directory that does not exist (leaktrace creates none for it).
    let missing = dir.join("no/such/dir/run.json");
    refused_before_attaching(
        pid,
        &["--record", missing.to_str().unwrap()],
        &format!(
            "could not write the recording to {}: {} does not exist",
            missing.display(),
            dir.join("no/such/dir").display()
        ),
    );
    // ...or under a regular file, which no one can create a directory in.
    let file = dir.join("file");
    fs::write(&file, "").unwrap();
    refused_before_attaching(
        pid,
        &["--record", file.join("run.json").to_str().unwrap()],
        "is a regular file, not a directory",
    );
    refused_before_attaching(
        pid,
        &["--out", file.join("out").to_str().unwrap()],
        "could not write the report to",
    );
    // A symbolic link planted at the --record destination: refused, its target untouched.
    let victim = dir.join("victim");
    fs::write(&victim, "precious").unwrap();
    let link = dir.join("run.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    refused_before_attaching(
        pid,
        &["--record", link.to_str().unwrap()],
        "run.json is a symbolic link, and leaktrace (running as root) never writes through one",
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    // Nothing created by the checks.
    assert_eq!(names_in(&dir), ["file", "run.json", "victim"]);
}
