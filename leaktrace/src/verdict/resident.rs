//! Level findings from the resident breakdown: memory that sits outside the VM's carriers when
//! the tracer arrives. Ledger lines are changes since attach; these are what was already there.
//!
//! - Freed memory glibc keeps (its arenas resident and mostly free) is `fragmentation` of the
//!   malloc arenas, with what would give it back.
//! - Memory in use outside the VM that does not grow is not a leak in progress, but it is not
//!   `healthy` either until something names its owner: `inconclusive`, with its size, where it
//!   lies, the native objects that are not OTP's, and the command that would decide.

use super::{Culprit, CulpritKind, Finding, VerdictKind};
use crate::{
    recording::{Recording, resident::Breakdown},
    units::human_bytes,
};

/// The breakdown the level findings read: at attach (the state the operator arrived to), else
/// at the end.
fn level(rec: &Recording) -> Option<&Breakdown> {
    let r = rec.resident.as_ref()?;
    r.at_attach.as_ref().or(r.at_end.as_ref())
}

/// Resident bytes of the malloc arenas in use and free, each at most what is resident there
/// (the walk counts mapped chunk bytes; the figures shown are never more than the pages held).
fn malloc_split(b: &Breakdown) -> Option<(u64, u64)> {
    let in_use = b.malloc_in_use?.min(b.malloc_arenas);
    let free = b.malloc_free?.min(b.malloc_arenas - in_use);
    Some((in_use, free))
}

/// Resident bytes outside the VM that something holds (not free inside malloc's arenas):
/// malloc in use (all of the arenas when they were not walked), anonymous mappings beyond the
/// VM's own carrier figure, and what nothing accounts for. ERTS carriers not located by their
/// shape sit among the anonymous mappings, so the VM's figure is taken from those; without the
/// VM's figure, anonymous mappings are not counted at all (they may all be carriers).
fn held_outside(b: &Breakdown, vm_carriers: Option<u64>) -> u64 {
    let malloc = malloc_split(b).map_or(b.malloc_arenas, |(in_use, _)| in_use);
    let anon = vm_carriers.map_or(0, |vm| {
        (b.other_anon + b.erts_carriers.unwrap_or(0) + b.mseg_cache.unwrap_or(0)).saturating_sub(vm)
    });
    malloc + anon + b.unaccounted.unwrap_or(0).max(0) as u64
}

/// OTP's own applications with native code (their NIFs and drivers are not candidates).
const OTP_NATIVE_APPS: &[&str] = &[
    "asn1",
    "crypto",
    "erts",
    "megaco",
    "odbc",
    "os_mon",
    "runtime_tools",
    "wx",
];

/// C runtime and system libraries every node maps (not candidates).
const SYSTEM_LIBS: &[&str] = &[
    "libc.so",
    "libm.so",
    "ld-linux",
    "libpthread",
    "libdl.so",
    "librt.so",
    "libtinfo",
    "libstdc++",
    "libgcc_s",
    "libz.so",
    "libcrypto",
    "libssl",
    "libsystemd",
    "libnss_",
    "locale-archive",
    "gconv",
];

/// Whether a mapped object is part of OTP, the C runtime or the VM's own mappings.
fn is_otp_or_system(path: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path);
    if path.starts_with("/memfd:") || path.contains("/erts-") || file == "beam.smp" {
        return true;
    }
    if let Some((_, rest)) = path.split_once("/lib/erlang/lib/")
        && let Some(app) = rest.split('/').next()
        && let Some((name, _vsn)) = app.rsplit_once('-')
        && OTP_NATIVE_APPS.contains(&name)
    {
        return true;
    }
    SYSTEM_LIBS.iter().any(|l| file.contains(l))
}

/// Native objects mapped by the node that are neither OTP's nor the C runtime's: the candidates
/// for memory in use outside the VM.
pub fn native_candidates(b: &Breakdown) -> Vec<&str> {
    b.by_object
        .iter()
        .map(|(p, _)| p.as_str())
        .filter(|p| !is_otp_or_system(p))
        .filter(|p| p.contains(".so"))
        .collect()
}

/// Freed memory that glibc keeps: `fragmentation` of the malloc arenas, by level.
pub fn malloc_fragmentation(rec: &Recording) -> Option<Finding> {
    let th = &rec.thresholds;
    let b = level(rec)?;
    let walk = b.malloc_walk.as_ref()?;
    let (in_use, free) = malloc_split(b)?;
    if (free as f64) < th.frag_min_free_bytes
        || in_use as f64 > th.frag_max_usage * (in_use + free) as f64
    {
        return None;
    }
    let bins = free.saturating_sub(walk.top_bytes.min(free));
    let detail = format!(
        "glibc {} holds {} free in {} arena{} (usage {:.0}%: {} in use by {} chunks; {} free in bins and caches between live chunks, {} at the top{}): freed chunks stay resident because live ones are spread over the heap. What gives it back: malloc_trim(0) in the process returns the free pages inside every arena (glibc 2.8+); MALLOC_ARENA_MAX=2 bounds the thread arenas; MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ only trim the top; an allocator that returns freed pages itself (jemalloc, mimalloc by LD_PRELOAD) avoids it",
        walk.glibc,
        human_bytes(free as f64),
        walk.arenas,
        if walk.arenas == 1 { "" } else { "s" },
        100.0 * in_use as f64 / (in_use + free).max(1) as f64,
        human_bytes(in_use as f64),
        walk.in_use_chunks,
        human_bytes(bins as f64),
        human_bytes(walk.top_bytes.min(free) as f64),
        if walk.complete {
            ""
        } else {
            "; the walk stopped early, figures are partial"
        },
    );
    Some(Finding {
        kind: VerdictKind::Fragmentation,
        summary: format!(
            "malloc arenas hold {} of freed memory, {} resident with {} in use ({:.0}% usage)",
            human_bytes(free as f64),
            human_bytes(b.malloc_arenas as f64),
            human_bytes(in_use as f64),
            100.0 * in_use as f64 / (in_use + free).max(1) as f64,
        ),
        culprits: vec![Culprit {
            kind: CulpritKind::MallocArenas,
            name: "malloc arenas".into(),
            bytes: free as i64,
            growth_bytes_per_s: 0.0,
            detail: Some(detail),
        }],
    })
}

/// Resident memory held outside the VM at attach, a large share of RSS: its size, where it
/// lies, the candidates and the command that would decide. `None` below the thresholds.
pub fn held_outside_level(rec: &Recording) -> Option<String> {
    let th = &rec.thresholds;
    let b = level(rec)?;
    let vm = rec.samples.iter().find_map(|s| s.vm_allocated);
    let outside = held_outside(b, vm);
    if (outside as f64) < th.outside_min_bytes
        || (outside as f64) < th.outside_min_share * b.rss as f64
    {
        return None;
    }
    let mut parts = Vec::new();
    match malloc_split(b) {
        Some((in_use, _)) => parts.push(format!(
            "malloc arenas, in use {}",
            human_bytes(in_use as f64)
        )),
        None => parts.push(format!(
            "malloc arenas {}{}",
            human_bytes(b.malloc_arenas as f64),
            b.malloc_unwalked
                .as_deref()
                .map(|w| format!(" (not walked: {w})"))
                .unwrap_or_default()
        )),
    }
    let anon = b.other_anon + b.erts_carriers.unwrap_or(0) + b.mseg_cache.unwrap_or(0);
    match vm {
        Some(vm) if anon > vm => parts.push(format!(
            "anonymous mappings {} beyond the VM's {} of carriers",
            human_bytes(anon.saturating_sub(vm) as f64),
            human_bytes(vm as f64)
        )),
        Some(_) => {}
        None => parts.push(format!(
            "anonymous mappings {} not judged (no VM figure to tell carriers from the rest)",
            human_bytes(b.other_anon as f64)
        )),
    }
    if let Some(u) = b.unaccounted.filter(|u| *u > 0) {
        parts.push(format!("unaccounted {}", human_bytes(u as f64)));
    }
    let candidates = native_candidates(b);
    Some(format!(
        "{} resident outside the VM at attach ({:.0}% of RSS {}: {}), not growing during the run; native objects mapped that are not OTP's: {}; to name its owner, run longer with --native on (allocations that stay, by module and function)",
        human_bytes(outside as f64),
        100.0 * outside as f64 / b.rss.max(1) as f64,
        human_bytes(b.rss as f64),
        parts.join(", "),
        if candidates.is_empty() {
            "none (the memory is the C runtime's or the VM's own)".to_string()
        } else {
            candidates.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        recording::resident::{HeapSummary, ResidentLevels},
        verdict::judge,
    };

    fn rec_with(b: Breakdown) -> Recording {
        let mut rec: Recording =
            serde_json::from_str(include_str!("../../tests/recordings/healthy.json")).unwrap();
        rec.resident = Some(ResidentLevels {
            at_attach: Some(b),
            at_end: None,
        });
        rec
    }

    fn objects() -> Vec<(String, u64)> {
        vec![
            ("/usr/lib/erlang/erts-13.1.5/bin/beam.smp".into(), 4 << 20),
            ("/usr/lib/x86_64-linux-gnu/libc.so.6".into(), 1 << 20),
            (
                "/usr/lib/erlang/lib/crypto-5.1.4/priv/lib/crypto.so".into(),
                1 << 20,
            ),
            (
                "/usr/lib/erlang/lib/jiffy-1.1.1/priv/jiffy.so".into(),
                1 << 20,
            ),
            ("/tmp/nif/lt_leak.so".into(), 1 << 20),
        ]
    }

    fn walk(in_use: u64, free: u64) -> HeapSummary {
        HeapSummary {
            glibc: "2.36".into(),
            arenas: 3,
            heap_bytes: in_use + free,
            in_use_bytes: in_use,
            in_use_chunks: in_use / 1008,
            free_bytes: free,
            top_bytes: 128 << 10,
            complete: true,
            ..HeapSummary::default()
        }
    }

    fn breakdown(arenas: u64, in_use: u64, free: u64) -> Breakdown {
        let mut b = Breakdown {
            rss: arenas + (20 << 20),
            file: 18 << 20,
            malloc_arenas: arenas,
            unaccounted: Some(0),
            by_object: objects(),
            ..Breakdown::default()
        };
        crate::target::breakdown::add_malloc_walk(&mut b, Ok(walk(in_use, free)));
        b
    }

    #[test]
    fn memory_in_use_outside_the_vm_at_attach_is_never_healthy() {
        let v = judge(&rec_with(breakdown(160 << 20, 158 << 20, 2 << 20)));
        assert_eq!(v.kind, VerdictKind::Inconclusive, "{v:#?}");
        for want in [
            "158.0 MiB resident outside the VM",
            "malloc arenas, in use 158.0 MiB",
            "/tmp/nif/lt_leak.so",
            "jiffy.so",
            "--native on",
        ] {
            assert!(v.summary.contains(want), "{want}: {}", v.summary);
        }
        for not in ["beam.smp", "libc.so", "crypto.so"] {
            assert!(!v.summary.contains(not), "{not}: {}", v.summary);
        }
    }

    #[test]
    fn freed_memory_glibc_keeps_is_fragmentation_of_the_malloc_arenas() {
        let v = judge(&rec_with(breakdown(200 << 20, 4 << 20, 196 << 20)));
        assert_eq!(v.kind, VerdictKind::Fragmentation, "{v:#?}");
        let c = &v.culprits[0];
        assert_eq!(
            (c.kind, c.name.as_str()),
            (CulpritKind::MallocArenas, "malloc arenas")
        );
        assert_eq!(c.bytes, 196 << 20);
        let d = c.detail.as_deref().unwrap();
        for want in [
            "malloc_trim(0)",
            "MALLOC_ARENA_MAX",
            "MALLOC_TRIM_THRESHOLD_",
            "usage 2%",
        ] {
            assert!(d.contains(want), "{want}: {d}");
        }
    }

    #[test]
    fn free_bytes_never_exceed_what_is_resident() {
        // The walk counts 300 MiB free, but only 100 MiB of the arenas are resident.
        let b = breakdown(100 << 20, 4 << 20, 300 << 20);
        assert_eq!(malloc_split(&b), Some((4 << 20, 96 << 20)));
        let f = malloc_fragmentation(&rec_with(b)).unwrap();
        assert_eq!(f.culprits[0].bytes, 96 << 20);
    }

    #[test]
    fn small_levels_stay_healthy() {
        let v = judge(&rec_with(breakdown(20 << 20, 10 << 20, 10 << 20)));
        assert_eq!(v.kind, VerdictKind::Healthy, "{v:#?}");
    }

    #[test]
    fn unwalked_arenas_count_as_held() {
        let mut b = breakdown(160 << 20, 0, 0);
        b.malloc_in_use = None;
        b.malloc_free = None;
        b.malloc_walk = None;
        b.malloc_unwalked = Some("the process maps no GNU C library".into());
        let v = judge(&rec_with(b));
        assert_eq!(v.kind, VerdictKind::Inconclusive, "{v:#?}");
        assert!(
            v.summary
                .contains("not walked: the process maps no GNU C library"),
            "{}",
            v.summary
        );
    }

    #[test]
    fn thresholds_come_from_the_recording() {
        let mut rec = rec_with(breakdown(160 << 20, 158 << 20, 2 << 20));
        rec.thresholds.outside_min_bytes = 512.0 * 1024.0 * 1024.0;
        assert_eq!(judge(&rec).kind, VerdictKind::Healthy);
    }

    #[test]
    fn anonymous_memory_beyond_the_vm_carriers_is_held_outside() {
        let mut b = breakdown(10 << 20, 5 << 20, 5 << 20);
        b.other_anon = 200 << 20;
        b.rss += 200 << 20;
        assert_eq!(held_outside(&b, Some(100 << 20)), (5 << 20) + (100 << 20));
        assert_eq!(held_outside(&b, None), 5 << 20);
    }
}
