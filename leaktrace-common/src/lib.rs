//! Types shared by leaktrace's eBPF programs and its userspace side.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that the kernel and userspace
//! agree on the layout byte for byte.
#![cfg_attr(target_arch = "bpf", no_std)]

/// What a carrier event reports. Decoded in userspace with `TryFrom<u32>`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CarrierEventKind {
    /// `erts_mseg_alloc_opt` returned a carrier (`addr`, `size` read at return).
    MsegAlloc = 1,
    /// `erts_mseg_dealloc_opt` took a carrier back (it may stay in the mseg cache).
    MsegDealloc = 2,
    /// `erts_mseg_realloc_opt` moved/resized a carrier (`old_addr`, `old_size` -> `addr`, `size`).
    MsegRealloc = 3,
    /// `erts_mmap` made an OS mapping (`mapper` says which ErtsMemMapper).
    Mmap = 4,
    /// `erts_munmap` removed an OS mapping.
    Munmap = 5,
    /// `erts_mremap` moved/resized an OS mapping.
    Mremap = 6,
    /// `erts_sys_aligned_alloc` returned a malloc-backed carrier.
    SysAlignedAlloc = 7,
    /// `erts_sys_aligned_free` freed a malloc-backed carrier (size unknown from the arguments).
    SysAlignedFree = 8,
    /// `erts_sys_aligned_realloc` resized a malloc-backed carrier.
    SysAlignedRealloc = 9,
    /// `erts_alcu_mmapper_mseg_alloc`: a literal_alloc carrier.
    LiteralAlloc = 10,
    /// `erts_alcu_mmapper_mseg_dealloc`: a literal_alloc carrier returned.
    LiteralDealloc = 11,
    /// `erts_alcu_mmapper_mseg_realloc`: a literal_alloc carrier resized.
    LiteralRealloc = 12,
}

impl TryFrom<u32> for CarrierEventKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        use CarrierEventKind::*;
        Ok(match value {
            1 => MsegAlloc,
            2 => MsegDealloc,
            3 => MsegRealloc,
            4 => Mmap,
            5 => Munmap,
            6 => Mremap,
            7 => SysAlignedAlloc,
            8 => SysAlignedFree,
            9 => SysAlignedRealloc,
            10 => LiteralAlloc,
            11 => LiteralDealloc,
            12 => LiteralRealloc,
            other => return Err(other),
        })
    }
}

/// One carrier-level event, as written to the ring buffer.
///
/// A fixed header (kind, pid, tid, timestamp) and a payload whose meaning depends on `kind`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CarrierEvent {
    /// A [`CarrierEventKind`] as u32.
    pub kind: u32,
    /// Process (tgid) that made the call.
    pub pid: u32,
    /// Thread that made the call.
    pub tid: u32,
    /// ERTS allocator number (`ErtsAlcType_t & 0xF` for mseg), or `NO_ALLOCATOR`.
    pub alloc_no: u32,
    /// `bpf_ktime_get_ns()` at the event.
    pub ts_ns: u64,
    /// Address of the carrier or mapping (new address for reallocs).
    pub addr: u64,
    /// Size in bytes (new size for reallocs; 0 when the call does not say).
    pub size: u64,
    /// Old address, for reallocs.
    pub old_addr: u64,
    /// Old size, for reallocs.
    pub old_size: u64,
    /// Flags argument (mseg: bit 0 set = multiblock carrier).
    pub flags: u64,
    /// `ErtsMemMapper*` for erts_mmap family events, 0 otherwise.
    pub mapper: u64,
}

/// `alloc_no` value when the probed call does not name an allocator.
pub const NO_ALLOCATOR: u32 = u32::MAX;

/// Size of [`CarrierEvent`] in bytes; checked at compile time on both sides.
pub const CARRIER_EVENT_SIZE: usize = 72;
const _: () = assert!(core::mem::size_of::<CarrierEvent>() == CARRIER_EVENT_SIZE);

/// Arguments an entry probe saves for its return probe, keyed by [`pending_key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingCall {
    /// Allocator number, or `NO_ALLOCATOR`.
    pub alloc_no: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// User pointer to the size to read at return (0: size is in `size`).
    pub size_ptr: u64,
    /// Size known at entry.
    pub size: u64,
    /// Old address (reallocs).
    pub old_addr: u64,
    /// Old size (reallocs).
    pub old_size: u64,
    /// Flags argument.
    pub flags: u64,
    /// `ErtsMemMapper*` for erts_mmap family calls.
    pub mapper: u64,
}

/// Key of the pending-call map: one slot per (thread, probed function), because
/// `erts_mseg_alloc_opt` calls `erts_mmap` on the same thread before it returns.
#[inline(always)]
pub fn pending_key(tid: u32, kind: u32) -> u64 {
    ((kind as u64) << 32) | tid as u64
}

/// Indices into the per-CPU `COUNTERS` array. Probe hit counters start at `HITS_BASE`.
pub mod counter {
    /// Ring buffer full: an event was lost.
    pub const EVENTS_LOST: u32 = 0;
    /// Pending-call map full: the return probe will not see the entry.
    pub const MAP_FULL: u32 = 1;
    /// A helper failed (reading user memory, ...).
    pub const PROBE_ERRORS: u32 = 2;
    /// A return probe fired without a matching entry (missed entry or map full).
    pub const MISSED_ENTRY: u32 = 3;
    /// A native free (free, munmap, realloc's old pointer) of a pointer not seen allocated:
    /// allocated before attach, or not tracked.
    pub const NATIVE_UNKNOWN_FREES: u32 = 4;
    /// The outstanding-allocation map was full: an allocation was not tracked.
    pub const NATIVE_OUTSTANDING_FULL: u32 = 5;
    /// The allocation-site map was full: an allocation was not tracked.
    pub const NATIVE_SITES_FULL: u32 = 6;
    /// An entry whose thread still had a pending call older than a second (a return never seen).
    pub const NATIVE_STALE_PENDING: u32 = 7;
    /// First probe hit counter; probe `p` counts at `HITS_BASE + p`.
    pub const HITS_BASE: u32 = 8;
    /// Size of the counter array.
    pub const LEN: u32 = 128;
    /// User stacks not recorded (`--stacks`): `bpf_get_stackid` failed (the stack map full, or
    /// its hash bucket held by another stack: -EEXIST; an unreadable stack: -EFAULT), or the
    /// (site, stack) map was full. The last slot, past the probe hit counters.
    pub const STACK_ERRORS: u32 = LEN - 1;
    /// Of [`EVENTS_LOST`], events that ended a carrier or mapping (dealloc, munmap, free):
    /// their carriers stay counted, so carrier figures are then too high (an upper bound).
    pub const EVENTS_LOST_FREES: u32 = LEN - 2;
    /// Of [`EVENTS_LOST`], reallocs and mremaps (either direction).
    pub const EVENTS_LOST_RESIZES: u32 = LEN - 3;
    /// `--blocks`: a block allocated while the live-block map was full (counted at its type as
    /// untracked; its free will be an unknown free).
    pub const BLOCK_LIVE_FULL: u32 = LEN - 4;
    /// `--blocks`: the per-type map was full: the call was not counted at all.
    pub const BLOCK_TYPES_FULL: u32 = LEN - 5;
    /// `--blocks`: an allocation call inside another of the same thread (realloc(NULL) entering
    /// the alloc path): counted once, by the outer call.
    pub const BLOCK_NESTED: u32 = LEN - 6;
}

/// Native allocation sizes and lifetimes of one call site, log2 buckets as [`BlockStats`]'s.
/// Kept for the first [`native_limits::HIST_SITES`] sites only (the totals cover all).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeHist {
    /// Allocation sizes ([`block::SIZE_BUCKETS`] log2 buckets).
    pub sizes: [u32; block::SIZE_BUCKETS],
    /// Lifetimes of freed allocations ([`block::LIFE_BUCKETS`] log2 microsecond buckets).
    pub lifetimes: [u32; block::LIFE_BUCKETS],
}

impl Default for NativeHist {
    fn default() -> Self {
        NativeHist {
            sizes: [0; block::SIZE_BUCKETS],
            lifetimes: [0; block::LIFE_BUCKETS],
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for NativeHist {}

/// Block-level (`erts_alcu_*`) aggregation in the kernel: per ERTS type, per CPU.
pub mod block {
    /// Live blocks tracked at once (allocated since attach and not freed).
    pub const LIVE: u32 = 1 << 20;
    /// Distinct ERTS types (`ErtsAlcType_t`) with totals.
    pub const TYPES: u32 = 4096;
    /// Size histogram buckets: bucket `i` counts blocks of `[2^i, 2^(i+1))` bytes, the last one
    /// everything larger.
    pub const SIZE_BUCKETS: usize = 24;
    /// Lifetime histogram buckets: bucket `i` counts frees `[2^i, 2^(i+1))` microseconds after
    /// the allocation, the last one everything longer (2^27 µs is over two minutes).
    pub const LIFE_BUCKETS: usize = 28;
    /// Pending-call kinds.
    pub const ALLOC: u32 = 1;
    /// A realloc of a block.
    pub const REALLOC: u32 = 2;
}

/// One ERTS type's block totals since the block probes attached (per CPU in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStats {
    /// Blocks allocated (reallocs count as a free and an allocation).
    pub allocs: u64,
    /// Of those, freed.
    pub frees: u64,
    /// Bytes allocated.
    pub bytes_allocated: u64,
    /// Bytes freed (of blocks allocated since attach).
    pub bytes_freed: u64,
    /// Frees of blocks not seen allocated (allocated before attach): counted, size unknown.
    pub unknown_frees: u64,
    /// Blocks allocated while the live map was full: their frees will be unknown frees.
    pub untracked: u64,
    /// Their bytes.
    pub bytes_untracked: u64,
    /// Allocation sizes, log2 buckets ([`block::SIZE_BUCKETS`]).
    pub sizes: [u64; block::SIZE_BUCKETS],
    /// Lifetimes of freed blocks, log2 microsecond buckets ([`block::LIFE_BUCKETS`]).
    pub lifetimes: [u64; block::LIFE_BUCKETS],
}

impl BlockStats {
    /// Adds `other`'s totals and buckets (summing per-CPU values, or types into a group).
    pub fn add(&mut self, other: &BlockStats) {
        self.allocs += other.allocs;
        self.frees += other.frees;
        self.bytes_allocated += other.bytes_allocated;
        self.bytes_freed += other.bytes_freed;
        self.unknown_frees += other.unknown_frees;
        self.untracked += other.untracked;
        self.bytes_untracked += other.bytes_untracked;
        for (a, b) in self.sizes.iter_mut().zip(other.sizes) {
            *a += b;
        }
        for (a, b) in self.lifetimes.iter_mut().zip(other.lifetimes) {
            *a += b;
        }
    }
}

impl Default for BlockStats {
    fn default() -> Self {
        BlockStats {
            allocs: 0,
            frees: 0,
            bytes_allocated: 0,
            bytes_freed: 0,
            unknown_frees: 0,
            untracked: 0,
            bytes_untracked: 0,
            sizes: [0; block::SIZE_BUCKETS],
            lifetimes: [0; block::LIFE_BUCKETS],
        }
    }
}

/// A block allocated since attach and not yet freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockLive {
    /// Its `ErtsAlcType_t`.
    pub alc_type: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Bytes asked for.
    pub size: u64,
    /// `bpf_ktime_get_ns()` at the allocation.
    pub ts_ns: u64,
}

/// An erts_alcu call in flight, one per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockPending {
    /// Its `ErtsAlcType_t`.
    pub alc_type: u32,
    /// [`block::ALLOC`] or [`block::REALLOC`].
    pub kind: u32,
    /// Bytes asked for.
    pub size: u64,
    /// The block being reallocated (0: none).
    pub old: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for BlockStats {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for BlockLive {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for BlockPending {}

/// Probe ids, used for hit counters (`counter::HITS_BASE + id`).
pub mod probe_id {
    /// erts_mseg_alloc_opt entry
    pub const MSEG_ALLOC: u32 = 0;
    /// erts_mseg_alloc_opt return
    pub const MSEG_ALLOC_RET: u32 = 1;
    /// erts_mseg_dealloc_opt
    pub const MSEG_DEALLOC: u32 = 2;
    /// erts_mseg_realloc_opt entry
    pub const MSEG_REALLOC: u32 = 3;
    /// erts_mseg_realloc_opt return
    pub const MSEG_REALLOC_RET: u32 = 4;
    /// erts_mmap entry
    pub const MMAP: u32 = 5;
    /// erts_mmap return
    pub const MMAP_RET: u32 = 6;
    /// erts_munmap
    pub const MUNMAP: u32 = 7;
    /// erts_mremap entry
    pub const MREMAP: u32 = 8;
    /// erts_mremap return
    pub const MREMAP_RET: u32 = 9;
    /// erts_sys_aligned_alloc entry
    pub const SYS_ALIGNED_ALLOC: u32 = 10;
    /// erts_sys_aligned_alloc return
    pub const SYS_ALIGNED_ALLOC_RET: u32 = 11;
    /// erts_sys_aligned_free
    pub const SYS_ALIGNED_FREE: u32 = 12;
    /// erts_sys_aligned_realloc entry
    pub const SYS_ALIGNED_REALLOC: u32 = 13;
    /// erts_sys_aligned_realloc return
    pub const SYS_ALIGNED_REALLOC_RET: u32 = 14;
    /// erts_alcu_mmapper_mseg_alloc entry
    pub const LITERAL_ALLOC: u32 = 15;
    /// erts_alcu_mmapper_mseg_alloc return
    pub const LITERAL_ALLOC_RET: u32 = 16;
    /// erts_alcu_mmapper_mseg_dealloc
    pub const LITERAL_DEALLOC: u32 = 17;
    /// erts_alcu_mmapper_mseg_realloc entry
    pub const LITERAL_REALLOC: u32 = 18;
    /// erts_alcu_mmapper_mseg_realloc return
    pub const LITERAL_REALLOC_RET: u32 = 19;
    /// malloc, valloc, pvalloc entry
    pub const MALLOC: u32 = 20;
    /// malloc family return
    pub const MALLOC_RET: u32 = 21;
    /// calloc entry
    pub const CALLOC: u32 = 22;
    /// calloc return
    pub const CALLOC_RET: u32 = 23;
    /// realloc entry
    pub const REALLOC: u32 = 24;
    /// realloc return
    pub const REALLOC_RET: u32 = 25;
    /// aligned_alloc, memalign entry
    pub const MEMALIGN: u32 = 26;
    /// aligned_alloc, memalign return
    pub const MEMALIGN_RET: u32 = 27;
    /// posix_memalign entry
    pub const POSIX_MEMALIGN: u32 = 28;
    /// posix_memalign return
    pub const POSIX_MEMALIGN_RET: u32 = 29;
    /// free (past its NULL test)
    pub const FREE: u32 = 30;
    /// libc mmap entry (anonymous mappings only are tracked)
    pub const MMAP_ANON: u32 = 31;
    /// libc mmap return
    pub const MMAP_ANON_RET: u32 = 32;
    /// libc munmap
    pub const MUNMAP_ANON: u32 = 33;
    /// enif_alloc, driver_alloc entry
    pub const NIF_ALLOC: u32 = 34;
    /// enif_alloc, driver_alloc return
    pub const NIF_ALLOC_RET: u32 = 35;
    /// enif_free, driver_free
    pub const NIF_FREE: u32 = 36;
    /// enif_realloc, driver_realloc entry
    pub const NIF_REALLOC: u32 = 37;
    /// enif_realloc, driver_realloc return
    pub const NIF_REALLOC_RET: u32 = 38;
    /// enif_alloc_resource entry
    pub const NIF_RESOURCE: u32 = 39;
    /// enif_alloc_resource return
    pub const NIF_RESOURCE_RET: u32 = 40;
    /// enif_keep_resource
    pub const NIF_KEEP: u32 = 41;
    /// enif_release_resource
    pub const NIF_RELEASE: u32 = 42;
    /// erts_alcu_alloc* entry (`--blocks`)
    pub const BLOCK_ALLOC: u32 = 43;
    /// erts_alcu_alloc* return
    pub const BLOCK_ALLOC_RET: u32 = 44;
    /// erts_alcu_realloc* entry
    pub const BLOCK_REALLOC: u32 = 45;
    /// erts_alcu_realloc* return
    pub const BLOCK_REALLOC_RET: u32 = 46;
    /// erts_alcu_free*
    pub const BLOCK_FREE: u32 = 47;
    /// Number of probe ids.
    pub const COUNT: u32 = 48;
}

const _: () = assert!(counter::HITS_BASE + probe_id::COUNT <= counter::LEN);

/// A native allocation call in flight on one thread, saved by its entry probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NativePending {
    /// Entry probe id ([`probe_id`]) of the outermost allocation call on the thread.
    pub probe: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Bytes asked for.
    pub size: u64,
    /// Return address of the call: the caller's code.
    pub site: u64,
    /// realloc: the old pointer; posix_memalign: where the pointer is written.
    pub ptr: u64,
    /// `bpf_ktime_get_ns()` at entry.
    pub ts_ns: u64,
    /// User stack of the call in the `STACKS` map (`--stacks`), or [`NO_STACK`].
    pub stack_id: i64,
}

/// A native allocation not yet freed, keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeOutstanding {
    /// Bytes.
    pub size: u64,
    /// Return address of the allocating call.
    pub site: u64,
    /// `bpf_ktime_get_ns()` at allocation.
    pub ts_ns: u64,
    /// User stack of the allocating call, or [`NO_STACK`].
    pub stack_id: i64,
}

/// Set in a site key when the allocation went through the NIF/driver API (enif_alloc,
/// enif_alloc_resource, driver_alloc): that memory lives inside ERTS carriers. User-space
/// addresses never have this bit.
pub const NIF_API_SITE: u64 = 1 << 63;

/// A resource object the NIF code still holds references to, keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NifResource {
    /// Bytes asked for.
    pub size: u64,
    /// Site key (with [`NIF_API_SITE`]).
    pub site: u64,
    /// References taken by the NIF code (alloc and keeps) minus releases.
    pub refs: u64,
    /// User stack of the allocating call, or [`NO_STACK`].
    pub stack_id: i64,
}

/// Totals of one allocation site (a return address), updated in the kernel: userspace reads a
/// few hundred of these per interval instead of an event per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeSite {
    /// Allocations made there since attach.
    pub allocations: u64,
    /// Of those, freed.
    pub frees: u64,
    /// Bytes allocated.
    pub bytes_allocated: u64,
    /// Bytes freed (of allocations made there).
    pub bytes_freed: u64,
    /// Allocations made there that were not tracked (the outstanding map was full): whether
    /// they were freed is unknown.
    pub untracked: u64,
    /// Their bytes.
    pub bytes_untracked: u64,
}

/// Sizes of the native maps: a bound on what the kernel side holds whatever the target does.
pub mod native_limits {
    /// Outstanding allocations tracked at once (about 48 MiB of kernel memory at most).
    pub const OUTSTANDING: u32 = 1 << 19;
    /// Allocation sites.
    pub const SITES: u32 = 1 << 16;
    /// Sites with size and lifetime histograms (the first ones seen).
    pub const HIST_SITES: u32 = 4096;
    /// Threads with a call in flight.
    pub const PENDING: u32 = 1 << 14;
    /// Distinct user stacks kept (`--stacks`).
    pub const STACKS: u32 = 1 << 14;
    /// (site, stack) pairs with totals (`--stacks`).
    pub const STACK_SITES: u32 = 1 << 14;
    /// Frames the kernel walks and keeps per stack: `--stacks` allows at most this many.
    pub const STACK_DEPTH: u32 = 32;
}

/// `stack_id` of a call whose user stack was not captured (`--stacks 0`, or the capture failed).
pub const NO_STACK: i64 = -1;

/// `stack_id` of a call whose frame pointer (`rbp`) pointed nowhere near its stack: code
/// without frame pointers, where a walk would read data as frames (and fill the stack map with
/// a new stack a call). Kept in `STACK_SITES` as a stack of the call site alone.
pub const NO_WALK: i64 = -2;

const _: () = assert!(counter::HITS_BASE + probe_id::COUNT <= counter::STACK_ERRORS);

/// Indices into the 1-element-per-option `NATIVE_CONFIG` array, written by userspace before the
/// native probes attach.
pub mod native_config {
    /// Frames of user stack to capture per native allocation call (0: none, `--stacks`).
    pub const STACK_DEPTH: u32 = 0;
    /// Size of the array.
    pub const LEN: u32 = 1;
}

/// Key of the per-(site, stack) totals (`STACK_SITES`): a site with each user stack it was
/// reached by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackSiteKey {
    /// Site key, as in `NATIVE_SITES` (with [`NIF_API_SITE`] for NIF API calls).
    pub site: u64,
    /// Stack id in the `STACKS` map, or [`NO_WALK`] (never [`NO_STACK`] here).
    pub stack_id: i64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for CarrierEvent {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for PendingCall {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for NativeSite {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for StackSiteKey {}
