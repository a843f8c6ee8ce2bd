//! `leaktrace diff A B`: what changed between two runs (before and after a fix, two releases):
//! per native object and per allocator, growth and outstanding bytes in each, and one line
//! that says whether a leak is gone, remains, or appeared.
//!
//! A and B are `--out` directories (their report.json), report.json files or recordings
//! (`--record`); each is read with [`Recording::read`] (regular files only, size and number
//! caps) and judged again, each with its own thresholds.
//!
//! Exit codes: 0 nothing got worse (every leak of A is gone, none appeared), 1 a leak of A
//! remains or a new one appeared in B, 2 error.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    error::Error,
    recording::{Recording, native::series_key},
    report::Report,
    units::human_bytes,
    verdict::{Culprit, CulpritKind, Verdict, VerdictKind},
};

/// Reads A or B: a directory written by `--out` (its report.json), a report.json or a
/// recording.
pub fn read_run(path: &Path) -> Result<Recording, Error> {
    let meta = std::fs::metadata(path).map_err(|source| Error::RecordingIo {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let file = path.join("report.json");
        if !file.exists() {
            return Err(Error::Usage(format!(
                "{} holds no report.json: give `leaktrace diff` directories written by --out, report.json files or recordings made with --record",
                path.display()
            )));
        }
        return Recording::read(&file);
    }
    Recording::read(path)
}

/// One run's figures for one native object or allocator.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Bytes held at the end (outstanding native bytes; an allocator's carrier bytes).
    pub bytes: Option<i64>,
    /// Growth over the run, bytes per second.
    pub growth_bytes_per_s: Option<f64>,
    /// Named as leaking by that run's verdict.
    pub leaks: bool,
}

/// A native object or allocator in both runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Object file name (with ` (NIF API)` for NIF API memory) or allocator name.
    pub name: String,
    /// In A.
    pub a: Figures,
    /// In B.
    pub b: Figures,
}

impl Row {
    /// B's bytes minus A's, when both were measured.
    pub fn bytes_change(&self) -> Option<i64> {
        Some(self.b.bytes? - self.a.bytes?)
    }
}

/// What happened to one leak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Leaked in A, not in B.
    Gone,
    /// Leaked in both.
    Remains,
    /// Leaked in B only.
    New,
}

/// One leak (a culprit of a native_leak or vm_growth finding) and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LeakChange {
    /// What it is (`native`, `allocator`, `ets_table`...).
    pub kind: String,
    /// Its name (for native objects, the object without the function).
    pub name: String,
    /// Gone, remains or new.
    pub change: Change,
    /// Growth in A, bytes/s (None: not a leak there).
    pub growth_a: Option<f64>,
    /// Growth in B.
    pub growth_b: Option<f64>,
}

/// The comparison of two runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    /// Verdict of A.
    pub verdict_a: VerdictKind,
    /// Verdict of B.
    pub verdict_b: VerdictKind,
    /// One line: the leak is gone, still leaks, new growth.
    pub conclusion: String,
    /// Every leak of either run.
    pub leaks: Vec<LeakChange>,
    /// Native objects of either run.
    pub native: Vec<Row>,
    /// Allocators of either run.
    pub allocators: Vec<Row>,
}

/// The findings of a verdict that are leaks: (kind, subject) -> growth.
fn leak_set(v: &Verdict) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    let leaky = |k: VerdictKind| matches!(k, VerdictKind::NativeLeak | VerdictKind::VmGrowth);
    let mut add = |kind: VerdictKind, culprits: &[Culprit]| {
        if !leaky(kind) {
            return;
        }
        if culprits.is_empty() {
            out.insert((kind.as_str().to_owned(), "(no culprit named)".into()), 0.0);
        }
        for c in culprits {
            out.insert(
                (c.kind.as_str().to_owned(), subject(c)),
                c.growth_bytes_per_s,
            );
        }
    };
    add(v.kind, &v.culprits);
    for f in &v.secondary {
        add(f.kind, &f.culprits);
    }
    out
}

/// What a culprit is about across runs: a native object whatever its top function.
fn subject(c: &Culprit) -> String {
    match c.kind {
        CulpritKind::Native => c
            .name
            .split_once(": ")
            .map_or(c.name.as_str(), |(object, _)| object)
            .to_owned(),
        _ => c.name.clone(),
    }
}

/// Native objects of a run: series key -> figures.
fn native_figures(r: &Report) -> BTreeMap<String, Figures> {
    let leaking: Vec<String> = leak_set(&r.verdict)
        .into_keys()
        .filter(|(k, _)| k == "native")
        .map(|(_, n)| n)
        .collect();
    r.recording
        .native
        .iter()
        .flat_map(|n| &n.modules)
        .map(|m| {
            (
                series_key(&m.module, m.nif_api),
                Figures {
                    bytes: Some(m.outstanding_bytes),
                    growth_bytes_per_s: Some(m.growth_bytes_per_s),
                    leaks: leaking.contains(&m.module),
                },
            )
        })
        .collect()
}

/// Allocators of a run: carrier bytes at the end and their growth from the VM's samples
/// (first to last), else the probes' net carrier bytes.
fn allocator_figures(r: &Report) -> BTreeMap<String, Figures> {
    let leaking: Vec<String> = leak_set(&r.verdict)
        .into_keys()
        .filter(|(k, _)| k == "allocator")
        .map(|(_, n)| n)
        .collect();
    let mut out: BTreeMap<String, Figures> = BTreeMap::new();
    let rec = &r.recording;
    for a in &rec.allocators {
        let span = match (rec.samples.first(), rec.samples.last()) {
            (Some(f), Some(l)) if l.t_s > f.t_s => l.t_s - f.t_s,
            _ => rec.duration_s,
        };
        out.insert(
            a.name.clone(),
            Figures {
                bytes: Some(a.net_bytes),
                growth_bytes_per_s: (span > 0.0).then(|| a.net_bytes as f64 / span),
                leaks: false,
            },
        );
    }
    if let Some(vm) = &rec.vm
        && let (Some(first), Some(last)) = (vm.samples.first(), vm.samples.last())
    {
        let (start, end) = (first.by_allocator(), last.by_allocator());
        let span = last.t_s - first.t_s;
        for (name, e) in end {
            let s = start.get(&name).map_or(0, |s| s.carriers);
            out.insert(
                name,
                Figures {
                    bytes: Some(e.carriers as i64),
                    growth_bytes_per_s: (span > 0.0).then(|| (e.carriers as f64 - s as f64) / span),
                    leaks: false,
                },
            );
        }
    }
    for (name, f) in &mut out {
        f.leaks = leaking.contains(name);
    }
    out
}

/// Rows of both runs, the largest change first.
fn rows(a: BTreeMap<String, Figures>, mut b: BTreeMap<String, Figures>) -> Vec<Row> {
    let mut out: Vec<Row> = a
        .into_iter()
        .map(|(name, fa)| {
            let fb = b.remove(&name).unwrap_or_default();
            Row { name, a: fa, b: fb }
        })
        .collect();
    out.extend(b.into_iter().map(|(name, fb)| Row {
        name,
        a: Figures::default(),
        b: fb,
    }));
    out.sort_by_key(|r| std::cmp::Reverse(r.bytes_change().map_or(0, |c| c.unsigned_abs())));
    out
}

/// Compares two judged runs.
pub fn compare(a: &Report, b: &Report) -> Diff {
    let (la, lb) = (leak_set(&a.verdict), leak_set(&b.verdict));
    let mut leaks = Vec::new();
    for ((kind, name), g) in &la {
        let in_b = lb.get(&(kind.clone(), name.clone()));
        leaks.push(LeakChange {
            kind: kind.clone(),
            name: name.clone(),
            change: if in_b.is_some() {
                Change::Remains
            } else {
                Change::Gone
            },
            growth_a: Some(*g),
            growth_b: in_b.copied(),
        });
    }
    for ((kind, name), g) in &lb {
        if !la.contains_key(&(kind.clone(), name.clone())) {
            leaks.push(LeakChange {
                kind: kind.clone(),
                name: name.clone(),
                change: Change::New,
                growth_a: None,
                growth_b: Some(*g),
            });
        }
    }
    let conclusion = conclusion(&leaks, a.verdict.kind, b.verdict.kind);
    Diff {
        verdict_a: a.verdict.kind,
        verdict_b: b.verdict.kind,
        conclusion,
        leaks,
        native: rows(native_figures(a), native_figures(b)),
        allocators: rows(allocator_figures(a), allocator_figures(b)),
    }
}

fn conclusion(leaks: &[LeakChange], a: VerdictKind, b: VerdictKind) -> String {
    let names = |c: Change| -> Vec<String> {
        leaks
            .iter()
            .filter(|l| l.change == c)
            .map(|l| crate::vm::render::clean(&l.name))
            .collect()
    };
    let (gone, remains, new) = (
        names(Change::Gone),
        names(Change::Remains),
        names(Change::New),
    );
    let mut parts = Vec::new();
    match gone.len() {
        0 => {}
        1 => parts.push(format!("the leak in {} is gone", gone[0])),
        _ => parts.push(format!("the leaks in {} are gone", gone.join(", "))),
    }
    if !remains.is_empty() {
        parts.push(format!("{} still leaks", remains.join(", ")));
    }
    if !new.is_empty() {
        parts.push(format!("new growth in {}", new.join(", ")));
    }
    if parts.is_empty() {
        return format!("no leak in either run (A {}, B {})", a.as_str(), b.as_str());
    }
    parts.join("; ")
}

impl Diff {
    /// 0 when nothing got worse, 1 when a leak remains or a new one appeared.
    pub fn exit_code(&self) -> u8 {
        if self.leaks.iter().any(|l| l.change != Change::Gone) {
            1
        } else {
            0
        }
    }

    /// The comparison for people: the conclusion first, then the tables.
    pub fn text(&self) -> String {
        let clean = crate::vm::render::clean;
        let mut o = format!(
            "diff: {}\n  verdict A {}, B {}",
            self.conclusion,
            self.verdict_a.as_str(),
            self.verdict_b.as_str()
        );
        let bytes = |v: Option<i64>| v.map_or("—".into(), |b| human_bytes(b as f64));
        let rate = |v: Option<f64>| v.map_or("—".into(), |g| format!("{}/s", human_bytes(g)));
        for l in &self.leaks {
            let _ = write!(
                o,
                "\n  {}: {} {} (growth A {}, B {})",
                match l.change {
                    Change::Gone => "gone",
                    Change::Remains => "remains",
                    Change::New => "new",
                },
                l.kind,
                clean(&l.name),
                rate(l.growth_a),
                rate(l.growth_b)
            );
        }
        for (title, rows) in [
            ("native object", &self.native),
            ("allocator", &self.allocators),
        ] {
            if rows.is_empty() {
                continue;
            }
            let _ = write!(
                o,
                "\n\n  {title:<28} {:>12} {:>12} {:>12} {:>14} {:>14}",
                "A bytes", "B bytes", "change", "A growth", "B growth"
            );
            for r in rows.iter().take(30) {
                let mark = |f: &Figures| if f.leaks { "*" } else { "" };
                let _ = write!(
                    o,
                    "\n  {:<28} {:>12} {:>12} {:>12} {:>14} {:>14}",
                    clean(&r.name),
                    format!("{}{}", bytes(r.a.bytes), mark(&r.a)),
                    format!("{}{}", bytes(r.b.bytes), mark(&r.b)),
                    bytes(r.bytes_change()),
                    rate(r.a.growth_bytes_per_s),
                    rate(r.b.growth_bytes_per_s)
                );
            }
        }
        o.push_str("\n\n  * named as leaking by that run's verdict");
        o
    }

    /// The comparison as JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a diff always serializes")
    }
}

/// Reads, judges and compares A and B.
pub fn compare_paths(a: &Path, b: &Path) -> Result<Diff, Error> {
    let ra = Report::new(read_run(a)?);
    let rb = Report::new(read_run(b)?);
    Ok(compare(&ra, &rb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> Report {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/recordings")
            .join(name);
        Report::new(Recording::read(&p).unwrap())
    }

    #[test]
    fn a_leak_fixed_is_gone_and_a_leak_kept_remains() {
        let (leaky, healthy) = (rec("two_problems.json"), rec("healthy.json"));
        let d = compare(&leaky, &healthy);
        assert!(
            d.conclusion.starts_with("the leaks in ")
                && d.conclusion.contains("lt_nif.so")
                && d.conclusion.ends_with("are gone"),
            "{}",
            d.conclusion
        );
        assert_eq!(d.exit_code(), 0);
        let d = compare(&healthy, &leaky);
        assert!(
            d.conclusion.starts_with("new growth in ") && d.conclusion.contains("lt_nif.so"),
            "{}",
            d.conclusion
        );
        assert_eq!(d.exit_code(), 1);
        let d = compare(&leaky, &leaky);
        assert!(d.conclusion.contains("lt_nif.so") && d.conclusion.contains("still leaks"));
        assert_eq!(d.exit_code(), 1);
        let d = compare(&healthy, &healthy);
        assert!(
            d.conclusion.starts_with("no leak in either run"),
            "{}",
            d.conclusion
        );
        assert_eq!(d.exit_code(), 0);
    }
}
