//! What the native probes saw, as a recording holds it: allocation sites grouped by the object
//! that made the calls, and their outstanding bytes over time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Native allocation evidence of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NativeEvidence {
    /// Seconds since attach when the libc probes attached (None: never).
    pub attached_at_s: Option<f64>,
    /// Why they attached, or why not.
    pub reason: String,
    /// The libc the probes are on.
    #[serde(default)]
    pub libc: Option<String>,
    /// Per object (NIF, driver, library, beam.smp itself), largest outstanding first.
    pub modules: Vec<NativeModule>,
    /// Outstanding bytes per object, one point per sample after attach.
    pub series: Vec<NativePoint>,
    /// Frees of addresses never seen allocated (allocated before attach, or untracked).
    pub unknown_frees: u64,
    /// Allocations not tracked because the outstanding map was full.
    pub outstanding_full: u64,
    /// Allocations not tracked because the site map was full.
    pub sites_full: u64,
    /// Calls whose return was never seen (a slot older than a second replaced).
    pub stale_calls: u64,
    /// Frames of user stack asked for with `--stacks` (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stack_depth: u32,
    /// With `--stacks`: allocation stacks (frame-pointer walks, best effort), largest
    /// outstanding first, [`MAX_STACKS`] at most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacks: Vec<NativeStack>,
    /// With `--stacks`: stacks the kernel walked fewer than 2 frames of (code without frame
    /// pointers ends the walk) or as many as it keeps (deeper frames cut off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stacks_truncated: Option<u64>,
    /// With `--stacks`: calls whose stack was not recorded (the stack map full or its bucket
    /// taken, an unreadable stack, the (site, stack) map full); their sites count them still.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_errors: Option<u64>,
    /// Seconds since attach when the probes were detached for costing more than
    /// `--max-overhead` (None: they stayed); figures after it are frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at_s: Option<f64>,
    /// Share of one CPU the probes cost at the last estimate (hits/s x cost per hit).
    #[serde(default)]
    pub overhead_cpu_share: f64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// Most stacks a recording keeps.
pub const MAX_STACKS: usize = 200;

/// Native allocations made through one user stack (`--stacks`), since the probes attached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NativeStack {
    /// Innermost first, `object: function` (or `object: 0xADDRESS` without a symbol). The first
    /// is the allocating call's site (its return address, exact without frame pointers); the
    /// rest are what the kernel's frame-pointer walk found past it.
    pub frames: Vec<String>,
    /// Allocated through the NIF/driver API (inside ERTS carriers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nif_api: bool,
    /// Allocations made.
    pub allocations: u64,
    /// Of those, freed.
    pub frees: u64,
    /// Bytes allocated and not freed.
    pub outstanding_bytes: i64,
}

impl NativeEvidence {
    /// Events the verdict cannot see: figures resting on them are lower bounds.
    pub fn lossy(&self) -> bool {
        self.outstanding_full + self.sites_full > 0
    }
}

/// One object's native allocations since the probes attached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NativeModule {
    /// File name of the object (`lt_native.so`, `libcrypto.so.3`, `beam.smp`).
    pub module: String,
    /// Allocated through the NIF/driver API: the memory is inside ERTS carriers (driver_alloc,
    /// binary_alloc), so it is never in `native_outstanding`.
    #[serde(default)]
    pub nif_api: bool,
    /// Path as the target maps it.
    pub path: String,
    /// beam.smp itself: its libc use is ERTS carriers and internals, counted by the carrier
    /// probes and the VM view, so never in `native_outstanding`.
    pub is_emulator: bool,
    /// The function with the most outstanding bytes, when the object has symbols.
    pub function: Option<String>,
    /// Allocations made.
    pub allocations: u64,
    /// Of those, freed.
    pub frees: u64,
    /// Bytes allocated and not freed.
    pub outstanding_bytes: i64,
    /// Distinct call sites.
    pub sites: u64,
    /// Allocations not tracked (the outstanding map was full): made here, fate unknown.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub untracked: u64,
    /// Their bytes: at most this much more may be outstanding.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub untracked_bytes: u64,
    /// Least-squares growth of `outstanding_bytes` over the samples since attach.
    #[serde(default)]
    pub growth_bytes_per_s: f64,
    /// Outstanding bytes per function (symbolized sites), largest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<(String, i64)>,
}

impl NativeModule {
    /// Its key in [`NativePoint::by_module`]: NIF API memory apart from the object's libc use.
    pub fn series_key(&self) -> String {
        series_key(&self.module, self.nif_api)
    }
}

/// The key of an object's figures in [`NativePoint::by_module`].
pub fn series_key(module: &str, nif_api: bool) -> String {
    if nif_api {
        format!("{module} (NIF API)")
    } else {
        module.to_owned()
    }
}

/// Outstanding bytes per object at one sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NativePoint {
    /// Seconds since attach.
    pub t_s: f64,
    /// Object file name -> outstanding bytes.
    pub by_module: BTreeMap<String, i64>,
}
