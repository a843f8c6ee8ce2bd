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
}
