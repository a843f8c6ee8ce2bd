//! Hand-written SVG pictures of the bundle: `timeline.svg` (the ledger lines over time) and
//! `sizes.svg` (the size and lifetime distributions). Plain SVG 1.1 with no script, so that a
//! browser, GitHub's viewer or an image converter shows them; every name from the target is
//! escaped.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::SeriesSummary;
use crate::{
    recording::{Recording, Sample, histograms::HistogramUnit},
    units::human_bytes,
    verdict::Verdict,
};

/// `text` safe inside an SVG element or attribute: control characters written out (`\u{1b}`),
/// the five XML specials as entities.
pub fn escape(text: &str) -> String {
    let mut o = String::with_capacity(text.len());
    for c in crate::vm::render::clean(text).chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Not characters XML 1.0 allows.
            '\u{fffe}' | '\u{ffff}' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// At most `n` characters of `text`, with an ellipsis when cut.
fn shorten(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(n.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

fn open(o: &mut String, w: u32, h: u32, title: &str) {
    let _ = writeln!(
        o,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" {FONT} font-size=\"12\">\n<title>{}</title>\n<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n<rect x=\"0.5\" y=\"0.5\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#bbbbbb\"/>",
        escape(title),
        w - 1,
        h - 1
    );
}

/// A short picture that only says `message` (and why): for a bundle file with nothing to draw.
pub fn message(title: &str, message: &str) -> String {
    let mut o = String::new();
    open(&mut o, 720, 120, title);
    let _ = writeln!(
        o,
        "<text x=\"20\" y=\"40\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    for (i, line) in wrap(message, 100).iter().enumerate() {
        let _ = writeln!(
            o,
            "<text x=\"20\" y=\"{}\">{}</text>",
            68 + 18 * i,
            escape(line)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// Words of `text` in lines of at most `n` characters (3 lines at most).
fn wrap(text: &str, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= n => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    if lines.len() > 3 {
        lines.truncate(3);
        lines[2] = shorten(&format!("{} …", lines[2]), n);
    }
    lines
}

/// A round step (1, 2 or 5 times a power of ten) near `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// A round byte step: 1, 2 or 5 times a power of ten of the binary unit (KiB, MiB, GiB) that
/// fits `raw`, so that tick labels read 2.0 MiB, 4.0 MiB...
fn byte_step(raw: f64) -> f64 {
    let mut unit = 1.0;
    while raw >= unit * 1024.0 && unit < 1024f64.powi(5) {
        unit *= 1024.0;
    }
    nice_step(raw / unit) * unit
}

/// A ledger line drawn on the timeline.
struct Line {
    name: &'static str,
    color: &'static str,
    note: &'static str,
    value: fn(&Sample) -> Option<f64>,
}

const LINES: [Line; 7] = [
    Line {
        name: "rss",
        color: "#1f77b4",
        note: "resident set",
        value: |s| s.rss.map(|v| v as f64),
    },
    Line {
        name: "cgroup_memory",
        color: "#7f7f7f",
        note: "the cgroup's charge (OOM killer)",
        value: |s| s.cgroup_memory.map(|v| v as f64),
    },
    Line {
        name: "carriers",
        color: "#2ca02c",
        note: "since attach",
        value: |s| s.carriers.map(|v| v as f64),
    },
    Line {
        name: "vm_used",
        color: "#9467bd",
        note: "VM blocks",
        value: |s| s.vm_used.map(|v| v as f64),
    },
    Line {
        name: "native_outstanding",
        color: "#d62728",
        note: "since attach",
        value: |s| s.native_outstanding.map(|v| v as f64),
    },
    Line {
        name: "unexplained",
        color: "#ff7f0e",
        note: "since attach",
        value: |s| s.unexplained.map(|v| v as f64),
    },
    Line {
        name: "blocks_net",
        color: "#8c564b",
        note: "--blocks, since attach",
        value: |s| s.blocks_net.map(|v| v as f64),
    },
];

/// `timeline.svg`: rss, carriers, vm_used, native_outstanding and unexplained over the run,
/// the moment the native probes attached, and the verdict.
pub fn timeline(r: &Recording, v: &Verdict) -> String {
    let title = format!("leaktrace timeline: {}", v.kind.as_str());
    let (w, h) = (1000.0, 540.0);
    let (left, right, top, bottom) = (90.0, 230.0, 78.0, 58.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    // The cgroup can hold far more than this node (other processes, page cache): drawn only
    // when on the node's scale, else its legend says so.
    let line_max = |l: &Line| {
        r.samples
            .iter()
            .filter_map(|s| (l.value)(s))
            .fold(0.0, f64::max)
    };
    let rss_max = line_max(&LINES[0]).max(1.0);
    let off_scale = |l: &Line| l.name == "cgroup_memory" && line_max(l) > 4.0 * rss_max;
    let points: Vec<(f64, f64)> = r
        .samples
        .iter()
        .flat_map(|s| {
            LINES
                .iter()
                .filter(|l| !off_scale(l))
                .filter_map(|l| Some((s.t_s, (l.value)(s)?)))
        })
        .collect();
    if points.is_empty() {
        return message(
            &title,
            "The recording holds no ledger sample: the run ended before its first interval.",
        );
    }
    let t_max = r
        .samples
        .iter()
        .map(|s| s.t_s)
        .fold(r.duration_s, f64::max)
        .max(1e-3);
    let mut y_min = points.iter().map(|p| p.1).fold(0.0, f64::min);
    let mut y_max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    if y_max - y_min < 1.0 {
        y_max = y_min + 1024.0;
    }
    let y_step = byte_step((y_max - y_min) / 6.0);
    y_min = (y_min / y_step).floor() * y_step;
    y_max = (y_max / y_step).ceil() * y_step;
    let x = |t: f64| left + pw * (t / t_max).clamp(0.0, 1.0);
    let y = |b: f64| top + ph * (1.0 - ((b - y_min) / (y_max - y_min)).clamp(0.0, 1.0));

    let mut o = String::new();
    open(&mut o, w as u32, h as u32, &title);
    let _ = writeln!(
        o,
        "<text x=\"{left}\" y=\"26\" font-size=\"17\" font-weight=\"bold\">verdict: {}</text>\n<text x=\"{left}\" y=\"48\" font-size=\"12\">{}</text>",
        escape(v.kind.as_str()),
        escape(&shorten(&v.summary, 140))
    );
    // Grid and axes.
    let mut b = y_min;
    let mut guard = 0;
    while b <= y_max + y_step / 2.0 && guard < 40 {
        let yy = y(b);
        let _ = writeln!(
            o,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"{}\" stroke-width=\"1\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#444444\">{}</text>",
            left + pw,
            if b == 0.0 { "#888888" } else { "#e6e6e6" },
            left - 6.0,
            yy + 4.0,
            escape(&human_bytes(b))
        );
        b += y_step;
        guard += 1;
    }
    let t_step = nice_step(t_max / 8.0);
    let mut t = 0.0;
    guard = 0;
    while t <= t_max + 1e-9 && guard < 40 {
        let xx = x(t);
        let _ = writeln!(
            o,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#f0f0f0\"/>\n<text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#444444\">{}</text>",
            top + ph,
            top + ph + 18.0,
            fmt_seconds(t)
        );
        t += t_step;
        guard += 1;
    }
    let _ = writeln!(
        o,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#666666\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since attach</text>",
        left + pw / 2.0,
        h - 14.0
    );
    // When the native probes attached.
    if let Some(at) = r.native.as_ref().and_then(|n| n.attached_at_s)
        && at.is_finite()
    {
        let xx = x(at);
        let _ = writeln!(
            o,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#d62728\" stroke-dasharray=\"5,4\" stroke-width=\"1.5\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#d62728\" font-size=\"11\">native probes attached ({})</text>",
            top + ph,
            xx + 4.0,
            top + 14.0,
            fmt_seconds(at)
        );
    }
    // The lines, broken where a sample lacks the figure.
    for (i, l) in LINES.iter().enumerate() {
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for s in &r.samples {
            match (l.value)(s) {
                Some(b) => segments
                    .last_mut()
                    .expect("never empty")
                    .push((x(s.t_s), y(b))),
                None if !segments.last().is_some_and(Vec::is_empty) => segments.push(Vec::new()),
                None => {}
            }
        }
        let mut last = None;
        let hidden = off_scale(l);
        for seg in segments.iter().filter(|s| !s.is_empty() && !hidden) {
            let pts: Vec<String> = seg.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = writeln!(
                o,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-linejoin=\"round\"/>",
                pts.join(" "),
                l.color
            );
            if seg.len() <= 60 {
                for (a, b) in seg {
                    let _ = writeln!(
                        o,
                        "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"2.5\" fill=\"{}\"/>",
                        l.color
                    );
                }
            }
        }
        for s in &r.samples {
            if let Some(b) = (l.value)(s) {
                last = Some(b);
            }
        }
        // The legend: colour, name, last value.
        let ly = top + 10.0 + 40.0 * i as f64;
        let lx = left + pw + 18.0;
        let _ = writeln!(
            o,
            "<rect x=\"{lx}\" y=\"{ly}\" width=\"14\" height=\"4\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#444444\">{}, {}</text>",
            l.color,
            lx + 20.0,
            ly + 6.0,
            l.name,
            lx + 20.0,
            ly + 22.0,
            l.note,
            match last {
                None => "not measured".into(),
                Some(b) if hidden => format!("last {}, off scale: not drawn", human_bytes(b)),
                Some(b) => format!("last {}", human_bytes(b)),
            }
        );
    }
    o.push_str("</svg>\n");
    o
}

fn fmt_seconds(t: f64) -> String {
    if t >= 10.0 || t == t.round() {
        format!("{t:.0} s")
    } else {
        format!("{t:.1} s")
    }
}

/// A value of `unit` for people: bytes in B/KiB/MiB, lifetimes in µs, ms, s, min or h.
pub fn value_label(v: u64, unit: HistogramUnit) -> String {
    match unit {
        HistogramUnit::Bytes => human_bytes(v as f64),
        HistogramUnit::Us => {
            let us = v as f64;
            if us < 1e3 {
                format!("{us:.0} µs")
            } else if us < 1e6 {
                format!("{:.1} ms", us / 1e3)
            } else if us < 60e6 {
                format!("{:.1} s", us / 1e6)
            } else if us < 3600e6 {
                format!("{:.1} min", us / 60e6)
            } else {
                format!("{:.1} h", us / 3600e6)
            }
        }
    }
}

/// Counts of `h` by power-of-two bucket: (the bucket's lower bound, count), lowest first.
pub fn log2_buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for v in h.iter_recorded() {
        let low = h.lowest_equivalent(v.value_iterated_to());
        let bound = if low == 0 { 0 } else { 1u64 << low.ilog2() };
        match out.last_mut() {
            Some((b, n)) if *b == bound => *n += v.count_at_value(),
            _ => out.push((bound, v.count_at_value())),
        }
    }
    out
}

/// Most series drawn in `sizes.svg`; report.md lists them all.
pub const MAX_PANELS: usize = 24;

/// `sizes.svg`: one bar chart per series (counts by power-of-two bucket of size or lifetime)
/// with its percentiles; a short picture saying so when the recording has none.
pub fn sizes(series: &[SeriesSummary]) -> String {
    let title = "leaktrace: allocation sizes and lifetimes";
    let drawn: Vec<&SeriesSummary> = series.iter().filter(|s| s.merged.is_some()).collect();
    if drawn.is_empty() {
        return message(
            title,
            if series.is_empty() {
                "No size or lifetime histograms in this recording: they are recorded by the probes that measure carriers, blocks and native allocations one by one (a later leaktrace, or --blocks)."
            } else {
                "The recording names histogram series but none holds a value that could be read (see report.md)."
            },
        );
    }
    let shown = drawn.len().min(MAX_PANELS);
    let (w, panel) = (1000.0, 170.0);
    let h = 50.0 + panel * shown as f64 + if drawn.len() > shown { 24.0 } else { 0.0 };
    let mut o = String::new();
    open(&mut o, w as u32, h as u32, title);
    let _ = writeln!(
        o,
        "<text x=\"20\" y=\"30\" font-size=\"17\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    for (i, s) in drawn.iter().take(shown).enumerate() {
        let Some(hist) = &s.merged else { continue };
        let y0 = 50.0 + panel * i as f64;
        let _ = writeln!(
            o,
            "<text x=\"20\" y=\"{:.1}\" font-weight=\"bold\">{}</text>\n<text x=\"20\" y=\"{:.1}\" fill=\"#444444\">{}</text>",
            y0 + 14.0,
            escape(&shorten(&s.name, 90)),
            y0 + 30.0,
            escape(&s.stats_line())
        );
        let buckets = log2_buckets(hist);
        let most = buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
        let (bx, by, bw, bh) = (20.0, y0 + 40.0, w - 40.0, panel - 80.0);
        let slot = bw / buckets.len().max(1) as f64;
        let every = buckets.len().div_ceil(20).max(1);
        let _ = writeln!(
            o,
            "<line x1=\"{bx}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#666666\"/>",
            by + bh,
            bx + bw,
            by + bh
        );
        for (j, (bound, n)) in buckets.iter().enumerate() {
            let bar = bh * (*n as f64 / most);
            let xx = bx + slot * j as f64;
            let _ = writeln!(
                o,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bar:.1}\" fill=\"{}\"><title>{} and up: {n}</title></rect>",
                xx + 2.0,
                by + bh - bar,
                (slot - 4.0).max(1.0),
                if s.unit == HistogramUnit::Bytes {
                    "#4e79a7"
                } else {
                    "#59a14f"
                },
                escape(&value_label(*bound, s.unit))
            );
            if j % every == 0 {
                let _ = writeln!(
                    o,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\" fill=\"#444444\">{}</text>",
                    xx + slot / 2.0,
                    by + bh + 14.0,
                    escape(&value_label(*bound, s.unit))
                );
            }
        }
    }
    if drawn.len() > shown {
        let _ = writeln!(
            o,
            "<text x=\"20\" y=\"{:.1}\" fill=\"#444444\">{} more series: see report.md and histograms.hlog</text>",
            h - 12.0,
            drawn.len() - shown
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped() {
        assert_eq!(
            escape("a<b>&\"c'\u{1b}"),
            "a&lt;b&gt;&amp;&quot;c&apos;\\u{1b}"
        );
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(byte_step(3.0 * 1024.0 * 1024.0), 5.0 * 1024.0 * 1024.0);
    }
}
