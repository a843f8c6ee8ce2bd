//! Maps shared by all probe families, and the counters every probe bumps.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use leaktrace_common::{
    NativeOutstanding, NativePending, NativeSite, NifResource, PendingCall, counter, native_limits,
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
