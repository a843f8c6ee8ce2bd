//! Resident pages of address ranges of a process, from `/proc/PID/pagemap`, and the small
//! interval arithmetic the carrier ledger needs around it.
//!
//! `pagemap` holds one 64-bit entry per virtual page: bit 63 = present in RAM, bit 62 =
//! swapped. A page counts as resident when it is present, which is what RSS counts too (a
//! swapped page is in neither). Entries of unmapped addresses read as 0, so a read may span
//! small holes between ranges.
//!
//! Why pagemap and not `/proc/PID/smaps`: smaps gives `Rss` per VMA, and a VMA is not a
//! carrier. The kernel merges adjacent anonymous mappings of equal protection into one VMA
//! (mseg carriers mapped next to each other, next to the mseg cache and to other anonymous
//! mappings, end up as one multi-GiB VMA), and malloc-backed (sys_alloc) carriers live
//! inside heap VMAs shared with everything else malloc holds. smaps therefore cannot say how
//! much of a given carrier is resident; pagemap can, for exactly its pages. smaps is also
//! the dearer read: the kernel walks every VMA of the process and formats some twenty lines
//! per VMA, where pagemap walks only the ranges asked for.
//!
//! Two ways to read it: the `PAGEMAP_SCAN` ioctl (Linux >= 6.7), where the kernel returns
//! runs of present pages and leaves out the shared zero page (which RSS does not count), and
//! plain `pread` of the entries (older kernels; counts zero-page mappings as present).
//!
//! Cost (`residency_cost_of_2_gib_of_carrier_ranges` below, 2 vCPU VM, Linux 6.18):
//! 2 GiB of mapped ranges given as 16,384 carrier-sized ranges of 128 KiB (1/8 of the pages
//! resident): 2.3 ms with `PAGEMAP_SCAN`, 5.5-7 ms reading entries; 512 MiB fully resident:
//! 1.6 ms vs 5.5 ms. That is about 1-3 ms per GiB of carrier address space per sample with
//! the ioctl; on a live ETS node of 1.1 GiB RSS with the node busy on the same 2 vCPUs, a
//! sample took 3-8 ms (it took 16-44 ms reading entries), i.e. under 2% of a 500 ms interval.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
};

/// A half-open address range `[start, end)`.
pub type Range = (u64, u64);

/// Bit 63 of a pagemap entry: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62 of a pagemap entry: the page is swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;

/// Pagemap bytes read at most per `pread` (8192 pages, 32 MiB of address space).
const CHUNK_BYTES: usize = 64 << 10;
/// Ranges closer than this many pages are read in one span (reading a hole costs less than
/// one more system call).
const MERGE_GAP_PAGES: u64 = 64;

/// What one pagemap entry says about its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageState {
    /// In RAM (counted in RSS).
    pub present: bool,
    /// In swap (not counted in RSS).
    pub swapped: bool,
}

/// Decodes one pagemap entry.
pub fn decode(entry: u64) -> PageState {
    PageState {
        present: entry & PM_PRESENT != 0,
        swapped: entry & PM_SWAPPED != 0,
    }
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

/// Pages `[first, end)` that `range` touches (partial pages included).
pub fn pages_of(range: Range, page: u64) -> (u64, u64) {
    let (s, e) = range;
    if e <= s {
        return (s / page, s / page);
    }
    (s / page, e.div_ceil(page))
}

/// Groups page ranges (sorted by start) into read spans: ranges closer than `gap` pages share
/// a span. Returns the spans as page ranges; empty page ranges are skipped.
pub fn read_spans(sorted_pages: &[(u64, u64)], gap: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in sorted_pages.iter().filter(|(a, b)| b > a) {
        match spans.last_mut() {
            Some(last) if a <= last.1.saturating_add(gap) => last.1 = last.1.max(b),
            _ => spans.push((a, b)),
        }
    }
    spans
}

/// Sorts and merges ranges into disjoint ranges (touching ranges are merged too).
pub fn union(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.retain(|(s, e)| e > s);
    ranges.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a \ b` for sorted disjoint range lists. `O(|a| log |b|)` plus the overlaps, so a small
/// `a` against a large `b` is cheap.
pub fn subtract(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        let mut k = b.partition_point(|r| r.1 <= cur);
        while cur < e && k < b.len() && b[k].0 < e {
            if b[k].0 > cur {
                out.push((cur, b[k].0));
            }
            cur = cur.max(b[k].1);
            k += 1;
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// Sum of the lengths of ranges.
pub fn total(ranges: &[Range]) -> u64 {
    ranges.iter().map(|(s, e)| e.saturating_sub(*s)).sum()
}

/// A set of disjoint address ranges, merged on insert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end.
    map: std::collections::BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// A set of `ranges` (any order, may overlap).
    pub fn from_ranges(ranges: &[Range]) -> RangeSet {
        RangeSet {
            map: union(ranges.to_vec()).into_iter().collect(),
        }
    }

    /// Adds `[s, e)`, merging with what it touches.
    pub fn insert(&mut self, (mut s, mut e): Range) {
        if e <= s {
            return;
        }
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back()
            && pe >= s
        {
            s = ps;
            e = e.max(pe);
        }
        let absorbed: Vec<u64> = self.map.range(s..=e).map(|(&k, _)| k).collect();
        for k in absorbed {
            let ke = self.map.remove(&k).expect("listed");
            e = e.max(ke);
        }
        self.map.insert(s, e);
    }

    /// Removes `[s, e)`, splitting what it cuts.
    pub fn remove(&mut self, (s, e): Range) {
        if e <= s {
            return;
        }
        let mut cut: Vec<Range> = Vec::new();
        if let Some((&ps, &pe)) = self.map.range(..s).next_back()
            && pe > s
        {
            cut.push((ps, pe));
        }
        cut.extend(self.map.range(s..e).map(|(&k, &v)| (k, v)));
        for (cs, ce) in cut {
            self.map.remove(&cs);
            if cs < s {
                self.map.insert(cs, s);
            }
            if ce > e {
                self.map.insert(e, ce);
            }
        }
    }

    /// Whether every byte of `[s, e)` is in the set.
    pub fn covers(&self, (s, e): Range) -> bool {
        if e <= s {
            return true;
        }
        matches!(self.map.range(..=s).next_back(), Some((_, &pe)) if pe >= e)
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> Vec<Range> {
        self.map.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// The parts of `[s, e)` not in the set.
    pub fn missing(&self, r: Range) -> Vec<Range> {
        let mut inside: Vec<Range> = Vec::new();
        if let Some((&ps, &pe)) = self.map.range(..r.0).next_back()
            && pe > r.0
        {
            inside.push((ps, pe));
        }
        inside.extend(self.map.range(r.0..r.1).map(|(&k, &v)| (k, v)));
        subtract(&[r], &inside)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Present-page bits of some spans of a process's address space at one instant.
#[derive(Clone, Debug, Default)]
pub struct Presence {
    page: u64,
    /// (first page, page count, one bit per page).
    spans: Vec<(u64, u64, Vec<u64>)>,
}

impl Presence {
    /// Present pages of `range`, in bytes (whole pages, as RSS counts them).
    pub fn resident_bytes(&self, range: Range) -> u64 {
        let (a, b) = pages_of(range, self.page);
        // Spans are sorted and disjoint: start at the last one beginning at or before `a`.
        let from = self
            .spans
            .partition_point(|(first, _, _)| *first <= a)
            .saturating_sub(1);
        let mut n = 0;
        for (first, count, bits) in self.spans[from..].iter().take_while(|(f, _, _)| *f < b) {
            let (lo, hi) = (a.max(*first), b.min(first + count));
            if lo < hi {
                n += count_bits(bits, lo - first, hi - first);
            }
        }
        n * self.page
    }

    /// A presence map of the given present page numbers (tests and simulations).
    pub fn from_present_pages(page: u64, present: &[u64]) -> Presence {
        let (Some(&lo), Some(&hi)) = (present.iter().min(), present.iter().max()) else {
            return Presence {
                page,
                spans: Vec::new(),
            };
        };
        let count = hi - lo + 1;
        let mut bits = vec![0u64; count.div_ceil(64) as usize];
        for p in present {
            let i = p - lo;
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        Presence {
            page,
            spans: vec![(lo, count, bits)],
        }
    }

    /// Bytes of address space covered.
    pub fn covered_bytes(&self) -> u64 {
        self.spans.iter().map(|(_, c, _)| c * self.page).sum()
    }
}

/// The bitmap words covering bits `[lo, hi)`, each with the mask of its bits in the range.
fn word_masks(lo: u64, hi: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut i = lo;
    std::iter::from_fn(move || {
        if i >= hi {
            return None;
        }
        let off = i % 64;
        let take = (64 - off).min(hi - i);
        let mask = if take == 64 {
            u64::MAX
        } else {
            ((1u64 << take) - 1) << off
        };
        let word = (i / 64) as usize;
        i += take;
        Some((word, mask))
    })
}

/// Set bits of `bits` in `[lo, hi)`.
pub fn count_bits(bits: &[u64], lo: u64, hi: u64) -> u64 {
    word_masks(lo, hi)
        .map(|(w, mask)| (bits.get(w).copied().unwrap_or(0) & mask).count_ones() as u64)
        .sum()
}

/// Sets bits `[lo, hi)`.
pub fn set_bits(bits: &mut [u64], lo: u64, hi: u64) {
    for (w, mask) in word_masks(lo, hi) {
        if let Some(word) = bits.get_mut(w) {
            *word |= mask;
        }
    }
}

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)` (linux/fs.h, Linux >= 6.7).
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
/// Page categories of `PAGEMAP_SCAN`.
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Regions asked per `PAGEMAP_SCAN` call.
const SCAN_REGIONS: usize = 4096;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    page: u64,
    buf: Vec<u8>,
    /// Whether `PAGEMAP_SCAN` is (still believed to be) available.
    scan: bool,
}

impl Pagemap {
    /// Opens the pagemap of `pid` (root, or the same user with ptrace access).
    pub fn open(pid: u32) -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
            page: page_size(),
            buf: vec![0; CHUNK_BYTES],
            scan: true,
        })
    }

    /// The same pagemap read by entries only (no `PAGEMAP_SCAN`), as on kernels before 6.7.
    pub fn without_scan(mut self) -> Pagemap {
        self.scan = false;
        self
    }

    /// Whether reads use `PAGEMAP_SCAN`.
    pub fn uses_scan(&self) -> bool {
        self.scan
    }

    /// The page size used.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// Present bits of the pages `[a, b)`: `PAGEMAP_SCAN` when the kernel has it, else
    /// reading the entries.
    fn read_bits(&mut self, span: (u64, u64)) -> io::Result<Vec<u64>> {
        if self.scan {
            match self.scan_bits(span) {
                Ok(bits) => return Ok(bits),
                // Before Linux 6.7 the ioctl does not exist: read entries from now on.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP)
                    ) =>
                {
                    self.scan = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.entry_bits(span)
    }

    /// `PAGEMAP_SCAN` (Linux >= 6.7): the kernel returns runs of pages that are present and
    /// not the shared zero page (which RSS does not count either), without copying an entry
    /// per page. About 10x cheaper than reading entries on resident memory.
    fn scan_bits(&mut self, (a, b): (u64, u64)) -> io::Result<Vec<u64>> {
        let mut bits = vec![0u64; (b - a).div_ceil(64) as usize];
        let mut regions = vec![PageRegion::default(); SCAN_REGIONS];
        let mut at = a * self.page;
        let end = b * self.page;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: at,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_inverted: PAGE_IS_PFNZERO,
                category_mask: PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                return_mask: PAGE_IS_PRESENT,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to `vec_len` regions
            // that outlive the call.
            let n = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN as _,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for r in &regions[..n as usize] {
                let lo = (r.start / self.page).clamp(a, b) - a;
                let hi = (r.end.div_ceil(self.page)).clamp(a, b) - a;
                set_bits(&mut bits, lo, hi);
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(bits)
    }

    /// Present bits of the pages `[a, b)`, read in chunks of at most [`CHUNK_BYTES`].
    fn entry_bits(&mut self, (a, b): (u64, u64)) -> io::Result<Vec<u64>> {
        let count = b - a;
        let mut bits = vec![0u64; count.div_ceil(64) as usize];
        let per_chunk = (CHUNK_BYTES / 8) as u64;
        let mut p = a;
        while p < b {
            let n = per_chunk.min(b - p) as usize;
            let buf = &mut self.buf[..n * 8];
            let mut got = 0;
            while got < buf.len() {
                match self.file.read_at(&mut buf[got..], (p * 8) + got as u64) {
                    Ok(0) => break, // past the end of the address space: not present
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf[got..].fill(0);
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
                if decode(entry).present {
                    let idx = p - a + i as u64;
                    bits[(idx / 64) as usize] |= 1 << (idx % 64);
                }
            }
            p += n as u64;
        }
        Ok(bits)
    }

    /// Present bits of the pages of `ranges` (any order, may overlap).
    pub fn presence(&mut self, ranges: &[Range]) -> io::Result<Presence> {
        let mut pages: Vec<(u64, u64)> = ranges.iter().map(|&r| pages_of(r, self.page)).collect();
        pages.sort_unstable();
        let mut spans = Vec::new();
        for span in read_spans(&pages, MERGE_GAP_PAGES) {
            let bits = self.read_bits(span)?;
            spans.push((span.0, span.1 - span.0, bits));
        }
        Ok(Presence {
            page: self.page,
            spans,
        })
    }

    /// Resident bytes of each range, in the order given (whole pages: a range that shares a
    /// page with its neighbour counts that page too).
    pub fn resident_bytes(&mut self, ranges: &[Range]) -> io::Result<Vec<u64>> {
        let presence = self.presence(ranges)?;
        Ok(ranges.iter().map(|&r| presence.resident_bytes(r)).collect())
    }
}

/// Anonymous, private, writable mappings of `pid` (`/proc/PID/maps`: no path, or `[heap]`),
/// where a process's carriers, caches and malloc arenas live.
pub fn anonymous_writable_mappings(pid: u32) -> io::Result<Vec<Range>> {
    let text = crate::target::maps_text(pid)?;
    Ok(parse_anonymous_writable(&text))
}

/// The parsing half of [`anonymous_writable_mappings`].
pub fn parse_anonymous_writable(maps: &str) -> Vec<Range> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("");
        if !perms.starts_with("rw")
            || !perms.ends_with('p')
            || !(path.is_empty() || path == "[heap]")
        {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
            out.push((s, e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_present_and_swapped_bits() {
        assert_eq!(
            decode(PM_PRESENT | 0x1234),
            PageState {
                present: true,
                swapped: false
            }
        );
        assert_eq!(
            decode(PM_SWAPPED | (1 << 55)),
            PageState {
                present: false,
                swapped: true
            }
        );
        assert!(!decode(0).present);
    }

    #[test]
    fn pages_of_rounds_out() {
        assert_eq!(pages_of((4096, 8192), 4096), (1, 2));
        assert_eq!(pages_of((4095, 4097), 4096), (0, 2));
        assert_eq!(pages_of((8192, 8192), 4096), (2, 2));
    }

    #[test]
    fn read_spans_merge_close_ranges_only() {
        let spans = read_spans(&[(0, 10), (5, 12), (20, 30), (200, 210), (210, 210)], 64);
        assert_eq!(spans, vec![(0, 30), (200, 210)]);
        assert_eq!(read_spans(&[(0, 10), (11, 12)], 0), vec![(0, 10), (11, 12)]);
    }

    #[test]
    fn union_and_subtract() {
        let u = union(vec![(10, 20), (0, 5), (5, 8), (15, 30), (40, 40)]);
        assert_eq!(u, vec![(0, 8), (10, 30)]);
        assert_eq!(
            subtract(&u, &[(2, 3), (7, 12), (25, 100)]),
            vec![(0, 2), (3, 7), (12, 25)]
        );
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract(&[(0, 10), (20, 30)], &[(0, 30)]), vec![]);
        assert_eq!(total(&u), 28);
    }

    #[test]
    fn range_set_inserts_removes_and_covers() {
        let mut s = RangeSet::new();
        s.insert((10, 20));
        s.insert((30, 40));
        s.insert((20, 30));
        assert_eq!(s.ranges(), vec![(10, 40)]);
        assert!(s.covers((12, 40)));
        assert!(!s.covers((5, 12)));
        s.remove((15, 25));
        assert_eq!(s.ranges(), vec![(10, 15), (25, 40)]);
        assert_eq!(s.missing((0, 50)), vec![(0, 10), (15, 25), (40, 50)]);
        s.insert((0, 100));
        assert_eq!(s.ranges(), vec![(0, 100)]);
        s.remove((0, 100));
        assert!(s.is_empty());
    }

    #[test]
    fn count_bits_across_words() {
        let bits = vec![u64::MAX, 0b1011];
        assert_eq!(count_bits(&bits, 0, 64), 64);
        assert_eq!(count_bits(&bits, 60, 68), 4 + 3);
        assert_eq!(count_bits(&bits, 65, 66), 1);
        assert_eq!(count_bits(&bits, 66, 200), 1);
    }

    #[test]
    fn parses_anonymous_writable_mappings() {
        let maps = "\
55c7f71a0000-55c7f71b6000 rw-p 003e6000 fe:00 746313   /usr/lib/erlang/bin/beam.smp
55c7f71b6000-55c7f71f4000 rw-p 00000000 00:00 0
55c81227d000-55c8124d8000 rw-p 00000000 00:00 0                          [heap]
7fbc4c008000-7fbc50000000 ---p 00000000 00:00 0
7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]
7ffe1000-7ffe2000 rw-s 00000000 00:01 5                          /dev/zero (deleted)
";
        assert_eq!(
            parse_anonymous_writable(maps),
            vec![
                (0x55c7f71b6000, 0x55c7f71f4000),
                (0x55c81227d000, 0x55c8124d8000)
            ]
        );
    }

    /// An anonymous private mapping of our own, unmapped on drop.
    struct Map(*mut u8, usize);

    impl Map {
        fn new(len: usize) -> Map {
            // SAFETY: a fresh anonymous mapping, checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            // No transparent huge pages: a touched byte must make exactly one page resident.
            // SAFETY: the range was just mapped.
            unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
            Map(p.cast(), len)
        }

        fn touch(&self, from: usize, to: usize) {
            let page = page_size() as usize;
            for off in (from..to).step_by(page) {
                // SAFETY: inside the mapping.
                unsafe { self.0.add(off).write_volatile(1) };
            }
        }

        fn range(&self) -> Range {
            (self.0 as u64, self.0 as u64 + self.1 as u64)
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: our own mapping.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    fn both_ways() -> [Pagemap; 2] {
        let open = || Pagemap::open(std::process::id()).expect("own pagemap");
        [open(), open().without_scan()]
    }

    #[test]
    fn counts_touched_pages_of_own_mapping_exactly() {
        for mut pm in both_ways() {
            let m = Map::new(64 << 20);
            assert_eq!(pm.resident_bytes(&[m.range()]).unwrap(), vec![0]);
            m.touch(0, 10 << 20);
            assert_eq!(pm.resident_bytes(&[m.range()]).unwrap(), vec![10 << 20]);
            m.touch(32 << 20, 40 << 20);
            let (s, _) = m.range();
            let halves = [(s, s + (32 << 20)), (s + (32 << 20), s + (64 << 20))];
            assert_eq!(pm.resident_bytes(&halves).unwrap(), vec![10 << 20, 8 << 20]);
            assert_eq!(pm.resident_bytes(&[m.range()]).unwrap(), vec![18 << 20]);
            // Dropping pages (RSS drops too).
            // SAFETY: inside our mapping.
            unsafe { libc::madvise(m.0.cast(), 4 << 20, libc::MADV_DONTNEED) };
            assert_eq!(pm.resident_bytes(&[m.range()]).unwrap(), vec![14 << 20]);
            let presence = pm.presence(&[m.range()]).unwrap();
            assert_eq!(presence.resident_bytes((s, s + (8 << 20))), 4 << 20);
            assert_eq!(presence.covered_bytes(), 64 << 20);
            // A range that is no longer mapped has nothing resident.
            drop(m);
            assert_eq!(pm.resident_bytes(&[(s, s + (64 << 20))]).unwrap(), vec![0]);
        }
    }

    #[test]
    fn pages_only_read_map_the_zero_page_which_scan_does_not_count() {
        let [mut scan, mut entries] = both_ways();
        let m = Map::new(4 << 20);
        let page = page_size() as usize;
        for off in (0..1 << 20).step_by(page) {
            // SAFETY: inside the mapping.
            unsafe { m.0.add(off).read_volatile() };
        }
        m.touch(2 << 20, 3 << 20);
        if scan.uses_scan() {
            assert_eq!(scan.resident_bytes(&[m.range()]).unwrap(), vec![1 << 20]);
        }
        // Entries say present for the zero page: the read fallback overcounts such pages.
        assert_eq!(entries.resident_bytes(&[m.range()]).unwrap(), vec![2 << 20]);
    }

    #[test]
    fn set_bits_across_words() {
        let mut bits = vec![0u64; 3];
        set_bits(&mut bits, 60, 130);
        assert_eq!(count_bits(&bits, 0, 192), 70);
        assert_eq!(bits[1], u64::MAX);
        assert_eq!(bits[2], 0b11);
        set_bits(&mut bits, 190, 400); // past the end: ignored
        assert_eq!(count_bits(&bits, 0, 192), 72);
    }

    /// The cost figures in the module documentation come from here
    /// (`cargo test --release --lib residency_cost -- --nocapture`).
    #[test]
    fn residency_cost_of_2_gib_of_carrier_ranges() {
        let len: usize = 2 << 30;
        let m = Map::new(len);
        let page = page_size() as usize;
        // Every 8th page resident: 256 MiB.
        for off in (0..len).step_by(page * 8) {
            m.touch(off, off + 1);
        }
        let (s, _) = m.range();
        // 16,384 carrier-sized ranges of 128 KiB, given out of order.
        let mut ranges: Vec<Range> = (0..(len as u64 >> 17))
            .map(|i| (s + (i << 17), s + ((i + 1) << 17)))
            .collect();
        ranges.reverse();
        let mut took = Vec::new();
        for mut pm in both_ways() {
            let t = std::time::Instant::now();
            let r = pm.resident_bytes(&ranges).unwrap();
            took.push((pm.uses_scan(), t.elapsed()));
            assert_eq!(r.iter().sum::<u64>(), (len / 8) as u64);
            assert!(r.iter().all(|&b| b == 4 * page as u64));
        }
        // Then 512 MiB of it fully resident.
        m.touch(0, 512 << 20);
        let full = [(s, s + (512 << 20))];
        for mut pm in both_ways() {
            let t = std::time::Instant::now();
            assert_eq!(pm.resident_bytes(&full).unwrap(), vec![512 << 20]);
            took.push((pm.uses_scan(), t.elapsed()));
        }
        eprintln!(
            "2 GiB in 16384 ranges, 1/8 resident (scan?, time): {:?} {:?}; 512 MiB fully resident: {:?} {:?}",
            took[0], took[1], took[2], took[3]
        );
        assert!(took.iter().all(|(_, t)| t.as_millis() < 2000), "{took:?}");
    }
}
