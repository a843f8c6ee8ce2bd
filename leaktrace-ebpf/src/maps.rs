//! Maps shared by all probe families, and the counters every probe bumps.

use core::cell::UnsafeCell;

use aya_ebpf::{
    bindings::{bpf_map_def, bpf_map_type::BPF_MAP_TYPE_STACK_TRACE},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use leaktrace_common::{
    BlockLive, BlockPending, BlockStats, NativeHist, NativeOutstanding, NativePending, NativeSite,
    NifResource, PendingCall, StackSiteKey, block, counter, native_config, native_limits,
};

/// Carrier events to userspace. Carrier calls are rare (hundreds a second on a busy node),
/// so 1 MiB holds seconds of backlog.
#[map]
pub static CARRIER_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Arguments saved by entry probes for their return probes, keyed by `pending_key(tid, probe)`.
#[map]
pub static PENDING: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

/// Native calls in flight, one per thread (the outermost).
#[map]
pub static NATIVE_PENDING: HashMap<u32, NativePending> =
    HashMap::with_max_entries(native_limits::PENDING, 0);

/// Native allocations not yet freed, by address.
#[map]
pub static NATIVE_OUTSTANDING: HashMap<u64, NativeOutstanding> =
    HashMap::with_max_entries(native_limits::OUTSTANDING, 0);

/// Totals per allocation site (return address), per CPU (a free on another CPU than its
/// allocation adds to that CPU's copy; userspace sums them), read by userspace each interval.
#[map]
pub static NATIVE_SITES: PerCpuHashMap<u64, NativeSite> =
    PerCpuHashMap::with_max_entries(native_limits::SITES, 0);

/// Resource objects the NIF code holds references to, by address.
#[map]
pub static NIF_RESOURCES: HashMap<u64, NifResource> =
    HashMap::with_max_entries(native_limits::OUTSTANDING, 0);

/// Options userspace writes before attaching the native probes (indices in `native_config`).
#[map]
pub static NATIVE_CONFIG: Array<u32> = Array::with_max_entries(native_config::LEN, 0);

/// A stack trace map of `native_limits::STACK_DEPTH` frames a stack: aya's `StackTrace` holds
/// 127, four times the memory (the map is preallocated, also when `--stacks` is off), and the
/// kernel walks as many frames as a value holds.
#[repr(transparent)]
pub struct StackMap(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read (by the loader, which relocates references to it).
unsafe impl Sync for StackMap {}

impl StackMap {
    /// The map, for `bpf_get_stackid`.
    #[inline(always)]
    pub fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.get().cast()
    }
}

/// User stacks of native allocation calls (`--stacks`), by stack id: return addresses,
/// innermost first, zero-filled past the last frame.
#[map]
pub static STACKS: StackMap = StackMap(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_STACK_TRACE,
    key_size: size_of::<u32>() as u32,
    value_size: native_limits::STACK_DEPTH * size_of::<u64>() as u32,
    max_entries: native_limits::STACKS,
    map_flags: 0,
    id: 0,
    pinning: 0,
}));

/// Totals per (site, user stack), per CPU, as `NATIVE_SITES` per site (`--stacks`).
#[map]
pub static STACK_SITES: PerCpuHashMap<StackSiteKey, NativeSite> =
    PerCpuHashMap::with_max_entries(native_limits::STACK_SITES, 0);

/// Size and lifetime buckets per native allocation site (the first HIST_SITES), per CPU.
#[map]
pub static NATIVE_HIST: PerCpuHashMap<u64, NativeHist> =
    PerCpuHashMap::with_max_entries(native_limits::HIST_SITES, 0);

/// A zeroed [`NativeHist`] to create entries from (kept off the small BPF stack).
#[map]
pub static NATIVE_HIST_ZERO: PerCpuArray<NativeHist> = PerCpuArray::with_max_entries(1, 0);

/// `--blocks`: blocks allocated since attach and not yet freed, by address.
#[map]
pub static BLOCK_LIVE: HashMap<u64, BlockLive> = HashMap::with_max_entries(block::LIVE, 0);

/// `--blocks`: the erts_alcu call in flight, per thread.
#[map]
pub static BLOCK_PENDING: HashMap<u32, BlockPending> = HashMap::with_max_entries(16384, 0);

/// `--blocks`: totals, size and lifetime buckets per ERTS type, per CPU.
#[map]
pub static BLOCK_STATS: PerCpuHashMap<u32, BlockStats> =
    PerCpuHashMap::with_max_entries(block::TYPES, 0);

/// A zeroed [`BlockStats`] to create entries from (too large for the BPF stack).
#[map]
pub static BLOCK_ZERO: PerCpuArray<BlockStats> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters: losses, errors and probe hits (indices in `leaktrace_common::counter`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Adds one to counter `index` on this CPU.
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, and a BPF program is not preempted on its CPU.
        unsafe { *slot += 1 };
    }
}

/// Counts a hit of probe `id`.
#[inline(always)]
pub fn hit(id: u32) {
    bump(counter::HITS_BASE + id);
}
