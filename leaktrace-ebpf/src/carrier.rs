//! Carrier-level probes: mseg carriers, erts_mmap OS mappings, malloc-backed (aligned) carriers
//! and literal_alloc carriers. These functions are called hundreds of times a second, not
//! millions, so every call is sent to userspace, which keeps the live carriers by address.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{
    CarrierEvent, CarrierEventKind as K, NO_ALLOCATOR, PendingCall, counter, pending_key,
    probe_id as P,
};

use crate::maps::{CARRIER_EVENTS, PENDING, bump, hit};

/// Why a probe did not record its event; each reason has a counter userspace reports.
enum Loss {
    RingFull,
    MapFull,
    Read,
    MissedEntry,
    Arg,
}

impl Loss {
    fn count(self) {
        bump(match self {
            Loss::RingFull => counter::EVENTS_LOST,
            Loss::MapFull => counter::MAP_FULL,
            Loss::MissedEntry => counter::MISSED_ENTRY,
            Loss::Read | Loss::Arg => counter::PROBE_ERRORS,
        });
    }
}

fn finish(r: Result<(), Loss>) -> u32 {
    if let Err(loss) = r {
        loss.count();
    }
    0
}

fn arg(ctx: &ProbeContext, n: usize) -> Result<u64, Loss> {
    ctx.arg::<u64>(n).ok_or(Loss::Arg)
}

fn emit(kind: K, alloc_no: u32, call: &PendingCall, addr: u64, size: u64) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(mut entry) = CARRIER_EVENTS.reserve::<CarrierEvent>(0) else {
        // Which way the carrier figures are now wrong: a lost end leaves a carrier counted.
        match kind {
            K::MsegDealloc | K::Munmap | K::SysAlignedFree | K::LiteralDealloc => {
                bump(counter::EVENTS_LOST_FREES)
            }
            K::MsegRealloc | K::Mremap | K::SysAlignedRealloc | K::LiteralRealloc => {
                bump(counter::EVENTS_LOST_RESIZES)
            }
            _ => {}
        }
        return Err(Loss::RingFull);
    };
    entry.write(CarrierEvent {
        kind: kind as u32,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        alloc_no,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        addr,
        size,
        old_addr: call.old_addr,
        old_size: call.old_size,
        flags: call.flags,
        mapper: call.mapper,
    });
    entry.submit(0);
    Ok(())
}

fn save(probe: u32, call: PendingCall) -> Result<(), Loss> {
    let tid = bpf_get_current_pid_tgid() as u32;
    PENDING
        .insert(pending_key(tid, probe), call, 0)
        .map_err(|_| Loss::MapFull)
}

/// Takes the entry's saved call and, when the entry passed a size pointer, reads the size the
/// function wrote there (ERTS rounds carrier sizes up and reports them through the pointer).
fn take(entry_probe: u32) -> Result<(PendingCall, u64), Loss> {
    let tid = bpf_get_current_pid_tgid() as u32;
    let key = pending_key(tid, entry_probe);
    let call = match unsafe { PENDING.get(key) } {
        Some(call) => *call,
        None => return Err(Loss::MissedEntry),
    };
    let _ = PENDING.remove(key);
    let size = if call.size_ptr != 0 {
        unsafe { bpf_probe_read_user(call.size_ptr as *const u64) }.map_err(|_| Loss::Read)?
    } else {
        call.size
    };
    Ok((call, size))
}

fn ret_addr(ctx: &RetProbeContext) -> u64 {
    ctx.ret::<u64>()
}

// erts_mseg_alloc_opt(ErtsAlcType_t alloc_no, Uint *size_p, Uint flags, const ErtsMsegOpt_t *opt)

#[uprobe]
pub fn mseg_alloc(ctx: ProbeContext) -> u32 {
    hit(P::MSEG_ALLOC);
    finish(try_mseg_alloc(&ctx))
}

fn try_mseg_alloc(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::MSEG_ALLOC,
        PendingCall {
            alloc_no: arg(ctx, 0)? as u32,
            size_ptr: arg(ctx, 1)?,
            flags: arg(ctx, 2)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn mseg_alloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::MSEG_ALLOC_RET);
    finish(try_mseg_alloc_ret(&ctx))
}

fn try_mseg_alloc_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::MSEG_ALLOC)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::MsegAlloc, call.alloc_no, &call, addr, size)
}

// erts_mseg_dealloc_opt(ErtsAlcType_t alloc_no, void *seg, Uint size, Uint flags, opt)

#[uprobe]
pub fn mseg_dealloc(ctx: ProbeContext) -> u32 {
    hit(P::MSEG_DEALLOC);
    finish(try_mseg_dealloc(&ctx))
}

fn try_mseg_dealloc(ctx: &ProbeContext) -> Result<(), Loss> {
    let call = PendingCall {
        flags: arg(ctx, 3)?,
        ..Default::default()
    };
    emit(
        K::MsegDealloc,
        arg(ctx, 0)? as u32,
        &call,
        arg(ctx, 1)?,
        arg(ctx, 2)?,
    )
}

// erts_mseg_realloc_opt(alloc_no, void *seg, Uint old_size, Uint *new_size_p, Uint flags, opt)

#[uprobe]
pub fn mseg_realloc(ctx: ProbeContext) -> u32 {
    hit(P::MSEG_REALLOC);
    finish(try_mseg_realloc(&ctx))
}

fn try_mseg_realloc(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::MSEG_REALLOC,
        PendingCall {
            alloc_no: arg(ctx, 0)? as u32,
            old_addr: arg(ctx, 1)?,
            old_size: arg(ctx, 2)?,
            size_ptr: arg(ctx, 3)?,
            flags: arg(ctx, 4)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn mseg_realloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::MSEG_REALLOC_RET);
    finish(try_mseg_realloc_ret(&ctx))
}

fn try_mseg_realloc_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::MSEG_REALLOC)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::MsegRealloc, call.alloc_no, &call, addr, size)
}

// erts_mmap(ErtsMemMapper *mm, Uint32 flags, UWord *sizep)

#[uprobe]
pub fn mmap(ctx: ProbeContext) -> u32 {
    hit(P::MMAP);
    finish(try_mmap(&ctx))
}

fn try_mmap(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::MMAP,
        PendingCall {
            alloc_no: NO_ALLOCATOR,
            mapper: arg(ctx, 0)?,
            flags: arg(ctx, 1)? & 0xffff_ffff,
            size_ptr: arg(ctx, 2)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn mmap_ret(ctx: RetProbeContext) -> u32 {
    hit(P::MMAP_RET);
    finish(try_mmap_ret(&ctx))
}

fn try_mmap_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::MMAP)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::Mmap, NO_ALLOCATOR, &call, addr, size)
}

// erts_munmap(ErtsMemMapper *mm, Uint32 flags, void *ptr, UWord size)

#[uprobe]
pub fn munmap(ctx: ProbeContext) -> u32 {
    hit(P::MUNMAP);
    finish(try_munmap(&ctx))
}

fn try_munmap(ctx: &ProbeContext) -> Result<(), Loss> {
    let call = PendingCall {
        mapper: arg(ctx, 0)?,
        flags: arg(ctx, 1)? & 0xffff_ffff,
        ..Default::default()
    };
    emit(K::Munmap, NO_ALLOCATOR, &call, arg(ctx, 2)?, arg(ctx, 3)?)
}

// erts_mremap(ErtsMemMapper *mm, Uint32 flags, void *ptr, UWord old_size, UWord *sizep)

#[uprobe]
pub fn mremap(ctx: ProbeContext) -> u32 {
    hit(P::MREMAP);
    finish(try_mremap(&ctx))
}

fn try_mremap(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::MREMAP,
        PendingCall {
            alloc_no: NO_ALLOCATOR,
            mapper: arg(ctx, 0)?,
            flags: arg(ctx, 1)? & 0xffff_ffff,
            old_addr: arg(ctx, 2)?,
            old_size: arg(ctx, 3)?,
            size_ptr: arg(ctx, 4)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn mremap_ret(ctx: RetProbeContext) -> u32 {
    hit(P::MREMAP_RET);
    finish(try_mremap_ret(&ctx))
}

fn try_mremap_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::MREMAP)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::Mremap, NO_ALLOCATOR, &call, addr, size)
}

// erts_sys_aligned_alloc(UWord alignment, UWord size)

#[uprobe]
pub fn sys_aligned_alloc(ctx: ProbeContext) -> u32 {
    hit(P::SYS_ALIGNED_ALLOC);
    finish(try_sys_aligned_alloc(&ctx))
}

fn try_sys_aligned_alloc(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::SYS_ALIGNED_ALLOC,
        PendingCall {
            alloc_no: NO_ALLOCATOR,
            size: arg(ctx, 1)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn sys_aligned_alloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::SYS_ALIGNED_ALLOC_RET);
    finish(try_sys_aligned_alloc_ret(&ctx))
}

fn try_sys_aligned_alloc_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::SYS_ALIGNED_ALLOC)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::SysAlignedAlloc, NO_ALLOCATOR, &call, addr, size)
}

// erts_sys_aligned_free(UWord alignment, void *ptr)

#[uprobe]
pub fn sys_aligned_free(ctx: ProbeContext) -> u32 {
    hit(P::SYS_ALIGNED_FREE);
    finish(try_sys_aligned_free(&ctx))
}

fn try_sys_aligned_free(ctx: &ProbeContext) -> Result<(), Loss> {
    let addr = arg(ctx, 1)?;
    if addr == 0 {
        return Ok(());
    }
    emit(
        K::SysAlignedFree,
        NO_ALLOCATOR,
        &PendingCall::default(),
        addr,
        0,
    )
}

// erts_sys_aligned_realloc(UWord alignment, void *ptr, UWord size, UWord old_size)

#[uprobe]
pub fn sys_aligned_realloc(ctx: ProbeContext) -> u32 {
    hit(P::SYS_ALIGNED_REALLOC);
    finish(try_sys_aligned_realloc(&ctx))
}

fn try_sys_aligned_realloc(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::SYS_ALIGNED_REALLOC,
        PendingCall {
            alloc_no: NO_ALLOCATOR,
            old_addr: arg(ctx, 1)?,
            size: arg(ctx, 2)?,
            old_size: arg(ctx, 3)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn sys_aligned_realloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::SYS_ALIGNED_REALLOC_RET);
    finish(try_sys_aligned_realloc_ret(&ctx))
}

fn try_sys_aligned_realloc_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::SYS_ALIGNED_REALLOC)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::SysAlignedRealloc, NO_ALLOCATOR, &call, addr, size)
}

// erts_alcu_mmapper_mseg_alloc(Allctr_t *allctr, Uint *size_p, Uint flags): literal_alloc carriers

#[uprobe]
pub fn literal_alloc(ctx: ProbeContext) -> u32 {
    hit(P::LITERAL_ALLOC);
    finish(try_literal_alloc(&ctx))
}

fn try_literal_alloc(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::LITERAL_ALLOC,
        PendingCall {
            alloc_no: NO_ALLOCATOR,
            size_ptr: arg(ctx, 1)?,
            flags: arg(ctx, 2)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn literal_alloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::LITERAL_ALLOC_RET);
    finish(try_literal_alloc_ret(&ctx))
}

fn try_literal_alloc_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::LITERAL_ALLOC)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::LiteralAlloc, NO_ALLOCATOR, &call, addr, size)
}

// erts_alcu_mmapper_mseg_dealloc(Allctr_t *allctr, void *seg, Uint size, Uint flags)

#[uprobe]
pub fn literal_dealloc(ctx: ProbeContext) -> u32 {
    hit(P::LITERAL_DEALLOC);
    finish(try_literal_dealloc(&ctx))
}

fn try_literal_dealloc(ctx: &ProbeContext) -> Result<(), Loss> {
    let call = PendingCall {
        flags: arg(ctx, 3)?,
        ..Default::default()
    };
    emit(
        K::LiteralDealloc,
        NO_ALLOCATOR,
        &call,
        arg(ctx, 1)?,
        arg(ctx, 2)?,
    )
}

// erts_alcu_mmapper_mseg_realloc(Allctr_t *allctr, void *seg, Uint old_size, Uint *new_size_p)

#[uprobe]
pub fn literal_realloc(ctx: ProbeContext) -> u32 {
    hit(P::LITERAL_REALLOC);
    finish(try_literal_realloc(&ctx))
}

fn try_literal_realloc(ctx: &ProbeContext) -> Result<(), Loss> {
    save(
        P::LITERAL_REALLOC,
        PendingCall {
            alloc_no: NO_ALLOCATOR,
            old_addr: arg(ctx, 1)?,
            old_size: arg(ctx, 2)?,
            size_ptr: arg(ctx, 3)?,
            ..Default::default()
        },
    )
}

#[uretprobe]
pub fn literal_realloc_ret(ctx: RetProbeContext) -> u32 {
    hit(P::LITERAL_REALLOC_RET);
    finish(try_literal_realloc_ret(&ctx))
}

fn try_literal_realloc_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let (call, size) = take(P::LITERAL_REALLOC)?;
    let addr = ret_addr(ctx);
    if addr == 0 {
        return Ok(());
    }
    emit(K::LiteralRealloc, NO_ALLOCATOR, &call, addr, size)
}
