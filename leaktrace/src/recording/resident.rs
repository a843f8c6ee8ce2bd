//! Where the target's resident memory lay: the model of the breakdown at attach and at the end
//! (measured by `target::breakdown`).

use serde::{Deserialize, Serialize};

use super::Recording;

/// The VM's own carrier bytes (allocated) at attach (`label` "at attach": the first sample with
/// VM figures) or at the end (the last one), to stand beside the resident carrier figure.
pub fn vm_carriers_near(rec: &Recording, label: &str) -> Option<u64> {
    let mut with_vm = rec.samples.iter().filter_map(|s| s.vm_allocated);
    if label == "at attach" {
        with_vm.next()
    } else {
        with_vm.next_back()
    }
}

/// Resident bytes of the target, by where they lie. Bytes; `None` where unknown.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// RSS (`/proc/PID/status` VmRSS).
    pub rss: u64,
    /// File-backed resident bytes (beam.smp, libraries, other files).
    pub file: u64,
    /// Resident bytes of ERTS carriers (ranges the carrier probes know); `None` without them.
    pub erts_carriers: Option<u64>,
    /// Resident bytes of the mseg cache (ERTS mappings not holding a carrier).
    pub mseg_cache: Option<u64>,
    /// Resident bytes of glibc's main heap and thread arenas (ERTS ranges excluded).
    pub malloc_arenas: u64,
    /// Bytes glibc counts as in use in its arenas (heap walker); `None` until it answered.
    pub malloc_in_use: Option<u64>,
    /// Bytes glibc holds free in its arenas (heap walker); `None` until it answered.
    pub malloc_free: Option<u64>,
    /// What the walk of glibc's arenas found (sizes of the chunks in use, notes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malloc_walk: Option<HeapSummary>,
    /// Why glibc's arenas were not walked (the mapped and resident figures stand alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malloc_unwalked: Option<String>,
    /// Resident bytes of thread stacks.
    pub thread_stacks: u64,
    /// Resident bytes of other anonymous mappings (ERTS ranges excluded).
    pub other_anon: u64,
    /// RSS minus every line above (shared-page rounding, pages the maps changed under us).
    pub unaccounted: Option<i64>,
    /// File-backed resident bytes by object, largest first.
    #[serde(default)]
    pub by_object: Vec<(String, u64)>,
    /// ERTS carriers' resident bytes by allocator, largest first.
    #[serde(default)]
    pub by_allocator: Vec<(String, u64)>,
}

impl Breakdown {
    /// Resident bytes outside every ERTS carrier and file: arenas, other anonymous mappings and
    /// what nothing accounts for (negative remainders count as 0).
    pub fn outside_vm(&self) -> u64 {
        self.malloc_arenas + self.other_anon + self.unaccounted.unwrap_or(0).max(0) as u64
    }
}

/// The resident breakdown at attach and at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResidentLevels {
    /// Measured right after the probes were placed.
    pub at_attach: Option<Breakdown>,
    /// Measured when tracing stopped (`None` when the target had exited).
    pub at_end: Option<Breakdown>,
}

/// What the walk found. All byte figures are chunk sizes (headers included).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeapSummary {
    /// glibc release of the target, from its libc.
    pub glibc: String,
    /// Arenas walked (the main one and thread arenas).
    pub arenas: u64,
    /// Bytes of arena heap walked.
    pub heap_bytes: u64,
    /// Bytes in chunks the program holds.
    pub in_use_bytes: u64,
    /// Chunks the program holds.
    pub in_use_chunks: u64,
    /// Bytes free inside the arenas: bins, fastbins, tcache and top chunks.
    pub free_bytes: u64,
    /// Of `free_bytes`: the top chunks (what `malloc_trim` returns first).
    pub top_bytes: u64,
    /// Of `free_bytes`: chunks parked in fastbins and per-thread caches.
    pub cached_bytes: u64,
    /// Chunks in use by log2 of their size: (lower bound in bytes, chunks, bytes).
    pub in_use_sizes: Vec<(u64, u64, u64)>,
    /// Whether every arena was walked to its end.
    pub complete: bool,
    /// Why parts were not walked (a check that failed, a bound reached).
    pub notes: Vec<String>,
    /// How long the walk took.
    pub walk_ms: f64,
    /// Address ranges of the thread arenas' heaps walked (64 MiB reservations each): what tells
    /// them apart in the maps, where adjacent heaps merge into one mapping.
    #[serde(skip)]
    pub heaps: Vec<(u64, u64)>,
}
