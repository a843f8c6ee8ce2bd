//! The live view as a person sees it: leaktrace in a tmux pane (120x40), the screen read with
//! `tmux capture-pane`, while a node leaks through a NIF.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use super::{LEAKTRACE, Node, privileged, serial};

/// The live view's last line (leaktrace::live::FOOTER).
const FOOTER: &str = "Ctrl-C ends the run and writes the report";

/// A tmux server of its own (`-S`, its socket under the test's temporary directory), holding
/// one detached session that runs leaktrace; the server, what runs in it and the socket go on
/// drop.
struct Pane {
    socket: PathBuf,
}

impl Pane {
    /// Starts `args` of leaktrace in a 120x40 pane that stays readable after leaktrace exits.
    fn start(tag: &str, args: &[&str]) -> Pane {
        let pane = Pane {
            socket: Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("lt-live-{}-{tag}.tmux", std::process::id())),
        };
        // exec: leaktrace itself is the pane's process, so Ctrl-C reaches it alone and no
        // shell exits under it (which would hang it up).
        let command = format!("exec '{LEAKTRACE}' {}", args.join(" "));
        let out = pane
            .tmux()
            .args(["new-session", "-d", "-s", "live", "-x", "120", "-y", "40"])
            .arg(&command)
            .args([
                ";",
                "set-option",
                "-w",
                "-t",
                "live",
                "remain-on-exit",
                "on",
            ])
            .output()
            .unwrap_or_else(|e| panic!("tmux (run `cargo xtask setup`): {e}"));
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pane
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket);
        c
    }

    /// The screen as the person at the terminal sees it now.
    fn capture(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", "live"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Captures until `done` holds, at most `within`; the last screen either way.
    fn wait_for(&self, within: Duration, done: impl Fn(&str) -> bool) -> (bool, String) {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.capture();
            if done(&screen) || Instant::now() > deadline {
                return (done(&screen), screen);
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn ctrl_c(&self) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", "live", "C-c"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "tmux send-keys C-c failed");
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn attach_args(pid: u32, duration: &str) -> Vec<String> {
    [
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        duration,
        "--interval",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The elapsed time of the header (`0:05` of `... PID 123  0:05 / 0:12 ...`).
fn elapsed(screen: &str) -> Option<&str> {
    let header = screen.lines().find(|l| l.starts_with("leaktrace  PID "))?;
    let (before, _) = header.split_once(" / ")?;
    before.rsplit(' ').next()
}

fn line<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
}

/// The live screen, fully drawn: the header, the ledger and the footer.
fn drawn(screen: &str) -> bool {
    screen.contains(FOOTER) && line(screen, "unexplained").is_some()
}

#[test]
fn live_view_redraws_in_place_then_leaves_the_verdict() {
    if !privileged("live_view_redraws_in_place_then_leaves_the_verdict") {
        return;
    }
    let _s = serial();
    // 256 KiB every 20 ms: about 12 MiB/s outside any ERTS carrier.
    let node = Node::start("lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let args = attach_args(node.pid(), "12s");
    let pane = Pane::start("run", &args.iter().map(String::as_str).collect::<Vec<_>>());

    let (up, first) = pane.wait_for(Duration::from_secs(30), |s| {
        drawn(s) && elapsed(s).is_some_and(|e| e >= "0:04")
    });
    eprintln!("--- screen at 4 s:\n{first}---");
    assert!(up, "no live screen at 4 s");
    let pid = format!("leaktrace  PID {}", node.pid());
    assert!(first.lines().next().is_some_and(|l| l.starts_with(&pid)));
    let rss = line(&first, "rss").expect("an rss line");
    assert!(
        rss.contains("MiB") && rss.contains("/s"),
        "rss without a rate: {rss}"
    );
    let unexplained = line(&first, "unexplained").expect("an unexplained line");
    assert!(unexplained.contains("/s"), "{unexplained}");
    assert!(first.contains(" hits/s, "), "no probe hits/s");
    assert!(first.contains("losses: "), "no losses line");
    assert!(first.contains("provisional: "), "no provisional line");

    thread::sleep(Duration::from_secs(2));
    let second = pane.capture();
    eprintln!("--- screen 2 s later:\n{second}---");
    assert_ne!(first, second, "the screen did not change");
    assert_ne!(
        elapsed(&first),
        elapsed(&second),
        "elapsed time did not move"
    );
    assert!(elapsed(&second).is_some(), "no header");
    // Drawn in place: one header, one footer, nothing scrolled.
    assert_eq!(second.matches("leaktrace  PID ").count(), 1, "{second}");
    assert_eq!(second.matches(FOOTER).count(), 1, "{second}");
    assert!(second.lines().count() <= 40);
    // By now the native probes have attached and name the leaking NIF.
    assert!(
        second.contains("top native culprits") && second.contains("lt_nif.so: leak"),
        "no native culprit on the screen"
    );

    let (done, last) = pane.wait_for(Duration::from_secs(60), |s| {
        s.contains("verdict: native_leak")
    });
    eprintln!("--- screen after the run:\n{last}---");
    assert!(done, "no verdict on the screen after the run");
    // Back on the normal screen: the live view is gone, the verdict stays.
    assert!(!last.contains(FOOTER), "still on the live screen");
    assert!(last.contains("leaktrace: traced for 0:1"), "{last}");
}

#[test]
fn live_view_ctrl_c_leaves_the_verdict() {
    if !privileged("live_view_ctrl_c_leaves_the_verdict") {
        return;
    }
    let _s = serial();
    let node = Node::start("lt_load:leak_forever(262144, 20)");
    thread::sleep(Duration::from_secs(1));
    let args = attach_args(node.pid(), "120s");
    let pane = Pane::start(
        "ctrl-c",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // Past --min-duration (5 s), so Ctrl-C ends a run that can be judged.
    let (up, screen) = pane.wait_for(Duration::from_secs(40), |s| {
        drawn(s) && elapsed(s).is_some_and(|e| e >= "0:07")
    });
    eprintln!("--- screen before Ctrl-C:\n{screen}---");
    assert!(up, "no live screen at 7 s");
    assert!(screen.contains(" / 2:00  every 500 ms"), "{screen}");
    let pressed = Instant::now();
    pane.ctrl_c();

    let (done, last) = pane.wait_for(Duration::from_secs(30), |s| {
        s.contains("verdict: native_leak")
    });
    eprintln!(
        "--- screen {:.1} s after Ctrl-C:\n{last}---",
        pressed.elapsed().as_secs_f64()
    );
    assert!(done, "no verdict after Ctrl-C");
    assert!(!last.contains(FOOTER), "still on the live screen");
}
