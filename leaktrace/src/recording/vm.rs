//! The VM's own figures as a recording holds them: allocator samples, the Erlang-level census,
//! and what was missing. Filled by the VM view (`crate::vm`), read by the verdict and reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the VM reported during the run (read-only calls over distribution).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmEvidence {
    /// Node connected to.
    pub node: String,
    /// How the node was found (`-sname on the command line`, `epmd: ...`, `--node`).
    #[serde(default)]
    pub found_by: String,
    /// Allocator figures, one per sample that answered.
    pub samples: Vec<VmSample>,
    /// Erlang-level census at the start of the run.
    pub census_start: Option<Census>,
    /// The latest Erlang-level census (at the end of the run when the node answered in time).
    pub census_end: Option<Census>,
    /// ERTS allocators the node runs without (`+M<x>e false`, `+Mea min`): their memory comes
    /// from malloc, outside any carrier.
    #[serde(default)]
    pub disabled_allocators: Vec<String>,
    /// Samples the node did not answer in time, or answered with an error.
    #[serde(default)]
    pub gaps: Vec<VmGap>,
    /// Gaps past the first [`MAX_GAPS`], counted and not kept.
    #[serde(default)]
    pub gaps_dropped: u64,
    /// Seconds between two censuses during the run (they are spaced so that their cost on the
    /// node stays under 0.5% of one scheduler, samples included it stays under 1%).
    #[serde(default)]
    pub census_every_s: Option<f64>,
    /// Every carrier of the node by allocator (`instrument:carriers/0`), taken once at the end
    /// of the run (absent in recordings made without it).
    #[serde(default)]
    pub carriers: Option<CarrierPicture>,
}

/// Most gaps a recording keeps: a node that fails every call must not grow the recording.
pub const MAX_GAPS: usize = 100;
/// Longest text kept from a node in one reason, in bytes.
pub const MAX_REASON: usize = 300;

/// `text` cut to at most [`MAX_REASON`] bytes on a character boundary, with "…" when cut.
pub fn cut_text(text: &str) -> String {
    if text.len() <= MAX_REASON {
        return text.to_owned();
    }
    let mut end = MAX_REASON;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl VmEvidence {
    /// Records a gap: its reason cut to [`MAX_REASON`], and only counted past [`MAX_GAPS`].
    pub fn add_gap(&mut self, t_s: f64, reason: &str) {
        if self.gaps.len() >= MAX_GAPS {
            self.gaps_dropped += 1;
            return;
        }
        self.gaps.push(VmGap {
            t_s,
            reason: cut_text(reason),
        });
    }

    /// Gaps recorded, kept or not.
    pub fn gap_count(&self) -> u64 {
        self.gaps.len() as u64 + self.gaps_dropped
    }

    /// Whether the VM's own memory lives outside ERTS carriers (allocators disabled).
    pub fn memory_outside_carriers(&self) -> bool {
        self.disabled_allocators
            .iter()
            .any(|a| a != "sys_alloc" && a != "mseg_alloc")
    }
}

/// A sample the VM did not give.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmGap {
    /// Seconds since attach.
    pub t_s: f64,
    /// Why (timeout, error, the previous call still running).
    pub reason: String,
}

/// Used and allocated bytes of one allocator instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocatorUsage {
    /// Allocator (`ets_alloc`, ...).
    pub name: String,
    /// Instance number (0 is the global one).
    pub instance: u32,
    /// Bytes in blocks (mbcs + sbcs + mbcs_pool, blocks of every owner allocator).
    pub blocks: u64,
    /// Bytes in carriers (mbcs + sbcs + mbcs_pool).
    pub carriers: u64,
    /// Of `carriers`, bytes in carriers abandoned to the pool.
    pub pool_carriers: u64,
}

impl AllocatorUsage {
    /// Carrier bytes not holding blocks.
    pub fn free(&self) -> u64 {
        self.carriers.saturating_sub(self.blocks)
    }
}

/// The allocator figures of one sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmSample {
    /// Seconds since attach.
    pub t_s: f64,
    /// Every allocator instance.
    pub allocators: Vec<AllocatorUsage>,
    /// `erlang:memory()` by type (empty when the node answers `notsup`: allocators disabled).
    pub memory: BTreeMap<String, u64>,
}

impl VmSample {
    /// Sum of blocks of every allocator, literal_alloc included (persistent terms and module
    /// literals live there; recon_alloc leaves it out, which hides their growth).
    pub fn used(&self) -> u64 {
        self.allocators.iter().map(|a| a.blocks).sum()
    }

    /// Sum of carriers of every allocator, literal_alloc included.
    pub fn allocated(&self) -> u64 {
        self.allocators.iter().map(|a| a.carriers).sum()
    }

    /// Totals per allocator (all instances).
    pub fn by_allocator(&self) -> BTreeMap<String, AllocatorUsage> {
        let mut out: BTreeMap<String, AllocatorUsage> = BTreeMap::new();
        for a in &self.allocators {
            let e = out.entry(a.name.clone()).or_insert_with(|| AllocatorUsage {
                name: a.name.clone(),
                ..Default::default()
            });
            e.blocks += a.blocks;
            e.carriers += a.carriers;
            e.pool_carriers += a.pool_carriers;
        }
        out
    }
}

/// One process worth naming.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// `<0.123.0>`.
    pub pid: String,
    /// What an operator knows it by: registered name, else the proc_lib `'$initial_call'`
    /// (`my_server:init/1`), else `initial_call`.
    pub name: String,
    /// Current function `m:f/a`.
    pub current_function: String,
    /// `process_info(P, memory)`, bytes.
    pub memory: u64,
    /// Messages waiting.
    pub message_queue_len: u64,
    /// Bytes of the distinct refc binaries it references (each binary counted once, however
    /// many references the process holds to it), when measured.
    pub binary_bytes: Option<u64>,
    /// Of `binary_bytes`, bytes of binaries other processes (or tables) reference too.
    #[serde(default)]
    pub binary_shared_bytes: Option<u64>,
    /// References to refc binaries the process holds (sub-binaries and copies included).
    #[serde(default)]
    pub binary_refs: Option<u64>,
}

/// Processes sharing an initial call (a worker per request, a pool): the count is the culprit
/// when many small processes leak.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessGroup {
    /// The initial call (proc_lib's `'$initial_call'` where there is one), or the registered
    /// name of a lone process.
    pub name: String,
    /// Processes in the group.
    pub count: u64,
    /// Their memory, bytes.
    pub memory: u64,
    /// Their messages waiting.
    pub message_queue_len: u64,
}

/// One ETS table worth naming.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Table id as printed by the VM.
    pub id: String,
    /// Table name.
    pub name: String,
    /// Owner pid.
    pub owner: String,
    /// Registered name of the owner, when it has one.
    pub owner_name: Option<String>,
    /// Bytes.
    pub memory: u64,
    /// Objects.
    pub size: u64,
}

impl TableEntry {
    /// The owner pid, with its registered name when it has one: `<0.9.0> (lt_table_owner)`.
    pub fn owner_display(&self) -> String {
        match &self.owner_name {
            Some(n) => format!("{} ({n})", self.owner),
            None => self.owner.clone(),
        }
    }
}

/// `persistent_term:info()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistentTerms {
    /// Terms stored.
    pub count: u64,
    /// Bytes they take (in literal_alloc).
    pub memory: u64,
}

/// One port worth naming.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortEntry {
    /// `#Port<0.5>`.
    pub id: String,
    /// The command it was opened with (`tcp_inet`, `efile`, ...).
    pub name: String,
    /// The connected (owner) process, with its name when known.
    pub owner: String,
    /// `port_info(P, memory)`, bytes.
    pub memory: u64,
    /// Bytes queued in the port's driver (`queue_size`).
    pub queue_size: u64,
}

/// The node's ports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ports {
    /// Ports open.
    pub count: u64,
    /// Sum of their memory, bytes.
    pub memory: u64,
    /// Sum of their driver queues, bytes.
    pub queue_size: u64,
    /// The largest by memory plus queue.
    pub top: Vec<PortEntry>,
}

/// Loaded code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadedCode {
    /// Modules loaded (`erlang:loaded()`).
    pub modules: u64,
    /// `erlang:memory(code)`, when the node reports it.
    pub memory: Option<u64>,
}

/// How much of the node a census examined: it is capped so that one census stays cheap on a
/// node with millions of processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CensusLimits {
    /// Processes examined (memory, queue, initial call).
    pub processes_examined: u64,
    /// The cap on that.
    pub process_cap: u64,
    /// Processes whose binaries were listed (largest processes first).
    pub binary_processes_examined: u64,
    /// References to binaries read.
    pub binary_refs_examined: u64,
    /// The cap on references read per census.
    pub binary_ref_cap: u64,
    /// Ports examined.
    pub ports_examined: u64,
    /// proc_lib processes whose real initial call was read (a sample when fewer than
    /// `initial_calls_wrapped`: group figures are then estimates).
    #[serde(default)]
    pub initial_calls_read: u64,
    /// proc_lib processes examined.
    #[serde(default)]
    pub initial_calls_wrapped: u64,
    /// Wall time of the census, milliseconds.
    pub wall_ms: f64,
}

/// The Erlang-level checklist (Erlang in Anger, ch. 7) at one instant: the heaviest processes,
/// longest mailboxes, biggest binary holders, process groups, tables, persistent terms, ports,
/// loaded code, atoms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Census {
    /// Seconds since attach.
    pub t_s: f64,
    /// Processes on the node.
    pub process_count: u64,
    /// Top processes (union of the top-N by memory, by queue and by binaries).
    pub processes: Vec<ProcessEntry>,
    /// Whether binary_bytes were measured for every examined process.
    pub binaries_scanned: bool,
    /// Tables on the node.
    pub table_count: u64,
    /// Top tables by memory.
    pub tables: Vec<TableEntry>,
    /// Atoms in use.
    pub atom_count: u64,
    /// Atom table limit.
    pub atom_limit: u64,
    /// mseg_alloc's segment cache, all instances (absent in recordings without it).
    #[serde(default)]
    pub mseg: Option<MsegCache>,
    /// Processes grouped by initial call, largest groups first.
    #[serde(default)]
    pub groups: Vec<ProcessGroup>,
    /// Bytes of the distinct refc binaries the examined processes reference, each counted once
    /// node-wide.
    #[serde(default)]
    pub binary_distinct_bytes: Option<u64>,
    /// `persistent_term:info()`.
    #[serde(default)]
    pub persistent_term: Option<PersistentTerms>,
    /// Ports.
    #[serde(default)]
    pub ports: Option<Ports>,
    /// Loaded code.
    #[serde(default)]
    pub code: Option<LoadedCode>,
    /// `erlang:memory()` at the census (empty when the node answers `notsup`).
    #[serde(default)]
    pub memory: BTreeMap<String, u64>,
    /// What the census examined.
    #[serde(default)]
    pub limits: CensusLimits,
}

impl Census {
    /// What the census examined, for people: "12 examined, cap 250000; binaries of 11
    /// processes, 40 references" (and whether the reference cap was reached).
    pub fn examined(&self) -> String {
        let l = &self.limits;
        format!(
            "{} examined, cap {}; binaries of {} processes, {} references{}",
            l.processes_examined,
            l.process_cap,
            l.binary_processes_examined,
            l.binary_refs_examined,
            if self.binaries_scanned {
                ""
            } else {
                ", reference cap reached"
            }
        )
    }

    /// The process group called `name`, if the census has it.
    pub fn group(&self, name: &str) -> Option<&ProcessGroup> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// System memory not in atoms, binaries, code or ETS (`erlang:memory()`), when reported.
    pub fn system_other(&self) -> Option<u64> {
        let m = &self.memory;
        let system = *m.get("system")?;
        let parts: u64 = ["atom", "binary", "code", "ets"]
            .iter()
            .filter_map(|k| m.get(*k))
            .sum();
        Some(system.saturating_sub(parts))
    }
}

/// mseg_alloc's segment cache counters, summed over instances (`erlang:system_info({allocator,
/// mseg_alloc})`), as recon_alloc:cache_hit_rates/0 reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MsegCache {
    /// `mseg_alloc` calls: carriers asked of mseg.
    pub alloc_calls: u64,
    /// `mseg_create` calls: carriers that needed a new mapping (cache misses).
    pub create_calls: u64,
    /// Segments held in the cache now.
    pub cached_segments: u64,
}

impl MsegCache {
    /// Share of mseg allocations served from the cache, if any were made.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.alloc_calls > 0).then(|| {
            self.alloc_calls.saturating_sub(self.create_calls) as f64 / self.alloc_calls as f64
        })
    }

    /// Hit rate of the calls made between `start` and `self`.
    pub fn hit_rate_since(&self, start: &MsegCache) -> Option<f64> {
        MsegCache {
            alloc_calls: self.alloc_calls.saturating_sub(start.alloc_calls),
            create_calls: self.create_calls.saturating_sub(start.create_calls),
            cached_segments: self.cached_segments,
        }
        .hit_rate()
    }
}

/// A carrier whose live blocks take less than this share of it, and more than none, is pinned:
/// it cannot be given back while they live, and they are too few to fill it.
pub const PINNED_USAGE: f64 = 0.25;
/// Carriers per allocator whose figures are kept for the median and the extremes; past it they
/// are only counted (a node with millions of carriers must not grow the recording).
pub const CARRIERS_KEPT: usize = 20_000;
/// Allocator names a picture keeps: a real node has about a dozen.
pub const PICTURE_ALLOCATORS: usize = 64;
/// Buckets of the free-block histogram kept per allocator (OTP's default is 14).
pub const FREE_BUCKETS: usize = 64;
/// Emptiest and fullest carriers kept per allocator.
pub const EXTREMES: usize = 3;

/// One carrier as `instrument:carriers/0` reports it, checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CarrierEntry {
    /// Carrier size, bytes.
    pub size: u64,
    /// Whether it sits in the carrier pool (abandoned by its instance for others to fill).
    pub in_pool: bool,
    /// Live blocks in it.
    pub blocks: u64,
    /// Bytes of those blocks.
    pub block_bytes: u64,
    /// Free blocks (holes between live blocks) in it.
    pub free_holes: u64,
}

impl CarrierEntry {
    /// Share of the carrier its live blocks take.
    pub fn usage(&self) -> f64 {
        self.block_bytes as f64 / self.size.max(1) as f64
    }

    /// Held by live blocks that fill less than [`PINNED_USAGE`] of it.
    pub fn pinned(&self) -> bool {
        self.block_bytes > 0 && self.usage() < PINNED_USAGE
    }
}

/// The carrier options of an allocator that decide where blocks go (`+M<x>as`, `+M<x>acul`,
/// `+M<x>lmbcs`), as the node reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CarrierOptions {
    /// Allocation strategy (`aoffcbf`, `ageffcbf`, ...).
    pub strategy: Option<String>,
    /// Abandon carrier utilization limit, percent (0: carriers are never pooled).
    pub acul: Option<u64>,
    /// Largest multiblock carrier size, bytes.
    pub lmbcs: Option<u64>,
}

/// The carriers of one allocator type, all instances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocatorCarriers {
    /// Allocator (`ets_alloc`, ...).
    pub name: String,
    /// Carriers.
    pub carriers: u64,
    /// Their bytes.
    pub carrier_bytes: u64,
    /// Of `carriers`, those in the pool.
    pub pool_carriers: u64,
    /// Live blocks in them.
    pub blocks: u64,
    /// Bytes of those blocks.
    pub block_bytes: u64,
    /// Carriers without a live block (releasable, or the main carrier an instance keeps).
    pub empty: u64,
    /// Carriers pinned by few live blocks (usage under [`PINNED_USAGE`], above none).
    pub pinned: u64,
    /// Bytes of the pinned carriers.
    pub pinned_bytes: u64,
    /// Bytes of the live blocks in the pinned carriers.
    pub pinned_block_bytes: u64,
    /// Median live blocks per pinned carrier (of the kept carriers).
    pub pinned_median_blocks: Option<u64>,
    /// Free blocks (holes) in all its carriers: the free histogram's buckets summed.
    pub free_holes: u64,
    /// Free blocks by size: bucket `i` holds sizes below `histogram_start << i` (the last has
    /// no upper bound).
    pub free_histogram: Vec<u64>,
    /// Bytes of its carriers the node did not scan (it skips what would harm responsiveness).
    pub unscanned_bytes: u64,
    /// Carriers the median and the extremes were taken from (the first [`CARRIERS_KEPT`]).
    pub kept: u64,
    /// Emptiest carriers holding live blocks, emptiest first.
    pub emptiest: Vec<CarrierEntry>,
    /// Fullest carriers, fullest first.
    pub fullest: Vec<CarrierEntry>,
    /// Its carrier options, when the node reported them.
    #[serde(default)]
    pub options: Option<CarrierOptions>,
}

impl AllocatorCarriers {
    /// Share of the pinned carriers their live blocks take (0 without pinned carriers).
    pub fn pinned_usage(&self) -> f64 {
        self.pinned_block_bytes as f64 / self.pinned_bytes.max(1) as f64
    }
}

/// Every carrier of the node at one instant (`instrument:carriers/0`), by allocator: why
/// free carrier space cannot go back to the OS.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CarrierPicture {
    /// Seconds since attach.
    pub t_s: f64,
    /// Wall time of the calls, milliseconds.
    pub wall_ms: f64,
    /// Carriers the node's allocator figures counted before the call (what bounds its cost).
    pub carriers_counted: u64,
    /// Why there is no picture (too many carriers, the call failed), when there is none.
    pub skipped: Option<String>,
    /// The call loaded OTP's `instrument` module on the node (it was not loaded before).
    pub loaded_instrument: bool,
    /// Upper bound of the first free-histogram bucket, bytes.
    pub histogram_start: u64,
    /// Entries of the reply dropped because their shape or figures made no sense.
    pub rejected: u64,
    /// By allocator, most carrier bytes first.
    pub allocators: Vec<AllocatorCarriers>,
}

impl CarrierPicture {
    /// The carriers of allocator `name`, if the picture has them.
    pub fn allocator(&self, name: &str) -> Option<&AllocatorCarriers> {
        self.allocators.iter().find(|a| a.name == name)
    }
}

/// Sums carriers into a [`CarrierPicture`]'s per-allocator figures, keeping at most
/// [`CARRIERS_KEPT`] carriers per allocator and [`PICTURE_ALLOCATORS`] allocators.
#[derive(Debug, Default)]
pub struct CarrierTally {
    by_name: BTreeMap<String, (AllocatorCarriers, Vec<CarrierEntry>)>,
}

impl CarrierTally {
    /// Adds one carrier of `allocator` with its free histogram and unscanned bytes; false
    /// when the allocator would exceed [`PICTURE_ALLOCATORS`] (the carrier is not counted).
    pub fn add(&mut self, allocator: &str, c: CarrierEntry, free: &[u64], unscanned: u64) -> bool {
        if !self.by_name.contains_key(allocator) {
            if self.by_name.len() >= PICTURE_ALLOCATORS {
                return false;
            }
            self.by_name.insert(
                allocator.to_owned(),
                (
                    AllocatorCarriers {
                        name: allocator.to_owned(),
                        ..Default::default()
                    },
                    Vec::new(),
                ),
            );
        }
        let Some((a, kept)) = self.by_name.get_mut(allocator) else {
            return false;
        };
        a.carriers += 1;
        a.carrier_bytes = a.carrier_bytes.saturating_add(c.size);
        a.pool_carriers += u64::from(c.in_pool);
        a.blocks = a.blocks.saturating_add(c.blocks);
        a.block_bytes = a.block_bytes.saturating_add(c.block_bytes);
        a.unscanned_bytes = a.unscanned_bytes.saturating_add(unscanned);
        if c.block_bytes == 0 {
            a.empty += 1;
        }
        if c.pinned() {
            a.pinned += 1;
            a.pinned_bytes = a.pinned_bytes.saturating_add(c.size);
            a.pinned_block_bytes = a.pinned_block_bytes.saturating_add(c.block_bytes);
        }
        let mut holes = 0u64;
        for (i, n) in free.iter().take(FREE_BUCKETS).enumerate() {
            if a.free_histogram.len() <= i {
                a.free_histogram.push(0);
            }
            a.free_histogram[i] = a.free_histogram[i].saturating_add(*n);
            holes = holes.saturating_add(*n);
        }
        a.free_holes = a.free_holes.saturating_add(holes);
        if kept.len() < CARRIERS_KEPT {
            kept.push(CarrierEntry {
                free_holes: holes,
                ..c
            });
        }
        true
    }

    /// The per-allocator figures, most carrier bytes first.
    pub fn finish(self) -> Vec<AllocatorCarriers> {
        let mut out: Vec<AllocatorCarriers> = self
            .by_name
            .into_values()
            .map(|(mut a, mut kept)| {
                a.kept = kept.len() as u64;
                let mut pinned: Vec<u64> = kept
                    .iter()
                    .filter(|c| c.pinned())
                    .map(|c| c.blocks)
                    .collect();
                pinned.sort_unstable();
                a.pinned_median_blocks = pinned.get(pinned.len() / 2).copied();
                kept.retain(|c| c.block_bytes > 0);
                kept.sort_by(|x, y| x.usage().total_cmp(&y.usage()));
                a.emptiest = kept.iter().take(EXTREMES).copied().collect();
                a.fullest = kept.iter().rev().take(EXTREMES).copied().collect();
                a
            })
            .collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.carrier_bytes));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_keep_the_first_hundred_with_short_reasons_and_count_the_rest() {
        let mut e = VmEvidence::default();
        let huge = "x".repeat(1 << 20);
        for i in 0..1000 {
            e.add_gap(f64::from(i), &huge);
        }
        assert_eq!(e.gaps.len(), MAX_GAPS);
        assert_eq!(e.gaps_dropped, 900);
        assert_eq!(e.gap_count(), 1000);
        assert!(
            e.gaps
                .iter()
                .all(|g| g.reason.len() <= MAX_REASON + "…".len())
        );
        // Recordings written before the count load with none dropped.
        let old: VmEvidence = serde_json::from_str(
            r#"{"node":"a@b","samples":[],"census_start":null,"census_end":null,"gaps":[{"t_s":1.0,"reason":"slow"}]}"#,
        )
        .unwrap();
        assert_eq!((old.gaps.len(), old.gaps_dropped), (1, 0));
    }
    fn carrier(size: u64, blocks: u64, block_bytes: u64, in_pool: bool) -> CarrierEntry {
        CarrierEntry {
            size,
            in_pool,
            blocks,
            block_bytes,
            free_holes: 0,
        }
    }

    #[test]
    fn a_carrier_is_pinned_by_live_blocks_under_a_quarter_of_it() {
        assert!(carrier(1000, 3, 249, false).pinned());
        assert!(!carrier(1000, 3, 250, false).pinned());
        assert!(
            !carrier(1000, 0, 0, false).pinned(),
            "an empty carrier can go back"
        );
    }

    #[test]
    fn the_tally_sums_by_allocator_and_takes_the_median_of_pinned_carriers() {
        const MB8: u64 = 8 << 20;
        let mut t = CarrierTally::default();
        // Three carriers pinned by 10, 20 and 700 blocks, one full, one empty.
        for (blocks, bytes) in [(10, 5_000), (700, 400_000), (20, 9_000)] {
            assert!(t.add(
                "ets_alloc",
                carrier(MB8, blocks, bytes, true),
                &[1, 2, 700],
                0
            ));
        }
        assert!(t.add(
            "ets_alloc",
            carrier(MB8, 9_000, 7 << 20, false),
            &[0, 1],
            4096
        ));
        assert!(t.add("ets_alloc", carrier(65536, 0, 0, false), &[1], 0));
        assert!(t.add("binary_alloc", carrier(65536, 1, 100, false), &[], 0));
        let out = t.finish();
        assert_eq!(
            out.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["ets_alloc", "binary_alloc"]
        );
        let e = &out[0];
        assert_eq!(
            (e.carriers, e.pool_carriers, e.empty, e.pinned),
            (5, 3, 1, 3)
        );
        assert_eq!(e.carrier_bytes, 4 * MB8 + 65536);
        assert_eq!(e.blocks, 10 + 700 + 20 + 9_000);
        assert_eq!(e.pinned_bytes, 3 * MB8);
        assert_eq!(e.pinned_block_bytes, 414_000);
        assert_eq!(e.pinned_median_blocks, Some(20));
        assert_eq!(e.free_holes, 3 * 703 + 1 + 1);
        assert_eq!(e.free_histogram, vec![4, 7, 2100]);
        assert_eq!(e.unscanned_bytes, 4096);
        assert_eq!(e.emptiest[0].blocks, 10, "{:?}", e.emptiest);
        assert_eq!(e.emptiest.len(), EXTREMES);
        assert_eq!(e.fullest[0].blocks, 9_000, "{:?}", e.fullest);
        assert!((e.pinned_usage() - 414_000.0 / (3 * MB8) as f64).abs() < 1e-9);
    }

    #[test]
    fn the_tally_keeps_bounded_carriers_and_allocators() {
        let mut t = CarrierTally::default();
        for i in 0..(CARRIERS_KEPT as u64 + 10) {
            t.add(
                "ets_alloc",
                carrier(1 << 20, 1 + i % 5, 64, false),
                &[1; 200],
                0,
            );
        }
        for i in 0..(PICTURE_ALLOCATORS + 5) {
            t.add(&format!("a{i}"), carrier(1, 0, 0, false), &[], 0);
        }
        let out = t.finish();
        assert_eq!(out.len(), PICTURE_ALLOCATORS);
        let e = out.iter().find(|a| a.name == "ets_alloc").unwrap();
        assert_eq!(
            e.carriers,
            CARRIERS_KEPT as u64 + 10,
            "every carrier counted"
        );
        assert_eq!(e.kept, CARRIERS_KEPT as u64);
        assert_eq!(e.free_histogram.len(), FREE_BUCKETS);
        assert_eq!(e.pinned_median_blocks, Some(3));
    }

    #[test]
    fn recordings_without_a_carrier_picture_load() {
        let old: VmEvidence = serde_json::from_str(
            r#"{"node":"a@b","samples":[],"census_start":null,"census_end":null}"#,
        )
        .unwrap();
        assert!(old.carriers.is_none());
    }
}
