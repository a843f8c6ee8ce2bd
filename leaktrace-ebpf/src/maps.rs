//! Maps shared by all probe families, and the counters every probe bumps.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use leaktrace_common::{PendingCall, counter};

/// Carrier events to userspace. Carrier calls are rare (hundreds a second on a busy node),
/// so 1 MiB holds seconds of backlog.
#[map]
pub static CARRIER_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Arguments saved by entry probes for their return probes, keyed by `pending_key(tid, probe)`.
#[map]
pub static PENDING: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

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
