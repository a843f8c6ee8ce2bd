//! What the block probes (`--blocks`, `erts_alcu_*`) saw, as a recording holds it: ERTS blocks
//! by allocator and by type since the probes attached.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Block-level evidence of a run. Every figure is a change since the probes attached: blocks
/// allocated before are seen only when freed (`unknown_frees`), their sizes never guessed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockEvidence {
    /// Seconds since attach when the block probes attached (None: never).
    pub attached_at_s: Option<f64>,
    /// Seconds since attach when they were detached early (`--max-overhead`), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at_s: Option<f64>,
    /// Why they attached, were detached, or did not attach.
    pub reason: String,
    /// The `erts_alcu_*` functions probed (the ones `erts_allctrs[]` points to).
    #[serde(default)]
    pub functions: Vec<String>,
    /// Per allocator, largest net growth first.
    pub allocators: Vec<BlockGroup>,
    /// Per ERTS type (`allocator: type`), largest net growth first; [`MAX_TYPES`] at most.
    pub types: Vec<BlockGroup>,
    /// Net block bytes per allocator (and `total`), one point per sample after attach.
    pub series: Vec<BlockPoint>,
    /// Blocks allocated while the live-block map was full (their frees become unknown frees).
    pub live_full: u64,
    /// Calls not counted at all: the per-type map was full.
    pub types_full: u64,
    /// `--blocks sampled`: how allocations were sampled and by what net figures were scaled
    /// (None: every call watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<String>,
    /// Estimated share of one CPU the block probes cost (hits/s x cost a hit), at the end or
    /// when detached.
    #[serde(default)]
    pub overhead_cpu_share: f64,
}

/// Most types a recording keeps (by net growth).
pub const MAX_TYPES: usize = 64;

/// Blocks of one allocator or one type since attach.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockGroup {
    /// `ets_alloc`, or `ets_alloc: db_term` for a type.
    pub name: String,
    /// The allocator (same as `name` for an allocator row).
    pub allocator: String,
    /// Blocks allocated.
    pub allocs: u64,
    /// Of those, freed.
    pub frees: u64,
    /// Bytes allocated minus bytes freed of them.
    pub net_bytes: i64,
    /// Frees of blocks allocated before attach (sizes unknown).
    pub unknown_frees: u64,
    /// Blocks not tracked (map full).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub untracked: u64,
    /// Least-squares growth of `net_bytes` over the samples since attach.
    pub growth_bytes_per_s: f64,
    /// Median allocation size (log2 bucket lower bound), bytes.
    #[serde(default)]
    pub median_size: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Net block bytes at one sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockPoint {
    /// Seconds since attach.
    pub t_s: f64,
    /// Allocator name (or `allocator: type` for the kept types) -> net bytes since attach.
    pub by_group: BTreeMap<String, i64>,
}
