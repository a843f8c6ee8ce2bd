//! The verdict: a pure function of a [`Recording`]. It reads trends (least-squares slopes over
//! the whole run, sustained in its second half) and levels (usage = used / allocated), never
//! one sample, and explains every verdict it did not choose.

mod resident;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    recording::{Recording, Sample, Thresholds, VmEvidence},
    trend::{Growth, growth, series},
    units::{human_bytes, rate},
};

/// The answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// Nothing grows and no allocator is badly fragmented.
    Healthy,
    /// ERTS allocators hold mostly empty carriers.
    Fragmentation,
    /// Memory outside ERTS carriers grows.
    NativeLeak,
    /// Memory the VM accounts for grows (tables, processes, binaries).
    VmGrowth,
    /// The evidence does not decide; the summary says what was missing.
    Inconclusive,
}

impl VerdictKind {
    /// Exit code: 0 healthy or fragmentation, 1 native_leak or vm_growth, 3 inconclusive.
    pub fn exit_code(self) -> i32 {
        match self {
            VerdictKind::Healthy | VerdictKind::Fragmentation => 0,
            VerdictKind::NativeLeak | VerdictKind::VmGrowth => 1,
            VerdictKind::Inconclusive => 3,
        }
    }

    /// snake_case name, as in report.json.
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Healthy => "healthy",
            VerdictKind::Fragmentation => "fragmentation",
            VerdictKind::NativeLeak => "native_leak",
            VerdictKind::VmGrowth => "vm_growth",
            VerdictKind::Inconclusive => "inconclusive",
        }
    }
}

/// What kind of thing a culprit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CulpritKind {
    /// An ERTS allocator (`ets_alloc`, ...).
    Allocator,
    /// An ETS table.
    EtsTable,
    /// One process (its heap or mailbox).
    Process,
    /// A process holding refc binaries.
    BinaryHolder,
    /// Processes sharing an initial call, growing in number or memory.
    ProcessGroup,
    /// `persistent_term` storage.
    PersistentTerm,
    /// Loaded code (modules never purged).
    Code,
    /// Ports (driver queues and buffers).
    Ports,
    /// The atom table.
    Atoms,
    /// System memory outside atoms, binaries, code and ETS.
    System,
    /// glibc's malloc arenas (freed memory kept resident).
    MallocArenas,
    /// Native allocations seen by the native probes.
    Native,
    /// ERTS blocks of one type (`--blocks`): `allocator: type`.
    BlockType,
    /// Memory outside ERTS carriers that no probe explains.
    Unexplained,
}

impl CulpritKind {
    /// snake_case name, as in report.json.
    pub fn as_str(self) -> &'static str {
        match self {
            CulpritKind::Allocator => "allocator",
            CulpritKind::EtsTable => "ets_table",
            CulpritKind::Process => "process",
            CulpritKind::BinaryHolder => "binary_holder",
            CulpritKind::ProcessGroup => "process_group",
            CulpritKind::PersistentTerm => "persistent_term",
            CulpritKind::Code => "code",
            CulpritKind::Ports => "ports",
            CulpritKind::Atoms => "atoms",
            CulpritKind::System => "system",
            CulpritKind::MallocArenas => "malloc_arenas",
            CulpritKind::Native => "native",
            CulpritKind::BlockType => "block_type",
            CulpritKind::Unexplained => "unexplained",
        }
    }
}

impl std::fmt::Display for CulpritKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is responsible, with numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Culprit {
    /// What it is.
    pub kind: CulpritKind,
    /// Name an operator can act on.
    pub name: String,
    /// Bytes it holds (at the end of the run).
    pub bytes: i64,
    /// How fast it grew.
    pub growth_bytes_per_s: f64,
    /// More numbers (usage, queue length, instance...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A verdict not chosen and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuledOut {
    /// The verdict.
    pub kind: VerdictKind,
    /// Why not, with numbers.
    pub reason: String,
}

/// A finding besides the primary verdict (several causes can hold at once).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// What it is.
    pub kind: VerdictKind,
    /// One line.
    pub summary: String,
    /// Who.
    pub culprits: Vec<Culprit>,
}

/// The trend of one ledger line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrendLine {
    /// Ledger line name.
    pub line: String,
    /// Least-squares slope over the run.
    pub slope_bytes_per_s: f64,
    /// Fitted growth over the run.
    pub growth_bytes: f64,
    /// Slope over the second half of the run.
    pub second_half_bytes_per_s: Option<f64>,
    /// Fit quality.
    pub r2: f64,
    /// Whether it counts as growing.
    pub grows: bool,
}

/// The verdict with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Primary verdict.
    pub kind: VerdictKind,
    /// One or two sentences with numbers.
    pub summary: String,
    /// Culprits of the primary verdict, most important first.
    pub culprits: Vec<Culprit>,
    /// Other verdicts that also hold.
    pub secondary: Vec<Finding>,
    /// Verdicts not chosen, each with its reason.
    pub ruled_out: Vec<RuledOut>,
    /// Trends of the ledger lines.
    pub trends: Vec<TrendLine>,
    /// Why the evidence is incomplete (lost events, full maps, probes that look blind,
    /// counters that could not be read); the verdict never rests on what these put in doubt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

/// Carrier bytes the VM reports must move by at least this much, with the probes seeing under
/// a tenth of it, before the carrier probes are called blind.
const BLIND_MIN_BYTES: f64 = 16.0 * 1024.0 * 1024.0;

/// The carrier probes look blind: the VM's own carrier figure (`vm_allocated`) moved by much
/// more than the floors while the probes counted under a tenth of it (a code path not probed,
/// probes on another file than the one running). Memory outside carriers is then unknown.
pub fn blind_carrier_probes(rec: &Recording) -> Option<String> {
    let both: Vec<(i64, u64)> = rec
        .samples
        .iter()
        .filter_map(|s| Some((s.carriers_mapped.or(s.carriers)?, s.vm_allocated?)))
        .collect();
    let (first, last) = (both.first()?, both.last()?);
    if both.len() < 2 {
        return None;
    }
    let probes = (last.0 - first.0) as f64;
    let vm = last.1 as f64 - first.1 as f64;
    let floor = BLIND_MIN_BYTES.max(rec.thresholds.min_total_growth_bytes);
    (vm.abs() >= floor && probes.abs() < 0.1 * vm.abs()).then(|| {
        format!(
            "the carrier probes look blind: the VM's carriers changed by {} while the probes counted {} (under a tenth)",
            human_bytes(vm),
            human_bytes(probes)
        )
    })
}

/// Every reason the evidence of `rec` is incomplete, one sentence each.
pub fn degradation(rec: &Recording) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(b) = blind_carrier_probes(rec) {
        out.push(b);
    }
    if let Some(b) = rec.losses.carrier_bound() {
        out.push(b);
    }
    if let Some(n) = rec.native.as_ref()
        && let Some(at) = n.detached_at_s
    {
        out.push(format!(
            "native probes detached at {at:.1} s over --max-overhead ({:.0}% of a CPU): native figures stop there, growth after it is not attributed",
            n.overhead_cpu_share * 100.0
        ));
    }
    if let Some(n) = rec.native.as_ref().filter(|n| n.lossy()) {
        out.push(format!(
            "{} native allocations went untracked (outstanding map full {}, site map full {}): native figures are lower bounds",
            n.outstanding_full + n.sites_full,
            n.outstanding_full,
            n.sites_full
        ));
    }
    if let Some(b) = rec
        .blocks
        .as_ref()
        .filter(|b| b.live_full + b.types_full > 0)
    {
        out.push(format!(
            "{} ERTS blocks went untracked (live-block map full) and {} block calls uncounted (type map full): block figures are lower bounds",
            b.live_full, b.types_full
        ));
    }
    if !rec.losses.unreadable.is_empty() {
        out.push(format!(
            "counters that could not be read (unknown, not 0): {}",
            rec.losses.unreadable.join(", ")
        ));
    }
    out
}

/// Why memory outside carriers cannot be judged in `rec`: carrier figures that may be too low
/// (lost creations, blind probes) make `unexplained` too high.
fn unexplained_in_doubt(rec: &Recording) -> Option<String> {
    if let Some(b) = blind_carrier_probes(rec) {
        return Some(b);
    }
    let l = &rec.losses;
    let low = l.lost_creations() + l.events_lost_resizes + l.map_full + l.missed_entries;
    if low > 0 {
        return Some(format!(
            "{low} carrier creation or resize events were lost, so carriers may be undercounted and the remainder overcounted"
        ));
    }
    l.unreadable
        .iter()
        .any(|c| c.contains("events") || c.contains("map") || c.contains("entries"))
        .then(|| "the carrier loss counters could not be read".to_owned())
}

type Line = fn(&Sample) -> Option<f64>;

const LINES: &[(&str, Line)] = &[
    ("rss", |s| s.rss.map(|v| v as f64)),
    ("rss_anon", |s| s.rss_anon.map(|v| v as f64)),
    ("carriers", |s| s.carriers.map(|v| v as f64)),
    ("mseg_cache", |s| s.mseg_cache.map(|v| v as f64)),
    ("native_outstanding", |s| {
        s.native_outstanding.map(|v| v as f64)
    }),
    ("unexplained", |s| s.unexplained.map(|v| v as f64)),
    ("vm_used", |s| s.vm_used.map(|v| v as f64)),
    ("vm_allocated", |s| s.vm_allocated.map(|v| v as f64)),
    ("blocks_net", |s| s.blocks_net.map(|v| v as f64)),
];

/// Growth of every ledger line that has data.
struct Trends {
    lines: BTreeMap<&'static str, Growth>,
}

impl Trends {
    fn of(rec: &Recording) -> Trends {
        let lines = LINES
            .iter()
            .filter_map(|(name, f)| {
                Some((*name, growth(&series(&rec.samples, f), &rec.thresholds)?))
            })
            .collect();
        Trends { lines }
    }

    fn get(&self, line: &str) -> Option<&Growth> {
        self.lines.get(line)
    }

    fn grows(&self, line: &str) -> bool {
        self.get(line).is_some_and(|g| g.grows)
    }

    fn slope(&self, line: &str) -> f64 {
        self.get(line).map_or(0.0, |g| g.whole.slope_per_s)
    }

    fn describe(&self, line: &str) -> String {
        match self.get(line) {
            Some(g) => format!(
                "{line} changed by {} at {}",
                human_bytes(g.total),
                rate(g.whole.slope_per_s)
            ),
            None => format!("{line} was not measured"),
        }
    }

    fn to_lines(&self) -> Vec<TrendLine> {
        LINES
            .iter()
            .filter_map(|(name, _)| {
                let g = self.lines.get(name)?;
                Some(TrendLine {
                    line: (*name).into(),
                    slope_bytes_per_s: g.whole.slope_per_s,
                    growth_bytes: g.total,
                    second_half_bytes_per_s: g.second_half.map(|h| h.slope_per_s),
                    r2: g.whole.r2,
                    grows: g.grows,
                })
            })
            .collect()
    }
}

/// A candidate verdict with the rate of growth it explains (its strength).
struct Candidate {
    finding: Finding,
    strength: f64,
}

/// Judges a recording.
pub fn judge(rec: &Recording) -> Verdict {
    let th = &rec.thresholds;
    let trends = Trends::of(rec);
    let rss_points = rec.samples.iter().filter(|s| s.rss_anon.is_some()).count();
    if rec.duration_s < th.min_duration_s || rss_points < 3 {
        return Verdict {
            kind: VerdictKind::Inconclusive,
            summary: format!(
                "run too short: {:.1} s with {rss_points} RSS samples, need at least {:.0} s and 3 samples (--min-duration)",
                rec.duration_s, th.min_duration_s
            ),
            culprits: Vec::new(),
            secondary: Vec::new(),
            ruled_out: Vec::new(),
            trends: trends.to_lines(),
            degraded: degradation(rec),
        };
    }

    let rss_grows = trends.grows("rss_anon");
    let rss_slope = trends.slope("rss_anon");
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut ruled_out: Vec<RuledOut> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // native_leak: memory outside ERTS carriers grows, named by the native probes when they
    // were attached.
    match native_rule(rec, &trends) {
        Ok(c) => candidates.push(c),
        Err(r) => ruled_out.push(r),
    }

    // The VM's own figures decide between VM growth and fragmentation.
    let vm = rec.vm.as_ref().filter(|v| !v.samples.is_empty());
    match vm {
        Some(vm) => {
            vm_findings(
                vm,
                &trends,
                th,
                nif_api_growth(rec),
                &mut candidates,
                &mut ruled_out,
            );
        }
        None if rec
            .blocks
            .as_ref()
            .is_some_and(|b| b.attached_at_s.is_some()) =>
        {
            block_findings(rec, &trends, th, &mut candidates, &mut ruled_out);
        }
        None => {
            let carriers_slope = trends.slope("carriers") + trends.slope("mseg_cache");
            if rss_grows && carriers_slope >= th.explained_fraction * rss_slope {
                notes.push(format!(
                    "ERTS carriers grow {} and explain the RSS growth; telling vm_growth from fragmentation needs the VM view (connect to the node: distributed node and cookie)",
                    rate(carriers_slope)
                ));
            }
            for kind in [VerdictKind::VmGrowth, VerdictKind::Fragmentation] {
                ruled_out.push(RuledOut {
                    kind,
                    reason: "not judged: no VM connection (vm_used/vm_allocated unmeasured)".into(),
                });
            }
        }
    }

    // Levels: what was already resident outside the VM when the tracer arrived.
    if let Some(finding) = resident::malloc_fragmentation(rec) {
        candidates.push(Candidate {
            strength: 0.0,
            finding,
        });
    }
    let held_outside = resident::held_outside_level(rec);

    let degraded = degradation(rec);
    notes.extend(degraded.iter().cloned());

    candidates.sort_by(|a, b| b.strength.total_cmp(&a.strength));
    let mut findings = candidates.into_iter().map(|c| c.finding);
    let (kind, summary, culprits) = match findings.next() {
        Some(primary) => (primary.kind, primary.summary, primary.culprits),
        None if rss_grows => (
            VerdictKind::Inconclusive,
            match notes.first() {
                Some(n) => n.clone(),
                None => inconclusive_growth(rec, &trends),
            },
            Vec::new(),
        ),
        None if held_outside.is_some() => (
            VerdictKind::Inconclusive,
            held_outside.clone().unwrap_or_default(),
            Vec::new(),
        ),
        None => (
            VerdictKind::Healthy,
            format!(
                "no sustained growth: {} over {:.0} s",
                trends.describe("rss_anon"),
                rec.duration_s
            ),
            Vec::new(),
        ),
    };
    let secondary: Vec<Finding> = findings.collect();
    if kind != VerdictKind::Healthy && !ruled_out.iter().any(|r| r.kind == VerdictKind::Healthy) {
        ruled_out.push(RuledOut {
            kind: VerdictKind::Healthy,
            reason: if rss_grows {
                trends.describe("rss_anon")
            } else if kind == VerdictKind::Inconclusive && held_outside.is_some() {
                "memory is held outside the VM and nothing names its owner yet".into()
            } else if culprits
                .first()
                .is_some_and(|c| c.kind == CulpritKind::MallocArenas)
            {
                "malloc's arenas hold mostly freed memory".into()
            } else {
                "an allocator holds mostly empty carriers".into()
            },
        });
    }
    ruled_out.retain(|r| r.kind != kind && !secondary.iter().any(|f| f.kind == r.kind));
    let mut summary = summary;
    if let Some(level) = held_outside.filter(|l| *l != summary) {
        summary.push_str("; ");
        summary.push_str(&level);
    }
    for n in notes
        .iter()
        .skip(usize::from(kind == VerdictKind::Inconclusive))
    {
        summary.push_str("; ");
        summary.push_str(n);
    }
    Verdict {
        kind,
        summary,
        culprits,
        secondary,
        ruled_out,
        trends: trends.to_lines(),
        degraded,
    }
}

/// Native objects whose outstanding bytes grow, most growth first.
fn native_culprits(rec: &Recording, rss_slope: f64) -> Vec<Culprit> {
    let Some(n) = rec.native.as_ref() else {
        return Vec::new();
    };
    let th = &rec.thresholds;
    let mut out: Vec<Culprit> = n
        .modules
        .iter()
        .filter(|m| !m.is_emulator)
        .filter_map(|m| {
            let pts: Vec<(f64, f64)> = n
                .series
                .iter()
                .filter_map(|p| Some((p.t_s, *p.by_module.get(&m.series_key())? as f64)))
                .collect();
            let g = growth(&pts, th)?;
            let object = m.module.as_str();
            g.grows.then(|| Culprit {
                kind: CulpritKind::Native,
                name: match &m.function {
                    Some(f) => format!("{object}: {f}"),
                    None => object.to_owned(),
                },
                bytes: m.outstanding_bytes,
                growth_bytes_per_s: g.whole.slope_per_s,
                detail: Some(format!(
                    "{}{} allocations, {} freed, {} outstanding since the probes attached; {} of the RSS growth{}",
                    if m.nif_api {
                        "through the NIF API (enif_alloc, enif_alloc_resource kept and never released, driver_alloc), inside ERTS carriers: "
                    } else {
                        ""
                    },
                    m.allocations,
                    m.frees,
                    human_bytes(m.outstanding_bytes as f64),
                    crate::units::share(g.whole.slope_per_s, rss_slope),
                    if m.path.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", m.path)
                    }
                )),
            })
        })
        .collect();
    out.sort_by(|a, b| b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s));
    out
}

/// Growth of outstanding NIF API memory (inside carriers), bytes/s, over growing objects.
fn nif_api_growth(rec: &Recording) -> f64 {
    let Some(n) = rec.native.as_ref() else {
        return 0.0;
    };
    n.modules
        .iter()
        .filter(|m| m.nif_api)
        .filter_map(|m| {
            let pts: Vec<(f64, f64)> = n
                .series
                .iter()
                .filter_map(|p| Some((p.t_s, *p.by_module.get(&m.series_key())? as f64)))
                .collect();
            let g = growth(&pts, &rec.thresholds)?;
            g.grows.then_some(g.whole.slope_per_s)
        })
        .sum()
}

/// How balanced the native side was, in one sentence with numbers.
fn native_balance(rec: &Recording, trends: &Trends) -> Option<String> {
    let n = rec.native.as_ref().filter(|n| n.attached_at_s.is_some())?;
    let others: Vec<_> = n.modules.iter().filter(|m| !m.is_emulator).collect();
    let allocations: u64 = others.iter().map(|m| m.allocations).sum();
    let frees: u64 = others.iter().map(|m| m.frees).sum();
    let emulator = n
        .modules
        .iter()
        .find(|m| m.is_emulator)
        .map(|m| {
            format!(
                "; beam.smp's own libc use (its carriers, counted apart): {} allocations, {} outstanding",
                m.allocations,
                human_bytes(m.outstanding_bytes as f64)
            )
        })
        .unwrap_or_default();
    if allocations == 0 {
        return Some(format!(
            "no NIF, driver or library allocated natively since the probes attached at {:.0} s{emulator}",
            n.attached_at_s.unwrap_or(0.0)
        ));
    }
    Some(format!(
        "native allocations are balanced: {allocations} allocations, {frees} frees by {} objects since {:.0} s; {}{emulator}",
        others.len(),
        n.attached_at_s.unwrap_or(0.0),
        trends.describe("native_outstanding")
    ))
}

/// The native_leak rule: growth the native probes attribute to objects, else growth outside
/// every ERTS carrier that explains most of the RSS growth.
fn native_rule(rec: &Recording, trends: &Trends) -> Result<Candidate, RuledOut> {
    let th = &rec.thresholds;
    let rss_slope = trends.slope("rss_anon");
    let rss_grows = trends.grows("rss_anon");
    let unexplained_slope = trends.slope("unexplained");
    let ruled = |reason: String| {
        Err(RuledOut {
            kind: VerdictKind::NativeLeak,
            reason,
        })
    };
    if let Some(vm) = rec.vm.as_ref().filter(|v| v.memory_outside_carriers())
        && !trends.grows("native_outstanding")
    {
        return ruled(format!(
            "not judged from memory outside carriers: the node runs without ERTS allocators {} (+M flags), so the VM's own memory lives outside carriers too ({})",
            vm.disabled_allocators.join(", "),
            trends.describe("unexplained")
        ));
    }
    let culprits = native_culprits(rec, rss_slope);
    if rss_grows && !culprits.is_empty() {
        let native_slope: f64 = culprits.iter().map(|c| c.growth_bytes_per_s).sum();
        let lossy = rec.native.as_ref().is_some_and(|n| n.lossy());
        return Ok(Candidate {
            strength: native_slope,
            finding: Finding {
                kind: VerdictKind::NativeLeak,
                summary: format!(
                    "native memory never freed grows {} ({} of the RSS growth of {}): {}{}",
                    rate(native_slope),
                    crate::units::share(native_slope, rss_slope),
                    rate(rss_slope),
                    culprits[0].name,
                    if lossy {
                        " (some allocations went untracked: map full; figures are lower bounds)"
                    } else {
                        ""
                    }
                ),
                culprits,
            },
        });
    }
    if !rec.sources.carrier_probes {
        return ruled(
            "carrier probes were not attached, so memory outside carriers cannot be told apart"
                .into(),
        );
    }
    if let Some(doubt) = unexplained_in_doubt(rec)
        && trends.grows("unexplained")
    {
        return ruled(format!(
            "not judged from memory outside carriers ({}): {doubt}",
            trends.describe("unexplained")
        ));
    }
    if rss_grows
        && trends.grows("unexplained")
        && unexplained_slope >= th.explained_fraction * rss_slope
    {
        let last = rec
            .samples
            .iter()
            .rev()
            .find_map(|s| s.unexplained)
            .unwrap_or(0);
        let untracked_by = rec.native.as_ref().and_then(|n| {
            n.modules
                .iter()
                .filter(|m| !m.is_emulator && m.untracked_bytes > 0)
                .max_by_key(|m| m.untracked_bytes)
        });
        let probes = match (rec.native.as_ref(), untracked_by) {
            (_, Some(m)) => format!(
                "the native probes' map was full; most untracked allocations were made by {}{}: {} allocations, {} untracked",
                m.module,
                m.function.as_deref().map(|f| format!(": {f}")).unwrap_or_default(),
                m.untracked,
                human_bytes(m.untracked_bytes as f64)
            ),
            (Some(n), None) if n.detached_at_s.is_some() => format!(
                "the native probes were detached at {:.1} s over --max-overhead, so the growth after it is not attributed",
                n.detached_at_s.unwrap_or(0.0)
            ),
            (Some(n), None) if n.attached_at_s.is_some() => {
                "the native probes saw no growing object: the growth is outside the malloc family (direct system calls, a driver's own mappings) or came before they attached".to_owned()
            }
            _ => "native probes off".to_owned(),
        };
        return Ok(Candidate {
            strength: unexplained_slope,
            finding: Finding {
                kind: VerdictKind::NativeLeak,
                summary: format!(
                    "RSS grows {}; {} of it ({:.0}%) is outside ERTS carriers",
                    rate(rss_slope),
                    rate(unexplained_slope),
                    100.0 * unexplained_slope / rss_slope.max(1.0)
                ),
                culprits: vec![Culprit {
                    kind: CulpritKind::Unexplained,
                    name: format!(
                        "memory outside ERTS carriers: NIF, driver or library malloc/mmap ({probes})"
                    ),
                    bytes: last,
                    growth_bytes_per_s: unexplained_slope,
                    detail: Some(format!(
                        "{:.0}% of the RSS growth",
                        100.0 * unexplained_slope / rss_slope.max(1.0)
                    )),
                }],
            },
        });
    }
    let why = if rss_grows {
        format!(
            "{}; it explains less than {:.0}% of the RSS growth ({})",
            trends.describe("unexplained"),
            th.explained_fraction * 100.0,
            rate(rss_slope)
        )
    } else {
        format!(
            "{}: not a sustained growth (over {}/s and {} in the run, and still growing in its second half)",
            trends.describe("rss_anon"),
            human_bytes(th.min_growth_bytes_per_s),
            human_bytes(th.min_total_growth_bytes)
        )
    };
    ruled(match native_balance(rec, trends) {
        Some(b) => format!("{b}; {why}"),
        None => why,
    })
}

/// Without a VM connection, the block probes (`--blocks`) judge VM growth and fragmentation:
/// blocks of a type growing is vm_growth; carriers an allocator gained during the run that its
/// blocks mostly do not fill is fragmentation. Both are changes since the block probes
/// attached (probe-derived), and say so.
fn block_findings(
    rec: &Recording,
    trends: &Trends,
    th: &Thresholds,
    candidates: &mut Vec<Candidate>,
    ruled_out: &mut Vec<RuledOut>,
) {
    let Some(b) = rec.blocks.as_ref() else { return };
    let rss_slope = trends.slope("rss_anon");
    let blocks_slope = trends.slope("blocks_net");
    let mut frozen = b
        .detached_at_s
        .map(|t| format!(" (block probes detached at {t:.0} s by --max-overhead)"))
        .unwrap_or_default();
    if b.sampling.is_some() {
        frozen.push_str(" (sampled: an estimate, see blocks.sampling)");
    }
    if trends.grows("blocks_net") {
        let floor = th.min_growth_bytes_per_s;
        let mut culprits: Vec<Culprit> = b
            .types
            .iter()
            .filter(|t| t.growth_bytes_per_s >= floor)
            .take(5)
            .map(|t| Culprit {
                kind: CulpritKind::BlockType,
                name: t.name.clone(),
                bytes: t.net_bytes,
                growth_bytes_per_s: t.growth_bytes_per_s,
                detail: Some(format!(
                    "probe-derived: {} blocks allocated, {} freed since the block probes attached (median size {}), net {}; {} of the block growth",
                    t.allocs,
                    t.frees,
                    human_bytes(t.median_size as f64),
                    human_bytes(t.net_bytes as f64),
                    crate::units::share(t.growth_bytes_per_s, blocks_slope)
                )),
            })
            .collect();
        culprits.sort_by(|a, b| b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s));
        if let Some(first) = culprits.first() {
            let summary = format!(
                "ERTS blocks grow {} (probe-derived, no VM connection){frozen}: {} grows {}",
                rate(blocks_slope),
                first.name,
                rate(first.growth_bytes_per_s)
            );
            candidates.push(Candidate {
                strength: blocks_slope,
                finding: Finding {
                    kind: VerdictKind::VmGrowth,
                    summary,
                    culprits,
                },
            });
        }
    } else {
        ruled_out.push(RuledOut {
            kind: VerdictKind::VmGrowth,
            reason: format!(
                "{} (block probes, no VM connection){frozen}",
                trends.describe("blocks_net")
            ),
        });
    }
    // Fragmentation: carriers gained during the run, by allocator, against the blocks their
    // allocator gained.
    let mut fragmented: Vec<Culprit> = rec
        .allocators
        .iter()
        .filter(|a| a.name != "literal_alloc" && a.net_bytes > 0)
        .filter_map(|a| {
            let blocks = b
                .allocators
                .iter()
                .find(|g| g.name == a.name)
                .map_or(0, |g| g.net_bytes.max(0));
            let free = a.net_bytes - blocks;
            (free as f64 >= th.frag_min_free_bytes
                && blocks as f64 <= th.frag_max_usage * a.net_bytes as f64)
                .then(|| Culprit {
                    kind: CulpritKind::Allocator,
                    name: a.name.clone(),
                    bytes: free,
                    growth_bytes_per_s: 0.0,
                    detail: Some(format!(
                        "probe-derived: of the {} of carriers it gained since attach, its blocks fill {} (usage {:.0}%); {} free in them",
                        human_bytes(a.net_bytes as f64),
                        human_bytes(blocks as f64),
                        100.0 * blocks as f64 / a.net_bytes.max(1) as f64,
                        human_bytes(free as f64)
                    )),
                })
        })
        .collect();
    fragmented.sort_by_key(|c| std::cmp::Reverse(c.bytes));
    match fragmented.first() {
        Some(first) => {
            let free: i64 = fragmented.iter().map(|c| c.bytes).sum();
            let summary = format!(
                "ERTS allocators hold mostly empty carriers (probe-derived, no VM connection): {} free in carriers gained since attach, most in {}",
                human_bytes(free as f64),
                first.name
            );
            candidates.push(Candidate {
                // A level, not a rate: ranks after growth that explains RSS.
                strength: (free as f64 / rec.duration_s.max(1.0)).min(rss_slope.max(1.0) * 0.5),
                finding: Finding {
                    kind: VerdictKind::Fragmentation,
                    summary,
                    culprits: fragmented,
                },
            });
        }
        None => ruled_out.push(RuledOut {
            kind: VerdictKind::Fragmentation,
            reason: "no allocator gained carriers its blocks do not fill (block probes, no VM connection)".into(),
        }),
    }
}

/// Why growing RSS got no verdict, in words that agree with the figures shown.
fn inconclusive_growth(rec: &Recording, trends: &Trends) -> String {
    let th = &rec.thresholds;
    let rss_slope = trends.slope("rss_anon");
    let carriers_slope = trends.slope("carriers") + trends.slope("mseg_cache");
    let share = |x: f64| 100.0 * x / rss_slope.max(1.0);
    if rec.vm.as_ref().is_some_and(|v| v.memory_outside_carriers()) {
        return format!(
            "RSS grows {}; the node runs without ERTS allocators, so carriers cannot account for it, and the census names no owner that grows beyond the floors",
            rate(rss_slope)
        );
    }
    if carriers_slope >= th.explained_fraction * rss_slope {
        return format!(
            "RSS grows {} and ERTS carriers grow {} ({:.0}% of it), but the VM's figures name no owner: {}; {}",
            rate(rss_slope),
            rate(carriers_slope),
            share(carriers_slope),
            trends.describe("vm_used"),
            trends.describe("vm_allocated")
        );
    }
    format!(
        "RSS grows {} but neither carriers ({}, {:.0}%) nor the unexplained remainder ({}, {:.0}%) reaches {:.0}% of it (--explained-fraction)",
        rate(rss_slope),
        rate(carriers_slope),
        share(carriers_slope),
        rate(trends.slope("unexplained")),
        share(trends.slope("unexplained")),
        th.explained_fraction * 100.0
    )
}

/// VM-level findings: vm_growth (used grows) and fragmentation (free carrier space, by level
/// or by allocated growing faster than used).
fn vm_findings(
    vm: &VmEvidence,
    trends: &Trends,
    th: &Thresholds,
    nif_api_slope: f64,
    candidates: &mut Vec<Candidate>,
    ruled_out: &mut Vec<RuledOut>,
) {
    let used_slope = trends.slope("vm_used");
    // The VM's used memory grows because a NIF keeps what it took through the NIF API: that is
    // the native_leak finding, not VM growth.
    if trends.grows("vm_used") && nif_api_slope >= th.explained_fraction * used_slope {
        ruled_out.push(RuledOut {
            kind: VerdictKind::VmGrowth,
            reason: format!(
                "{}, of which NIF API memory never released grows {}: that is the native_leak",
                trends.describe("vm_used"),
                rate(nif_api_slope)
            ),
        });
        fragmentation_findings(vm, trends, th, candidates, ruled_out);
        return;
    }
    let census = erlang_culprits(vm, th);
    let dt = census_span(vm);
    let census_rate: f64 = census.iter().map(|c| c.growth_bytes_per_s.max(0.0)).sum();
    // Without vm_used (allocators disabled: the VM's memory is malloc'd, outside carriers),
    // the census alone shows VM growth: what its owners gained over the run.
    let census_grows = trends.get("vm_used").is_none()
        && census_rate >= th.min_growth_bytes_per_s
        && census_rate * dt >= th.min_total_growth_bytes;
    if trends.grows("vm_used") || census_grows {
        let culprits = if census.is_empty() {
            allocator_block_growth(vm, th)
        } else {
            census
        };
        let who = culprits
            .first()
            .map(|c| {
                if c.name == c.kind.as_str() {
                    format!(": {}", c.name)
                } else {
                    format!(": {} {}", c.kind.as_str().replace('_', " "), c.name)
                }
            })
            .unwrap_or_default();
        let (strength, summary) = if census_grows {
            (
                census_rate,
                format!(
                    "memory the VM's owners hold grows {} (census; vm_used cannot be measured on this node){who}",
                    rate(census_rate)
                ),
            )
        } else {
            (
                used_slope,
                format!(
                    "memory the VM uses grows {} (vm_used){who}",
                    rate(used_slope)
                ),
            )
        };
        candidates.push(Candidate {
            strength,
            finding: Finding {
                kind: VerdictKind::VmGrowth,
                summary,
                culprits,
            },
        });
    } else {
        ruled_out.push(RuledOut {
            kind: VerdictKind::VmGrowth,
            reason: match trends.get("vm_used") {
                Some(_) => format!("{}, under the growth floor", trends.describe("vm_used")),
                None => format!(
                    "vm_used not measured; the census shows owners growing {} in all, under the growth floor",
                    rate(census_rate)
                ),
            },
        });
    }

    fragmentation_findings(vm, trends, th, candidates, ruled_out);
}

/// The fragmentation rule: free carrier space by level at the end, or growing.
fn fragmentation_findings(
    vm: &VmEvidence,
    trends: &Trends,
    th: &Thresholds,
    candidates: &mut Vec<Candidate>,
    ruled_out: &mut Vec<RuledOut>,
) {
    let used_slope = trends.slope("vm_used");
    // Fragmentation by level at the end of the run, per allocator.
    let last = vm.samples.last().expect("non-empty checked by caller");
    let mut fragmented: Vec<Culprit> = last
        .by_allocator()
        .into_values()
        .filter(|a| a.name != "literal_alloc")
        .filter(|a| {
            a.free() as f64 >= th.frag_min_free_bytes
                && (a.blocks as f64) <= th.frag_max_usage * a.carriers as f64
        })
        .map(|a| {
            let worst = last
                .allocators
                .iter()
                .filter(|i| i.name == a.name)
                .max_by_key(|i| i.free())
                .map(|i| i.instance)
                .unwrap_or(0);
            Culprit {
                kind: CulpritKind::Allocator,
                name: a.name.clone(),
                bytes: a.free() as i64,
                growth_bytes_per_s: 0.0,
                detail: Some(format!(
                    "usage {:.0}% ({} used of {} in carriers), {} reclaimable, {} in carriers abandoned to the pool; most free in instance {worst}{}",
                    100.0 * a.blocks as f64 / a.carriers.max(1) as f64,
                    human_bytes(a.blocks as f64),
                    human_bytes(a.carriers as f64),
                    human_bytes(a.free() as f64),
                    human_bytes(a.pool_carriers as f64),
                    vm.carriers
                        .as_ref()
                        .and_then(|p| why_carriers_stay(p, &a.name))
                        .map(|why| format!("; {why}"))
                        .unwrap_or_default(),
                )),
            }
        })
        .collect();
    fragmented.sort_by_key(|c| std::cmp::Reverse(c.bytes));
    let alloc_slope = trends.slope("vm_allocated");
    // Free carrier space grows: above the noise floor, and as a real share of the carrier growth
    // (carriers always carry some slack, so used and allocated growing together is not it).
    let free_slope = alloc_slope - used_slope;
    let growing_free = trends.grows("vm_allocated")
        && free_slope > th.min_growth_bytes_per_s
        && free_slope >= th.explained_fraction * alloc_slope;
    if !fragmented.is_empty() || growing_free {
        let free: i64 = fragmented.iter().map(|c| c.bytes).sum();
        let summary = if fragmented.is_empty() {
            format!(
                "carriers grow {} while used memory grows {}",
                rate(alloc_slope),
                rate(used_slope)
            )
        } else {
            format!(
                "allocators hold {} of mostly empty carriers: {} (usage {:.0}% overall)",
                human_bytes(free as f64),
                fragmented
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                100.0 * last.used() as f64 / last.allocated().max(1) as f64
            )
        };
        // Growth of free space competes with the other growth findings; a level alone is
        // primary only when nothing grows.
        let strength = if growing_free { free_slope } else { 0.0 };
        candidates.push(Candidate {
            strength,
            finding: Finding {
                kind: VerdictKind::Fragmentation,
                summary,
                culprits: fragmented,
            },
        });
    } else {
        let usage = 100.0 * last.used() as f64 / last.allocated().max(1) as f64;
        ruled_out.push(RuledOut {
            kind: VerdictKind::Fragmentation,
            reason: format!(
                "usage {usage:.0}% ({} used of {} allocated); no allocator has {} free below {:.0}% usage",
                human_bytes(last.used() as f64),
                human_bytes(last.allocated() as f64),
                human_bytes(th.frag_min_free_bytes),
                th.frag_max_usage * 100.0
            ),
        });
    }
}

/// Why an allocator's free carrier space cannot go back to the OS, from the carrier picture:
/// how many of its carriers a few live blocks pin, and which ERTS flags (OTP 25, erts_alloc(3))
/// change where new blocks go. `None` when the picture does not have the allocator.
fn why_carriers_stay(p: &crate::recording::vm::CarrierPicture, name: &str) -> Option<String> {
    if let Some(why) = &p.skipped {
        return Some(format!("no carrier picture: {why}"));
    }
    let a = p.allocator(name)?;
    let carriers = format!(
        "{} carriers ({}{})",
        a.carriers,
        human_bytes(a.carrier_bytes as f64),
        if a.pool_carriers > 0 {
            format!(", {} in the pool", a.pool_carriers)
        } else {
            String::new()
        }
    );
    if a.pinned == 0 {
        return Some(format!(
            "{carriers}, none pinned by few live blocks ({} empty): the free space is spread over fuller carriers",
            a.empty
        ));
    }
    let mut why = format!(
        "{carriers}, {} pinned by few live blocks (median {} blocks, {:.0}% used) over {} free holes: a carrier goes back to the OS only once its last block is freed, so none of these can",
        a.pinned,
        a.pinned_median_blocks
            .map_or_else(|| "unknown".into(), |m| m.to_string()),
        100.0 * a.pinned_usage(),
        a.free_holes
    );
    // erts_alloc(3) flag letters; literal_alloc and exec_alloc take no strategy flags.
    let letter = match name {
        "binary_alloc" => 'B',
        "std_alloc" => 'D',
        "ets_alloc" => 'E',
        "fix_alloc" => 'F',
        "eheap_alloc" => 'H',
        "ll_alloc" => 'L',
        "driver_alloc" => 'R',
        "sl_alloc" => 'S',
        "temp_alloc" => 'T',
        _ => return Some(why),
    };
    let o = a.options.clone().unwrap_or_default();
    let mut levers = Vec::new();
    if o.strategy.as_deref() != Some("ageffcbf") {
        levers.push(format!(
            "+M{letter}as ageffcbf{} fills older carriers first so newer ones can empty",
            o.strategy
                .map(|s| format!(" (now {s})"))
                .unwrap_or_default()
        ));
    }
    levers.push(format!(
        "a smaller +M{letter}lmbcs{} makes each survivor pin less",
        o.lmbcs
            .map(|b| format!(" (now {})", human_bytes(b as f64)))
            .unwrap_or_default()
    ));
    if a.pool_carriers > 0 {
        levers.push(format!(
            "+M{letter}acul{} decides which carriers are abandoned to the pool for other instances to fill",
            o.acul.map(|v| format!(" (now {v})")).unwrap_or_default()
        ));
    }
    why.push_str(&format!(
        "; {}: these change where new blocks go, not what is pinned now",
        levers.join(", ")
    ));
    Some(why)
}

/// Seconds between the start and end census (0 without both).
fn census_span(vm: &VmEvidence) -> f64 {
    match (&vm.census_start, &vm.census_end) {
        (Some(a), Some(b)) => (b.t_s - a.t_s).max(0.0),
        _ => 0.0,
    }
}

/// A process group must gain this many processes to be named for its count alone.
const GROUP_MIN_NEW_PROCESSES: u64 = 1000;
/// Loaded modules gained to name loaded code.
const CODE_MIN_NEW_MODULES: u64 = 100;
/// Atoms gained to name the atom table.
const ATOMS_MIN_NEW: u64 = 10_000;

/// Erlang-level culprits from the start and end census: tables, processes, binary holders,
/// process groups, persistent terms, loaded code, ports, atoms and other system memory that
/// grew, most growth first. Each owner appears once; no figure exceeds what the node's own
/// category holds (`erlang:memory/0` at the end census).
fn erlang_culprits(vm: &VmEvidence, th: &Thresholds) -> Vec<Culprit> {
    let (Some(start), Some(end)) = (&vm.census_start, &vm.census_end) else {
        return Vec::new();
    };
    let dt = (end.t_s - start.t_s).max(1e-3);
    // Worth naming: grew at least a quarter of the run's growth floor.
    let floor = th.min_total_growth_bytes / 4.0;
    // The node's own total for a category caps what any one owner in it can claim.
    let cap = |category: &str, bytes: u64| -> u64 {
        end.memory.get(category).map_or(bytes, |c| bytes.min(*c))
    };
    let mut out = Vec::new();
    for t in &end.tables {
        let before = start
            .tables
            .iter()
            .find(|s| s.id == t.id)
            .map_or(0, |s| s.memory);
        let grew = t.memory as f64 - before as f64;
        if grew >= floor {
            out.push(Culprit {
                kind: CulpritKind::EtsTable,
                name: t.name.clone(),
                bytes: cap("ets", t.memory) as i64,
                growth_bytes_per_s: grew / dt,
                detail: Some(format!("{} objects, owner {}", t.size, t.owner_display())),
            });
        }
    }
    for p in &end.processes {
        let before = start.processes.iter().find(|b| b.pid == p.pid);
        let mem_grew = p.memory as f64 - before.map_or(0.0, |b| b.memory as f64);
        let queue_grew =
            p.message_queue_len as i64 - before.map_or(0, |b| b.message_queue_len as i64);
        let bin_now = cap("binary", p.binary_bytes.unwrap_or(0));
        let bin_before = before
            .and_then(|b| b.binary_bytes)
            .map_or(0, |b| cap("binary", b));
        let bin_grew = bin_now as f64 - bin_before as f64;
        let binaries = p.binary_bytes.map(|_| {
            let shared = p.binary_shared_bytes.unwrap_or(0).min(bin_now);
            format!(
                "{} of distinct refc binaries through {} references{}",
                human_bytes(bin_now as f64),
                p.binary_refs.unwrap_or(0),
                if shared > 0 {
                    format!(
                        ", {} of it shared with other processes or tables",
                        human_bytes(shared as f64)
                    )
                } else {
                    String::new()
                }
            )
        });
        let name = format!("{} {}", p.name, p.pid);
        let queue = format!(
            "message_queue_len {} ({:+}), in {}",
            p.message_queue_len, queue_grew, p.current_function
        );
        if bin_grew >= floor && bin_grew >= mem_grew {
            // Its figure is the distinct binaries it keeps alive, each counted once.
            out.push(Culprit {
                kind: CulpritKind::BinaryHolder,
                name,
                bytes: bin_now as i64,
                growth_bytes_per_s: bin_grew / dt,
                detail: Some(format!(
                    "{}; its own heap {}, {queue}",
                    binaries.unwrap_or_default(),
                    human_bytes(p.memory as f64)
                )),
            });
        } else if mem_grew >= floor || (queue_grew > 1000 && mem_grew > 0.0) {
            let mut detail = queue;
            if bin_grew >= floor
                && let Some(b) = &binaries
            {
                detail.push_str("; also holds ");
                detail.push_str(b);
            }
            out.push(Culprit {
                kind: CulpritKind::Process,
                name,
                bytes: cap("processes", p.memory) as i64,
                growth_bytes_per_s: mem_grew / dt,
                detail: Some(detail),
            });
        }
    }
    // Groups: many small processes that no single process culprit names. A group absent from
    // the start census counts from zero only when that census listed every group.
    let start_complete = start.groups.len() < crate::vm::query::GROUP_CAP;
    for g in end.groups.iter().filter(|g| g.count > 1) {
        let before = match start.group(&g.name) {
            Some(b) => b.clone(),
            None if start_complete && !start.groups.is_empty() => Default::default(),
            None => continue,
        };
        let new = g.count as i64 - before.count as i64;
        let mem_grew = g.memory as f64 - before.memory as f64;
        if (new >= GROUP_MIN_NEW_PROCESSES as i64 && mem_grew > 0.0)
            || (mem_grew >= floor && new > 0)
        {
            out.push(Culprit {
                kind: CulpritKind::ProcessGroup,
                name: g.name.clone(),
                bytes: cap("processes", g.memory) as i64,
                growth_bytes_per_s: mem_grew / dt,
                detail: Some(format!(
                    "{:+} processes ({} now, {} each on average), {} memory: processes started and never ending",
                    new,
                    g.count,
                    human_bytes(g.memory as f64 / g.count.max(1) as f64),
                    human_bytes(mem_grew)
                )),
            });
        }
    }
    if let (Some(a), Some(b)) = (start.persistent_term, end.persistent_term) {
        let grew = b.memory as f64 - a.memory as f64;
        if grew >= floor {
            out.push(Culprit {
                kind: CulpritKind::PersistentTerm,
                name: "persistent_term".into(),
                bytes: b.memory as i64,
                growth_bytes_per_s: grew / dt,
                detail: Some(format!(
                    "{} terms ({:+}); every put copies the term into literal_alloc and an erase or overwrite frees it only after a global GC",
                    b.count,
                    b.count as i64 - a.count as i64
                )),
            });
        }
    }
    if let (Some(a), Some(b)) = (start.code, end.code) {
        let new = b.modules as i64 - a.modules as i64;
        let grew = b.memory.unwrap_or(0) as f64 - a.memory.unwrap_or(0) as f64;
        if grew >= floor || new >= CODE_MIN_NEW_MODULES as i64 {
            out.push(Culprit {
                kind: CulpritKind::Code,
                name: "loaded code".into(),
                bytes: b.memory.unwrap_or(0) as i64,
                growth_bytes_per_s: grew.max(0.0) / dt,
                detail: Some(format!(
                    "{} modules loaded ({new:+}): modules loaded and never purged",
                    b.modules
                )),
            });
        }
    }
    if let (Some(a), Some(b)) = (&start.ports, &end.ports) {
        let grew = (b.memory + b.queue_size) as f64 - (a.memory + a.queue_size) as f64;
        if grew >= floor {
            let top = b.top.first();
            out.push(Culprit {
                kind: CulpritKind::Ports,
                name: top.map_or("ports".into(), |p| format!("{} {}", p.name, p.id)),
                bytes: (b.memory + b.queue_size) as i64,
                growth_bytes_per_s: grew / dt,
                detail: Some(format!(
                    "{} ports ({:+}), {} in driver queues; largest owned by {}",
                    b.count,
                    b.count as i64 - a.count as i64,
                    human_bytes(b.queue_size as f64),
                    top.map_or("—", |p| p.owner.as_str())
                )),
            });
        }
    }
    if end.atom_count > start.atom_count + ATOMS_MIN_NEW {
        out.push(Culprit {
            kind: CulpritKind::Atoms,
            name: "atom table".into(),
            bytes: end.memory.get("atom").copied().unwrap_or(0) as i64,
            growth_bytes_per_s: (end.memory.get("atom").copied().unwrap_or(0) as f64
                - start.memory.get("atom").copied().unwrap_or(0) as f64)
                / dt,
            detail: Some(format!(
                "{} atoms of {} (+{} during the run): atoms are never freed",
                end.atom_count,
                end.atom_limit,
                end.atom_count - start.atom_count
            )),
        });
    }
    // Other system memory, only when nothing more precise was found.
    if out.is_empty()
        && let (Some(a), Some(b)) = (start.system_other(), end.system_other())
    {
        let grew = b as f64 - a as f64;
        if grew >= floor {
            out.push(Culprit {
                kind: CulpritKind::System,
                name: "system memory (not atoms, binaries, code or ETS)".into(),
                bytes: b as i64,
                growth_bytes_per_s: grew / dt,
                detail: Some(
                    "erlang:memory(system) minus its named parts: timers, distribution buffers, NIF and driver allocations, ERTS tables".into(),
                ),
            });
        }
    }
    out.sort_by(|a, b| b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s));
    out.truncate(5);
    out
}

/// When no Erlang-level owner explains the growth: the allocators whose blocks grow (a leak
/// inside ERTS itself shows up this way).
fn allocator_block_growth(vm: &VmEvidence, th: &Thresholds) -> Vec<Culprit> {
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &vm.samples {
        for (name, a) in s.by_allocator() {
            by.entry(name).or_default().push((s.t_s, a.blocks as f64));
        }
    }
    let mut out: Vec<Culprit> = by
        .into_iter()
        .filter_map(|(name, pts)| {
            let g = growth(&pts, th)?;
            g.grows.then(|| Culprit {
                kind: CulpritKind::Allocator,
                name,
                bytes: pts.last().map_or(0, |p| p.1 as i64),
                growth_bytes_per_s: g.whole.slope_per_s,
                detail: Some("blocks grow with no process or table owning them".into()),
            })
        })
        .collect();
    out.sort_by(|a, b| b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    /// A real recording of a healthy node (tests/recordings), to be bent into scenarios.
    fn healthy() -> Recording {
        serde_json::from_str(include_str!("../tests/recordings/healthy.json")).unwrap()
    }

    /// Adds steady growth (bytes/s) to RSS, probe carriers and the VM's ets_alloc.
    fn grow(rec: &mut Recording, rss: f64, carriers: f64, used: f64) {
        for s in &mut rec.samples {
            let t = s.t_s;
            let add = |v: &mut Option<u64>, rate: f64| *v = v.map(|x| x + (rate * t) as u64);
            add(&mut s.rss, rss);
            add(&mut s.rss_anon, rss);
            add(&mut s.vm_used, used);
            add(&mut s.vm_allocated, carriers);
            s.carriers = s.carriers.map(|c| c + (carriers * t) as i64);
            s.unexplained = s.unexplained.map(|u| u + ((rss - carriers) * t) as i64);
        }
        for v in &mut rec.vm.as_mut().unwrap().samples {
            let ets = v
                .allocators
                .iter_mut()
                .find(|a| a.name == "ets_alloc" && a.instance == 0)
                .unwrap();
            ets.blocks += (used * v.t_s) as u64;
            ets.carriers += (carriers * v.t_s) as u64;
        }
    }

    fn kinds(v: &Verdict) -> Vec<VerdictKind> {
        std::iter::once(v.kind)
            .chain(v.secondary.iter().map(|f| f.kind))
            .collect()
    }

    #[test]
    fn the_healthy_recording_is_healthy() {
        let v = judge(&healthy());
        assert_eq!(v.kind, VerdictKind::Healthy, "{v:#?}");
        let ruled: Vec<VerdictKind> = v.ruled_out.iter().map(|r| r.kind).collect();
        assert_eq!(
            ruled,
            vec![
                VerdictKind::NativeLeak,
                VerdictKind::VmGrowth,
                VerdictKind::Fragmentation
            ]
        );
    }

    #[test]
    fn used_and_carriers_growing_together_is_vm_growth_only() {
        let mut rec = healthy();
        grow(&mut rec, 20.0 * MIB, 20.0 * MIB, 19.5 * MIB);
        let v = judge(&rec);
        assert_eq!(kinds(&v), vec![VerdictKind::VmGrowth], "{v:#?}");
        assert_eq!(v.culprits[0].name, "ets_alloc");
    }

    #[test]
    fn carriers_growing_without_use_is_fragmentation() {
        let mut rec = healthy();
        grow(&mut rec, 20.0 * MIB, 20.0 * MIB, 0.0);
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::Fragmentation, "{v:#?}");
        assert!(
            v.ruled_out
                .iter()
                .any(|r| r.kind == VerdictKind::NativeLeak)
        );
    }

    #[test]
    fn growth_outside_carriers_is_a_native_leak() {
        let mut rec = healthy();
        grow(&mut rec, 10.0 * MIB, 0.0, 0.0);
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::NativeLeak, "{v:#?}");
    }

    #[test]
    fn without_the_vm_view_carrier_growth_is_inconclusive() {
        let mut rec = healthy();
        grow(&mut rec, 20.0 * MIB, 20.0 * MIB, 20.0 * MIB);
        rec.vm = None;
        for s in &mut rec.samples {
            s.vm_used = None;
            s.vm_allocated = None;
        }
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::Inconclusive, "{v:#?}");
        assert!(v.summary.contains("VM view"), "{}", v.summary);
    }

    #[test]
    fn growth_outside_carriers_is_no_native_leak_when_the_vm_lives_there_too() {
        let mut rec = healthy();
        grow(&mut rec, 10.0 * MIB, 0.0, 0.0);
        rec.vm.as_mut().unwrap().disabled_allocators = vec!["ets_alloc".into()];
        for s in &mut rec.samples {
            (s.vm_used, s.vm_allocated) = (None, None);
        }
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::Inconclusive, "{v:#?}");
        assert!(
            v.summary.contains("without ERTS allocators"),
            "{}",
            v.summary
        );
        assert!(
            v.ruled_out
                .iter()
                .any(|r| r.kind == VerdictKind::NativeLeak && r.reason.contains("ets_alloc"))
        );
    }

    #[test]
    fn inconclusive_summary_agrees_with_its_figures() {
        // RSS and the probes' carriers grow together while the VM's figures stay flat (carriers
        // the VM does not report): the summary must say carriers account for it.
        let mut rec = healthy();
        for s in &mut rec.samples {
            let add = (10.0 * MIB * s.t_s) as u64;
            s.rss = s.rss.map(|x| x + add);
            s.rss_anon = s.rss_anon.map(|x| x + add);
            s.carriers = s.carriers.map(|c| c + add as i64);
        }
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::Inconclusive, "{v:#?}");
        assert!(v.summary.contains("ERTS carriers grow"), "{}", v.summary);
        assert!(v.summary.contains("name no owner"), "{}", v.summary);
    }

    #[test]
    fn short_runs_are_inconclusive() {
        let mut rec = healthy();
        grow(&mut rec, 10.0 * MIB, 0.0, 0.0);
        rec.samples.truncate(3);
        rec.duration_s = rec.samples.last().unwrap().t_s;
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::Inconclusive, "{v:#?}");
    }

    /// RSS and the VM's own carriers grow together while the probes count nothing.
    fn blind(rec: &mut Recording) {
        grow(rec, 10.0 * MIB, 10.0 * MIB, 10.0 * MIB);
        for s in &mut rec.samples {
            // The probes saw none of it: the VM's figure moved, the ledger's did not.
            let add = (10.0 * MIB * s.t_s) as i64;
            s.carriers = s.carriers.map(|c| c - add);
            s.carriers_mapped = s.carriers.map(|_| 0);
            s.unexplained = s.unexplained.map(|u| u + add);
        }
    }

    #[test]
    fn blind_carrier_probes_are_never_a_native_leak() {
        let mut rec = healthy();
        blind(&mut rec);
        let v = judge(&rec);
        assert_ne!(v.kind, VerdictKind::NativeLeak, "{v:#?}");
        assert!(
            v.degraded.iter().any(|d| d.contains("look blind")),
            "{:?}",
            v.degraded
        );
        let why = v
            .ruled_out
            .iter()
            .find(|r| r.kind == VerdictKind::NativeLeak)
            .map(|r| r.reason.clone())
            .unwrap_or_default();
        assert!(why.contains("not judged"), "{why}");
        // The same growth with the probes seeing the carriers is not degraded.
        let mut seen = healthy();
        grow(&mut seen, 10.0 * MIB, 10.0 * MIB, 10.0 * MIB);
        assert!(judge(&seen).degraded.is_empty());
    }

    #[test]
    fn lost_creations_keep_the_remainder_from_a_native_leak_lost_releases_do_not() {
        let mut rec = healthy();
        grow(&mut rec, 10.0 * MIB, 0.0, 0.0);
        rec.losses.events_lost = 40;
        let v = judge(&rec);
        assert_ne!(v.kind, VerdictKind::NativeLeak, "{v:#?}");
        assert!(
            v.degraded.iter().any(|d| d.contains("lower bound")),
            "{:?}",
            v.degraded
        );
        // Lost releases leave carriers counted: the remainder is if anything too small.
        rec.losses.events_lost_frees = 40;
        let v = judge(&rec);
        assert_eq!(v.kind, VerdictKind::NativeLeak, "{v:#?}");
        assert!(
            v.degraded.iter().any(|d| d.contains("upper bound")),
            "{:?}",
            v.degraded
        );
    }

    #[test]
    fn unreadable_counters_are_unknown_not_zero() {
        let mut rec = healthy();
        grow(&mut rec, 10.0 * MIB, 0.0, 0.0);
        rec.losses.unreadable = vec!["events lost".into()];
        let v = judge(&rec);
        assert_ne!(v.kind, VerdictKind::NativeLeak, "{v:#?}");
        assert!(
            v.degraded
                .iter()
                .any(|d| d.contains("unknown, not 0") && d.contains("events lost")),
            "{:?}",
            v.degraded
        );
    }
    /// The fragmented recording of `carriers_growing_without_use_is_fragmentation` with a
    /// carrier picture of ets_alloc: 34 carriers of 8 MiB pinned by ~589 blocks each.
    fn fragmented_with_picture(
        picture: impl FnOnce(&mut crate::recording::vm::CarrierPicture),
    ) -> Verdict {
        use crate::recording::vm::{CarrierEntry, CarrierOptions, CarrierPicture, CarrierTally};
        let mut rec = healthy();
        grow(&mut rec, 20.0 * MIB, 20.0 * MIB, 0.0);
        let mut tally = CarrierTally::default();
        for i in 0..34u64 {
            let c = CarrierEntry {
                size: 8 << 20,
                in_pool: i >= 2,
                blocks: 580 + i,
                block_bytes: 414_656,
                free_holes: 0,
            };
            tally.add("ets_alloc", c, &[0, 0, 0, 583, 6], 0);
        }
        let mut p = CarrierPicture {
            histogram_start: 512,
            allocators: tally.finish(),
            ..Default::default()
        };
        p.allocators[0].options = Some(CarrierOptions {
            strategy: Some("aoffcbf".into()),
            acul: Some(60),
            lmbcs: Some(5 << 20),
        });
        picture(&mut p);
        rec.vm.as_mut().unwrap().carriers = Some(p);
        judge(&rec)
    }

    fn ets_detail(v: &Verdict) -> String {
        let c = v
            .culprits
            .iter()
            .find(|c| c.name == "ets_alloc")
            .unwrap_or_else(|| panic!("no ets_alloc culprit: {v:#?}"));
        c.detail.clone().unwrap_or_default()
    }

    #[test]
    fn the_carrier_picture_says_why_fragmented_carriers_stay() {
        let v = fragmented_with_picture(|_| {});
        assert_eq!(v.kind, VerdictKind::Fragmentation, "{v:#?}");
        let d = ets_detail(&v);
        for want in [
            "34 carriers (272.0 MiB, 32 in the pool)",
            "34 pinned by few live blocks (median 597 blocks, 5% used) over 20026 free holes",
            "+MEas ageffcbf (now aoffcbf)",
            "+MElmbcs (now 5.0 MiB)",
            "+MEacul (now 60)",
        ] {
            assert!(d.contains(want), "{want:?} not in {d}");
        }
    }

    #[test]
    fn the_carrier_picture_says_when_nothing_is_pinned_or_it_was_skipped() {
        let v = fragmented_with_picture(|p| {
            for c in &mut p.allocators {
                c.pinned = 0;
            }
        });
        let d = ets_detail(&v);
        assert!(d.contains("none pinned by few live blocks"), "{d}");
        assert!(
            !d.contains("+MEas"),
            "no lever without pinned carriers: {d}"
        );
        let v = fragmented_with_picture(|p| {
            p.skipped = Some("the node has 200000 carriers, more than 100000".into());
        });
        let d = ets_detail(&v);
        assert!(
            d.contains("no carrier picture: the node has 200000 carriers"),
            "{d}"
        );
        // Without a picture the detail is what it was.
        let mut rec = healthy();
        grow(&mut rec, 20.0 * MIB, 20.0 * MIB, 0.0);
        let d = ets_detail(&judge(&rec));
        assert!(
            !d.contains("pinned") && !d.contains("carrier picture"),
            "{d}"
        );
    }

    #[test]
    fn native_probes_detached_over_budget_are_said_in_the_verdict() {
        let mut rec: Recording =
            serde_json::from_str(include_str!("../tests/recordings/healthy.json")).unwrap();
        rec.native = Some(crate::recording::NativeEvidence {
            attached_at_s: Some(0.5),
            detached_at_s: Some(2.0),
            overhead_cpu_share: 0.4,
            reason: "--native on".into(),
            ..Default::default()
        });
        let v = judge(&rec);
        assert!(
            v.degraded
                .iter()
                .any(|d| d.contains("native probes detached at 2.0 s") && d.contains("40%")),
            "{v:#?}"
        );
    }
}
