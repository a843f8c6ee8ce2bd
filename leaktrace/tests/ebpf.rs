//! Real eBPF programs in the real kernel, attached to stand-ins for the ERTS carrier functions
//! defined in this test binary (same names and signatures as in beam.smp).

mod support;

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
};

use leaktrace::{
    probes::{CARRIER_PROBES, Tracer},
    symbols::SymbolTable,
};
use leaktrace_common::{CarrierEvent, CarrierEventKind as K};
use support::privileged;

/// Tests here load programs of the same names; one at a time keeps the detach check exact.
static KERNEL: Mutex<()> = Mutex::new(());

fn kernel() -> MutexGuard<'static, ()> {
    KERNEL.lock().unwrap_or_else(|p| p.into_inner())
}

const FAKE_CARRIER: u64 = 0x7f00_0000_0000;
const FAKE_MAPPING: u64 = 0x7e00_0000_0000;

/// Like ERTS: rounds the size up to 256 KiB and reports it through the pointer.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn erts_mseg_alloc_opt(
    alloc_no: u32,
    size_p: &mut u64,
    flags: u64,
    _opt: *const u8,
) -> u64 {
    *size_p = (*size_p + 0x3ffff) & !0x3ffff;
    std::hint::black_box(FAKE_CARRIER + ((alloc_no as u64) << 24) + flags)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn erts_mseg_dealloc_opt(
    alloc_no: u32,
    seg: u64,
    size: u64,
    flags: u64,
    _opt: *const u8,
) {
    std::hint::black_box((alloc_no, seg, size, flags));
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn erts_mmap(mm: u64, flags: u32, sizep: &mut u64) -> u64 {
    *sizep = (*sizep + 0xfff) & !0xfff;
    std::hint::black_box(FAKE_MAPPING + mm % 4096 + flags as u64)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn erts_munmap(mm: u64, flags: u32, ptr: u64, size: u64) {
    std::hint::black_box((mm, flags, ptr, size));
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn erts_sys_aligned_alloc(alignment: u64, size: u64) -> u64 {
    std::hint::black_box(FAKE_CARRIER + 0x1000_0000 + alignment + size % 7)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn erts_sys_aligned_free(alignment: u64, ptr: u64) {
    std::hint::black_box((alignment, ptr));
}

fn own_tid() -> u32 {
    unsafe { libc::gettid() as u32 }
}

fn attach_to_self() -> Tracer {
    let exe = Path::new("/proc/self/exe");
    let symbols = SymbolTable::read(exe, "test binary").expect("own symbols");
    let mut tracer = Tracer::load().expect("load eBPF programs");
    tracer
        .attach(exe, &symbols, std::process::id(), CARRIER_PROBES)
        .expect("attach to own stand-ins");
    tracer
}

fn my_events(tracer: &mut Tracer) -> Vec<CarrierEvent> {
    let tid = own_tid();
    let mut out = Vec::new();
    tracer.drain(|ev| {
        if ev.tid == tid {
            out.push(ev)
        }
    });
    out
}

#[test]
fn carrier_probes_see_sizes_at_return_and_addresses() {
    if !privileged("carrier_probes_see_sizes_at_return_and_addresses") {
        return;
    }
    let _k = kernel();
    let mut tracer = attach_to_self();

    let mut size = 100_000u64;
    let addr = erts_mseg_alloc_opt(6, &mut size, 1, std::ptr::null());
    assert_eq!(size, 256 * 1024);
    erts_mseg_dealloc_opt(6, addr, size, 1, std::ptr::null());
    let mut msize = 5000u64;
    let mapping = erts_mmap(0x5555, 0, &mut msize);
    erts_munmap(0x5555, 0, mapping, msize);
    let aligned = erts_sys_aligned_alloc(262144, 300_000);
    erts_sys_aligned_free(262144, aligned);

    let events = my_events(&mut tracer);
    let kinds: Vec<_> = events
        .iter()
        .map(|e| K::try_from(e.kind).unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec![
            K::MsegAlloc,
            K::MsegDealloc,
            K::Mmap,
            K::Munmap,
            K::SysAlignedAlloc,
            K::SysAlignedFree
        ],
        "events: {events:#?}"
    );
    let alloc = events[0];
    assert_eq!(
        (alloc.alloc_no, alloc.addr, alloc.size, alloc.flags),
        (6, addr, 256 * 1024, 1)
    );
    assert_eq!(alloc.pid, std::process::id());
    assert_eq!((events[1].addr, events[1].size), (addr, 256 * 1024));
    assert_eq!(
        (events[2].addr, events[2].size, events[2].mapper),
        (mapping, 8192, 0x5555)
    );
    assert_eq!((events[3].addr, events[3].size), (mapping, 8192));
    assert_eq!((events[4].addr, events[4].size), (aligned, 300_000));
    assert_eq!(events[5].addr, aligned);
    assert!(events.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));

    let stats = tracer.probe_stats();
    let hits = |name: &str| {
        stats
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.hits)
            .unwrap()
    };
    assert!(hits("mseg_alloc") >= 1 && hits("mseg_alloc_ret") >= 1 && hits("munmap") >= 1);
    // This binary has no erts_mremap: that optional probe is reported, not attached.
    let mremap = stats.iter().find(|p| p.name == "mremap").unwrap();
    assert!(!mremap.attached);
    assert!(mremap.error.as_deref().unwrap().contains("erts_mremap"));
    let losses = tracer.losses();
    assert_eq!(
        (losses.events_lost, losses.map_full, losses.missed_entries),
        (0, 0, 0)
    );
}

#[test]
fn probes_are_gone_after_drop() {
    if !privileged("probes_are_gone_after_drop") {
        return;
    }
    let _k = kernel();
    let ours = |name: &str| name.starts_with("mseg_alloc") || name.starts_with("munmap");
    let count = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.name_as_str().is_some_and(ours))
            .count()
    };
    let before = count();
    let mut tracer = attach_to_self();
    assert!(count() > before, "programs should be loaded while tracing");
    let mut size = 1u64;
    erts_mseg_alloc_opt(1, &mut size, 0, std::ptr::null());
    assert_eq!(my_events(&mut tracer).len(), 1);
    drop(tracer);
    assert_eq!(count(), before, "programs left behind after drop");
}

#[test]
fn required_symbol_missing_is_named() {
    if !privileged("required_symbol_missing_is_named") {
        return;
    }
    let _k = kernel();
    let true_bin = Path::new("/bin/true");
    let symbols = SymbolTable::read(true_bin, "/bin/true").unwrap();
    let mut tracer = Tracer::load().unwrap();
    let err = tracer
        .attach(true_bin, &symbols, std::process::id(), CARRIER_PROBES)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("erts_mseg_alloc_opt") && err.contains("/bin/true"),
        "{err}"
    );
}

#[test]
fn full_ring_counts_lost_releases_apart() {
    if !privileged("full_ring_counts_lost_releases_apart") {
        return;
    }
    let _k = kernel();
    let tracer = attach_to_self();
    // 1 MiB of ring holds about 13 000 events of 80 bytes; nothing drains it here.
    let calls = 30_000u64;
    for i in 0..calls {
        erts_munmap(0x5555, 0, FAKE_MAPPING + i * 4096, 4096);
    }
    let losses = tracer.losses();
    eprintln!("{calls} munmaps, nothing drained: {losses:?}");
    assert!(
        losses.events_lost > 0 && losses.events_lost < calls,
        "{losses:?}"
    );
    // Every lost event was a release: the carrier figures are an upper bound, and say so.
    assert_eq!(losses.events_lost_frees, losses.events_lost, "{losses:?}");
    assert_eq!(losses.events_lost_resizes, 0, "{losses:?}");
    assert!(losses.unreadable.is_empty(), "{losses:?}");
    let bound = losses.carrier_bound().expect("lost events are stated");
    assert!(bound.contains("upper bound"), "{bound}");
}
