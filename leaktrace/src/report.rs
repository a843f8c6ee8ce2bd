//! Reports: report.json (schema 1: the recording plus the verdict), report.md for humans, and
//! the short summary printed at the end of a run.

use std::{fmt::Write as _, fs, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    error::Error,
    recording::{Census, Recording, Sample},
    units::human_bytes,
    verdict::{Verdict, judge},
};

/// A judged recording; serialized as report.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Everything recorded (flattened: `schema`, `target`, `samples`, ... at top level).
    #[serde(flatten)]
    pub recording: Recording,
    /// The verdict.
    pub verdict: Verdict,
    /// Probe-counted carriers against the VM's own figure; the mseg cache.
    #[serde(default)]
    pub cross_check: CrossCheck,
}

impl Report {
    /// Judges `recording`.
    pub fn new(recording: Recording) -> Report {
        let verdict = judge(&recording);
        let cross_check = CrossCheck::of(&recording);
        Report {
            recording,
            verdict,
            cross_check,
        }
    }
}

/// Two views of the same carriers over the run: what the probes counted and what the VM reports
/// (`carriers_size` summed, i.e. `vm_allocated`). A large difference means carriers the probes
/// do not see (an allocator path not probed) or a VM figure that lags; both are worth knowing
/// before trusting the ledger. Null where a source was missing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CrossCheck {
    /// Carrier bytes created minus destroyed between the first and last sample having both
    /// figures, as the probes counted them.
    pub probe_carriers_change: Option<i64>,
    /// The VM's carrier bytes change over the same samples.
    pub vm_carriers_change: Option<i64>,
    /// `probe_carriers_change - vm_carriers_change`.
    pub difference: Option<i64>,
    /// Share of mseg carrier requests served from the mseg cache during the run.
    pub mseg_hit_rate_run: Option<f64>,
    /// The same since the node started.
    pub mseg_hit_rate_lifetime: Option<f64>,
    /// Segments in the mseg cache at the end.
    pub mseg_cached_segments: Option<u64>,
}

impl CrossCheck {
    /// Computes the check from a recording.
    pub fn of(r: &Recording) -> CrossCheck {
        let both: Vec<(i64, u64)> = r
            .samples
            .iter()
            .filter_map(|s| Some((s.carriers?, s.vm_allocated?)))
            .collect();
        let (probe, vm) = match (both.first(), both.last()) {
            (Some(a), Some(b)) if both.len() >= 2 => {
                (Some(b.0 - a.0), Some(b.1 as i64 - a.1 as i64))
            }
            _ => (None, None),
        };
        let census = r.vm.as_ref();
        let end = census
            .and_then(|v| v.census_end.as_ref())
            .and_then(|c| c.mseg);
        let start = census
            .and_then(|v| v.census_start.as_ref())
            .and_then(|c| c.mseg);
        CrossCheck {
            probe_carriers_change: probe,
            vm_carriers_change: vm,
            difference: probe.zip(vm).map(|(p, v)| p - v),
            mseg_hit_rate_run: end.zip(start).and_then(|(e, s)| e.hit_rate_since(&s)),
            mseg_hit_rate_lifetime: end.and_then(|e| e.hit_rate()),
            mseg_cached_segments: end.map(|e| e.cached_segments),
        }
    }

    /// One line for people, or None when there is nothing to compare.
    pub fn line(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let (Some(p), Some(v), Some(d)) = (
            self.probe_carriers_change,
            self.vm_carriers_change,
            self.difference,
        ) {
            parts.push(format!(
                "carriers over the run: probes {}, VM {} (difference {})",
                human_bytes(p as f64),
                human_bytes(v as f64),
                human_bytes(d as f64)
            ));
        }
        let rate = |r: Option<f64>| r.map_or("—".into(), |r| format!("{:.0}%", r * 100.0));
        if self.mseg_hit_rate_lifetime.is_some() {
            parts.push(format!(
                "mseg cache hit rate {} during the run, {} since start, {} cached segments",
                rate(self.mseg_hit_rate_run),
                rate(self.mseg_hit_rate_lifetime),
                self.mseg_cached_segments.unwrap_or(0)
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// report.json text.
pub fn to_json(report: &Report) -> String {
    serde_json::to_string_pretty(report).expect("a report always serializes")
}

fn icell(v: Option<i64>) -> String {
    v.map_or("—".into(), |b| human_bytes(b as f64))
}

fn ucell(v: Option<u64>) -> String {
    v.map_or("—".into(), |b| human_bytes(b as f64))
}

/// Samples shown in the ledger table: all of a short run, else first, evenly spaced, last.
fn shown(samples: &[Sample]) -> Vec<&Sample> {
    const MAX: usize = 12;
    if samples.len() <= MAX {
        return samples.iter().collect();
    }
    let step = (samples.len() - 1) as f64 / (MAX - 1) as f64;
    (0..MAX)
        .map(|i| &samples[((i as f64 * step).round() as usize).min(samples.len() - 1)])
        .collect()
}

/// A name from the node or a recording, safe in a markdown table: no control characters,
/// no table or markup breakers.
fn md(name: &str) -> String {
    crate::vm::render::clean(name)
        .replace('|', "\\|")
        .replace('`', "'")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The census at the end, against the start where it helps.
fn census_markdown(o: &mut String, c: &Census, start: Option<&Census>) {
    let l = &c.limits;
    let _ = writeln!(
        o,
        "\n### Census at {:.0} s\n\n{} processes ({} examined, cap {}; binaries of {} processes, {} references{}), {} ETS tables, {} of {} atoms; census took {:.0} ms.",
        c.t_s,
        c.process_count,
        l.processes_examined,
        l.process_cap,
        l.binary_processes_examined,
        l.binary_refs_examined,
        if c.binaries_scanned {
            ""
        } else {
            ", reference cap reached"
        },
        c.table_count,
        c.atom_count,
        c.atom_limit,
        l.wall_ms
    );
    let mut parts = Vec::new();
    if let Some(b) = c.binary_distinct_bytes {
        parts.push(format!("distinct refc binaries {}", human_bytes(b as f64)));
    }
    if let Some(p) = c.persistent_term {
        parts.push(format!(
            "persistent_term {} terms, {}",
            p.count,
            human_bytes(p.memory as f64)
        ));
    }
    if let Some(code) = c.code {
        parts.push(format!("{} modules loaded", code.modules));
    }
    if let Some(p) = &c.ports {
        parts.push(format!(
            "{} ports, {} in driver queues",
            p.count,
            human_bytes(p.queue_size as f64)
        ));
    }
    if let Some(sys) = c.system_other() {
        parts.push(format!("other system memory {}", human_bytes(sys as f64)));
    }
    if !parts.is_empty() {
        let _ = writeln!(o, "\n{}.", parts.join("; "));
    }
    if !c.groups.is_empty() {
        let _ = writeln!(
            o,
            "\n| process group (initial call) | count | change | memory |\n|---|---:|---:|---:|"
        );
        for g in c.groups.iter().take(8) {
            let before = start.and_then(|s| s.group(&g.name)).map_or(0, |b| b.count);
            let _ = writeln!(
                o,
                "| {} | {} | {:+} | {} |",
                md(&g.name),
                g.count,
                g.count as i64 - before as i64,
                human_bytes(g.memory as f64)
            );
        }
    }
}

/// report.md text.
pub fn to_markdown(report: &Report) -> String {
    let r = &report.recording;
    let v = &report.verdict;
    let mut o = String::new();
    let _ = writeln!(o, "# leaktrace report: {}\n", v.kind.as_str());
    let _ = writeln!(o, "**{}**\n", md(&v.summary));
    let node = match &r.vm {
        Some(vm) if !vm.node.is_empty() => format!(
            "{} (connected; found by {})",
            md(&vm.node),
            md(&vm.found_by)
        ),
        _ => match &r.target.node {
            Some(n) => format!("{} (no VM connection)", md(n)),
            None => "not connected (see Sources)".into(),
        },
    };
    let _ = writeln!(
        o,
        "- target: PID {} `{}`, OTP {}, node {node}",
        r.target.pid,
        r.target.exe,
        r.target.otp_release.as_deref().unwrap_or("unknown"),
    );
    let _ = writeln!(
        o,
        "- run: {:.1} s, sample every {:.1} s, ended by {:?}; leaktrace {}",
        r.duration_s, r.interval_s, r.end, r.tool_version
    );
    let _ = writeln!(o, "- exit code {}\n", v.kind.exit_code());
    if !v.culprits.is_empty() {
        let _ = writeln!(
            o,
            "## Culprits\n\n| kind | name | bytes | growth | detail |\n|---|---|---:|---:|---|"
        );
        for c in &v.culprits {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {}/s | {} |",
                c.kind,
                md(&c.name),
                human_bytes(c.bytes as f64),
                human_bytes(c.growth_bytes_per_s),
                md(c.detail.as_deref().unwrap_or(""))
            );
        }
        o.push('\n');
    }
    if !v.secondary.is_empty() {
        let _ = writeln!(o, "## Also found\n");
        for f in &v.secondary {
            let names: Vec<&str> = f.culprits.iter().map(|c| c.name.as_str()).collect();
            let _ = writeln!(
                o,
                "- **{}**: {} ({})",
                f.kind.as_str(),
                f.summary,
                names.join(", ")
            );
        }
        o.push('\n');
    }
    let _ = writeln!(o, "## Ruled out\n");
    for x in &v.ruled_out {
        let _ = writeln!(o, "- **{}**: {}", x.kind.as_str(), md(&x.reason));
    }
    let _ = writeln!(
        o,
        "\n## Ledger\n\nProbe lines (carriers, mseg_cache, native) are changes since attach; baseline is rss_anon at attach; unexplained = rss_anon - baseline - carriers - mseg_cache - native. — = not measured.\n"
    );
    let _ = writeln!(
        o,
        "| t (s) | rss | rss_anon | carriers | mseg_cache | vm_used | vm_allocated | native | unexplained |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in shown(&r.samples) {
        let _ = writeln!(
            o,
            "| {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.t_s,
            ucell(s.rss),
            ucell(s.rss_anon),
            icell(s.carriers),
            icell(s.mseg_cache),
            ucell(s.vm_used),
            ucell(s.vm_allocated),
            icell(s.native_outstanding),
            icell(s.unexplained)
        );
    }
    let _ = writeln!(
        o,
        "\n## Trends\n\n| line | slope | growth over run | 2nd half | r² | grows |\n|---|---:|---:|---:|---:|---|"
    );
    for t in &v.trends {
        let _ = writeln!(
            o,
            "| {} | {}/s | {} | {} | {:.2} | {} |",
            t.line,
            human_bytes(t.slope_bytes_per_s),
            human_bytes(t.growth_bytes),
            t.second_half_bytes_per_s
                .map_or("—".into(), |h| format!("{}/s", human_bytes(h))),
            t.r2,
            if t.grows { "yes" } else { "no" }
        );
    }
    if !r.allocators.is_empty() {
        let _ = writeln!(
            o,
            "\n## Carriers seen by the probes (changes since attach)\n\n| allocator | created | destroyed | net | live seen |\n|---|---:|---:|---:|---:|"
        );
        for a in &r.allocators {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} ({}) |",
                a.name,
                a.created,
                a.destroyed,
                human_bytes(a.net_bytes as f64),
                a.live_seen,
                human_bytes(a.live_seen_bytes as f64)
            );
        }
    }
    if let Some(vm) = &r.vm
        && let Some(last) = vm.samples.last()
    {
        let _ = writeln!(
            o,
            "\n## VM allocators at the end (node {})\n\n| allocator | used | allocated | usage | pooled |\n|---|---:|---:|---:|---:|",
            vm.node
        );
        let mut rows: Vec<_> = last.by_allocator().into_values().collect();
        rows.sort_by_key(|a| std::cmp::Reverse(a.carriers));
        for a in rows.iter().filter(|a| a.carriers > 0) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0}% | {} |",
                a.name,
                human_bytes(a.blocks as f64),
                human_bytes(a.carriers as f64),
                100.0 * a.blocks as f64 / a.carriers as f64,
                human_bytes(a.pool_carriers as f64)
            );
        }
        if let Some(c) = &vm.census_end {
            census_markdown(&mut o, c, vm.census_start.as_ref());
        }
        if !vm.gaps.is_empty() {
            let _ = writeln!(
                o,
                "\n{} samples without VM figures (first at {:.1} s: {}).",
                vm.gaps.len(),
                vm.gaps[0].t_s,
                md(&vm.gaps[0].reason)
            );
        }
    }
    if let Some(line) = report.cross_check.line() {
        let _ = writeln!(o, "\n## Cross-check\n\n{line}.");
    }
    let _ = writeln!(o, "\n## Sources\n");
    let s = &r.sources;
    for (name, on) in [
        ("carrier probes", s.carrier_probes),
        ("NIF/driver API probes", s.nif_api_probes),
        ("native probes", s.native_probes),
        ("block probes", s.block_probes),
        ("VM connection", s.vm_connection),
    ] {
        let _ = writeln!(o, "- {name}: {}", if on { "yes" } else { "no" });
    }
    for n in &r.source_notes {
        let _ = writeln!(o, "- note: {n}");
    }
    let _ = writeln!(
        o,
        "\n## Probes\n\n| program | symbol | attached | hits |\n|---|---|---|---:|"
    );
    for p in &r.probes {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            p.name,
            p.symbol,
            if p.attached {
                "yes".to_string()
            } else {
                format!("no: {}", p.error.as_deref().unwrap_or(""))
            },
            p.hits
        );
    }
    let l = &r.losses;
    let _ = writeln!(
        o,
        "\n## Losses\n\nevents lost {}, map full {}, probe errors {}, missed entries {}, unknown-size frees {}.",
        l.events_lost, l.map_full, l.probe_errors, l.missed_entries, l.unknown_frees
    );
    let t = &r.thresholds;
    let _ = writeln!(
        o,
        "\n## Thresholds\n\ngrowth floor {}/s and {} over the run (sustained in the second half); minimum run {:.0} s; explained fraction {:.2}; fragmentation: {} free at usage ≤ {:.0}%.\n\nTracer: peak RSS {}, {} carrier events.",
        human_bytes(t.min_growth_bytes_per_s),
        human_bytes(t.min_total_growth_bytes),
        t.min_duration_s,
        t.explained_fraction,
        human_bytes(t.frag_min_free_bytes),
        t.frag_max_usage * 100.0,
        human_bytes(r.tracer.peak_rss as f64),
        r.tracer.events
    );
    o
}

/// The few lines printed at the end of a run.
pub fn terminal_summary(report: &Report) -> String {
    let v = &report.verdict;
    let clean = crate::vm::render::clean;
    let mut o = format!("verdict: {} — {}", v.kind.as_str(), clean(&v.summary));
    for c in v.culprits.iter().take(5) {
        let _ = write!(
            o,
            "\n  culprit: {} {} — {} (growing {}/s){}",
            c.kind,
            clean(&c.name),
            human_bytes(c.bytes as f64),
            human_bytes(c.growth_bytes_per_s),
            c.detail
                .as_deref()
                .map(|d| format!("; {}", clean(d)))
                .unwrap_or_default()
        );
    }
    for f in &v.secondary {
        let _ = write!(o, "\n  also: {} — {}", f.kind.as_str(), f.summary);
    }
    for x in &v.ruled_out {
        let _ = write!(o, "\n  not {}: {}", x.kind.as_str(), x.reason);
    }
    if let Some(line) = report.cross_check.line() {
        let _ = write!(o, "\n  check: {line}");
    }
    o
}

/// Writes report.json and report.md into `dir` (created if needed).
pub fn write_dir(report: &Report, dir: &Path) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::ReportIo { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let json = dir.join("report.json");
    fs::write(&json, to_json(report)).map_err(io(&json))?;
    let md = dir.join("report.md");
    fs::write(&md, to_markdown(report)).map_err(io(&md))?;
    Ok(())
}
