//! The bug-report bundle `--out DIR` writes beside report.json and report.md: files a
//! maintainer opens with tools they already have (a browser, `go tool pprof`, flamegraph
//! tools, HdrHistogram's log processor and plotter), holding nothing secret (no cookie, no
//! environment: only what the recording holds, names escaped).
//!
//! Every file is rendered here, in memory, before anything is written
//! ([`crate::report::write_dir`] writes them, each atomically); the set of files is fixed
//! ([`FIXED_FILES`]) but for one `.hgrm` percentile table per histogram series.

pub mod flame;
pub mod hgrm;
pub mod hlog;
pub mod pprof;
pub mod svg;

use hdrhistogram::Histogram;

use crate::{
    recording::{
        Recording,
        histograms::{HistogramUnit, MAX_INTERVALS, MAX_SERIES},
    },
    report::Report,
};

/// Files every `--out` writes, whatever the run measured (a file with nothing to show says
/// so), so that a directory never mixes files of two runs.
pub const FIXED_FILES: [&str; 8] = [
    "report.json",
    "report.md",
    "timeline.svg",
    "sizes.svg",
    "native.svg",
    "native.folded",
    "native.pb.gz",
    "histograms.hlog",
];

/// One file of the bundle, for the list in report.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// File name in the directory.
    pub name: String,
    /// What it holds.
    pub what: String,
    /// What opens it.
    pub opens_with: &'static str,
}

/// The files of the bundle of `r`, in the order they are listed.
pub fn manifest(r: &Recording) -> Vec<Entry> {
    let e = |name: &str, what: &str, opens_with| Entry {
        name: name.into(),
        what: what.into(),
        opens_with,
    };
    let mut out = vec![
        e(
            "report.md",
            "this report",
            "any Markdown viewer (renders on GitHub as an issue attachment)",
        ),
        e(
            "report.json",
            "the recording and the verdict (schema 1)",
            "`jq`; `leaktrace report report.json` re-judges it, `leaktrace diff` compares two",
        ),
        e(
            "timeline.svg",
            "ledger lines over time, native probes attach time, verdict",
            "a web browser",
        ),
        e(
            "sizes.svg",
            "size and lifetime distributions by power of two (a short note when none were measured)",
            "a web browser",
        ),
        e(
            "native.svg",
            "flame graph of outstanding native bytes (a short note when none)",
            "a web browser (click to zoom, Ctrl-F to search)",
        ),
        e(
            "native.folded",
            "the same as folded stacks: frame;frame bytes",
            "`flamegraph.pl`, `inferno-flamegraph`, speedscope",
        ),
        e(
            "native.pb.gz",
            "the same as a pprof profile (outstanding_space/bytes, outstanding_objects/count)",
            "`go tool pprof -http=: native.pb.gz`, `pprof`",
        ),
        e(
            "histograms.hlog",
            "every histogram interval, tagged by series (HdrHistogram interval log, V2 deflate)",
            "HdrHistogram's `HistogramLogProcessor`, any HdrHistogram interval log reader",
        ),
    ];
    let names = hgrm::file_names(&r.histograms);
    for (s, name) in r.histograms.series.iter().zip(names) {
        out.push(Entry {
            what: format!(
                "percentiles of {} ({})",
                crate::vm::render::clean(&s.name),
                s.unit.as_str()
            ),
            name,
            opens_with: "HdrHistogram's plotter (`plotFiles.html`), any text viewer",
        });
    }
    out
}

/// A histogram series merged over the run, for the pictures and report.md.
#[derive(Clone, Debug)]
pub struct SeriesSummary {
    /// The series name.
    pub name: String,
    /// Its unit.
    pub unit: HistogramUnit,
    /// Values still unknown at the end (lifetimes of what is still live).
    pub censored: u64,
    /// All its intervals added up; None when none could be read.
    pub merged: Option<Histogram<u64>>,
    /// Intervals that could not be read, with why.
    pub problems: Vec<String>,
}

impl SeriesSummary {
    /// `n 1234, p50 4.0 KiB, p99 1.0 MiB, max 2.0 MiB, 3 censored`.
    pub fn stats_line(&self) -> String {
        let Some(h) = &self.merged else {
            return "no readable values".into();
        };
        // The lowest value of the bucket: "512.0 KiB", not its top "512.5 KiB".
        let v = |q: f64| svg::value_label(h.lowest_equivalent(h.value_at_quantile(q)), self.unit);
        let mut line = format!(
            "n {}, min {}, p50 {}, p90 {}, p99 {}, max {}",
            h.len(),
            svg::value_label(h.min(), self.unit),
            v(0.5),
            v(0.9),
            v(0.99),
            svg::value_label(h.max(), self.unit)
        );
        if self.censored > 0 {
            line.push_str(&format!(
                ", {} still live at the end (not counted: percentiles are lower bounds)",
                self.censored
            ));
        }
        line
    }
}

/// Every series of `r` (at most [`MAX_SERIES`], [`MAX_INTERVALS`] intervals each), merged.
pub fn series(r: &Recording) -> Vec<SeriesSummary> {
    r.histograms
        .series
        .iter()
        .take(MAX_SERIES)
        .map(|s| {
            let mut merged: Option<Histogram<u64>> = None;
            let mut problems = Vec::new();
            for i in s.intervals.iter().take(MAX_INTERVALS) {
                let added = i.decode().and_then(|h| match &mut merged {
                    Some(m) => m.add(&h).map_err(|e| format!("cannot be added: {e:?}")),
                    None => {
                        merged = Some(h);
                        Ok(())
                    }
                });
                if let Err(e) = added {
                    problems.push(format!("interval at {:.1} s: {e}", i.start_s));
                }
            }
            SeriesSummary {
                name: s.name.clone(),
                unit: s.unit,
                censored: s.censored,
                merged: merged.filter(|m| !m.is_empty()),
                problems,
            }
        })
        .collect()
}

/// One rendered file.
#[derive(Clone, Debug)]
pub struct BundleFile {
    /// File name in the directory.
    pub name: String,
    /// Its bytes.
    pub contents: Vec<u8>,
}

/// Renders every file of the bundle but report.json and report.md (which
/// [`crate::report::write_dir`] renders), in [`manifest`] order. Never fails on what the
/// recording holds: what cannot be drawn is said in the file and in report.md.
pub fn render(report: &Report) -> Result<Vec<BundleFile>, String> {
    let r = &report.recording;
    let file = |name: &str, contents: Vec<u8>| BundleFile {
        name: name.into(),
        contents,
    };
    let summaries = series(r);
    let (stacks, source) = flame::stacks(r.native.as_ref());
    let subtitle = format!(
        "PID {} {}, {}, {}",
        r.target.pid,
        crate::vm::render::clean(r.target.node.as_deref().unwrap_or("")),
        report.verdict.kind.as_str(),
        crate::units::human_bytes(flame::total_bytes(&stacks) as f64)
    );
    let profile = pprof::profile(
        &stacks,
        &[format!(
            "leaktrace {}: outstanding native allocations of PID {} at the end of the run ({})",
            crate::vm::render::clean(&r.tool_version),
            r.target.pid,
            match source {
                flame::StackSource::Stacks => "by allocation stack",
                flame::StackSource::Modules => "by object and function, no stacks recorded",
                flame::StackSource::None => "none outstanding",
            }
        )],
    );
    let pb = pprof::gzipped(&profile).map_err(|e| format!("native.pb.gz: {e}"))?;
    let (hlog, _) = hlog::interval_log(r);
    let mut out = vec![
        file(
            "timeline.svg",
            svg::timeline(r, &report.verdict).into_bytes(),
        ),
        file("sizes.svg", svg::sizes(&summaries).into_bytes()),
        file(
            "native.svg",
            flame::flamegraph(&stacks, source, &subtitle).into_bytes(),
        ),
        file("native.folded", flame::folded(&stacks).into_bytes()),
        file("native.pb.gz", pb),
        file("histograms.hlog", hlog),
    ];
    for (s, name) in summaries.iter().zip(hgrm::file_names(&r.histograms)) {
        let text = match &s.merged {
            Some(h) => hgrm::percentiles(h, 1.0),
            None => hgrm::percentiles(&Histogram::<u64>::new(3).map_err(|e| e.to_string())?, 1.0),
        };
        out.push(file(&name, text.into_bytes()));
    }
    Ok(out)
}
