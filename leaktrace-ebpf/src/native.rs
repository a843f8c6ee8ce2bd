//! Native probes: the libc malloc family and anonymous mmap of the target, from every thread.
//!
//! These fire up to millions of times a second, so nothing goes to userspace per call: an
//! allocation is kept by address in `NATIVE_OUTSTANDING` (size, site), and the totals of its
//! site (the return address of the call) in the per-CPU `NATIVE_SITES`; a free finds the allocation, credits
//! its site and forgets it. Userspace reads the sites each interval.
//!
//! With `--stacks N` the entry probes also capture the user stack (`bpf_get_stackid`, frame
//! pointers, best effort) and the totals are kept per (site, stack) too, in `STACK_SITES`.
//!
//! One call in flight per thread: the outermost allocation call. glibc's realloc(NULL, n) calls
//! malloc, and malloc may call mmap: the inner calls find the slot taken and are not counted,
//! so every byte is counted once, at the caller's site.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_get_stackid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{
    NIF_API_SITE, NO_STACK, NO_WALK, NativeHist, NativeOutstanding, NativePending, NativeSite,
    NifResource, StackSiteKey, block, counter, native_config, native_limits, probe_id as P,
};

use crate::maps::{
    NATIVE_CONFIG, NATIVE_HIST, NATIVE_HIST_ZERO, NATIVE_OUTSTANDING, NATIVE_PENDING, NATIVE_SITES,
    NIF_RESOURCES, STACK_SITES, STACKS, bump, hit,
};

/// A pending call older than this lost its return (longjmp, thread killed): replaced.
const STALE_NS: u64 = 1_000_000_000;
/// Farthest a frame pointer is taken to be above the stack pointer (a thread's stack).
const MAX_FRAME_SPAN: u64 = 8 << 20;
/// Highest user-space address on x86-64 (47 bits).
const USER_TOP: u64 = 0x7fff_ffff_ffff;
/// `MAP_ANONYMOUS` on x86-64.
const MAP_ANONYMOUS: u64 = 0x20;

fn tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// The return address at `[rsp]`: at a function's entry (or past instructions that leave the
/// stack alone) it is the caller's code. Most NIFs have no frame pointers; this needs none.
fn site(ctx: &ProbeContext) -> u64 {
    let rsp = unsafe { (*ctx.regs).rsp };
    unsafe { bpf_probe_read_user(rsp as *const u64) }.unwrap_or(0)
}

/// Saves the call unless an outer allocation call of this thread is in flight.
fn enter(ctx: &ProbeContext, probe: u32, size: u64, site: u64, ptr: u64) {
    let call = NativePending {
        probe,
        _pad: 0,
        size,
        site,
        ptr,
        ts_ns: now(),
        stack_id: NO_STACK,
    };
    let key = tid();
    if NATIVE_PENDING
        .insert(&key, &call, BPF_NOEXIST as u64)
        .is_ok()
    {
        capture(ctx, key);
        return;
    }
    // Taken: by an outer call (nested: not counted), or by a call whose return never came.
    if let Some(old) = unsafe { NATIVE_PENDING.get(&key) }
        && call.ts_ns.saturating_sub(old.ts_ns) > STALE_NS
    {
        bump(counter::NATIVE_STALE_PENDING);
        if NATIVE_PENDING.insert(&key, &call, BPF_ANY as u64).is_err() {
            bump(counter::MAP_FULL);
            return;
        }
        capture(ctx, key);
    }
}

/// A frame as a frame pointer points at it: the caller's saved `rbp`, then a return address.
#[repr(C)]
#[derive(Clone, Copy)]
struct Frame {
    next: u64,
    ret: u64,
}

/// Whether `next` can be the frame pointer of a frame above the one at `bp`, on the same stack.
fn above(next: u64, bp: u64) -> bool {
    next > bp && next - bp < MAX_FRAME_SPAN && next & 7 == 0
}

/// Whether the kernel's frame-pointer walk from here reads frames, not data: `rbp` on this
/// thread's stack above `rsp`, then each frame (as many as the kernel walks) holding a user
/// address to return to and a next frame further up, until the chain ends (`rbp` 0, or
/// unreadable: the kernel stops there too). Code without frame pointers (most NIFs, beam.smp)
/// leaves `rbp` a register like any other: walked, it gives a new "stack" nearly every call
/// and fills the map.
fn frame_chain(ctx: &ProbeContext) -> bool {
    let (sp, mut bp) = unsafe { ((*ctx.regs).rsp, (*ctx.regs).rbp) };
    if !above(bp, sp) {
        return false;
    }
    for _ in 0..native_limits::STACK_DEPTH {
        let Ok(frame) = (unsafe { bpf_probe_read_user(bp as *const Frame) }) else {
            return true;
        };
        if !(0x1000..=USER_TOP).contains(&frame.ret) {
            return false;
        }
        if frame.next == 0 {
            return true;
        }
        if !above(frame.next, bp) {
            return false;
        }
        bp = frame.next;
    }
    true
}

/// With `--stacks`: the user stack of the call just saved for thread `key`, into its slot.
/// Only the outermost call pays for the walk (a nested call never gets here).
fn capture(ctx: &ProbeContext, key: u32) {
    let on = NATIVE_CONFIG
        .get(native_config::STACK_DEPTH)
        .is_some_and(|depth| *depth > 0);
    if !on {
        return;
    }
    // The kernel walks frame pointers from the registers at the probe: frame 0 is the probe's
    // own address. Where the chain is no chain of frames the call keeps its site alone.
    let id = if frame_chain(ctx) {
        let id = unsafe { bpf_get_stackid(ctx.as_ptr(), STACKS.as_ptr(), BPF_F_USER_STACK as u64) };
        if id < 0 {
            bump(counter::STACK_ERRORS);
            return;
        }
        id
    } else {
        NO_WALK
    };
    if let Some(call) = NATIVE_PENDING.get_ptr_mut(&key) {
        unsafe { (*call).stack_id = id };
    }
}

/// The saved call of this thread if `probe` made it (a nested call's return finds its outer
/// call's slot and leaves it).
fn leave(probe: u32) -> Option<NativePending> {
    let key = tid();
    let call = *unsafe { NATIVE_PENDING.get(&key) }?;
    if call.probe != probe {
        return None;
    }
    let _ = NATIVE_PENDING.remove(&key);
    Some(call)
}

fn site_entry(site: u64) -> Option<*mut NativeSite> {
    if let Some(s) = NATIVE_SITES.get_ptr_mut(&site) {
        return Some(s);
    }
    let _ = NATIVE_SITES.insert(&site, &NativeSite::default(), BPF_NOEXIST as u64);
    let s = NATIVE_SITES.get_ptr_mut(&site);
    if s.is_none() {
        bump(counter::NATIVE_SITES_FULL);
    }
    s
}

/// This CPU's totals of `site` reached by stack `stack_id` (None without a stack).
fn stack_entry(site: u64, stack_id: i64) -> Option<*mut NativeSite> {
    if stack_id == NO_STACK {
        return None;
    }
    let key = StackSiteKey { site, stack_id };
    if let Some(s) = STACK_SITES.get_ptr_mut(&key) {
        return Some(s);
    }
    let _ = STACK_SITES.insert(&key, &NativeSite::default(), BPF_NOEXIST as u64);
    let s = STACK_SITES.get_ptr_mut(&key);
    if s.is_none() {
        bump(counter::STACK_ERRORS);
    }
    s
}

/// Counts an allocation of `size` bytes in a site's (or a site and stack's) totals.
fn add_allocation(s: *mut NativeSite, size: u64) {
    unsafe {
        add(&raw mut (*s).allocations, 1);
        add(&raw mut (*s).bytes_allocated, size);
    }
}

/// This CPU's size and lifetime buckets of `site`, created on first use while there is room.
fn hist_entry(site: u64) -> Option<*mut NativeHist> {
    if let Some(h) = NATIVE_HIST.get_ptr_mut(&site) {
        return Some(h);
    }
    let zero = NATIVE_HIST_ZERO.get(0)?;
    let _ = NATIVE_HIST.insert(&site, zero, BPF_NOEXIST as u64);
    NATIVE_HIST.get_ptr_mut(&site)
}

/// Counts an allocation of `size` bytes in its site's size buckets.
fn hist_size(site: u64, size: u64) {
    if let Some(h) = hist_entry(site) {
        let i = crate::block::log2(size).min(block::SIZE_BUCKETS - 1);
        // SAFETY: this CPU's value of a per-CPU map, as in `add`.
        if let Some(b) = unsafe { (*h).sizes.get_mut(i) } {
            *b = b.wrapping_add(1);
        }
    }
}

/// Counts a free `ns` nanoseconds after its allocation in its site's lifetime buckets.
fn hist_lifetime(site: u64, ns: u64) {
    if let Some(h) = hist_entry(site) {
        let i = crate::block::log2(ns / 1000).min(block::LIFE_BUCKETS - 1);
        if let Some(b) = unsafe { (*h).lifetimes.get_mut(i) } {
            *b = b.wrapping_add(1);
        }
    }
}

/// Counts an allocation the outstanding map had no room for: its site is still named.
fn add_untracked(s: *mut NativeSite, size: u64) {
    unsafe {
        add(&raw mut (*s).untracked, 1);
        add(&raw mut (*s).bytes_untracked, size);
    }
}

/// Counts a free of `size` bytes in a site's (or a site and stack's) totals.
fn add_free(s: *mut NativeSite, size: u64) {
    unsafe {
        add(&raw mut (*s).frees, 1);
        add(&raw mut (*s).bytes_freed, size);
    }
}

/// Credits a free of an allocation made at `site` by stack `stack_id` (the stack's totals).
fn stack_freed(site: u64, stack_id: i64, size: u64) {
    if stack_id == NO_STACK {
        return;
    }
    if let Some(s) = STACK_SITES.get_ptr_mut(&StackSiteKey { site, stack_id }) {
        add_free(s, size);
    }
}

/// Adds `v` to a counter of this CPU's copy of a site.
fn add(slot: *mut u64, v: u64) {
    // SAFETY: `slot` points into this CPU's value of a per-CPU map: no other CPU writes it,
    // and a BPF program is not preempted on its CPU.
    unsafe { *slot += v };
}

/// Records an allocation of `size` bytes at `ptr` made by `call` (its site and stack).
fn allocated(ptr: u64, call: &NativePending) {
    let (size, site) = (call.size, call.site);
    if ptr == 0 {
        return;
    }
    let Some(s) = site_entry(site) else { return };
    let mut stack_id = call.stack_id;
    let by_stack = stack_entry(site, stack_id);
    if by_stack.is_none() {
        stack_id = NO_STACK;
    }
    let entry = NativeOutstanding {
        size,
        site,
        ts_ns: now(),
        stack_id,
    };
    if NATIVE_OUTSTANDING
        .insert(&ptr, &entry, BPF_ANY as u64)
        .is_err()
    {
        bump(counter::NATIVE_OUTSTANDING_FULL);
        add_untracked(s, size);
        return;
    }
    add_allocation(s, size);
    if let Some(t) = by_stack {
        add_allocation(t, size);
    }
    hist_size(site, size);
}

/// Forgets the allocation at `ptr` and credits its site; an address never seen allocated is
/// counted, its size never guessed.
fn freed(ptr: u64) {
    let Some(entry) = (unsafe { NATIVE_OUTSTANDING.get(&ptr) }).copied() else {
        bump(counter::NATIVE_UNKNOWN_FREES);
        return;
    };
    if NATIVE_OUTSTANDING.remove(&ptr).is_err() {
        // Another CPU freed it first (a double free in the target): count it once.
        return;
    }
    if let Some(s) = NATIVE_SITES.get_ptr_mut(&entry.site) {
        add_free(s, entry.size);
    }
    stack_freed(entry.site, entry.stack_id, entry.size);
    hist_lifetime(entry.site, now().saturating_sub(entry.ts_ns));
}

fn ret(ctx: &RetProbeContext) -> u64 {
    ctx.ret::<u64>()
}

/// The return of an allocation call whose result is the pointer: records it at the site its
/// entry saved (one helper for every such return probe).
fn alloc_ret(ctx: &RetProbeContext, ret_probe: u32, entry_probe: u32) -> u32 {
    hit(ret_probe);
    if let Some(call) = leave(entry_probe) {
        allocated(ret(ctx), &call);
    }
    0
}

/// The return of a realloc-like call: NULL in is an allocation, size 0 a free, and a failed
/// realloc (NULL for a non-zero size) leaves the old block where it was.
fn realloc_ret(ctx: &RetProbeContext, ret_probe: u32, entry_probe: u32) -> u32 {
    hit(ret_probe);
    let Some(call) = leave(entry_probe) else {
        return 0;
    };
    let new = ret(ctx);
    if new == 0 && call.size != 0 {
        return 0;
    }
    if call.ptr != 0 {
        freed(call.ptr);
    }
    if call.size != 0 {
        allocated(new, &call);
    }
    0
}

// malloc(size), valloc(size), pvalloc(size)

#[uprobe]
pub fn native_malloc(ctx: ProbeContext) -> u32 {
    hit(P::MALLOC);
    enter(&ctx, P::MALLOC, arg(&ctx, 0), site(&ctx), 0);
    0
}

#[uretprobe]
pub fn native_malloc_ret(ctx: RetProbeContext) -> u32 {
    alloc_ret(&ctx, P::MALLOC_RET, P::MALLOC)
}

// calloc(n, size)

#[uprobe]
pub fn native_calloc(ctx: ProbeContext) -> u32 {
    hit(P::CALLOC);
    let (n, size) = (arg(&ctx, 0), arg(&ctx, 1));
    // No 128-bit multiply in BPF (an overflow check compiles to one): two factors under 2^32
    // cannot overflow; beyond that calloc fails anyway (NULL, not recorded).
    let bytes = if n >> 32 == 0 && size >> 32 == 0 {
        n * size
    } else {
        u64::MAX
    };
    enter(&ctx, P::CALLOC, bytes, site(&ctx), 0);
    0
}

#[uretprobe]
pub fn native_calloc_ret(ctx: RetProbeContext) -> u32 {
    alloc_ret(&ctx, P::CALLOC_RET, P::CALLOC)
}

// realloc(ptr, size): NULL is malloc, size 0 is free.

#[uprobe]
pub fn native_realloc(ctx: ProbeContext) -> u32 {
    hit(P::REALLOC);
    enter(&ctx, P::REALLOC, arg(&ctx, 1), site(&ctx), arg(&ctx, 0));
    0
}

#[uretprobe]
pub fn native_realloc_ret(ctx: RetProbeContext) -> u32 {
    realloc_ret(&ctx, P::REALLOC_RET, P::REALLOC)
}

// aligned_alloc(alignment, size), memalign(alignment, size)

#[uprobe]
pub fn native_memalign(ctx: ProbeContext) -> u32 {
    hit(P::MEMALIGN);
    enter(&ctx, P::MEMALIGN, arg(&ctx, 1), site(&ctx), 0);
    0
}

#[uretprobe]
pub fn native_memalign_ret(ctx: RetProbeContext) -> u32 {
    alloc_ret(&ctx, P::MEMALIGN_RET, P::MEMALIGN)
}

// posix_memalign(void **memptr, alignment, size): 0 on success, the pointer in *memptr.

#[uprobe]
pub fn native_posix_memalign(ctx: ProbeContext) -> u32 {
    hit(P::POSIX_MEMALIGN);
    enter(
        &ctx,
        P::POSIX_MEMALIGN,
        arg(&ctx, 2),
        site(&ctx),
        arg(&ctx, 0),
    );
    0
}

#[uretprobe]
pub fn native_posix_memalign_ret(ctx: RetProbeContext) -> u32 {
    hit(P::POSIX_MEMALIGN_RET);
    let Some(call) = leave(P::POSIX_MEMALIGN) else {
        return 0;
    };
    if ret(&ctx) != 0 {
        return 0;
    }
    match unsafe { bpf_probe_read_user(call.ptr as *const u64) } {
        Ok(ptr) => allocated(ptr, &call),
        Err(_) => bump(counter::PROBE_ERRORS),
    }
    0
}

// free(ptr): placed past glibc's NULL test (see the userspace placement), so ptr is non-NULL.

#[uprobe]
pub fn native_free(ctx: ProbeContext) -> u32 {
    hit(P::FREE);
    let ptr = arg(&ctx, 0);
    if ptr != 0 {
        freed(ptr);
    }
    0
}

// mmap(addr, length, prot, flags, fd, offset): anonymous mappings only.

#[uprobe]
pub fn native_mmap(ctx: ProbeContext) -> u32 {
    hit(P::MMAP_ANON);
    if arg(&ctx, 3) & MAP_ANONYMOUS != 0 {
        enter(&ctx, P::MMAP_ANON, arg(&ctx, 1), site(&ctx), 0);
    }
    0
}

#[uretprobe]
pub fn native_mmap_ret(ctx: RetProbeContext) -> u32 {
    hit(P::MMAP_ANON_RET);
    if let Some(call) = leave(P::MMAP_ANON) {
        let addr = ret(&ctx);
        // MAP_FAILED is (void *)-1.
        if addr != u64::MAX {
            allocated(addr, &call);
        }
    }
    0
}

// munmap(addr, length)

#[uprobe]
pub fn native_munmap(ctx: ProbeContext) -> u32 {
    hit(P::MUNMAP_ANON);
    let addr = arg(&ctx, 0);
    if unsafe { NATIVE_OUTSTANDING.get(&addr) }.is_some() {
        freed(addr);
    }
    0
}

// The NIF and driver API of beam.smp. enif_alloc is `mov; mov; mov; jmp *allocator`: it
// tail-jumps, so `[rsp]` at its entry is the NIF's own return address, and its return probe
// fires when the allocator returns to the NIF. This memory lives in ERTS carriers: its sites
// carry NIF_API_SITE so userspace keeps it out of native_outstanding.

// enif_alloc(size), driver_alloc(size)

#[uprobe]
pub fn nif_alloc(ctx: ProbeContext) -> u32 {
    hit(P::NIF_ALLOC);
    enter(
        &ctx,
        P::NIF_ALLOC,
        arg(&ctx, 0),
        site(&ctx) | NIF_API_SITE,
        0,
    );
    0
}

#[uretprobe]
pub fn nif_alloc_ret(ctx: RetProbeContext) -> u32 {
    alloc_ret(&ctx, P::NIF_ALLOC_RET, P::NIF_ALLOC)
}

// enif_free(ptr), driver_free(ptr)

#[uprobe]
pub fn nif_free(ctx: ProbeContext) -> u32 {
    hit(P::NIF_FREE);
    let ptr = arg(&ctx, 0);
    if ptr != 0 {
        freed(ptr);
    }
    0
}

// enif_realloc(ptr, size), driver_realloc(ptr, size)

#[uprobe]
pub fn nif_realloc(ctx: ProbeContext) -> u32 {
    hit(P::NIF_REALLOC);
    enter(
        &ctx,
        P::NIF_REALLOC,
        arg(&ctx, 1),
        site(&ctx) | NIF_API_SITE,
        arg(&ctx, 0),
    );
    0
}

#[uretprobe]
pub fn nif_realloc_ret(ctx: RetProbeContext) -> u32 {
    realloc_ret(&ctx, P::NIF_REALLOC_RET, P::NIF_REALLOC)
}

// enif_alloc_resource(type, size): the NIF holds one reference.

#[uprobe]
pub fn nif_resource(ctx: ProbeContext) -> u32 {
    hit(P::NIF_RESOURCE);
    enter(
        &ctx,
        P::NIF_RESOURCE,
        arg(&ctx, 1),
        site(&ctx) | NIF_API_SITE,
        0,
    );
    0
}

#[uretprobe]
pub fn nif_resource_ret(ctx: RetProbeContext) -> u32 {
    hit(P::NIF_RESOURCE_RET);
    let Some(call) = leave(P::NIF_RESOURCE) else {
        return 0;
    };
    let ptr = ret(&ctx);
    if ptr == 0 {
        return 0;
    }
    let Some(s) = site_entry(call.site) else {
        return 0;
    };
    let mut stack_id = call.stack_id;
    let by_stack = stack_entry(call.site, stack_id);
    if by_stack.is_none() {
        stack_id = NO_STACK;
    }
    let entry = NifResource {
        size: call.size,
        site: call.site,
        refs: 1,
        stack_id,
    };
    if NIF_RESOURCES.insert(&ptr, &entry, BPF_ANY as u64).is_err() {
        bump(counter::NATIVE_OUTSTANDING_FULL);
        add_untracked(s, call.size);
        return 0;
    }
    add_allocation(s, call.size);
    if let Some(t) = by_stack {
        add_allocation(t, call.size);
    }
    0
}

// enif_keep_resource(obj): one more reference the NIF code must release.

#[uprobe]
pub fn nif_keep(ctx: ProbeContext) -> u32 {
    hit(P::NIF_KEEP);
    if let Some(r) = NIF_RESOURCES.get_ptr_mut(&arg(&ctx, 0)) {
        unsafe { (*r).refs += 1 };
    }
    0
}

// enif_release_resource(obj): the last release of the NIF's references credits the site (the
// object may live on in terms; that is the VM's to free, not a leak of the NIF).

#[uprobe]
pub fn nif_release(ctx: ProbeContext) -> u32 {
    hit(P::NIF_RELEASE);
    let ptr = arg(&ctx, 0);
    let Some(r) = NIF_RESOURCES.get_ptr_mut(&ptr) else {
        bump(counter::NATIVE_UNKNOWN_FREES);
        return 0;
    };
    let left = unsafe {
        (*r).refs = (*r).refs.saturating_sub(1);
        (*r).refs
    };
    if left > 0 {
        return 0;
    }
    let entry = unsafe { *r };
    if NIF_RESOURCES.remove(&ptr).is_err() {
        return 0;
    }
    if let Some(s) = NATIVE_SITES.get_ptr_mut(&entry.site) {
        add_free(s, entry.size);
    }
    stack_freed(entry.site, entry.stack_id, entry.size);
    0
}
