//! Where the target's resident memory is now: RSS split into files, ERTS carriers, the mseg
//! cache, malloc arenas, thread stacks and other anonymous mappings, from `/proc/PID/maps` and
//! the pagemap. Ledger lines are changes since attach; this is the level an operator who
//! arrives after the fact needs ("RSS is 8 GB, erlang:memory says 3: where is the rest?").

use std::{collections::BTreeMap, io};

pub use crate::recording::resident::Breakdown;
use crate::resident::{self, Pagemap, Range};

// Thread arenas are mmap'd aligned to glibc's `HEAP_MAX_SIZE` (malloc/arena.c, `new_heap`),
// which is how they are told apart in the maps.
use super::glibc_heap::HEAP_MAX;

/// What one mapping of the target holds, as the maps show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Backed by a file: the object's path.
    File(String),
    /// glibc's main heap (`[heap]`) or a thread arena (64 MiB-aligned anonymous region).
    MallocArena,
    /// `[stack]`, or an anonymous region right above a guard page (a thread's stack).
    ThreadStack,
    /// Any other anonymous mapping.
    OtherAnon,
    /// Not counted in RSS lines of its own (guard pages, vdso, vvar).
    Ignored,
}

/// One line of `/proc/PID/maps`, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Address range.
    pub range: Range,
    /// What it holds.
    pub kind: Kind,
}

/// Classifies every mapping in `maps` text.
pub fn classify(maps: &str) -> Vec<Region> {
    // (range, perms, path) of every line.
    let lines: Vec<(Range, String, String)> = maps
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            let path = line
                .split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ");
            Some((
                (
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ),
                perms,
                path,
            ))
        })
        .collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, (range, perms, path)) in lines.iter().enumerate() {
        let kind = if path.starts_with('/') {
            Kind::File(path.trim_end_matches(" (deleted)").to_string())
        } else if path == "[heap]" {
            Kind::MallocArena
        } else if path == "[stack]" {
            Kind::ThreadStack
        } else if path.starts_with('[') || !perms.starts_with("rw") {
            Kind::Ignored
        } else if range.0 % HEAP_MAX == 0 && arena_shape(&lines, i) {
            Kind::MallocArena
        } else if i > 0 && {
            let (prev, pperms, ppath) = &lines[i - 1];
            prev.1 == range.0 && pperms.starts_with("---") && ppath.is_empty()
        } {
            Kind::ThreadStack
        } else {
            Kind::OtherAnon
        };
        out.push(Region {
            range: *range,
            kind,
        });
    }
    out
}

/// A thread arena is one HEAP_MAX region: the used part read-write, the reserve after it
/// `---p`, ending on a HEAP_MAX boundary (or the whole region read-write).
fn arena_shape(lines: &[(Range, String, String)], i: usize) -> bool {
    let (range, _, _) = &lines[i];
    if range.1 - range.0 == HEAP_MAX {
        return true;
    }
    if range.1 - range.0 > HEAP_MAX {
        return false;
    }
    match lines.get(i + 1) {
        Some((next, perms, path)) => {
            next.0 == range.1
                && perms.starts_with("---")
                && path.is_empty()
                && next.1 == range.0 + HEAP_MAX
        }
        None => false,
    }
}

/// ERTS ranges the carrier probes know, for the breakdown.
#[derive(Clone, Debug, Default)]
pub struct ErtsRanges {
    /// Carriers in use, by allocator name.
    pub carriers: Vec<(String, Range)>,
    /// ERTS mappings held in the mseg cache.
    pub mseg_cache: Vec<Range>,
    /// Whether the mseg cache is told apart (else its segments count with the carriers).
    pub mseg_known: bool,
    /// Whether the probes were there to see them (else the carrier lines are `None`).
    pub known: bool,
}

/// Builds the breakdown from classified regions, ERTS ranges and a residency function (resident
/// bytes of each range, in order).
pub fn compute(
    regions: &[Region],
    erts: &ErtsRanges,
    arenas: &[Range],
    rss: u64,
    mut resident_of: impl FnMut(&[Range]) -> Vec<u64>,
) -> Breakdown {
    // Heaps the malloc walk found are arenas whatever their shape in the maps (adjacent heaps
    // merge into one mapping that looks like neither an arena nor a carrier).
    let arenas = resident::union(arenas.to_vec());
    let erts = &ErtsRanges {
        carriers: erts
            .carriers
            .iter()
            .flat_map(|(n, r)| {
                resident::subtract(&[*r], &arenas)
                    .into_iter()
                    .map(move |p| (n.clone(), p))
            })
            .collect(),
        mseg_cache: resident::subtract(&erts.mseg_cache, &arenas),
        mseg_known: erts.mseg_known,
        known: erts.known,
    };
    let erts_all: Vec<Range> = resident::union(
        erts.carriers
            .iter()
            .map(|(_, r)| *r)
            .chain(erts.mseg_cache.iter().copied())
            .collect(),
    );
    let mut b = Breakdown {
        rss,
        ..Breakdown::default()
    };
    let mut ranges: Vec<Range> = Vec::new();
    // The region each range comes from, and whether it lies in a heap the walk found.
    let mut owners: Vec<(usize, bool)> = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let parts = match r.kind {
            Kind::Ignored => continue,
            Kind::File(_) => vec![r.range],
            _ => resident::subtract(&[r.range], &erts_all),
        };
        for p in parts {
            if matches!(r.kind, Kind::File(_)) {
                ranges.push(p);
                owners.push((i, false));
                continue;
            }
            let outside = resident::subtract(&[p], &arenas);
            for q in resident::subtract(&[p], &outside) {
                ranges.push(q);
                owners.push((i, true));
            }
            for q in outside {
                ranges.push(q);
                owners.push((i, false));
            }
        }
    }
    let res = resident_of(&ranges);
    let mut objects: BTreeMap<String, u64> = BTreeMap::new();
    for (&(i, in_heap), &bytes) in owners.iter().zip(&res) {
        if in_heap {
            b.malloc_arenas += bytes;
            continue;
        }
        match &regions[i].kind {
            Kind::File(p) => {
                b.file += bytes;
                *objects.entry(p.clone()).or_default() += bytes;
            }
            Kind::MallocArena => b.malloc_arenas += bytes,
            Kind::ThreadStack => b.thread_stacks += bytes,
            Kind::OtherAnon => b.other_anon += bytes,
            Kind::Ignored => {}
        }
    }
    if erts.known {
        let carrier_ranges: Vec<Range> = erts.carriers.iter().map(|(_, r)| *r).collect();
        let cres = resident_of(&carrier_ranges);
        let mut by_alloc: BTreeMap<String, u64> = BTreeMap::new();
        for ((name, _), bytes) in erts.carriers.iter().zip(&cres) {
            if name.is_empty() {
                continue;
            }
            *by_alloc.entry(name.clone()).or_default() += bytes;
        }
        b.erts_carriers = Some(cres.iter().sum());
        b.mseg_cache = erts
            .mseg_known
            .then(|| resident_of(&erts.mseg_cache).iter().sum());
        b.by_allocator = sorted(by_alloc);
    }
    let counted = b.file
        + b.erts_carriers.unwrap_or(0)
        + b.mseg_cache.unwrap_or(0)
        + b.malloc_arenas
        + b.thread_stacks
        + b.other_anon;
    b.unaccounted = Some(rss as i64 - counted as i64);
    b.by_object = sorted(objects);
    b
}

/// Adds what glibc holds (its arenas walked from outside) to `b`.
pub fn add_malloc_walk(b: &mut Breakdown, walk: Result<super::glibc_heap::HeapSummary, String>) {
    match walk {
        Ok(w) => {
            b.malloc_in_use = Some(w.in_use_bytes);
            b.malloc_free = Some(w.free_bytes);
            b.malloc_walk = Some(w);
        }
        Err(why) => b.malloc_unwalked = Some(why),
    }
}

fn sorted(m: BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// VmRSS of `pid` in bytes.
pub fn read_rss(pid: u32) -> io::Result<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .map_err(io::Error::other)?
        .vmrss
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status has no VmRSS line")))
}

/// The breakdown of a live target now: glibc's arenas walked first (the heaps it finds are
/// arenas in the maps too), then the maps and the pagemap.
/// `erts` locates the ERTS ranges in the same maps text (read once, capped).
pub fn measure(pid: u32, erts: impl FnOnce(&str) -> ErtsRanges) -> io::Result<Breakdown> {
    let maps = super::maps_text(pid)?;
    let erts = &erts(&maps);
    let walk = super::glibc_heap::walk(pid, &maps).map_err(|e| e.to_string());
    let heaps = walk.as_ref().map(|w| w.heaps.clone()).unwrap_or_default();
    let regions = classify(&maps);
    let rss = read_rss(pid)?;
    let mut pagemap = Pagemap::open(pid)?;
    let mut err = None;
    let mut b = compute(&regions, erts, &heaps, rss, |ranges| {
        pagemap.resident_bytes(ranges).unwrap_or_else(|e| {
            err = Some(e);
            vec![0; ranges.len()]
        })
    });
    if let Some(e) = err {
        return Err(e);
    }
    add_malloc_walk(&mut b, walk);
    Ok(b)
}

/// The breakdown as a block of lines for the terminal and `leaktrace vm`: each line in bytes and
/// % of RSS. `vm_carriers` is the VM's own carrier figure (allocated), shown beside the
/// resident one; `native_objects` how many objects to name among the files.
pub fn render(label: &str, b: &Breakdown, vm_carriers: Option<u64>) -> Vec<String> {
    use crate::units::{human_bytes, percent};
    let rss = b.rss as f64;
    let row = |name: &str, v: u64, note: String| {
        let note = if note.is_empty() {
            String::new()
        } else {
            format!("  {note}")
        };
        format!(
            "  {name:<17} {:>10} {:>4}{note}",
            human_bytes(v as f64),
            percent(v as f64, rss)
        )
    };
    let mut o = vec![format!("resident {label}: {}", human_bytes(rss))];
    let objects: Vec<String> = b
        .by_object
        .iter()
        .take(3)
        .map(|(p, v)| {
            let short = p.rsplit('/').next().unwrap_or(p);
            format!("{short} {}", human_bytes(*v as f64))
        })
        .collect();
    o.push(row("file-backed", b.file, objects.join(", ")));
    match b.erts_carriers {
        Some(c) => {
            let mut note = match vm_carriers {
                Some(vm) if vm > c => format!(
                    "located by their shape in the maps; the VM counts {} in carriers, the rest lies in the lines below",
                    human_bytes(vm as f64)
                ),
                Some(vm) => format!("the VM counts {} in carriers", human_bytes(vm as f64)),
                None => String::new(),
            };
            if b.mseg_cache.is_none() {
                note = format!("with the mseg cache; {note}");
            }
            o.push(row(
                "ERTS carriers",
                c,
                note.trim_end_matches("; ").to_string(),
            ));
        }
        None => o.push(format!(
            "  ERTS carriers     not located (they count in the lines below){}",
            vm_carriers
                .map(|vm| format!("; the VM counts {} in carriers", human_bytes(vm as f64)))
                .unwrap_or_default()
        )),
    }
    if let Some(c) = b.mseg_cache {
        o.push(row("mseg cache", c, String::new()));
    }
    let malloc_note = match (&b.malloc_walk, &b.malloc_unwalked) {
        (Some(w), _) => format!(
            "glibc {} walked {} of heap: in use {}, free {} (top {}, cached {}) in {} arena{}{}",
            w.glibc,
            human_bytes(w.heap_bytes as f64),
            human_bytes(w.in_use_bytes as f64),
            human_bytes(w.free_bytes as f64),
            human_bytes(w.top_bytes as f64),
            human_bytes(w.cached_bytes as f64),
            w.arenas,
            if w.arenas == 1 { "" } else { "s" },
            if w.complete { "" } else { " (walk partial)" }
        ),
        (None, Some(why)) => format!("not walked: {why}"),
        (None, None) => String::new(),
    };
    o.push(row("malloc arenas", b.malloc_arenas, malloc_note));
    o.push(row("thread stacks", b.thread_stacks, String::new()));
    o.push(row("other anonymous", b.other_anon, String::new()));
    if let Some(u) = b.unaccounted {
        o.push(format!(
            "  {:<17} {:>10} {:>4}",
            "unaccounted",
            human_bytes(u as f64),
            percent(u as f64, rss)
        ));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0400000 r-xp 00000000 08:01 123 /usr/lib/erlang/erts-13.1.5/bin/beam.smp
55d0c1000000-55d0c5000000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
7f0000800000-7f0004000000 ---p 00000000 00:00 0
7f1000000000-7f1000001000 ---p 00000000 00:00 0
7f1000001000-7f1000101000 rw-p 00000000 00:00 0
7f1000200000-7f1000600000 rw-p 00000000 00:00 0
7f2000000000-7f2000100000 r-xp 00000000 08:01 456 /opt/app/priv/my_nif.so
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd10000000-7ffd10002000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn classifies_heap_arena_stack_file_and_other() {
        let r = classify(MAPS);
        let kinds: Vec<&Kind> = r.iter().map(|r| &r.kind).collect();
        assert_eq!(
            kinds,
            vec![
                &Kind::File("/usr/lib/erlang/erts-13.1.5/bin/beam.smp".into()),
                &Kind::MallocArena,
                &Kind::MallocArena,
                &Kind::Ignored,
                &Kind::Ignored,
                &Kind::ThreadStack,
                &Kind::OtherAnon,
                &Kind::File("/opt/app/priv/my_nif.so".into()),
                &Kind::ThreadStack,
                &Kind::Ignored,
            ],
            "{r:#?}"
        );
    }

    #[test]
    fn erts_ranges_are_taken_out_of_anonymous_lines() {
        let regions = classify(MAPS);
        let erts = ErtsRanges {
            carriers: vec![("ets_alloc".into(), (0x7f1000200000, 0x7f1000400000))],
            mseg_cache: vec![(0x7f1000400000, 0x7f1000500000)],
            mseg_known: true,
            known: true,
        };
        // Every range fully resident.
        let b = compute(&regions, &erts, &[], 200 << 20, |rs| {
            rs.iter().map(|r| r.1 - r.0).collect()
        });
        assert_eq!(b.erts_carriers, Some(2 << 20));
        assert_eq!(b.mseg_cache, Some(1 << 20));
        assert_eq!(b.other_anon, 1 << 20);
        assert_eq!(b.malloc_arenas, (64 << 20) + (8 << 20));
        assert_eq!(b.thread_stacks, (1 << 20) + 0x21000);
        assert_eq!(b.file, (4 << 20) + (1 << 20));
        assert_eq!(b.by_object[0].0, "/usr/lib/erlang/erts-13.1.5/bin/beam.smp");
        assert_eq!(b.by_allocator, vec![("ets_alloc".to_string(), 2 << 20)]);
        let counted = b.file + (3 << 20) + b.malloc_arenas + b.thread_stacks + b.other_anon;
        assert_eq!(b.unaccounted, Some((200 << 20) - counted as i64));
        assert_eq!(b.malloc_in_use, None);
        let lines = render("at attach", &b, Some(3 << 20));
        assert_eq!(lines[0], "resident at attach: 200.0 MiB", "{lines:#?}");
        assert!(
            lines[1].contains("file-backed") && lines[1].contains("5.0 MiB"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains("ERTS carriers") && lines[2].contains("3.0 MiB in carriers"),
            "{lines:#?}"
        );
    }

    #[test]
    fn without_probes_carrier_lines_are_unknown() {
        let b = compute(
            &classify(MAPS),
            &ErtsRanges::default(),
            &[],
            1 << 30,
            |rs| vec![0; rs.len()],
        );
        assert_eq!((b.erts_carriers, b.mseg_cache), (None, None));
        assert_eq!(b.unaccounted, Some(1 << 30));
    }

    #[test]
    fn heaps_the_walk_found_are_arenas_even_when_merged_into_one_mapping() {
        // Two full thread heaps side by side: one 128 MiB mapping, 256 KiB-aligned at both
        // ends, so by shape alone it would pass for ERTS carriers.
        let maps = "7f0000000000-7f0008000000 rw-p 00000000 00:00 0\n";
        let regions = classify(maps);
        let erts = ErtsRanges {
            carriers: vec![(String::new(), (0x7f0000000000, 0x7f0008000000))],
            known: true,
            ..ErtsRanges::default()
        };
        let heaps = [
            (0x7f0000000000, 0x7f0004000000),
            (0x7f0004000000, 0x7f0008000000),
        ];
        let b = compute(&regions, &erts, &heaps, 128 << 20, |rs| {
            rs.iter().map(|r| r.1 - r.0).collect()
        });
        assert_eq!(b.malloc_arenas, 128 << 20, "{b:?}");
        assert_eq!((b.erts_carriers, b.other_anon), (Some(0), 0), "{b:?}");
    }
}
