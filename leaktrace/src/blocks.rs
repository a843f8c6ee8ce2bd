//! The block ledger (`--blocks`): which `erts_alcu_*` functions the node really uses, the names
//! of its allocators and types (read from its own tables), and the kernel's per-type totals
//! turned into per-allocator and per-type growth and HdrHistograms.

use std::collections::BTreeMap;

use leaktrace_common::{BlockStats, block};

use crate::{
    image::ImageView,
    recording::{
        blocks::{BlockEvidence, BlockGroup, BlockPoint, MAX_TYPES},
        histograms::{HistogramUnit, Histograms},
    },
};

/// The erts_alcu entry points by role; `erts_allctrs[]` says which ones the node uses.
pub const ALLOC_FUNCTIONS: [&str; 4] = [
    "erts_alcu_alloc_thr_pref",
    "erts_alcu_alloc_thr_spec",
    "erts_alcu_alloc_ts",
    "erts_alcu_alloc",
];
/// Realloc entry points (the `_mv` ones move the block, same arguments).
pub const REALLOC_FUNCTIONS: [&str; 8] = [
    "erts_alcu_realloc_thr_pref",
    "erts_alcu_realloc_thr_spec",
    "erts_alcu_realloc_ts",
    "erts_alcu_realloc",
    "erts_alcu_realloc_mv_thr_pref",
    "erts_alcu_realloc_mv_thr_spec",
    "erts_alcu_realloc_mv_ts",
    "erts_alcu_realloc_mv",
];
/// Free entry points.
pub const FREE_FUNCTIONS: [&str; 4] = [
    "erts_alcu_free_thr_pref",
    "erts_alcu_free_thr_spec",
    "erts_alcu_free_ts",
    "erts_alcu_free",
];

/// Entries of `erts_allctrs[]`: `{alloc, realloc, free, extra}`, 8 bytes each.
const ALLCTRS_ENTRY_WORDS: usize = 4;

/// The erts_alcu functions `erts_allctrs[]` of the running node points to (exported names), or
/// why it could not be read. The realloc of an allocator may be the `_mv` variant.
pub fn used_functions(view: &ImageView) -> Result<Vec<&'static str>, String> {
    let table = view.pointer_table("erts_allctrs", 64 * ALLCTRS_ENTRY_WORDS).ok_or(
        "cannot read erts_allctrs[] from the target (not exported by this beam.smp, or /proc/PID/mem unreadable)",
    )?;
    let used: Vec<u64> = table
        .chunks_exact(ALLCTRS_ENTRY_WORDS)
        .flat_map(|e| e[..3].to_vec())
        .filter(|p| *p != 0)
        .collect();
    let all = ALLOC_FUNCTIONS
        .iter()
        .chain(&REALLOC_FUNCTIONS)
        .chain(&FREE_FUNCTIONS);
    let found: Vec<&'static str> = all
        .filter(|f| view.address_of(f).is_some_and(|a| used.contains(&a)))
        .copied()
        .collect();
    if !found.iter().any(|f| ALLOC_FUNCTIONS.contains(f)) {
        return Err(format!(
            "erts_allctrs[] of the target points to no erts_alcu_alloc* function this beam.smp exports ({} entries read): the layout differs from the OTP releases leaktrace knows (25-28)",
            used.len()
        ));
    }
    Ok(found)
}

/// Allocator and type names of the node, from its `erts_alc_a2ad` and `erts_alc_n2td` tables.
#[derive(Clone, Debug, Default)]
pub struct TypeNames {
    allocators: Vec<Option<String>>,
    types: Vec<Option<String>>,
}

impl TypeNames {
    /// Reads both tables; an error says which one did not read.
    pub fn read(view: &ImageView) -> Result<TypeNames, String> {
        let allocators = view
            .string_table("erts_alc_a2ad", 64)
            .ok_or("cannot read the allocator names (erts_alc_a2ad) of the target")?;
        let types = view
            .string_table("erts_alc_n2td", 1024)
            .ok_or("cannot read the type names (erts_alc_n2td) of the target")?;
        Ok(TypeNames { allocators, types })
    }

    /// Names from given tables (tests, recordings).
    pub fn from_tables(allocators: Vec<Option<String>>, types: Vec<Option<String>>) -> TypeNames {
        TypeNames { allocators, types }
    }

    /// `(allocator, type)` of an `ErtsAlcType_t`: allocator number in the low 4 bits, type
    /// number from bit 7 (OTP 25-28 layout).
    pub fn of(&self, alc_type: u32) -> (String, String) {
        let a = (alc_type & 0xF) as usize;
        let t = (alc_type >> 7) as usize;
        let allocator = match self.allocators.get(a).cloned().flatten() {
            Some(n) if !n.ends_with("_alloc") && n != "erts_mmap" => format!("{n}_alloc"),
            Some(n) => n,
            None => format!("allocator {a}"),
        };
        let ty = self
            .types
            .get(t)
            .cloned()
            .flatten()
            .unwrap_or_else(|| format!("type {t}"));
        (allocator, ty.to_ascii_lowercase())
    }
}

/// Per-type totals from the kernel, over a run.
#[derive(Debug)]
pub struct BlockLedger {
    names: TypeNames,
    /// Latest kernel totals per `ErtsAlcType_t`.
    totals: BTreeMap<u32, BlockStats>,
    /// Totals at the last interval close (for histogram deltas).
    closed: BTreeMap<u32, BlockStats>,
    /// Net bytes per group name over time.
    series: Vec<(f64, BTreeMap<String, i64>)>,
    /// Functions probed.
    pub functions: Vec<String>,
    /// Net bytes are multiplied by this (`--blocks sampled`: 1 / the share of time the
    /// allocation windows were open; 1 otherwise).
    scale: f64,
}

fn net(s: &BlockStats) -> i64 {
    s.bytes_allocated as i64 - s.bytes_freed as i64
}

/// The lower bound of log2 bucket `i`.
fn bucket_value(i: usize) -> u64 {
    1u64 << i.min(62)
}

fn median_of(buckets: &[u64]) -> u64 {
    let total: u64 = buckets.iter().sum();
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if total > 0 && seen * 2 >= total {
            return bucket_value(i);
        }
    }
    0
}

impl BlockLedger {
    /// A ledger naming types with `names`.
    pub fn new(names: TypeNames, functions: Vec<String>) -> BlockLedger {
        BlockLedger {
            names,
            totals: BTreeMap::new(),
            closed: BTreeMap::new(),
            series: Vec::new(),
            functions,
            scale: 1.0,
        }
    }

    /// Takes the kernel's totals (summed over CPUs).
    pub fn update(&mut self, stats: impl IntoIterator<Item = (u32, BlockStats)>) {
        for (t, s) in stats {
            self.totals.insert(t, s);
        }
    }

    /// Totals per group (allocator, or `allocator: type`).
    fn groups(&self, by_type: bool) -> BTreeMap<String, (String, BlockStats)> {
        let mut out: BTreeMap<String, (String, BlockStats)> = BTreeMap::new();
        for (t, s) in &self.totals {
            let (allocator, ty) = self.names.of(*t);
            let name = if by_type {
                format!("{allocator}: {ty}")
            } else {
                allocator.clone()
            };
            out.entry(name)
                .or_insert((allocator, BlockStats::default()))
                .1
                .add(s);
        }
        out
    }

    /// Sets the factor net bytes are scaled by (sampling; see [`BlockLedger::scale`]).
    pub fn set_scale(&mut self, scale: f64) {
        if scale.is_finite() && scale >= 1.0 {
            self.scale = scale;
        }
    }

    fn scaled(&self, v: i64) -> i64 {
        (v as f64 * self.scale) as i64
    }

    /// Net block bytes since attach, all types (scaled when sampled).
    pub fn net_total(&self) -> i64 {
        self.scaled(self.totals.values().map(net).sum())
    }

    /// Records net bytes per allocator and per type at `t_s`.
    pub fn record_point(&mut self, t_s: f64) {
        let mut point: BTreeMap<String, i64> = BTreeMap::new();
        for by_type in [false, true] {
            for (name, (_, s)) in self.groups(by_type) {
                point.insert(name, self.scaled(net(&s)));
            }
        }
        self.series.push((t_s, point));
    }

    /// Puts the size and lifetime buckets gained since the last call into `h` (one series per
    /// allocator: `block_size/ets_alloc`, `block_lifetime/ets_alloc`) and closes nothing: the
    /// caller closes the interval for every series at once.
    pub fn histograms_into(&mut self, h: &mut Histograms) {
        for (t, s) in &self.totals {
            let before = self.closed.get(t).copied().unwrap_or_default();
            let (allocator, ty) = self.names.of(*t);
            // Per allocator, and per type (`block_size/ets_alloc: db_term`).
            for group in [allocator.clone(), format!("{allocator}: {ty}")] {
                for i in 0..block::SIZE_BUCKETS {
                    let n = s.sizes[i].saturating_sub(before.sizes[i]);
                    h.record_n(
                        &format!("block_size/{group}"),
                        HistogramUnit::Bytes,
                        bucket_value(i),
                        n,
                    );
                }
                for i in 0..block::LIFE_BUCKETS {
                    let n = s.lifetimes[i].saturating_sub(before.lifetimes[i]);
                    h.record_n(
                        &format!("block_lifetime/{group}"),
                        HistogramUnit::Us,
                        bucket_value(i),
                        n,
                    );
                }
            }
        }
        self.closed = self.totals.clone();
    }

    /// Blocks still live at the end, per allocator and per type: their lifetimes are censored.
    pub fn censor_into(&self, h: &mut Histograms) {
        for (name, (_, s)) in self.groups(false).into_iter().chain(self.groups(true)) {
            let live = s.allocs.saturating_sub(s.frees);
            if live > 0 {
                h.censored(&format!("block_lifetime/{name}"), HistogramUnit::Us, live);
            }
        }
    }

    fn rows(&self, by_type: bool) -> Vec<BlockGroup> {
        let mut rows: Vec<BlockGroup> = self
            .groups(by_type)
            .into_iter()
            .map(|(name, (allocator, s))| {
                let pts: Vec<(f64, f64)> = self
                    .series
                    .iter()
                    .filter_map(|(t, p)| Some((*t, *p.get(&name)? as f64)))
                    .collect();
                BlockGroup {
                    growth_bytes_per_s: crate::trend::fit(&pts).map_or(0.0, |f| f.slope_per_s),
                    name,
                    allocator,
                    allocs: s.allocs,
                    frees: s.frees,
                    net_bytes: self.scaled(net(&s)),
                    unknown_frees: s.unknown_frees,
                    untracked: s.untracked,
                    median_size: median_of(&s.sizes),
                }
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.net_bytes));
        rows
    }

    /// The evidence for the recording.
    pub fn evidence(&self, attached_at_s: Option<f64>, reason: String) -> BlockEvidence {
        let allocators = self.rows(false);
        let mut types = self.rows(true);
        types.truncate(MAX_TYPES);
        let kept: Vec<&str> = allocators
            .iter()
            .chain(&types)
            .map(|g| g.name.as_str())
            .collect();
        let series = self
            .series
            .iter()
            .map(|(t, p)| BlockPoint {
                t_s: *t,
                by_group: p
                    .iter()
                    .filter(|(k, _)| kept.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
            })
            .collect();
        BlockEvidence {
            attached_at_s,
            reason,
            functions: self.functions.clone(),
            allocators,
            types,
            series,
            ..Default::default()
        }
    }
}

/// What the block probes saw, a few lines for people: the top allocators, and with a VM
/// connection the VM's own change of used bytes beside the probes' and why they differ.
pub fn summary_lines(rec: &crate::recording::Recording) -> Vec<String> {
    use crate::units::human_bytes;
    let Some(b) = rec.blocks.as_ref() else {
        return Vec::new();
    };
    let Some(at) = b.attached_at_s else {
        return vec![b.reason.clone()];
    };
    let mut out = Vec::new();
    let top: Vec<String> = b
        .allocators
        .iter()
        .take(4)
        .map(|g| {
            format!(
                "{} {} ({} allocated, {} freed, {} frees of older blocks)",
                g.name,
                human_bytes(g.net_bytes as f64),
                g.allocs,
                g.frees,
                g.unknown_frees
            )
        })
        .collect();
    out.push(format!(
        "since {at:.1} s (probe-derived, blocks from before attach not included): {}",
        if top.is_empty() {
            "no block calls".to_owned()
        } else {
            top.join("; ")
        }
    ));
    let probe = rec
        .samples
        .iter()
        .filter_map(|s| s.blocks_net)
        .collect::<Vec<_>>();
    let vm: Vec<(f64, u64)> = rec
        .samples
        .iter()
        .filter(|s| s.blocks_net.is_some())
        .filter_map(|s| Some((s.t_s, s.vm_used?)))
        .collect();
    if let (Some(p0), Some(p1), Some(v0), Some(v1)) =
        (probe.first(), probe.last(), vm.first(), vm.last())
    {
        let unknown: u64 = b.allocators.iter().map(|g| g.unknown_frees).sum();
        out.push(format!(
            "probes {} vs VM vm_used {} over the same samples: the VM counts block headers and blocks freed that were allocated before attach ({unknown} such frees, sizes unknown to the probes)",
            human_bytes((p1 - p0) as f64),
            human_bytes(v1.1 as f64 - v0.1 as f64)
        ));
    }
    if let Some(s) = &b.sampling {
        out.push(format!("sampled: {s}"));
    }
    if let Some(t) = b.detached_at_s {
        out.push(format!(
            "detached at {t:.1} s by --max-overhead: figures frozen there"
        ));
    }
    if b.live_full + b.types_full > 0 {
        out.push(format!(
            "{} blocks untracked (live map full), {} calls uncounted (type map full): block figures are lower bounds",
            b.live_full, b.types_full
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> TypeNames {
        let mut allocators = vec![None; 14];
        allocators[6] = Some("ets".to_owned());
        let mut types = vec![None; 232];
        types[40] = Some("DB_TERM".to_owned());
        types[41] = Some("DB_TABLE".to_owned());
        TypeNames::from_tables(allocators, types)
    }

    fn stats(allocs: u64, frees: u64, size: u64) -> BlockStats {
        let mut s = BlockStats {
            allocs,
            frees,
            bytes_allocated: allocs * size,
            bytes_freed: frees * size,
            ..Default::default()
        };
        s.sizes[63 - size.leading_zeros() as usize] = allocs;
        s.lifetimes[3] = frees;
        s
    }

    #[test]
    fn types_are_named_from_the_node_tables() {
        let n = names();
        assert_eq!(n.of((40 << 7) | 6), ("ets_alloc".into(), "db_term".into()));
        assert_eq!(
            n.of((200 << 7) | 9),
            ("allocator 9".into(), "type 200".into())
        );
    }

    #[test]
    fn groups_sum_types_and_rank_by_growth() {
        let mut l = BlockLedger::new(names(), vec![]);
        l.update([
            ((40 << 7) | 6, stats(10, 2, 100)),
            ((41 << 7) | 6, stats(3, 3, 64)),
        ]);
        l.record_point(1.0);
        l.update([
            ((40 << 7) | 6, stats(20, 2, 100)),
            ((41 << 7) | 6, stats(3, 3, 64)),
        ]);
        l.record_point(2.0);
        let e = l.evidence(Some(0.0), "--blocks".into());
        assert_eq!(e.allocators.len(), 1);
        assert_eq!(e.allocators[0].net_bytes, 1800);
        assert_eq!(e.types[0].name, "ets_alloc: db_term");
        assert!((e.types[0].growth_bytes_per_s - 1000.0).abs() < 1e-6);
        assert_eq!(e.types[1].net_bytes, 0);
        assert_eq!(e.types[0].median_size, 64);
        assert_eq!(l.net_total(), 1800);
    }

    #[test]
    fn histograms_take_only_what_is_new_and_censor_the_live() {
        let mut l = BlockLedger::new(names(), vec![]);
        let mut h = Histograms::default();
        l.update([((40 << 7) | 6, stats(10, 2, 100))]);
        l.histograms_into(&mut h);
        h.close_interval(1.0);
        l.update([((40 << 7) | 6, stats(15, 2, 100))]);
        l.histograms_into(&mut h);
        h.close_interval(2.0);
        l.censor_into(&mut h);
        let sizes = h
            .series
            .iter()
            .find(|s| s.name == "block_size/ets_alloc")
            .unwrap();
        let counts: Vec<u64> = sizes
            .intervals
            .iter()
            .map(|i| i.decode().unwrap().len())
            .collect();
        assert_eq!(counts, vec![10, 5]);
        let life = h
            .series
            .iter()
            .find(|s| s.name == "block_lifetime/ets_alloc")
            .unwrap();
        assert_eq!(life.censored, 13);
        // The same per type.
        let by_type = h
            .series
            .iter()
            .find(|s| s.name == "block_size/ets_alloc: db_term")
            .unwrap();
        assert_eq!(by_type.intervals.len(), 2);
    }
}
