//! Block probes (`--blocks`): ERTS's own allocator, `erts_alcu_{alloc,realloc,free}*`, of the
//! variants the node's `erts_allctrs[]` really points to.
//!
//! Busy nodes make 10^5-10^6 of these calls a second, so nothing goes to userspace per call: a
//! block allocated since attach is kept by address in `BLOCK_LIVE` (type, size, time), and its
//! type's totals, log2 size and lifetime buckets in the per-CPU `BLOCK_STATS`. A free finds the
//! block and credits its type; a free of a block allocated before attach is counted at the type
//! the call names, its size never guessed.
//!
//! One call in flight per thread: `erts_alcu_realloc*(p = NULL)` enters the alloc path, and the
//! inner alloc finds the slot taken, so the block is counted once, by the outer call.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{BlockLive, BlockPending, BlockStats, block, counter, probe_id as P};

use crate::maps::{BLOCK_LIVE, BLOCK_PENDING, BLOCK_STATS, BLOCK_ZERO, bump, hit};

fn tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// floor(log2(v)) for v > 0 (0 for 0), without a count-leading-zeros instruction.
#[inline(always)]
pub(crate) fn log2(mut v: u64) -> usize {
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// This CPU's totals of `alc_type`, created (from the zero value, not the small BPF stack)
/// on first use.
fn stats(alc_type: u32) -> Option<*mut BlockStats> {
    if let Some(s) = BLOCK_STATS.get_ptr_mut(&alc_type) {
        return Some(s);
    }
    let zero = BLOCK_ZERO.get(0)?;
    let _ = BLOCK_STATS.insert(&alc_type, zero, BPF_NOEXIST as u64);
    let s = BLOCK_STATS.get_ptr_mut(&alc_type);
    if s.is_none() {
        bump(counter::BLOCK_TYPES_FULL);
    }
    s
}

/// Records a block of `size` bytes at `ptr` of `alc_type`.
fn allocated(ptr: u64, alc_type: u32, size: u64) {
    if ptr == 0 {
        return;
    }
    let Some(s) = stats(alc_type) else { return };
    let bucket = log2(size).min(block::SIZE_BUCKETS - 1);
    // SAFETY: `s` points into this CPU's value of a per-CPU map: no other CPU writes it, and a
    // BPF program is not preempted on its CPU.
    unsafe {
        (*s).allocs += 1;
        (*s).bytes_allocated += size;
        if let Some(b) = (*s).sizes.get_mut(bucket) {
            *b += 1;
        }
    }
    let live = BlockLive {
        alc_type,
        _pad: 0,
        size,
        ts_ns: now(),
    };
    if BLOCK_LIVE.insert(&ptr, &live, BPF_ANY as u64).is_err() {
        bump(counter::BLOCK_LIVE_FULL);
        unsafe {
            (*s).untracked += 1;
            (*s).bytes_untracked += size;
        }
    }
}

/// Forgets the block at `ptr` and credits its type; a block never seen allocated is counted at
/// `alc_type` (the type the free names).
fn freed(ptr: u64, alc_type: u32) {
    if ptr == 0 {
        return;
    }
    let Some(live) = (unsafe { BLOCK_LIVE.get(&ptr) }).copied() else {
        if let Some(s) = stats(alc_type) {
            unsafe { (*s).unknown_frees += 1 };
        }
        return;
    };
    if BLOCK_LIVE.remove(&ptr).is_err() {
        return;
    }
    let Some(s) = stats(live.alc_type) else {
        return;
    };
    let life_us = now().saturating_sub(live.ts_ns) / 1000;
    let bucket = log2(life_us).min(block::LIFE_BUCKETS - 1);
    unsafe {
        (*s).frees += 1;
        (*s).bytes_freed += live.size;
        if let Some(b) = (*s).lifetimes.get_mut(bucket) {
            *b += 1;
        }
    }
}

/// Saves the call unless one of this thread is in flight (then the outer one counts it).
fn enter(call: BlockPending) {
    if BLOCK_PENDING
        .insert(&tid(), &call, BPF_NOEXIST as u64)
        .is_err()
    {
        bump(counter::BLOCK_NESTED);
    }
}

/// Takes this thread's call in flight, if its kind is `kind`.
fn leave(kind: u32) -> Option<BlockPending> {
    let t = tid();
    let call = (unsafe { BLOCK_PENDING.get(&t) }).copied()?;
    if call.kind != kind {
        return None;
    }
    let _ = BLOCK_PENDING.remove(&t);
    Some(call)
}

// erts_alcu_alloc*(ErtsAlcType_t type, void *extra, Uint size) -> void *

#[uprobe]
pub fn block_alloc(ctx: ProbeContext) -> u32 {
    hit(P::BLOCK_ALLOC);
    enter(BlockPending {
        alc_type: arg(&ctx, 0) as u32,
        kind: block::ALLOC,
        size: arg(&ctx, 2),
        old: 0,
    });
    0
}

#[uretprobe]
pub fn block_alloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::BLOCK_ALLOC_RET);
    let Some(call) = leave(block::ALLOC) else {
        return 0;
    };
    allocated(ctx.ret::<u64>(), call.alc_type, call.size);
    0
}

// erts_alcu_realloc*(type, extra, void *p, Uint size) -> void * (also the _mv variants)

#[uprobe]
pub fn block_realloc(ctx: ProbeContext) -> u32 {
    hit(P::BLOCK_REALLOC);
    enter(BlockPending {
        alc_type: arg(&ctx, 0) as u32,
        kind: block::REALLOC,
        size: arg(&ctx, 3),
        old: arg(&ctx, 2),
    });
    0
}

#[uretprobe]
pub fn block_realloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::BLOCK_REALLOC_RET);
    let Some(call) = leave(block::REALLOC) else {
        return 0;
    };
    let ptr = ctx.ret::<u64>();
    if ptr == 0 {
        // Failed: the old block is untouched.
        return 0;
    }
    freed(call.old, call.alc_type);
    allocated(ptr, call.alc_type, call.size);
    0
}

// erts_alcu_free*(type, extra, void *p): a free asked on another scheduler is queued to the
// block's owner and done later, inside ERTS; it counts here, when asked for.

#[uprobe]
pub fn block_free(ctx: ProbeContext) -> u32 {
    hit(P::BLOCK_FREE);
    freed(arg(&ctx, 2), arg(&ctx, 0) as u32);
    0
}
