//! Reports: report.json (schema 1: the recording plus the verdict), report.md for humans, and
//! the short summary printed at the end of a run.

use std::{
    ffi::{CStr, CString, OsStr, OsString},
    fmt::Write as _,
    fs::{self, File},
    io::{self, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{DirBuilderExt, MetadataExt, PermissionsExt},
        },
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{OutMode, TraceConfig},
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
            .filter_map(|s| Some((s.carriers_mapped.or(s.carriers)?, s.vm_allocated?)))
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
        "\n### Census at {:.0} s\n\n{} processes ({}), {} ETS tables, {} of {} atoms; census took {:.0} ms.",
        c.t_s,
        c.process_count,
        c.examined(),
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

/// The carrier picture: per allocator, carriers pinned by few live blocks and the holes
/// between them.
fn carriers_markdown(o: &mut String, p: &crate::recording::vm::CarrierPicture) {
    let _ = writeln!(
        o,
        "\n### Carriers (instrument:carriers)\n\nTaken at {:.0} s in {:.0} ms{}.",
        p.t_s,
        p.wall_ms,
        if p.loaded_instrument {
            "; the call loaded OTP's `instrument` module on the node (it was not loaded)"
        } else {
            ""
        }
    );
    if let Some(why) = &p.skipped {
        let _ = writeln!(o, "\nNo picture: {}.", md(why));
        return;
    }
    let _ = writeln!(
        o,
        "A carrier is pinned when its live blocks take under {:.0}% of it: it cannot go back to the OS until the last one is freed.{}\n\n| allocator | carriers | MiB | pool | live blocks | pinned carriers | median blocks per pinned | free holes |\n|---|---:|---:|---:|---:|---:|---:|---:|",
        crate::recording::vm::PINNED_USAGE * 100.0,
        if p.rejected > 0 {
            format!(
                " {} malformed entries of the reply were dropped.",
                p.rejected
            )
        } else {
            String::new()
        }
    );
    for a in &p.allocators {
        let _ = writeln!(
            o,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            md(&a.name),
            a.carriers,
            a.carrier_bytes as f64 / (1024.0 * 1024.0),
            a.pool_carriers,
            a.blocks,
            a.pinned,
            a.pinned_median_blocks.map_or("—".into(), |m| m.to_string()),
            a.free_holes
        );
    }
    let mut pinned: Vec<_> = p.allocators.iter().filter(|a| a.pinned > 0).collect();
    pinned.sort_by_key(|a| std::cmp::Reverse(a.pinned_bytes));
    for a in pinned.iter().take(3) {
        let _ = writeln!(
            o,
            "\nEmptiest {} carriers holding blocks: {}.",
            md(&a.name),
            a.emptiest
                .iter()
                .map(|c| format!(
                    "{} with {} blocks ({:.1}% used, {} free holes{})",
                    human_bytes(c.size as f64),
                    c.blocks,
                    100.0 * c.usage(),
                    c.free_holes,
                    if c.in_pool { ", in the pool" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
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
        md(&r.target.exe),
        md(r.target.otp_release.as_deref().unwrap_or("unknown")),
    );
    let _ = writeln!(
        o,
        "- run: {:.1} s, sample every {:.1} s, ended by {:?}; leaktrace {}",
        r.duration_s,
        r.interval_s,
        r.end,
        md(&r.tool_version)
    );
    let _ = writeln!(o, "- exit code {}\n", v.kind.exit_code());
    evidence_markdown(&mut o, report);
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
            let names: Vec<String> = f.culprits.iter().map(|c| md(&c.name)).collect();
            let _ = writeln!(
                o,
                "- **{}**: {} ({})",
                f.kind.as_str(),
                md(&f.summary),
                names.join(", ")
            );
        }
        o.push('\n');
    }
    let _ = writeln!(o, "## Ruled out\n");
    for x in &v.ruled_out {
        let _ = writeln!(o, "- **{}**: {}", x.kind.as_str(), md(&x.reason));
    }
    resident_markdown(&mut o, r);
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
    o += &crate::cgroup::render(r, "\n", md);
    let _ = writeln!(
        o,
        "\n## Trends\n\n| line | slope | growth over run | 2nd half | r² | grows |\n|---|---:|---:|---:|---:|---|"
    );
    for t in &v.trends {
        let _ = writeln!(
            o,
            "| {} | {}/s | {} | {} | {:.2} | {} |",
            md(&t.line),
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
                md(&a.name),
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
            md(&vm.node)
        );
        let mut rows: Vec<_> = last.by_allocator().into_values().collect();
        rows.sort_by_key(|a| std::cmp::Reverse(a.carriers));
        for a in rows.iter().filter(|a| a.carriers > 0) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0}% | {} |",
                md(&a.name),
                human_bytes(a.blocks as f64),
                human_bytes(a.carriers as f64),
                100.0 * a.blocks as f64 / a.carriers as f64,
                human_bytes(a.pool_carriers as f64)
            );
        }
        if let Some(c) = &vm.census_end {
            census_markdown(&mut o, c, vm.census_start.as_ref());
        }
        if let Some(p) = &vm.carriers {
            carriers_markdown(&mut o, p);
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
    native_markdown(&mut o, r);
    blocks_markdown(&mut o, r);
    sizes_markdown(&mut o, r);
    let _ = writeln!(o, "\n## How measured\n");
    measured_markdown(&mut o, report);
    let _ = writeln!(o, "\n### Sources\n");
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
        let _ = writeln!(o, "- note: {}", md(n));
    }
    if !r.privileges.is_empty() {
        let _ = writeln!(
            o,
            "\n### Privileges\n\n| from | phase | capabilities held |\n|---:|---|---|"
        );
        for p in &r.privileges {
            let _ = writeln!(
                o,
                "| {:.1} s | {} | {} |",
                p.at_s,
                md(&p.phase),
                if p.held.is_empty() {
                    "none".to_owned()
                } else {
                    md(&p.held.join(", "))
                }
            );
        }
    }
    let _ = writeln!(
        o,
        "\n### Probes\n\n| program | symbol | attached | hits |\n|---|---|---|---:|"
    );
    for p in &r.probes {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            md(&p.name),
            md(&p.symbol),
            if p.attached {
                "yes".to_string()
            } else {
                format!("no: {}", md(p.error.as_deref().unwrap_or("")))
            },
            p.hits
        );
    }
    let l = &r.losses;
    let _ = writeln!(
        o,
        "\n### Losses\n\nevents lost {}, map full {}, probe errors {}, missed entries {}, unknown-size frees {}.",
        l.events_lost, l.map_full, l.probe_errors, l.missed_entries, l.unknown_frees
    );
    let t = &r.thresholds;
    let _ = writeln!(
        o,
        "\n### Thresholds\n\ngrowth floor {}/s and {} over the run (sustained in the second half); minimum run {:.0} s; explained fraction {:.2}; fragmentation: {} free at usage ≤ {:.0}%; resident outside the VM at attach: {} and {:.0}% of RSS.\n\nTracer: peak RSS {}, {} carrier events.",
        human_bytes(t.min_growth_bytes_per_s),
        human_bytes(t.min_total_growth_bytes),
        t.min_duration_s,
        t.explained_fraction,
        human_bytes(t.frag_min_free_bytes),
        t.frag_max_usage * 100.0,
        human_bytes(t.outside_min_bytes),
        t.outside_min_share * 100.0,
        human_bytes(r.tracer.peak_rss as f64),
        r.tracer.events
    );
    versions_markdown(&mut o, r);
    files_markdown(&mut o, r);
    o
}

/// A ledger figure of a sample, as bytes.
type Figure = fn(&Sample) -> Option<f64>;

/// The ledger lines of the evidence table: name and the figure of a sample.
const EVIDENCE_LINES: [(&str, Figure); 8] = [
    ("rss", |s| s.rss.map(|v| v as f64)),
    ("rss_anon", |s| s.rss_anon.map(|v| v as f64)),
    ("carriers", |s| s.carriers.map(|v| v as f64)),
    ("mseg_cache", |s| s.mseg_cache.map(|v| v as f64)),
    ("vm_used", |s| s.vm_used.map(|v| v as f64)),
    ("vm_allocated", |s| s.vm_allocated.map(|v| v as f64)),
    ("native_outstanding", |s| {
        s.native_outstanding.map(|v| v as f64)
    }),
    ("unexplained", |s| s.unexplained.map(|v| v as f64)),
];

/// The evidence at a glance: each ledger line at its first and last sample, its change and
/// its trend.
fn evidence_markdown(o: &mut String, report: &Report) {
    let r = &report.recording;
    let _ = writeln!(
        o,
        "## Evidence\n\n| line | first | last | change | slope | grows |\n|---|---:|---:|---:|---:|---|"
    );
    let mut rows = 0;
    for (name, value) in EVIDENCE_LINES {
        let first = r.samples.iter().find_map(|s| Some((s.t_s, value(s)?)));
        let last = r
            .samples
            .iter()
            .rev()
            .find_map(|s| Some((s.t_s, value(s)?)));
        let (Some((_, a)), Some((_, b))) = (first, last) else {
            continue;
        };
        let trend = report.verdict.trends.iter().find(|t| t.line == name);
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {} | {} | {} |",
            human_bytes(a),
            human_bytes(b),
            human_bytes(b - a),
            trend.map_or("—".into(), |t| format!(
                "{}/s",
                human_bytes(t.slope_bytes_per_s)
            )),
            trend.map_or("—", |t| if t.grows { "yes" } else { "no" })
        );
        rows += 1;
    }
    if rows == 0 {
        let _ = writeln!(o, "| (no sample) | — | — | — | — | — |");
    }
    let _ = writeln!(
        o,
        "\ncarriers, mseg_cache, native_outstanding and unexplained are changes since attach; — = not measured. The full ledger is below and in timeline.svg.\n"
    );
    if !report.verdict.degraded.is_empty() {
        let _ = writeln!(o, "**Evidence limits:**\n");
        for d in &report.verdict.degraded {
            let _ = writeln!(o, "- {}", md(d));
        }
        o.push('\n');
    }
}

/// Native allocations by object, when the native probes ran.
fn native_markdown(o: &mut String, r: &Recording) {
    let Some(n) = &r.native else { return };
    let _ = writeln!(
        o,
        "\n## Native allocations\n\n{}; {}.\n",
        match n.attached_at_s {
            Some(t) => format!("native probes attached at {t:.1} s"),
            None => "native probes not attached".into(),
        },
        md(&n.reason)
    );
    if n.modules.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "| object | outstanding | growth | allocations | frees | top function |\n|---|---:|---:|---:|---:|---|"
    );
    for m in n.modules.iter().take(20) {
        let mut name = md(&m.module);
        if m.nif_api {
            name.push_str(" (NIF API)");
        }
        if m.is_emulator {
            name.push_str(" (ERTS itself)");
        }
        let _ = writeln!(
            o,
            "| {name} | {} | {}/s | {} | {} | {} |",
            human_bytes(m.outstanding_bytes as f64),
            human_bytes(m.growth_bytes_per_s),
            m.allocations,
            m.frees,
            md(m.function.as_deref().unwrap_or("—"))
        );
    }
    let (stacks, source) = crate::bundle::flame::stacks(Some(n));
    let _ = writeln!(
        o,
        "\nnative.svg, native.folded and native.pb.gz hold {} outstanding {}.",
        human_bytes(crate::bundle::flame::total_bytes(&stacks) as f64),
        match source {
            crate::bundle::flame::StackSource::Stacks => "by allocation stack",
            crate::bundle::flame::StackSource::Modules =>
                "by object and function (no stacks recorded: `--stacks N` records them)",
            crate::bundle::flame::StackSource::None => "(none)",
        }
    );
}

/// The block probes (`--blocks`): per allocator and the top types, changes since attach.
fn blocks_markdown(o: &mut String, r: &Recording) {
    let Some(b) = &r.blocks else { return };
    let _ = writeln!(o, "\n## ERTS blocks (--blocks)\n");
    for line in crate::blocks::summary_lines(r) {
        let _ = writeln!(o, "- {}", md(&line));
    }
    if b.attached_at_s.is_none() {
        return;
    }
    let _ = writeln!(
        o,
        "\n| allocator / type | net since attach | growth | allocated | freed | frees of older blocks | median size |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for g in b.allocators.iter().chain(b.types.iter().take(15)) {
        let _ = writeln!(
            o,
            "| {} | {} | {}/s | {} | {} | {} | {} |",
            md(&g.name),
            human_bytes(g.net_bytes as f64),
            human_bytes(g.growth_bytes_per_s),
            g.allocs,
            g.frees,
            g.unknown_frees,
            human_bytes(g.median_size as f64)
        );
    }
}

/// The histogram series, one row each.
fn sizes_markdown(o: &mut String, r: &Recording) {
    let _ = writeln!(o, "\n## Sizes and lifetimes\n");
    let series = crate::bundle::series(r);
    if series.is_empty() {
        let _ = writeln!(
            o,
            "No size or lifetime histograms in this recording (sizes.svg says so; histograms.hlog holds no interval)."
        );
        return;
    }
    let names = crate::bundle::hgrm::file_names(&r.histograms);
    let _ = writeln!(o, "| series | unit | values | file |\n|---|---|---|---|");
    for (s, file) in series.iter().zip(names) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {file} |",
            md(&s.name),
            s.unit.as_str(),
            md(&s.stats_line())
        );
        for p in &s.problems {
            let _ = writeln!(o, "| | | unreadable {} | |", md(p));
        }
    }
    if r.histograms.dropped > 0 {
        let _ = writeln!(
            o,
            "\n{} values were not recorded (too many series, or a histogram that could not be encoded).",
            r.histograms.dropped
        );
    }
}

/// Probes, hits, losses and overhead in one paragraph, ahead of the detailed tables.
fn measured_markdown(o: &mut String, report: &Report) {
    let r = &report.recording;
    let attached = r.probes.iter().filter(|p| p.attached).count();
    let hits: u64 = r.probes.iter().map(|p| p.hits).sum();
    let l = &r.losses;
    let lost = l.events_lost + l.map_full + l.probe_errors + l.missed_entries;
    let _ = writeln!(
        o,
        "{attached} of {} probes attached, {hits} probe hits; {lost} events not recorded ({}); {} samples every {:.1} s over {:.1} s; tracer overhead: peak RSS {}, {} carrier events{}.",
        r.probes.len(),
        if lost == 0 {
            "none lost".to_string()
        } else {
            format!(
                "{} ring buffer, {} map full, {} probe errors, {} missed entries",
                l.events_lost, l.map_full, l.probe_errors, l.missed_entries
            )
        },
        r.samples.len(),
        r.interval_s,
        r.duration_s,
        human_bytes(r.tracer.peak_rss as f64),
        r.tracer.events,
        match r.native.as_ref().and_then(|n| n.attached_at_s) {
            Some(t) => format!("; native probes attached at {t:.1} s"),
            None => "; native probes not attached".into(),
        }
    );
}

/// Versions and the command line (secrets removed).
/// Where the resident memory lay at attach and at the end: one row per line of the breakdown,
/// in bytes and % of RSS; the objects holding the most file-backed pages; what glibc holds.
fn resident_markdown(o: &mut String, r: &Recording) {
    use crate::recording::resident::Breakdown;
    let Some(levels) = &r.resident else {
        return;
    };
    let cols: Vec<(&str, &Breakdown)> =
        [("at attach", &levels.at_attach), ("at end", &levels.at_end)]
            .into_iter()
            .filter_map(|(l, b)| b.as_ref().map(|b| (l, b)))
            .collect();
    if cols.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\n## Resident memory\n\nWhere the RSS lies (levels, not changes): ERTS carriers are located by their shape in the maps (carriers and the mseg cache together when the cache is not told apart); malloc's arenas are walked from outside for what is in use and free. — = unknown.\n"
    );
    let mut head = String::from("| line |");
    let mut rule = String::from("|---|");
    for (l, _) in &cols {
        let _ = write!(head, " {l} | % of RSS |");
        rule += "---:|---:|";
    }
    let _ = writeln!(o, "{head}\n{rule}");
    type Get = fn(&Breakdown) -> Option<i64>;
    let rows: [(&str, Get); 10] = [
        ("RSS", |b| Some(b.rss as i64)),
        ("file-backed", |b| Some(b.file as i64)),
        ("ERTS carriers", |b| b.erts_carriers.map(|v| v as i64)),
        ("mseg cache", |b| b.mseg_cache.map(|v| v as i64)),
        ("malloc arenas", |b| Some(b.malloc_arenas as i64)),
        ("… in use (glibc)", |b| b.malloc_in_use.map(|v| v as i64)),
        ("… free (glibc)", |b| b.malloc_free.map(|v| v as i64)),
        ("thread stacks", |b| Some(b.thread_stacks as i64)),
        ("other anonymous", |b| Some(b.other_anon as i64)),
        ("unaccounted", |b| b.unaccounted),
    ];
    for (name, get) in rows {
        let mut line = format!("| {name} |");
        for (_, b) in &cols {
            match get(b) {
                Some(v) => {
                    let _ = write!(
                        line,
                        " {} | {} |",
                        human_bytes(v as f64),
                        crate::units::percent(v as f64, b.rss as f64)
                    );
                }
                None => line += " — | — |",
            }
        }
        let _ = writeln!(o, "{line}");
    }
    let (label, last) = cols[cols.len() - 1];
    if !last.by_object.is_empty() {
        let _ = writeln!(
            o,
            "\nFile-backed pages by object ({label}): {}.",
            last.by_object
                .iter()
                .take(8)
                .map(|(p, v)| format!("{} {}", md(p), human_bytes(*v as f64)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match (&last.malloc_walk, &last.malloc_unwalked) {
        (Some(w), _) => {
            let _ = writeln!(
                o,
                "\nglibc {} ({label}): {} arena{}, {} of heap walked in {:.0} ms{}: {} in use in {} chunks, {} free ({} at the top, {} in fastbins and thread caches).",
                md(&w.glibc),
                w.arenas,
                if w.arenas == 1 { "" } else { "s" },
                human_bytes(w.heap_bytes as f64),
                w.walk_ms,
                if w.complete { "" } else { " (partial)" },
                human_bytes(w.in_use_bytes as f64),
                w.in_use_chunks,
                human_bytes(w.free_bytes as f64),
                human_bytes(w.top_bytes as f64),
                human_bytes(w.cached_bytes as f64),
            );
            if !w.in_use_sizes.is_empty() {
                let _ = writeln!(
                    o,
                    "\n| chunk size in use | chunks | bytes |\n|---:|---:|---:|"
                );
                for (lo, n, bytes) in &w.in_use_sizes {
                    let _ = writeln!(
                        o,
                        "| ≥ {} | {n} | {} |",
                        human_bytes(*lo as f64),
                        human_bytes(*bytes as f64)
                    );
                }
            }
            for note in w.notes.iter().take(10) {
                let _ = writeln!(o, "\n- walk: {}", md(note));
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(o, "\nglibc's arenas were not walked: {}.", md(why));
        }
        (None, None) => {}
    }
}

fn versions_markdown(o: &mut String, r: &Recording) {
    let _ = writeln!(
        o,
        "\n## Versions\n\n| what | version |\n|---|---|\n| leaktrace | {} |\n| OTP | {} |\n| beam.smp | {} |\n| kernel | {} |",
        md(&r.tool_version),
        md(r.target.otp_release.as_deref().unwrap_or("unknown")),
        md(&r.target.exe),
        r.kernel
            .as_deref()
            .map(md)
            .unwrap_or_else(|| "not recorded (run `uname -r` on the traced host)".into())
    );
    let _ = writeln!(o, "\n## Command line\n");
    if r.command_line.is_empty() {
        let _ = writeln!(o, "Not recorded in this recording.");
    } else {
        // Redacted again: a recording is a file anyone may have edited or an older leaktrace
        // may have written.
        let words: Vec<String> = redact_command_line(&r.command_line)
            .iter()
            .map(|w| shell_word(&crate::vm::render::clean(w)))
            .collect();
        let line = words.join(" ");
        let fence = if line.contains("```") { "````" } else { "```" };
        let _ = writeln!(o, "{fence}\n{line}\n{fence}");
    }
}

/// `word` as a POSIX shell reads it back: bare when plain, else in single quotes.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The files of the bundle and what opens each.
fn files_markdown(o: &mut String, r: &Recording) {
    let _ = writeln!(
        o,
        "\n## Files in this bundle\n\n| file | holds | open with |\n|---|---|---|"
    );
    for e in crate::bundle::manifest(r) {
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            md(&e.name),
            md(&e.what),
            e.opens_with.replace('|', "\\|")
        );
    }
}

/// The value that replaces a secret on a command line.
pub const REDACTED: &str = "<redacted>";

/// Flags whose value is a secret: leaktrace's `--cookie`, erl's `-setcookie` (also
/// `-setcookie NODE COOKIE`, which sets the cookie for talking to NODE) and its GNU spelling.
const SECRET_FLAGS: [&str; 3] = ["--cookie", "-setcookie", "--setcookie"];

/// Whether an environment variable of this name holds a secret (`RELEASE_COOKIE`,
/// `ERLANG_COOKIE`, `*_PASSWORD`, `*_TOKEN`, `*_SECRET`, ...).
fn secret_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    [
        "COOKIE",
        "PASSWORD",
        "PASSWD",
        "SECRET",
        "TOKEN",
        "CREDENTIAL",
        "API_KEY",
    ]
    .iter()
    .any(|w| upper.contains(w))
}

/// `args` with secrets replaced by [`REDACTED`]: the value of leaktrace's `--cookie` (as
/// `--cookie X` or `--cookie=X`), of erl's `-setcookie COOKIE` and `-setcookie NODE COOKIE`,
/// and of secret environment assignments (`RELEASE_COOKIE=X`, `env DB_PASSWORD=X erl ...`).
/// An argument that is itself a command (`sh -c "erl -setcookie X"`, `ERL_AFLAGS=-setcookie X`)
/// is redacted word by word. The command line goes into recordings and reports that are
/// shared; the cookie gives control of the node.
pub fn redact_command_line<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    redact_words(&args, 0)
}

fn redact_words(args: &[&str], depth: u32) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if SECRET_FLAGS.contains(&a) {
            out.push(a.to_owned());
            // `--cookie X` takes the next argument whatever it is; `-setcookie COOKIE` and
            // `-setcookie NODE COOKIE` take the values up to the next flag: all redacted (the
            // node name costs nothing to lose).
            let values = if a == "--cookie" {
                usize::from(i < args.len())
            } else {
                args[i..]
                    .iter()
                    .take_while(|v| !v.starts_with('-'))
                    .take(2)
                    .count()
            };
            out.extend(std::iter::repeat_n(REDACTED.to_owned(), values));
            i += values;
            continue;
        }
        if let Some((flag, _)) = a.split_once('=')
            && SECRET_FLAGS.contains(&flag)
        {
            out.push(format!("{flag}={REDACTED}"));
            continue;
        }
        if let Some((name, value)) = a.split_once('=')
            && !name.is_empty()
            && !name.starts_with('-')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            if secret_variable(name) {
                out.push(format!("{name}={REDACTED}"));
            } else if value.contains(char::is_whitespace) && depth < 4 {
                // `ERL_AFLAGS=-setcookie X`: a variable holding more arguments.
                let words: Vec<&str> = value.split_whitespace().collect();
                out.push(format!(
                    "{name}={}",
                    redact_words(&words, depth + 1).join(" ")
                ));
            } else {
                out.push(a.to_owned());
            }
            continue;
        }
        if a.contains(char::is_whitespace) && depth < 4 {
            // A command in one argument (`sh -c "..."`).
            let words: Vec<&str> = a.split_whitespace().collect();
            let redacted = redact_words(&words, depth + 1);
            if redacted.iter().zip(&words).any(|(r, w)| r != w) {
                out.push(redacted.join(" "));
                continue;
            }
        }
        out.push(a.to_owned());
    }
    out
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
        let _ = write!(o, "\n  also: {} — {}", f.kind.as_str(), clean(&f.summary));
    }
    for x in &v.ruled_out {
        let _ = write!(o, "\n  not {}: {}", x.kind.as_str(), clean(&x.reason));
    }
    if let Some(line) = report.cross_check.line() {
        let _ = write!(o, "\n  check: {line}");
    }
    for line in crate::blocks::summary_lines(&report.recording) {
        let _ = write!(o, "\n  blocks: {}", clean(&line));
    }
    o += &crate::cgroup::render(&report.recording, "\n  cgroup: ", clean);
    if let Some(levels) = &report.recording.resident {
        for (label, b) in [("at attach", &levels.at_attach), ("at end", &levels.at_end)] {
            if let Some(b) = b {
                let vm = crate::recording::resident::vm_carriers_near(&report.recording, label);
                for line in crate::target::breakdown::render(label, b, vm) {
                    let _ = write!(o, "\n  {}", clean(&line));
                }
            }
        }
    }
    o
}

/// Writes the bundle into `dir`: report.json, report.md and the files of [`crate::bundle`]
/// (pictures, pprof, folded stacks, HdrHistogram logs and percentiles), all rendered before
/// anything is written. Each file is written atomically (a temporary file in `dir`, synced,
/// then renamed over the destination), never through a symbolic link: `dir` itself or any
/// destination being a symbolic link (or not a directory / regular file) is refused before
/// anything is written. When a write fails, the files this call already wrote are removed, so
/// that the directory never holds half a bundle. `.hgrm` tables of an earlier bundle that this
/// one does not rewrite are removed (the directory describes one run). `dir` is created (0755)
/// when missing.
pub fn write_dir(report: &Report, dir: &Path, mode: OutMode) -> Result<(), Error> {
    let fail = |e: WriteError| Error::Write {
        what: "the report",
        flag: "--out",
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    // Secrets never reach the bundle, whoever filled the command line.
    let redacted;
    let report =
        if redact_command_line(&report.recording.command_line) == report.recording.command_line {
            report
        } else {
            let mut r = report.clone();
            r.recording.command_line = redact_command_line(&r.recording.command_line);
            redacted = r;
            &redacted
        };
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("report.json".into(), to_json(report).into_bytes()),
        ("report.md".into(), to_markdown(report).into_bytes()),
    ];
    let bundle = crate::bundle::render(report).map_err(|e| {
        fail(WriteError::Io(
            dir.to_path_buf(),
            io::Error::other(format!("cannot render the bundle: {e}")),
        ))
    })?;
    files.extend(bundle.into_iter().map(|f| (f.name, f.contents)));
    let out = OutDir::create(dir, mode).map_err(fail)?;
    for name in REPORT_FILES {
        out.check_destination(OsStr::new(name)).map_err(fail)?;
    }
    for (name, _) in &files {
        out.check_destination(OsStr::new(name)).map_err(fail)?;
    }
    let mut written: Vec<CString> = Vec::new();
    for (name, contents) in &files {
        if let Err(e) = out.write_atomic(OsStr::new(name), contents) {
            for w in &written {
                out.unlink(w);
            }
            return Err(fail(e));
        }
        written.push(c_name(dir, OsStr::new(name)).map_err(fail)?);
    }
    let keep: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    out.remove_stale(|n| crate::bundle::hgrm::is_hgrm_name(n) && !keep.contains(&n));
    Ok(())
}

/// The files `--out` always writes (checked before attaching, refused when a symbolic link);
/// `.hgrm` tables, one per histogram series, are checked when written.
const REPORT_FILES: [&str; 8] = crate::bundle::FIXED_FILES;

/// Checks, before anything is attached, that `--record` and `--out` can be written: the
/// directory exists (or, for `--out`, can be created under an existing writable directory), a
/// probe file can be created and removed in it, and no destination is a symbolic link or other
/// than a regular file. Creates nothing that stays.
pub fn check_writable(cfg: &TraceConfig) -> Result<(), Error> {
    check_paths(cfg.out.as_deref(), cfg.record.as_deref(), cfg.out_mode)
}

/// [`check_writable`] of `--out` and `--record`.
fn check_paths(out: Option<&Path>, record: Option<&Path>, mode: OutMode) -> Result<(), Error> {
    if let Some(file) = record {
        let fail = |e: WriteError| Error::Write {
            what: "the recording",
            flag: "--record",
            path: file.to_path_buf(),
            reason: e.to_string(),
        };
        let (dir, name) = split_file(file).map_err(fail)?;
        let dir = OutDir::open(&dir, false, mode).map_err(fail)?;
        dir.check_destination(&name).map_err(fail)?;
        dir.probe().map_err(fail)?;
    }
    if let Some(out) = out {
        let fail = |e: WriteError| Error::Write {
            what: "the report",
            flag: "--out",
            path: out.to_path_buf(),
            reason: e.to_string(),
        };
        match fs::symlink_metadata(out) {
            Ok(_) => {
                let dir = OutDir::open(out, true, mode).map_err(fail)?;
                dir.check_owner().map_err(fail)?;
                for name in REPORT_FILES {
                    dir.check_destination(OsStr::new(name)).map_err(fail)?;
                }
                dir.probe().map_err(fail)?;
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                // Created when the report is written: the nearest existing ancestor must take it.
                let mut ancestor = out;
                loop {
                    ancestor = match ancestor.parent() {
                        Some(p) if p.as_os_str().is_empty() => Path::new("."),
                        Some(p) => p,
                        None => break,
                    };
                    if fs::symlink_metadata(ancestor).is_ok() {
                        break;
                    }
                }
                OutDir::open(ancestor, false, mode)
                    .and_then(|d| d.probe())
                    .map_err(fail)?;
            }
            Err(e) => return Err(fail(WriteError::Io(out.to_path_buf(), e))),
        }
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (a temporary file beside it, synced, renamed over it),
/// never through a symbolic link at `path` (refused, as is anything but a regular file there).
/// The directory must exist.
pub fn write_file(path: &Path, contents: &[u8], mode: OutMode) -> Result<(), WriteError> {
    let (dir, name) = split_file(path)?;
    let dir = OutDir::open(&dir, false, mode)?;
    dir.check_destination(&name)?;
    dir.write_atomic(&name, contents)
}

/// Why a file could not be written, naming the path at fault.
#[derive(Debug)]
pub enum WriteError {
    /// A symbolic link where a file or directory is to be written.
    Symlink(PathBuf),
    /// Something other than what is needed: (path, what it is, what it must be).
    NotA(PathBuf, &'static str, &'static str),
    /// An existing directory another user owns: (path, its owner, ours).
    NotOurs(PathBuf, u32, u32),
    /// The path names no file (`/`, `..`).
    NoFileName(PathBuf),
    /// The system said no.
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Symlink(p) => write!(
                f,
                "{} is a symbolic link, and leaktrace (running as root) never writes through one: remove it or choose another path",
                p.display()
            ),
            WriteError::NotA(p, is, must) => {
                write!(f, "{} is {is}, not {must}", p.display())
            }
            WriteError::NoFileName(p) => write!(f, "{} names no file", p.display()),
            WriteError::NotOurs(p, owner, us) => write!(
                f,
                "{} exists and belongs to uid {owner}, not to uid {us} that leaktrace runs as: its owner could read the report or swap its files; choose a new directory (leaktrace creates it) or one of your own",
                p.display()
            ),
            WriteError::Io(p, e) if e.kind() == io::ErrorKind::NotFound => {
                write!(f, "{} does not exist ({e})", p.display())
            }
            WriteError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

/// What a file of mode `mode` (`st_mode`) is, for messages.
pub fn file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        _ => "a special file",
    }
}

/// The directory of `path` (`.` for a bare name) and its file name.
fn split_file(path: &Path) -> Result<(PathBuf, OsString), WriteError> {
    let name = path
        .file_name()
        .ok_or_else(|| WriteError::NoFileName(path.to_path_buf()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_os_string()))
}

fn c_name(path: &Path, name: &OsStr) -> Result<CString, WriteError> {
    CString::new(name.as_bytes()).map_err(|_| {
        WriteError::Io(
            path.join(name),
            io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the name"),
        )
    })
}

/// A directory opened once; files are created in it relative to that descriptor, so a
/// directory swapped for a symbolic link after the checks is not followed.
struct OutDir {
    fd: OwnedFd,
    path: PathBuf,
    /// Mode of the files created in it.
    mode: OutMode,
}

impl OutDir {
    /// Opens `path` as a directory; with `nofollow`, a symbolic link there is refused.
    fn open(path: &Path, nofollow: bool, mode: OutMode) -> Result<OutDir, WriteError> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            WriteError::Io(
                path.to_path_buf(),
                io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"),
            )
        })?;
        let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        if nofollow {
            flags |= libc::O_NOFOLLOW;
        }
        // SAFETY: c is a valid C string; the descriptor returned is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match fs::symlink_metadata(path) {
                Ok(m) if nofollow && m.file_type().is_symlink() => {
                    WriteError::Symlink(path.to_path_buf())
                }
                Ok(m) if !m.is_dir() && !m.file_type().is_symlink() => {
                    WriteError::NotA(path.to_path_buf(), file_kind(m.mode()), "a directory")
                }
                _ => WriteError::Io(path.to_path_buf(), e),
            });
        }
        Ok(OutDir {
            // SAFETY: fd is a fresh descriptor nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
            mode,
        })
    }

    /// Refuses a directory another user owns: whoever owns it can read what is written there
    /// whatever the files' modes (by replacing them), and the report is the operator's.
    fn check_owner(&self) -> Result<(), WriteError> {
        let meta = File::from(
            self.fd
                .try_clone()
                .map_err(|e| WriteError::Io(self.path.clone(), e))?,
        )
        .metadata()
        .map_err(|e| WriteError::Io(self.path.clone(), e))?;
        // SAFETY: geteuid has no preconditions.
        let us = unsafe { libc::geteuid() };
        if meta.uid() != us {
            return Err(WriteError::NotOurs(self.path.clone(), meta.uid(), us));
        }
        Ok(())
    }

    /// `--out DIR`: DIR created (the mode's directory mode, 0700 by default, with its parents)
    /// when missing; a symbolic link, a non-directory or another user's directory there is
    /// refused.
    fn create(path: &Path, mode: OutMode) -> Result<OutDir, WriteError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(WriteError::Symlink(path.to_path_buf()));
            }
            Ok(m) if !m.is_dir() => {
                return Err(WriteError::NotA(
                    path.to_path_buf(),
                    file_kind(m.mode()),
                    "a directory",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode.dir())
                    .create(path)
                    .map_err(|e| WriteError::Io(path.to_path_buf(), e))?;
            }
            Err(e) => return Err(WriteError::Io(path.to_path_buf(), e)),
        }
        let dir = OutDir::open(path, true, mode)?;
        dir.check_owner()?;
        Ok(dir)
    }

    /// `st_mode` of `name` in the directory, not following a symbolic link; None if absent.
    fn lstat(&self, name: &CStr) -> io::Result<Option<u32>> {
        // SAFETY: an all-zero stat is a valid out-buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and out-pointer.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            return Ok(Some(st.st_mode));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Refuses a destination that is a symbolic link or anything but a regular file.
    fn check_destination(&self, name: &OsStr) -> Result<(), WriteError> {
        let path = self.path.join(name);
        match self.lstat(&c_name(&self.path, name)?) {
            Ok(None) => Ok(()),
            Ok(Some(mode)) if mode & libc::S_IFMT == libc::S_IFREG => Ok(()),
            Ok(Some(mode)) if mode & libc::S_IFMT == libc::S_IFLNK => {
                Err(WriteError::Symlink(path))
            }
            Ok(Some(mode)) => Err(WriteError::NotA(path, file_kind(mode), "a regular file")),
            Err(e) => Err(WriteError::Io(path, e)),
        }
    }

    /// A new file of the directory's file mode in it, named after `stem`: created exclusively and
    /// without following a symbolic link, so it is never a file someone else prepared.
    fn create_temp(&self, stem: &OsStr) -> Result<(CString, File), WriteError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let mut last = None;
        for _ in 0..16 {
            let mut name = OsString::from(".");
            name.push(stem);
            name.push(format!(
                ".leaktrace-{}-{}.tmp",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let c = c_name(&self.path, &name)?;
            // SAFETY: valid descriptor and C string; the descriptor returned is owned below.
            let fd = unsafe {
                libc::openat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    self.mode.file() as libc::c_uint,
                )
            };
            if fd >= 0 {
                // SAFETY: fd is a fresh descriptor nothing else owns.
                let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                // The umask may have taken bits the operator asked for (--out-mode 0644).
                let _ = file.set_permissions(fs::Permissions::from_mode(self.mode.file()));
                return Ok((c, file));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(WriteError::Io(self.path.join(&name), e));
            }
            last = Some((name, e));
        }
        let (name, e) = last.expect("at least one attempt");
        Err(WriteError::Io(self.path.join(name), e))
    }

    fn unlink(&self, name: &CStr) {
        // SAFETY: valid descriptor and C string.
        unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) };
    }

    /// Removes the regular files and symbolic links (the link, never what it points to) of the
    /// directory whose names `stale` accepts; best effort.
    fn remove_stale(&self, stale: impl Fn(&str) -> bool) {
        // Listed through the descriptor, so that it is the directory written to.
        let listing = fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
            .or_else(|_| fs::read_dir(&self.path));
        let Ok(listing) = listing else { return };
        for entry in listing.flatten() {
            let name = entry.file_name();
            let Some(text) = name.to_str() else { continue };
            if !stale(text) {
                continue;
            }
            let Ok(c) = c_name(&self.path, &name) else {
                continue;
            };
            if let Ok(Some(mode)) = self.lstat(&c)
                && matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFLNK)
            {
                self.unlink(&c);
            }
        }
    }

    /// Writes `contents` to `name`: a temporary file, synced, renamed over `name` (which a
    /// rename replaces and never follows). Nothing partial stays behind on failure.
    fn write_atomic(&self, name: &OsStr, contents: &[u8]) -> Result<(), WriteError> {
        let dest = c_name(&self.path, name)?;
        let (tmp, mut file) = self.create_temp(name)?;
        let written = file
            .write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| WriteError::Io(self.path.join(name), e))
            .and_then(|()| {
                // The destination is checked again as late as possible: rename would replace a
                // symbolic link planted meanwhile (not write through it), but say so instead.
                self.check_destination(name)?;
                // SAFETY: valid descriptors and C strings.
                let r = unsafe {
                    libc::renameat(
                        self.fd.as_raw_fd(),
                        tmp.as_ptr(),
                        self.fd.as_raw_fd(),
                        dest.as_ptr(),
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(WriteError::Io(
                        self.path.join(name),
                        io::Error::last_os_error(),
                    ))
                }
            });
        drop(file);
        if written.is_err() {
            self.unlink(&tmp);
        } else {
            // The rename itself durable; best effort.
            // SAFETY: valid descriptor.
            unsafe { libc::fsync(self.fd.as_raw_fd()) };
        }
        written
    }

    /// Creates and removes a probe file: the directory takes new files.
    fn probe(&self) -> Result<(), WriteError> {
        let (tmp, file) = self.create_temp(OsStr::new("leaktrace-probe"))?;
        drop(file);
        self.unlink(&tmp);
        Ok(())
    }
}

#[cfg(test)]
mod write_tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn files_are_replaced_whole_with_mode_0600_and_no_temporary_left() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("rec.json");
        fs::write(&file, "old, longer than the new").unwrap();
        write_file(&file, b"new", OutMode::default()).unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "new");
        // The operator's alone by default; --out-mode 0644 shares it.
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(names(tmp.path()), ["rec.json"]);
        write_file(&file, b"shared", OutMode::parse("0644").unwrap()).unwrap();
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{mode:o}");
    }

    #[test]
    fn a_symlink_or_special_file_at_the_destination_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let link = tmp.path().join("rec.json");
        symlink(&victim, &link).unwrap();
        let err = write_file(&link, b"new", OutMode::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("rec.json is a symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        // A dangling one too (it would create the file it points to).
        let dangling = tmp.path().join("dangling.json");
        symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            write_file(&dangling, b"x", OutMode::default()),
            Err(WriteError::Symlink(_))
        ));
        assert!(!tmp.path().join("nowhere").exists());
        let dir = tmp.path().join("a_dir");
        fs::create_dir(&dir).unwrap();
        let err = write_file(&dir, b"x", OutMode::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a_dir is a directory, not a regular file"),
            "{err}"
        );
        assert_eq!(
            names(tmp.path()),
            ["a_dir", "dangling.json", "rec.json", "victim"]
        );
    }

    #[test]
    fn checks_before_attaching_create_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        // Fine: an existing directory, a directory to create, a file in an existing directory.
        check_paths(Some(base), Some(&base.join("rec.json")), OutMode::default()).unwrap();
        check_paths(Some(&base.join("new/deeper")), None, OutMode::default()).unwrap();
        assert!(names(base).is_empty(), "{:?}", names(base));
        // A --record directory that does not exist.
        let err = check_paths(
            None,
            Some(&base.join("missing/rec.json")),
            OutMode::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(&format!(
                "could not write the recording to {}",
                base.join("missing/rec.json").display()
            )) && err.contains("missing does not exist")
                && err.ends_with("(check --record)"),
            "{err}"
        );
        // --out under a regular file, --out a regular file, --out a symlink.
        fs::write(base.join("file"), "").unwrap();
        for out in [base.join("file/out"), base.join("file")] {
            let err = check_paths(Some(&out), None, OutMode::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("is a regular file, not a directory"), "{err}");
        }
        symlink(base, base.join("link")).unwrap();
        let err = check_paths(Some(&base.join("link")), None, OutMode::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("link is a symbolic link"), "{err}");
        // A symlink already planted at report.md.
        fs::create_dir(base.join("out")).unwrap();
        symlink(base.join("file"), base.join("out/report.md")).unwrap();
        let err = check_paths(Some(&base.join("out")), None, OutMode::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("report.md is a symbolic link"), "{err}");
        assert_eq!(names(&base.join("out")), ["report.md"]);
        // A directory that takes no files (for a user other than root).
        if unsafe { libc::geteuid() } != 0 {
            let ro = base.join("ro");
            fs::create_dir(&ro).unwrap();
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
            let err = check_paths(None, Some(&ro.join("rec.json")), OutMode::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("Permission denied"), "{err}");
        }
    }
}
