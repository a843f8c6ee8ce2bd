//! The live view a terminal shows while tracing: one compact screen, redrawn in place each
//! interval (ledger lines and their rates, the growth so far, native culprits, probe hits and
//! losses). [`render`] is pure and tested; [`Screen`] draws it on stderr's alternate screen.
//!
//! The alternate screen (what `top` and `less` use) keeps the operator's scrollback intact and
//! is left when the run ends, so the verdict printed afterwards lands on the normal screen.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
};

use crate::{
    recording::{Losses, NativeModule, Sample, Thresholds},
    trend::{self, fit},
    units::{human_bytes, human_count},
    vm::render::clean,
};

/// Seconds of recent samples the "last" rate is fitted over.
const RECENT_S: f64 = 10.0;

/// Shortest time hits/s are measured over, seconds.
const MIN_RATE_SPAN_S: f64 = 0.2;

/// Native culprits shown at most.
const TOP_CULPRITS: usize = 3;

/// The last line of every screen: how to end the run.
pub const FOOTER: &str = "Ctrl-C ends the run and writes the report";

/// What the live screen shows, borrowed from the session at one sample.
#[derive(Clone, Copy, Debug)]
pub struct LiveState<'a> {
    /// The traced process.
    pub pid: u32,
    /// Its Erlang node name, when known (from the target: escaped before display).
    pub node: Option<&'a str>,
    /// Seconds since attach.
    pub elapsed_s: f64,
    /// `--duration`, seconds.
    pub duration_s: f64,
    /// `--interval`, seconds.
    pub interval_s: f64,
    /// Every ledger sample so far, oldest first.
    pub samples: &'a [Sample],
    /// The verdict's thresholds: the growth rule the provisional line applies.
    pub thresholds: &'a Thresholds,
    /// When the native probes attached (None: not attached).
    pub native_attached_at_s: Option<f64>,
    /// Why the native probes are (or are not) attached.
    pub native_reason: &'a str,
    /// Native objects by outstanding bytes, largest first (names from the target).
    pub native_modules: &'a [NativeModule],
    /// Probe hits per second over the latest span of at least 0.2 s (None before one).
    pub hits_per_s: Option<f64>,
    /// Probe hits since attach.
    pub hits: u64,
    /// Carrier events read from the ring buffer since attach.
    pub events: u64,
    /// Loss counters so far.
    pub losses: &'a Losses,
}

/// One ledger line of the screen.
struct LedgerLine {
    name: &'static str,
    /// Net change since attach (shown signed) rather than an absolute size.
    net: bool,
    /// Shown even when never measured ("—"): the lines the verdict always weighs.
    always: bool,
    /// Weighed by the provisional growth line.
    judged: bool,
    get: fn(&Sample) -> Option<f64>,
}

const LEDGER: &[LedgerLine] = &[
    LedgerLine {
        name: "rss",
        net: false,
        always: true,
        judged: false,
        get: |s| s.rss.map(|v| v as f64),
    },
    LedgerLine {
        name: "rss_anon",
        net: false,
        always: true,
        judged: true,
        get: |s| s.rss_anon.map(|v| v as f64),
    },
    LedgerLine {
        name: "carriers",
        net: true,
        always: true,
        judged: true,
        get: |s| s.carriers.map(|v| v as f64),
    },
    LedgerLine {
        name: "mseg_cache",
        net: true,
        always: true,
        judged: true,
        get: |s| s.mseg_cache.map(|v| v as f64),
    },
    LedgerLine {
        name: "native_outstanding",
        net: true,
        always: true,
        judged: true,
        get: |s| s.native_outstanding.map(|v| v as f64),
    },
    LedgerLine {
        name: "unexplained",
        net: true,
        always: true,
        judged: true,
        get: |s| s.unexplained.map(|v| v as f64),
    },
    LedgerLine {
        name: "vm_used",
        net: false,
        always: true,
        judged: true,
        get: |s| s.vm_used.map(|v| v as f64),
    },
    LedgerLine {
        name: "vm_allocated",
        net: false,
        always: true,
        judged: true,
        get: |s| s.vm_allocated.map(|v| v as f64),
    },
    LedgerLine {
        name: "blocks_net",
        net: true,
        always: false,
        judged: true,
        get: |s| s.blocks_net.map(|v| v as f64),
    },
    LedgerLine {
        name: "cgroup_memory",
        net: false,
        always: false,
        judged: false,
        get: |s| s.cgroup_memory.map(|v| v as f64),
    },
];

/// The screen for `state`, at most `height` lines of at most `width` characters each; the
/// footer ([`FOOTER`]) is always the last line. Names from the target are escaped.
pub fn render(state: &LiveState<'_>, width: u16, height: u16) -> Vec<String> {
    let mut lines = vec![header(state)];
    lines.push(format!(
        "{:<20} {:>12} {:>14} {:>14}",
        "ledger",
        "now",
        format!("last {RECENT_S:.0}s"),
        "whole run"
    ));
    for l in LEDGER {
        if let Some(row) = ledger_row(state.samples, l) {
            lines.push(row);
        }
    }
    lines.push(provisional(state));
    lines.push(probes(state));
    lines.push(losses(state.losses));
    lines.extend(culprits(state));

    let height = usize::from(height);
    if height == 0 {
        return Vec::new();
    }
    // Too small a terminal loses the lines nearest the bottom, never the footer.
    lines.truncate(height - 1);
    lines.push(FOOTER.into());
    lines.iter().map(|l| cut(l, usize::from(width))).collect()
}

fn header(state: &LiveState<'_>) -> String {
    let node = state
        .node
        .map(|n| format!("  node {}", clean(n)))
        .unwrap_or_default();
    format!(
        "leaktrace  PID {}{node}  {} / {}  every {}",
        state.pid,
        clock(state.elapsed_s),
        clock(state.duration_s),
        interval(state.interval_s)
    )
}

/// `m:ss`, or `h:mm:ss` past an hour.
fn clock(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

fn interval(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

fn signed(bytes: f64) -> String {
    // Below half a byte shows as "0 B": a flat line is neither "+0 B" nor "-0 B".
    if bytes.abs() < 0.5 {
        human_bytes(0.0)
    } else if bytes > 0.0 {
        format!("+{}", human_bytes(bytes))
    } else {
        human_bytes(bytes)
    }
}

fn signed_rate(bytes_per_s: f64) -> String {
    format!("{}/s", signed(bytes_per_s))
}

/// One ledger line: its latest measured value, its slope over the last [`RECENT_S`] seconds
/// and over the run; None for an optional line never measured.
fn ledger_row(samples: &[Sample], l: &LedgerLine) -> Option<String> {
    let points = trend::series(samples, l.get);
    let Some(&(t_last, now)) = points.last() else {
        return l
            .always
            .then(|| format!("{:<20} {:>12} {:>14} {:>14}", l.name, "—", "—", "—"));
    };
    let recent: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0 >= t_last - RECENT_S)
        .collect();
    let rate = |pts: &[(f64, f64)]| {
        fit(pts).map_or_else(|| "—".to_string(), |f| signed_rate(f.slope_per_s))
    };
    let value = if l.net { signed(now) } else { human_bytes(now) };
    Some(format!(
        "{:<20} {:>12} {:>14} {:>14}",
        l.name,
        value,
        rate(&recent),
        rate(&points)
    ))
}

/// The growth so far under the verdict's rule: which lines grow and how fast. The verdict
/// itself weighs far more (native objects, the census, losses) and comes at the end.
fn provisional(state: &LiveState<'_>) -> String {
    let th = state.thresholds;
    let rss_points = state
        .samples
        .iter()
        .filter(|s| s.rss_anon.is_some())
        .count();
    if state.elapsed_s < th.min_duration_s || rss_points < 3 {
        return format!(
            "provisional: too early to judge (needs {:.0} s and 3 samples)",
            th.min_duration_s
        );
    }
    let mut growing: Vec<(&str, f64)> = LEDGER
        .iter()
        .filter(|l| l.judged)
        .filter_map(|l| {
            let g = trend::growth(&trend::series(state.samples, l.get), th)?;
            g.grows.then_some((l.name, g.whole.slope_per_s))
        })
        .collect();
    if growing.is_empty() {
        return format!(
            "provisional: nothing grows beyond {} so far; the verdict comes at the end",
            signed_rate(th.min_growth_bytes_per_s)
        );
    }
    growing.sort_by(|a, b| b.1.total_cmp(&a.1));
    let rss = growing.iter().find(|(n, _)| *n == "rss_anon").copied();
    let share = |slope: f64| match rss {
        Some((_, r)) if r > 0.0 => format!(" ({:.0}%)", 100.0 * slope / r),
        _ => String::new(),
    };
    let parts: Vec<String> = growing
        .iter()
        .filter(|(n, _)| *n != "rss_anon")
        .map(|&(name, slope)| format!("{name} {}{}", signed_rate(slope), share(slope)))
        .collect();
    match rss {
        Some((_, r)) if parts.is_empty() => {
            format!("provisional: rss_anon grows {}", signed_rate(r))
        }
        Some((_, r)) => format!(
            "provisional: rss_anon grows {}; of it {}",
            signed_rate(r),
            parts.join(", ")
        ),
        None => format!("provisional: growing {}", parts.join(", ")),
    }
}

fn probes(state: &LiveState<'_>) -> String {
    let rate = state
        .hits_per_s
        .map_or_else(|| "—".to_string(), human_count);
    format!(
        "probes: {rate} hits/s, {} hits since attach, {} carrier events",
        human_count(state.hits as f64),
        human_count(state.events as f64)
    )
}

fn losses(l: &Losses) -> String {
    let mut parts = Vec::new();
    if l.events_lost > 0 {
        parts.push(format!(
            "{} events lost ({} releases, {} resizes)",
            l.events_lost, l.events_lost_frees, l.events_lost_resizes
        ));
    }
    for (n, what) in [
        (l.map_full, "pending map full"),
        (l.probe_errors, "probe errors"),
        (l.missed_entries, "missed entries"),
        (l.unknown_frees, "unknown frees"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    let mut o = if parts.is_empty() {
        "losses: none".to_string()
    } else {
        format!("losses: {}", parts.join(", "))
    };
    if !l.unreadable.is_empty() {
        let _ = write!(o, "; unreadable: {}", l.unreadable.join(", "));
    }
    o
}

/// Native objects (not beam.smp itself) holding outstanding bytes, largest first.
fn culprits(state: &LiveState<'_>) -> Vec<String> {
    let Some(at) = state.native_attached_at_s else {
        return vec![format!(
            "native probes not attached: {}",
            clean(state.native_reason)
        )];
    };
    let top: Vec<&NativeModule> = state
        .native_modules
        .iter()
        .filter(|m| !m.is_emulator && m.outstanding_bytes > 0)
        .take(TOP_CULPRITS)
        .collect();
    if top.is_empty() {
        return vec![format!(
            "native probes attached at {at:.1} s: nothing outstanding outside beam.smp"
        )];
    }
    let mut out = vec![format!(
        "top native culprits (outstanding since the probes attached at {at:.1} s):"
    )];
    for m in top {
        let name = match &m.function {
            Some(f) => format!("{}: {}", clean(&m.module), clean(f)),
            None => clean(&m.module),
        };
        let api = if m.nif_api { " (NIF API)" } else { "" };
        out.push(format!(
            "  {name}{api}  {}  {}  {} allocations, {} frees",
            signed(m.outstanding_bytes as f64),
            signed_rate(m.growth_bytes_per_s),
            human_count(m.allocations as f64),
            human_count(m.frees as f64)
        ));
    }
    out
}

/// `s` cut to `width` characters, the cut marked with "…".
fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut o: String = s.chars().take(width - 1).collect();
    o.push('…');
    o
}

/// The live view on stderr, a terminal: switched to the alternate screen when made, redrawn
/// in place by [`Screen::draw`], and back on the normal screen (cursor shown again) when
/// dropped, also when the run ends by Ctrl-C, SIGTERM or an error.
#[derive(Debug)]
pub struct Screen {
    /// Time and hit count the hits/s are measured from.
    last_hits: Option<(f64, u64)>,
    /// Hits/s as last measured.
    rate: Option<f64>,
}

impl Screen {
    /// Enters the alternate screen and hides the cursor. Only for a stderr that is a terminal.
    pub fn enter() -> Screen {
        put("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J");
        Screen {
            last_hits: None,
            rate: None,
        }
    }

    /// Probe hits per second since the previous call at least [`MIN_RATE_SPAN_S`] earlier
    /// (None on the first). Two samples close together (the ticks missed while probes
    /// attached are caught up at once) keep the rate of before rather than show 0 hits/s.
    pub fn hits_per_s(&mut self, t_s: f64, hits: u64) -> Option<f64> {
        match self.last_hits {
            Some((t0, _)) if t_s - t0 < MIN_RATE_SPAN_S => {}
            Some((t0, h0)) => {
                self.rate = Some(hits.saturating_sub(h0) as f64 / (t_s - t0));
                self.last_hits = Some((t_s, hits));
            }
            None => self.last_hits = Some((t_s, hits)),
        }
        self.rate
    }

    /// Draws `state` over the previous screen, sized to the terminal now.
    pub fn draw(&mut self, state: &LiveState<'_>) {
        let (width, height) = terminal_size();
        let lines = render(state, width, height);
        let mut o = String::new();
        // Each row is placed and erased whole before it is written: a line the width of the
        // terminal leaves the cursor pending a wrap, which the next absolute move cancels.
        for (row, line) in lines.iter().enumerate() {
            let _ = write!(o, "\x1b[{};1H\x1b[2K{line}", row + 1);
        }
        if lines.len() < usize::from(height) {
            let _ = write!(o, "\x1b[{};1H\x1b[J", lines.len() + 1);
        }
        put(&o);
    }

    /// Back on the normal screen, with one line saying the run is being judged: the closing
    /// census may take seconds before the verdict.
    pub fn leave(self, elapsed_s: f64) {
        drop(self);
        put(&format!(
            "leaktrace: traced for {}; judging and writing the report\n",
            clock(elapsed_s)
        ));
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        put("\x1b[?25h\x1b[?1049l");
    }
}

/// Writes to stderr; a terminal gone away is no reason to stop tracing.
fn put(s: &str) {
    let mut e = io::stderr().lock();
    let _ = e.write_all(s.as_bytes());
    let _ = e.flush();
}

/// Columns and rows of the terminal on stderr (`TIOCGWINSZ`); 80x24 when it does not say.
pub fn terminal_size() -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct it is given, which lives here.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (80, 24)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Sample> {
        (0..21)
            .map(|i| {
                let t = i as f64 * 0.5;
                let leak = (i as i64) * (6 << 20);
                Sample {
                    t_s: t,
                    rss: Some(200 << 20),
                    rss_anon: Some((150 << 20) + leak as u64),
                    carriers: Some(1 << 20),
                    mseg_cache: Some(0),
                    unexplained: Some(leak),
                    ..Default::default()
                }
            })
            .collect()
    }

    fn state<'a>(
        samples: &'a [Sample],
        th: &'a Thresholds,
        modules: &'a [NativeModule],
        losses: &'a Losses,
    ) -> LiveState<'a> {
        LiveState {
            pid: 4242,
            node: Some("app\x1b[31m@host"),
            elapsed_s: 10.2,
            duration_s: 12.0,
            interval_s: 0.5,
            samples,
            thresholds: th,
            native_attached_at_s: Some(3.0),
            native_reason: "unexplained grows",
            native_modules: modules,
            hits_per_s: Some(1234.0),
            hits: 99_000,
            events: 17,
            losses,
        }
    }

    fn evil_module() -> NativeModule {
        NativeModule {
            module: "evil\x1b[31m.so".into(),
            function: Some("grab\x07".into()),
            outstanding_bytes: 60 << 20,
            growth_bytes_per_s: 6.0 * 1024.0 * 1024.0,
            allocations: 240,
            frees: 0,
            ..Default::default()
        }
    }

    #[test]
    fn shows_the_ledger_rates_and_footer() {
        let s = samples();
        let th = Thresholds::default();
        let m = [evil_module()];
        let l = Losses::default();
        let screen = render(&state(&s, &th, &m, &l), 120, 40);
        let text = screen.join("\n");
        eprintln!("{text}");
        assert!(screen[0].contains("PID 4242") && screen[0].contains("0:10 / 0:12"));
        assert!(screen[0].contains("every 500 ms"));
        let unexplained = screen
            .iter()
            .find(|l| l.starts_with("unexplained "))
            .expect("unexplained line");
        // 6 MiB every half second: 12 MiB/s over the last 10 s and over the run.
        assert_eq!(
            unexplained.matches("+12.0 MiB/s").count(),
            2,
            "{unexplained}"
        );
        assert!(text.contains("vm_used                         —"), "{text}");
        assert!(
            !text.contains("blocks_net"),
            "an unmeasured optional line is left out"
        );
        assert!(
            text.contains(
                "provisional: rss_anon grows +12.0 MiB/s; of it unexplained +12.0 MiB/s (100%)"
            ),
            "{text}"
        );
        assert!(text.contains("probes: 1234 hits/s"), "{text}");
        assert!(text.contains("losses: none"), "{text}");
        assert_eq!(screen.last().map(String::as_str), Some(FOOTER));
    }

    #[test]
    fn cuts_to_the_terminal_and_escapes_target_names() {
        let s = samples();
        let th = Thresholds::default();
        let m = [evil_module()];
        let l = Losses {
            events_lost: 3,
            unreadable: vec!["probe hits".into()],
            ..Default::default()
        };
        let st = state(&s, &th, &m, &l);
        let wide = render(&st, 200, 60).join("\n");
        assert!(!wide.contains('\x1b') && !wide.contains('\x07'), "{wide:?}");
        assert!(wide.contains("node app\\u{1b}[31m@host"), "{wide}");
        assert!(wide.contains("evil\\u{1b}[31m.so: grab\\u{7}"), "{wide}");
        assert!(wide.contains("losses: 3 events lost"), "{wide}");

        let narrow = render(&st, 30, 8);
        assert_eq!(narrow.len(), 8);
        assert!(
            narrow.iter().all(|l| l.chars().count() <= 30),
            "{narrow:#?}"
        );
        assert!(narrow[0].ends_with('…'), "{}", narrow[0]);
        assert_eq!(narrow.last().map(|l| l.chars().count()), Some(30));
        assert!(render(&st, 80, 0).is_empty());
        assert_eq!(render(&st, 80, 1), vec![FOOTER.to_string()]);
    }

    #[test]
    fn says_too_early_and_not_attached() {
        let s = samples();
        let th = Thresholds::default();
        let l = Losses::default();
        let mut st = state(&s[..2], &th, &[], &l);
        st.elapsed_s = 0.5;
        st.native_attached_at_s = None;
        st.hits_per_s = None;
        let text = render(&st, 120, 40).join("\n");
        assert!(text.contains("provisional: too early"), "{text}");
        assert!(
            text.contains("native probes not attached: unexplained grows"),
            "{text}"
        );
        assert!(text.contains("probes: — hits/s"), "{text}");
    }

    #[test]
    fn nothing_grows_on_a_flat_node() {
        let mut s = samples();
        for (i, x) in s.iter_mut().enumerate() {
            // A wobble well under a byte a second: flat, shown as 0, never "-0 B".
            x.rss_anon = Some((150 << 20) + (i % 2) as u64);
            x.unexplained = Some((i % 2) as i64);
        }
        let th = Thresholds::default();
        let l = Losses::default();
        let text = render(&state(&s, &th, &[], &l), 120, 40).join("\n");
        assert!(
            text.contains("provisional: nothing grows beyond +64.0 KiB/s so far"),
            "{text}"
        );
        assert!(!text.contains("-0 B"), "{text}");
        assert!(
            text.contains("nothing outstanding outside beam.smp"),
            "{text}"
        );
    }

    #[test]
    fn hits_per_second_between_draws() {
        let mut s = Screen {
            last_hits: None,
            rate: None,
        };
        assert_eq!(s.hits_per_s(1.0, 100), None);
        assert_eq!(s.hits_per_s(1.5, 600), Some(1000.0));
        // A sample right after another keeps the rate measured before.
        assert_eq!(s.hits_per_s(1.51, 600), Some(1000.0));
        assert_eq!(s.hits_per_s(2.0, 700), Some(200.0));
        std::mem::forget(s); // no terminal to restore in a test
    }
}
