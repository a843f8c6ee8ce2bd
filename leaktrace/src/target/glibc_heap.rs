//! What glibc's malloc holds inside a running process, read from outside: its arenas walked
//! through `/proc/PID/mem`, chunk headers only, giving the bytes in use, the bytes free inside
//! the arenas (in bins, fastbins, tcache, and the top chunk that `malloc_trim` could give back)
//! and a size histogram of the chunks in use.
//!
//! The heap belongs to a process that may be hostile or corrupt, and it keeps changing while it
//! is read (the process is never stopped): every pointer and size is checked against the
//! mapping it must lie in before it is followed, every list walk is bounded, the whole walk is
//! bounded in bytes read and in time, and a check that fails stops that part of the walk and
//! says so. Nothing read is ever trusted to size an allocation.
//!
//! Finding the arenas: `main_arena` is a static of libc (not in `.dynsym`), but the exported
//! `mallinfo2` walks the arena list and loads its address with a rip-relative `lea`, and reads
//! `ar_ptr->next` with a `mov reg, [reg + disp]`: both are decoded from the target's own libc
//! code, so the offset of `next` is read, not assumed. The other offsets are glibc's
//! `struct malloc_state` on x86-64, unchanged from 2.27 (when `have_fastchunks` was added)
//! through 2.41; pointers in fastbin and tcache lists are mangled ("safe-linking") since 2.32.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    time::{Duration, Instant},
};

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use object::{Object as _, ObjectSymbol as _};

/// Largest libc file looked at for its dynamic symbols.
const LIBC_CAP: u64 = 64 << 20;
/// Most arenas followed (glibc's default limit is 8 per core).
const ARENA_CAP: usize = 4096;
/// Most heaps followed per thread arena.
const HEAPS_PER_ARENA_CAP: usize = 4096;
/// Most chunks looked at in one fastbin.
const FASTBIN_CAP: usize = 1 << 20;
/// Most bytes of the target's memory read by one walk.
const READ_BUDGET: u64 = 4 << 30;
/// Longest a walk may take; past it the figures are partial and say so.
const TIME_BUDGET: Duration = Duration::from_secs(3);
/// Bytes read from the target at a time while walking chunks.
const WINDOW: usize = 1 << 20;

/// glibc's `MINSIZE` and `MALLOC_ALIGNMENT` on x86-64.
const MINSIZE: u64 = 32;
const ALIGN: u64 = 16;
/// `HEAP_MAX_SIZE` of thread arenas on 64-bit (2 * DEFAULT_MMAP_THRESHOLD_MAX).
pub const HEAP_MAX: u64 = 64 << 20;
/// `struct malloc_state` offsets on x86-64, glibc 2.27-2.41.
const FASTBINS: u64 = 0x10;
const NFASTBINS: u64 = 10;
const TOP: u64 = 0x60;
/// `sizeof(struct malloc_state)` when `next` is at 0x870 (`next`, `next_free`,
/// `attached_threads`, `system_mem`, `max_system_mem` follow `binmap`).
const STATE_SIZE_AFTER_NEXT: u64 = 0x28;
/// `sizeof(tcache_perthread_struct)` with 64 bins and 16-bit counts (glibc 2.30+), as a chunk.
const TCACHE_CHUNK: u64 = 0x290;
const TCACHE_BINS: usize = 64;

pub use crate::recording::resident::HeapSummary;

/// Why the heap could not be walked at all.
#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    /// The target maps no GNU libc.
    #[error("the process maps no GNU C library (libc.so.6): its malloc is another one")]
    NoLibc,
    /// libc could not be read or understood.
    #[error("cannot read its C library {path}: {reason}")]
    Libc {
        /// The library as the target maps it.
        path: String,
        /// Why.
        reason: String,
    },
    /// The code that leads to the arenas is not the shape expected.
    #[error(
        "cannot find malloc's arenas in glibc {version}: {reason} (walked on glibc 2.27 to 2.41, x86-64)"
    )]
    Layout {
        /// glibc release.
        version: String,
        /// What did not match.
        reason: String,
    },
    /// The target's memory could not be read.
    #[error("cannot read the process's memory ({0}): root or CAP_SYS_PTRACE is needed")]
    Memory(String),
}

/// Reads the target's memory. `/proc/PID/mem` for a live process; an image in tests.
pub trait Memory {
    /// Fills `buf` from address `addr`, or fails.
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// `/proc/PID/mem`.
pub struct ProcMem(File);

impl ProcMem {
    /// Opens the memory of `pid`.
    pub fn open(pid: u32) -> std::io::Result<ProcMem> {
        File::open(format!("/proc/{pid}/mem")).map(ProcMem)
    }
}

impl Memory for ProcMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, addr)
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// First address.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Readable and writable.
    pub rw: bool,
    /// Executable.
    pub exec: bool,
    /// File offset.
    pub offset: u64,
    /// Path or pseudo-name (`[heap]`), empty for anonymous memory.
    pub path: String,
}

/// Parses `/proc/PID/maps` text, every mapping.
pub fn parse_regions(text: &str) -> Vec<Region> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            let (range, perms, offset) = (f.next()?, f.next()?, f.next()?);
            let _dev = f.next()?;
            let _inode = f.next()?;
            let path = f.next().unwrap_or("").trim_start().to_owned();
            let (a, b) = range.split_once('-')?;
            Some(Region {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                rw: perms.starts_with("rw"),
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libc.so.6" || (name.starts_with("libc-2.") && name.ends_with(".so"))
}

/// Where the arenas are: `main_arena`'s address and the offset of `next` in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Address of `main_arena` in the target.
    pub main_arena: u64,
    /// Offset of `next` in `struct malloc_state`.
    pub next: u64,
    /// Fastbin and tcache pointers are mangled (glibc 2.32+).
    pub safe_linking: bool,
    /// `sizeof(heap_info)`: 32, or 48 since glibc 2.35 added its `pagesize` field (a thread
    /// arena's state, and a later heap's first chunk, start right after it).
    pub heap_info_size: u64,
}

/// Decodes `mallinfo2` (at `ip`, bytes `code`) for `lea reg, [rip + d]` (main_arena) and the
/// `mov reg2, [reg2 + d2]` of the arena loop (`ar_ptr = ar_ptr->next`).
pub fn layout_from_mallinfo2(code: &[u8], ip: u64) -> Result<(u64, u64), String> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut arena = None;
    for insn in &mut decoder {
        if insn.is_invalid() {
            break;
        }
        if arena.is_none()
            && insn.mnemonic() == Mnemonic::Lea
            && insn.op1_kind() == OpKind::Memory
            && insn.memory_base() == Register::RIP
        {
            arena = Some(insn.memory_displacement64());
            continue;
        }
        if arena.is_some()
            && insn.mnemonic() == Mnemonic::Mov
            && insn.op0_kind() == OpKind::Register
            && insn.op1_kind() == OpKind::Memory
            && insn.memory_base() == insn.op0_register()
            && insn.memory_index() == Register::None
            && (0x800..0x1000).contains(&insn.memory_displacement64())
        {
            return Ok((arena.unwrap_or(0), insn.memory_displacement64()));
        }
        if insn.mnemonic() == Mnemonic::Ret {
            break;
        }
    }
    Err(match arena {
        None => "no rip-relative lea of main_arena in mallinfo2".into(),
        Some(_) => "no load of ar_ptr->next in mallinfo2's arena loop".into(),
    })
}

/// glibc's release string, from its banner in the library (`... release version 2.36.`).
pub fn glibc_version(libc: &[u8]) -> Option<String> {
    let key = b"release version ";
    let at = libc.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &libc[at..(at + 16).min(libc.len())];
    let v: String = rest
        .iter()
        .take_while(|b| b.is_ascii_digit() || **b == b'.')
        .map(|b| *b as char)
        .collect();
    let v = v.trim_end_matches('.').to_owned();
    (!v.is_empty()).then_some(v)
}

fn version_number(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.split('.').next()?.parse().ok()?))
}

/// Reads the target's libc (through `/proc/PID/map_files`, the very file mapped), finds
/// `mallinfo2` and decodes the arena layout from the target's own copy of its code.
fn find_layout(
    pid: u32,
    regions: &[Region],
    mem: &dyn Memory,
) -> Result<(Layout, String), HeapError> {
    let first = regions
        .iter()
        .find(|r| is_libc(&r.path) && r.offset == 0)
        .ok_or(HeapError::NoLibc)?;
    let path = first.path.clone();
    let libc_err = |reason: String| HeapError::Libc {
        path: path.clone(),
        reason,
    };
    // The very file mapped, through its map_files link: no path the node names is followed.
    let link = std::path::PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        first.start, first.end
    ));
    let file = super::open::open_resolved(&link, super::open::AnyOwner { cap: LIBC_CAP })
        .map_err(libc_err)?;
    let data = super::open::read_capped(file, LIBC_CAP).map_err(libc_err)?;
    let version = glibc_version(&data).unwrap_or_else(|| "unknown".into());
    let elf = object::File::parse(&*data).map_err(|e| libc_err(e.to_string()))?;
    let sym = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok("mallinfo2"))
        .ok_or_else(|| HeapError::Layout {
            version: version.clone(),
            reason: "libc exports no mallinfo2 (glibc before 2.33?)".into(),
        })?;
    let first_load = elf
        .segments()
        .map(|s| object::ObjectSegment::address(&s))
        .min()
        .unwrap_or(0);
    let bias = first.start.wrapping_sub(first_load);
    let ip = bias.wrapping_add(sym.address());
    let mut code = [0u8; 256];
    mem.read(ip, &mut code)
        .map_err(|e| HeapError::Memory(e.to_string()))?;
    let (main_arena, next) =
        layout_from_mallinfo2(&code, ip).map_err(|reason| HeapError::Layout {
            version: version.clone(),
            reason,
        })?;
    let known = version_number(&version).is_some_and(|v| ((2, 27)..=(2, 41)).contains(&v));
    if !known {
        return Err(HeapError::Layout {
            version,
            reason: "no struct layout known for this release".into(),
        });
    }
    let safe_linking = version_number(&version).is_some_and(|v| v >= (2, 32));
    let heap_info_size = if version_number(&version).is_some_and(|v| v >= (2, 35)) {
        48
    } else {
        32
    };
    Ok((
        Layout {
            main_arena,
            next,
            safe_linking,
            heap_info_size,
        },
        version,
    ))
}

/// Walks the malloc arenas of `pid`, whose `/proc/PID/maps` text is `maps`.
pub fn walk(pid: u32, maps: &str) -> Result<HeapSummary, HeapError> {
    let regions = parse_regions(maps);
    let mem = ProcMem::open(pid).map_err(|e| HeapError::Memory(e.to_string()))?;
    let (layout, version) = find_layout(pid, &regions, &mem)?;
    let mut summary = walk_with(&mem, &regions, layout);
    summary.glibc = version;
    Ok(summary)
}

/// The walk itself, over any memory: for tests on heap images too.
pub fn walk_with(mem: &dyn Memory, regions: &[Region], layout: Layout) -> HeapSummary {
    let mut w = Walker {
        mem,
        regions,
        layout,
        started: Instant::now(),
        read: 0,
        s: HeapSummary {
            complete: true,
            ..Default::default()
        },
        sizes: [(0, 0); 64],
    };
    w.arenas();
    w.s.in_use_sizes = w
        .sizes
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(b, (n, bytes))| (1u64 << b, *n, *bytes))
        .collect();
    w.s.walk_ms = w.started.elapsed().as_secs_f64() * 1e3;
    w.s
}

struct Walker<'a> {
    mem: &'a dyn Memory,
    regions: &'a [Region],
    layout: Layout,
    started: Instant,
    read: u64,
    s: HeapSummary,
    sizes: [(u64, u64); 64],
}

impl Walker<'_> {
    fn note(&mut self, why: String) {
        self.s.complete = false;
        if self.s.notes.len() < 32 {
            self.s.notes.push(why);
        }
    }

    fn over_budget(&mut self) -> bool {
        if self.read > READ_BUDGET || self.started.elapsed() > TIME_BUDGET {
            if self.s.complete || !self.s.notes.iter().any(|n| n.starts_with("stopped")) {
                self.note(format!(
                    "stopped after {:.1} s and {} MiB read: the figures cover what was walked",
                    self.started.elapsed().as_secs_f64(),
                    self.read >> 20
                ));
            }
            return true;
        }
        false
    }

    /// The readable, writable mapping holding `[addr, addr + len)`, whole.
    fn region_of(&self, addr: u64, len: u64) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| r.rw && r.start <= addr && addr.checked_add(len).is_some_and(|e| e <= r.end))
    }

    fn read(&mut self, addr: u64, buf: &mut [u8]) -> bool {
        self.read += buf.len() as u64;
        self.region_of(addr, buf.len() as u64).is_some() && self.mem.read(addr, buf).is_ok()
    }

    fn word(&mut self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }

    fn arenas(&mut self) {
        let main = self.layout.main_arena;
        let mut arena = main;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..ARENA_CAP {
            if !seen.insert(arena) {
                self.note(format!(
                    "the arena list loops back to {arena:#x} before main_arena"
                ));
                return;
            }
            let size = self.layout.next + STATE_SIZE_AFTER_NEXT;
            if self.region_of(arena, size).is_none() {
                self.note(format!("arena at {arena:#x} lies in no writable mapping"));
                return;
            }
            self.s.arenas += 1;
            if arena == main {
                self.main_heap(arena);
            } else {
                self.thread_heaps(arena);
            }
            if self.over_budget() {
                return;
            }
            match self.word(arena + self.layout.next) {
                Some(n) if n == main => return,
                Some(n) => arena = n,
                None => {
                    self.note(format!("cannot read the next arena after {arena:#x}"));
                    return;
                }
            }
        }
        self.note(format!("more than {ARENA_CAP} arenas: the rest not walked"));
    }

    fn top(&mut self, arena: u64) -> Option<u64> {
        self.word(arena + TOP)
    }

    /// The main arena grows with brk: one contiguous heap, `[heap]`, from its start to the
    /// end of its top chunk.
    fn main_heap(&mut self, arena: u64) {
        let Some(top) = self.top(arena) else {
            self.note("cannot read main_arena's top chunk".into());
            return;
        };
        let Some(heap) = self
            .regions
            .iter()
            .find(|r| r.path == "[heap]" && r.start <= top && top < r.end)
            .cloned()
        else {
            // No brk heap (a process that never used it, or brk failed and mmap served).
            if top != 0 && self.region_of(top, MINSIZE).is_none() {
                self.note(format!("main_arena's top {top:#x} lies in no mapping"));
            }
            return;
        };
        let start = heap.start.next_multiple_of(ALIGN);
        self.chunks(arena, start, heap.end, top);
        self.fastbins(arena);
    }

    /// A thread arena lives in heaps of HEAP_MAX bytes, aligned to it; the arena's state is
    /// inside its first heap, its top chunk in the newest, older ones linked by `prev`.
    fn thread_heaps(&mut self, arena: u64) {
        let Some(top) = self.top(arena) else {
            self.note(format!("cannot read the top chunk of arena {arena:#x}"));
            return;
        };
        let mut heap = top & !(HEAP_MAX - 1);
        for _ in 0..HEAPS_PER_ARENA_CAP {
            // heap_info: ar_ptr, prev, size, mprotect_size.
            let (Some(ar_ptr), Some(prev), Some(size)) =
                (self.word(heap), self.word(heap + 8), self.word(heap + 16))
            else {
                self.note(format!("cannot read heap_info at {heap:#x}"));
                return;
            };
            if ar_ptr != arena || size > HEAP_MAX || size < self.layout.heap_info_size {
                self.note(format!(
                    "heap at {heap:#x} does not belong to arena {arena:#x} (its heap_info says {ar_ptr:#x}, {size} bytes)"
                ));
                return;
            }
            self.s.heaps.push((heap, heap + HEAP_MAX));
            let first = if arena >= heap && arena < heap + HEAP_MAX {
                // The arena's own state sits after heap_info in its first heap.
                (arena + self.layout.next + STATE_SIZE_AFTER_NEXT).next_multiple_of(ALIGN)
            } else {
                (heap + self.layout.heap_info_size).next_multiple_of(ALIGN)
            };
            let end = heap + size;
            let top_here = if (heap..end).contains(&top) { top } else { 0 };
            self.chunks(arena, first, end, top_here);
            if prev == 0 || self.over_budget() {
                break;
            }
            if prev & (HEAP_MAX - 1) != 0 {
                self.note(format!(
                    "heap at {heap:#x} links to a misaligned heap {prev:#x}"
                ));
                return;
            }
            heap = prev;
        }
        self.fastbins(arena);
    }

    /// Walks the chunks in `[start, end)`: a chunk is free when the next one's PREV_INUSE bit
    /// is clear; the walk ends at `top` (the top chunk, free) or at a fence post.
    fn chunks(&mut self, arena: u64, start: u64, end: u64, top: u64) {
        let mut window: Vec<u8> = Vec::new();
        let mut window_at = 0u64;
        let mut header = |w: &mut Self, at: u64| -> Option<u64> {
            // The size word of the chunk at `at` (at + 8), through a window of reads.
            let field = at + 8;
            if field < window_at || field + 8 > window_at + window.len() as u64 {
                let len = (end.saturating_sub(field)).min(WINDOW as u64) as usize;
                if len < 8 {
                    return None;
                }
                window.resize(len, 0);
                if !w.read(field, &mut window) {
                    return None;
                }
                window_at = field;
            }
            let o = (field - window_at) as usize;
            Some(u64::from_le_bytes(window[o..o + 8].try_into().ok()?))
        };
        let mut at = start;
        let mut pending: Option<u64> = None; // size of the previous chunk, not yet classified
        let mut tcache_candidates = Vec::new();
        loop {
            if at == top {
                if let Some(prev) = pending.take() {
                    // The chunk before top: free if top's PREV_INUSE is clear.
                    let top_size = header(self, at).unwrap_or(1);
                    self.classify(prev, top_size & 1 != 0);
                }
                if let Some(t) = header(self, at) {
                    let size = t & !7;
                    if size <= end - at {
                        self.s.top_bytes += size;
                        self.s.free_bytes += size;
                        self.s.heap_bytes += size;
                    }
                }
                break;
            }
            if at + MINSIZE > end {
                if let Some(prev) = pending.take() {
                    self.classify(prev, true);
                }
                break;
            }
            let Some(raw) = header(self, at) else {
                self.note(format!(
                    "cannot read the chunk at {at:#x} of arena {arena:#x}"
                ));
                return;
            };
            let size = raw & !7;
            if let Some(prev) = pending.take() {
                self.classify(prev, raw & 1 != 0);
            }
            if size <= ALIGN && end - at < 3 * ALIGN {
                // The fence posts a thread heap ends with once the arena grew into a new heap
                // (malloc.c sysmalloc: a 16-byte chunk, then a 0 one, in the last 47 bytes).
                break;
            }
            if size % ALIGN != 0 || size < MINSIZE || size > end - at || raw & 2 != 0 {
                self.note(format!(
                    "chunk at {at:#x} of arena {arena:#x} has size field {raw:#x}: the heap changed under the walk or is corrupt; the rest of this heap is not counted"
                ));
                return;
            }
            if size == TCACHE_CHUNK {
                tcache_candidates.push(at);
            }
            self.s.heap_bytes += size;
            pending = Some(size);
            at += size;
            if self.read > READ_BUDGET {
                self.over_budget();
                return;
            }
        }
        for c in tcache_candidates {
            self.tcache(c);
        }
    }

    fn classify(&mut self, size: u64, in_use: bool) {
        if in_use {
            self.s.in_use_bytes += size;
            self.s.in_use_chunks += 1;
            let b = 63 - size.leading_zeros() as usize;
            self.sizes[b].0 += 1;
            self.sizes[b].1 += size;
        } else {
            self.s.free_bytes += size;
        }
    }

    /// Moves what a per-thread cache holds from in use (its chunks keep PREV_INUSE set) to
    /// free, when the chunk at `chunk` is one: 64 counts each matching whether its list head
    /// is set.
    fn tcache(&mut self, chunk: u64) {
        let mut buf = [0u8; (TCACHE_BINS * 2) + (TCACHE_BINS * 8)];
        if !self.read(chunk + 16, &mut buf) {
            return;
        }
        let counts: Vec<u64> = (0..TCACHE_BINS)
            .map(|i| u64::from(u16::from_le_bytes([buf[2 * i], buf[2 * i + 1]])))
            .collect();
        let heads: Vec<u64> = (0..TCACHE_BINS)
            .map(|i| {
                let o = TCACHE_BINS * 2 + 8 * i;
                u64::from_le_bytes(buf[o..o + 8].try_into().unwrap_or_default())
            })
            .collect();
        let plausible = counts.iter().zip(&heads).all(|(c, h)| {
            *c <= 1024 && (*c == 0) == (*h == 0) && (*h == 0 || self.region_of(*h, 16).is_some())
        });
        if !plausible || counts.iter().all(|c| *c == 0) {
            return;
        }
        let cached: u64 = counts
            .iter()
            .enumerate()
            .map(|(i, c)| c * (MINSIZE + ALIGN * i as u64))
            .sum();
        let cached = cached.min(self.s.in_use_bytes);
        let chunks: u64 = counts.iter().sum();
        self.s.in_use_bytes -= cached;
        self.s.in_use_chunks = self.s.in_use_chunks.saturating_sub(chunks);
        self.s.free_bytes += cached;
        self.s.cached_bytes += cached;
    }

    /// Chunks in the arena's fastbins also keep PREV_INUSE set: follow each list (bounded,
    /// every link checked) and count them free.
    fn fastbins(&mut self, arena: u64) {
        for i in 0..NFASTBINS {
            let Some(mut p) = self.word(arena + FASTBINS + 8 * i) else {
                return;
            };
            let want = MINSIZE + ALIGN * i;
            let mut n = 0;
            while p != 0 && n < FASTBIN_CAP {
                let Some(raw) = self.word(p + 8) else {
                    self.note(format!(
                        "fastbin {i} of arena {arena:#x} points outside the heap"
                    ));
                    break;
                };
                if raw & !7 != want || p % ALIGN != 0 {
                    self.note(format!(
                        "fastbin {i} of arena {arena:#x} holds a chunk of size {:#x}: the list changed under the walk",
                        raw & !7
                    ));
                    break;
                }
                let Some(fd) = self.word(p + 16) else { break };
                p = if self.layout.safe_linking {
                    ((p + 16) >> 12) ^ fd
                } else {
                    fd
                };
                n += 1;
                let moved = want.min(self.s.in_use_bytes);
                self.s.in_use_bytes -= moved;
                self.s.in_use_chunks = self.s.in_use_chunks.saturating_sub(1);
                self.s.free_bytes += moved;
                self.s.cached_bytes += moved;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap, io::Read as _};

    use super::*;

    /// A sparse memory image.
    #[derive(Default)]
    struct Image(RefCell<BTreeMap<u64, u8>>);

    impl Image {
        fn put(&self, addr: u64, word: u64) {
            for (i, b) in word.to_le_bytes().iter().enumerate() {
                self.0.borrow_mut().insert(addr + i as u64, *b);
            }
        }
    }

    impl Memory for Image {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let m = self.0.borrow();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = m.get(&(addr + i as u64)).copied().unwrap_or(0);
            }
            Ok(())
        }
    }

    const LIBC_DATA: u64 = 0x7f00_0000_0000;
    const HEAP: u64 = 0x5555_0000_0000;

    fn regions() -> Vec<Region> {
        parse_regions(&format!(
            "{:x}-{:x} rw-p 00000000 00:00 0 [heap]\n{:x}-{:x} rw-p 001d0000 fe:00 123 /usr/lib/x86_64-linux-gnu/libc.so.6\n",
            HEAP,
            HEAP + 0x10_0000,
            LIBC_DATA,
            LIBC_DATA + 0x4000
        ))
    }

    fn layout() -> Layout {
        Layout {
            main_arena: LIBC_DATA + 0x100,
            next: 0x870,
            safe_linking: true,
            heap_info_size: 48,
        }
    }

    /// A brk heap: chunks of `sizes` (in use unless listed in `free`), then top.
    fn heap(sizes: &[u64], free: &[usize]) -> (Image, u64) {
        let img = Image::default();
        let arena = layout().main_arena;
        img.put(arena + layout().next, arena); // one arena
        let mut at = HEAP;
        for (i, s) in sizes.iter().enumerate() {
            let prev_in_use = i == 0 || !free.contains(&(i - 1));
            img.put(at + 8, s | u64::from(prev_in_use));
            at += s;
        }
        let prev_in_use = sizes.is_empty() || !free.contains(&(sizes.len() - 1));
        img.put(at + 8, (HEAP + 0x10_0000 - at) | u64::from(prev_in_use));
        img.put(arena + TOP, at);
        (img, at)
    }

    #[test]
    fn chunks_in_use_and_free_are_told_apart() {
        let (img, top) = heap(&[0x290, 0x410, 0x410, 0x20, 0x1010], &[1, 3]);
        let s = walk_with(&img, &regions(), layout());
        assert!(s.complete, "{:?}", s.notes);
        assert_eq!(s.arenas, 1);
        assert_eq!(s.in_use_bytes, 0x290 + 0x410 + 0x1010);
        assert_eq!(s.in_use_chunks, 3);
        assert_eq!(s.top_bytes, HEAP + 0x10_0000 - top);
        assert_eq!(s.free_bytes, 0x410 + 0x20 + s.top_bytes);
        assert_eq!(s.heap_bytes, 0x10_0000);
        assert!(
            s.in_use_sizes
                .iter()
                .any(|(b, n, _)| *b == 0x1000 && *n == 1)
        );
    }

    #[test]
    fn fastbin_and_tcache_chunks_count_as_free() {
        let (img, _) = heap(&[0x290, 0x20, 0x20, 0x30, 0x400], &[]);
        let arena = layout().main_arena;
        // Fastbin 0 (size 0x20): the chunk at HEAP+0x290, then HEAP+0x2b0, mangled.
        let a = HEAP + 0x290;
        let b = HEAP + 0x2b0;
        img.put(arena + FASTBINS, a);
        img.put(a + 16, ((a + 16) >> 12) ^ b);
        img.put(b + 16, (b + 16) >> 12); // NULL, mangled
        // The tcache struct (first chunk): one 0x30 chunk cached in bin 1.
        let counts = HEAP + 16;
        img.put(counts, 1 << 16); // counts[1] = 1
        img.put(counts + 128 + 8, HEAP + 0x2d0 + 16);
        let s = walk_with(&img, &regions(), layout());
        assert!(s.complete, "{:?}", s.notes);
        assert_eq!(s.in_use_bytes, 0x290 + 0x400);
        assert_eq!(s.cached_bytes, 0x20 + 0x20 + 0x30);
    }

    /// A thread arena grown into a second heap: the first heap ends with glibc's fence posts,
    /// the arena's state sits after `heap_info` in the first one. Per glibc release layout.
    fn thread_arena(layout: Layout) -> (Image, Vec<Region>) {
        const H1: u64 = 0x7e00_0000_0000;
        const H2: u64 = H1 + HEAP_MAX;
        const SIZE: u64 = 0x10_0000;
        let (img, _) = heap(&[0x290], &[]);
        let main = layout.main_arena;
        let t = H1 + layout.heap_info_size;
        img.put(main + layout.next, t);
        img.put(t + layout.next, main);
        // heap_info of both heaps: ar_ptr, prev, size.
        img.put(H1, t);
        img.put(H1 + 8, 0);
        img.put(H1 + 16, SIZE);
        img.put(H2, t);
        img.put(H2 + 8, H1);
        img.put(H2 + 16, SIZE);
        // First heap: two chunks in use, a free one, then fence posts in the last 32 bytes.
        let mut at = (t + layout.next + STATE_SIZE_AFTER_NEXT).next_multiple_of(ALIGN);
        for (size, prev_in_use) in [(0x410, 1), (0x810, 1)] {
            img.put(at + 8, size | prev_in_use | 4);
            at += size;
        }
        let fence = H1 + SIZE - 0x20;
        img.put(at + 8, (fence - at) | 1 | 4); // the old top, freed
        img.put(fence + 8, 0x10); // PREV_INUSE clear: the chunk before is free
        img.put(fence + 0x18, 1);
        // Second heap: one chunk in use, then top.
        let first = (H2 + layout.heap_info_size).next_multiple_of(ALIGN);
        img.put(first + 8, 0x1010 | 1 | 4);
        let top = first + 0x1010;
        img.put(top + 8, (H2 + SIZE - top) | 1);
        img.put(t + TOP, top);
        let mut regions = regions();
        regions.extend(parse_regions(&format!(
            "{H1:x}-{:x} rw-p 00000000 00:00 0\n{H2:x}-{:x} rw-p 00000000 00:00 0\n",
            H1 + SIZE,
            H2 + SIZE
        )));
        (img, regions)
    }

    #[test]
    fn thread_arenas_are_walked_heap_by_heap_in_each_glibc_layout() {
        for (heap_info_size, safe_linking) in [(48, true), (32, true), (32, false)] {
            let layout = Layout {
                heap_info_size,
                safe_linking,
                ..layout()
            };
            let (img, regions) = thread_arena(layout);
            let s = walk_with(&img, &regions, layout);
            let ctx = format!("heap_info {heap_info_size}: {s:?}");
            assert!(s.complete, "{ctx}");
            assert_eq!(s.arenas, 2, "{ctx}");
            // 0x290 (main arena's tcache chunk) + 0x410 + 0x810 + 0x1010.
            assert_eq!(s.in_use_bytes, 0x290 + 0x410 + 0x810 + 0x1010, "{ctx}");
            assert_eq!(s.heaps.len(), 2, "{ctx}");
        }
    }

    #[test]
    fn a_corrupt_heap_stops_with_a_note_and_no_panic() {
        let (img, _) = heap(&[0x290, 0x410, 0x410], &[]);
        img.put(HEAP + 0x290 + 8, 0xdead_beef_0001); // absurd size
        let s = walk_with(&img, &regions(), layout());
        assert!(!s.complete);
        assert!(s.notes[0].contains("size field"), "{:?}", s.notes);
        // An arena list that loops elsewhere, a top outside any mapping.
        let (img, _) = heap(&[0x290], &[]);
        let arena = layout().main_arena;
        img.put(arena + layout().next, arena + 0x1000);
        img.put(arena + 0x1000 + layout().next, arena + 0x1000);
        let s = walk_with(&img, &regions(), layout());
        assert!(!s.complete, "{s:?}");
        // A fastbin that loops forever is cut at its size check or bound.
        let (img, _) = heap(&[0x290, 0x20], &[]);
        let a = HEAP + 0x290;
        img.put(arena + FASTBINS, a);
        img.put(a + 16, ((a + 16) >> 12) ^ a);
        let s = walk_with(&img, &regions(), layout());
        assert!(s.free_bytes > 0);
    }

    #[test]
    fn random_images_never_panic() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(200), |(words in proptest::collection::vec(any::<u64>(), 0..256))| {
            let img = Image::default();
            for (i, w) in words.iter().enumerate() {
                img.put(HEAP + 8 * i as u64, *w);
            }
            let arena = layout().main_arena;
            img.put(arena + TOP, HEAP + 8 * (words.len() as u64 / 2));
            img.put(arena + layout().next, arena);
            img.put(arena + FASTBINS, HEAP + 0x40);
            let s = walk_with(&img, &regions(), layout());
            prop_assert!(s.in_use_bytes + s.free_bytes <= 0x10_0000 * 2);
        });
    }

    #[test]
    fn mallinfo2_of_debian_glibc_2_36_gives_the_layout() {
        // mallinfo2 of Debian 12's libc.so.6 (2.36-9+deb12u*), at its link address 0x99d80.
        let code = [
            0x41, 0x56, 0x49, 0x89, 0xfe, 0x41, 0x55, 0x41, 0x54, 0x55, 0x53, 0x48, 0x83, 0xec,
            0x60, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00, 0x48, 0x89, 0x44, 0x24,
            0x58, 0x31, 0xc0, 0x80, 0x3d, 0xe2, 0x06, 0x14, 0x00, 0x00, 0x0f, 0x84, 0xe4, 0x00,
            0x00, 0x00, 0x66, 0x0f, 0xef, 0xc0, 0x4c, 0x8d, 0x25, 0xa9, 0x9e, 0x13, 0x00, 0x49,
            0x89, 0xe5, 0x31, 0xed, 0x0f, 0x29, 0x04, 0x24, 0x4c, 0x89, 0xe3, 0x0f, 0x29, 0x44,
            0x24, 0x10, 0x0f, 0x29, 0x44, 0x24, 0x20, 0x0f, 0x29, 0x44, 0x24, 0x30, 0x0f, 0x29,
            0x44, 0x24, 0x40, 0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0xba, 0x01,
            0x00, 0x00, 0x00, 0x89, 0xe8, 0xf0, 0x0f, 0xb1, 0x13, 0x0f, 0x85, 0x8f, 0x00, 0x00,
            0x00, 0x4c, 0x89, 0xee, 0x48, 0x89, 0xdf, 0xe8, 0x74, 0xaa, 0xff, 0xff, 0x89, 0xe8,
            0x87, 0x03, 0x83, 0xf8, 0x01, 0x7f, 0x6b, 0x48, 0x8b, 0x9b, 0x70, 0x08, 0x00, 0x00,
            0x4c, 0x39, 0xe3, 0x75, 0xcf,
        ];
        assert_eq!(layout_from_mallinfo2(&code, 0x99d80), Ok((0x1d3c60, 0x870)));
        assert!(layout_from_mallinfo2(&[0xc3], 0).is_err());
    }

    #[test]
    fn versions_from_the_banner() {
        let banner =
            b"xx GNU C Library (Debian GLIBC 2.36-9+deb12u14) stable release version 2.36.\n";
        assert_eq!(glibc_version(banner).as_deref(), Some("2.36"));
        assert_eq!(version_number("2.36"), Some((2, 36)));
        assert_eq!(glibc_version(b"nothing"), None);
    }

    /// A real process: a C program that keeps 2% of 200 000 blocks of 1 KiB and frees the
    /// rest, walked from outside while it sleeps.
    #[test]
    fn a_real_heap_with_most_blocks_freed() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "SKIPPED a_real_heap_with_most_blocks_freed: reading another process's heap needs root"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("keep.c");
        std::fs::write(
            &src,
            r#"#include <stdlib.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    enum { N = 200000 };
    static char *p[N];
    for (int i = 0; i < N; i++) { p[i] = malloc(1000); p[i][0] = 1; }
    for (int i = 0; i < N; i++) if (i % 50) { free(p[i]); p[i] = 0; }
    printf("ready\n"); fflush(stdout);
    pause();
    return p[0][0];
}
"#,
        )
        .unwrap();
        let bin = dir.path().join("keep");
        let cc = std::process::Command::new("gcc")
            .args(["-O1", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .expect("gcc");
        assert!(cc.success());
        let mut child = std::process::Command::new(&bin)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 6];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        let s = walk(child.id(), &super::super::maps_text(child.id()).unwrap());
        let _ = child.kill();
        let _ = child.wait();
        let s = s.unwrap();
        // 4000 blocks of 1000 bytes kept: chunks of 1008 bytes each, 4.03 MB.
        let kept = 4000.0 * 1008.0;
        assert!(
            (s.in_use_bytes as f64 - kept).abs() < kept * 0.10,
            "in use {} vs {kept}: {s:?}",
            s.in_use_bytes
        );
        // About 196 MB freed, kept by glibc inside the heap.
        assert!(s.free_bytes > 150_000_000, "{s:?}");
        assert!(s.complete, "{s:?}");
        assert_eq!(s.glibc, "2.36", "{s:?}");
    }
}
