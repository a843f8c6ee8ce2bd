//! Where the target's resident memory lay: the model of the breakdown at attach and at the end
//! (measured by `target::breakdown`).

use serde::{Deserialize, Serialize};

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
