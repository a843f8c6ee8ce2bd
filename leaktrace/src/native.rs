//! Native allocations by the object that made them: the kernel keeps totals per call site
//! (return address); this names each site's object from the target's mappings and its
//! function from ELF symbols (blazesym), and sums them per object over time. With `--stacks`
//! it also names the frames of each allocation stack the kernel walked.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
};

use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer,
        source::{Process, Source},
    },
};
use leaktrace_common::{
    NIF_API_SITE, NO_WALK, NativeHist, NativeSite, StackSiteKey, native_limits,
};

use crate::recording::{
    NativeEvidence, NativeModule, NativePoint,
    native::{MAX_STACKS, NativeStack},
};

/// One file-backed mapping of the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Path as the target sees it.
    pub path: String,
    /// Mapped executable: code.
    pub exec: bool,
    /// Offset in the file of its first byte.
    pub offset: u64,
}

/// Parses `/proc/PID/maps` text: file-backed mappings only.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let (off, _dev, _inode) = (f.next()?, f.next()?, f.next()?);
            let path: String = f.collect::<Vec<_>>().join(" ");
            let (a, b) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                path,
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                offset: u64::from_str_radix(off, 16).ok()?,
            })
        })
        .filter(|m| m.path.starts_with('/'))
        .collect()
}

/// Reads the target's file-backed mappings (capped: [`crate::target::maps_text`]).
pub fn read_maps(pid: u32) -> Vec<Mapping> {
    parse_maps(&crate::target::maps_text(pid).unwrap_or_default())
}

/// The C library the target runs with, as it maps it.
pub fn find_libc(maps: &[Mapping]) -> Option<String> {
    maps.iter()
        .map(|m| m.path.as_str())
        .find(|p| {
            let name = p.rsplit('/').next().unwrap_or(p);
            name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
        })
        .map(str::to_owned)
}

/// The object's file name; a file replaced on disk since it was mapped (an upgrade) keeps its
/// name, without the kernel's " (deleted)".
fn file_name(path: &str) -> String {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

/// What is known of one call site.
#[derive(Clone, Debug)]
struct Site {
    module: String,
    /// Allocated through the NIF/driver API: inside ERTS carriers.
    nif_api: bool,
    path: String,
    function: Option<String>,
    stats: NativeSite,
}

/// Native allocations of one run, by site and by object.
pub struct NativeLedger {
    pid: u32,
    emulator: String,
    maps: Vec<Mapping>,
    sites: HashMap<u64, Site>,
    symbolizer: Symbolizer,
    series: Vec<NativePoint>,
    /// `--stacks`: frames kept per stack (0: stacks off).
    stack_depth: usize,
    /// Totals per (site, stack), as read last.
    stack_sites: HashMap<StackSiteKey, NativeSite>,
    /// The kernel's frames of each stack id seen (read once: an id's stack never changes).
    stack_ips: HashMap<u32, Vec<u64>>,
    /// `object: function` of each frame address named so far.
    frame_names: HashMap<u64, String>,
    /// Stacks the kernel walked fewer than 2 frames of, or its whole depth.
    stacks_truncated: u64,
    /// Size and lifetime buckets per site as last put into the histograms.
    hist_seen: HashMap<u64, NativeHist>,
    /// JIT function names (`+JPperf true`), read by leaktrace itself rather than by blazesym:
    /// the file is the node's, so it goes through the safe open.
    perf_map: crate::target::perf_map::PerfMapSource,
    /// How each mapped object (by path) is symbolized.
    objects: RefCell<HashMap<String, ObjectNames>>,
}

/// How the functions of one mapped object are named.
enum ObjectNames {
    /// By blazesym, which maps the file: only for files the node's user cannot write (owned by
    /// root, not group- or world-writable), since a mapped file truncated under the tracer
    /// would kill it with SIGBUS.
    Blazesym,
    /// From its symbol table, read in pieces through the safe open.
    Own(crate::symbols::SymbolTable),
    /// Not opened (refused or gone): left unnamed.
    Unreadable,
}

impl std::fmt::Debug for NativeLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeLedger")
            .field("pid", &self.pid)
            .field("sites", &self.sites.len())
            .finish()
    }
}

/// Object name of addresses in no file mapping (JIT code, anonymous executable memory).
pub const ANONYMOUS: &str = "[anonymous code]";

impl NativeLedger {
    /// A ledger for `pid`, whose emulator is the file `emulator` (as the target maps it).
    pub fn new(pid: u32, emulator: &str) -> NativeLedger {
        NativeLedger {
            pid,
            emulator: file_name(emulator),
            maps: read_maps(pid),
            sites: HashMap::new(),
            symbolizer: Symbolizer::new(),
            series: Vec::new(),
            stack_depth: 0,
            stack_sites: HashMap::new(),
            hist_seen: HashMap::new(),
            stack_ips: HashMap::new(),
            frame_names: HashMap::new(),
            stacks_truncated: 0,
            perf_map: crate::target::perf_map::PerfMapSource::new(pid),
            objects: RefCell::new(HashMap::new()),
        }
    }

    /// Keeps `depth` frames of each allocation stack (`--stacks`; 0: none).
    pub fn set_stack_depth(&mut self, depth: u32) {
        self.stack_depth = depth as usize;
    }

    /// Takes the kernel's (site, stack) totals (every pair, as read now); `frames_of` reads a
    /// stack id's frames from the kernel, each new id once.
    pub fn update_stacks(
        &mut self,
        sites: impl IntoIterator<Item = (StackSiteKey, NativeSite)>,
        mut frames_of: impl FnMut(u32) -> Option<Vec<u64>>,
    ) {
        if self.stack_depth == 0 {
            return;
        }
        let mut unnamed: Vec<u64> = Vec::new();
        let mut maps_read = false;
        for (key, stats) in sites {
            let new_key = self.stack_sites.insert(key, stats).is_none();
            if key.stack_id == NO_WALK {
                // No walk (no frame pointer): the site alone, a truncated stack.
                let site = key.site & !NIF_API_SITE;
                if new_key {
                    self.stacks_truncated += 1;
                    if !self.frame_names.contains_key(&site) {
                        unnamed.push(site);
                    }
                }
                continue;
            }
            let Ok(id) = u32::try_from(key.stack_id) else {
                continue;
            };
            let new_id = !self.stack_ips.contains_key(&id);
            if new_id {
                // Not readable (yet): the totals stay, the frames are asked again next time.
                let Some(ips) = frames_of(id) else {
                    continue;
                };
                // A library loaded since the maps were read: its frames are code too.
                if !maps_read
                    && ips
                        .iter()
                        .skip(1)
                        .any(|a| plausible(*a) && self.mapping_of(*a).is_none())
                {
                    self.refresh_maps();
                    maps_read = true;
                }
                if is_truncated(&ips, |a| self.is_code(a)) {
                    self.stacks_truncated += 1;
                }
                self.stack_ips.insert(id, ips);
            }
            if new_id || new_key {
                let frames = stack_frames(key.site, &self.stack_ips[&id], self.stack_depth, |a| {
                    self.is_code(a)
                });
                unnamed.extend(
                    frames
                        .into_iter()
                        .filter(|a| !self.frame_names.contains_key(a)),
                );
            }
        }
        unnamed.sort_unstable();
        unnamed.dedup();
        if unnamed.is_empty() {
            return;
        }
        if !maps_read && unnamed.iter().any(|a| self.mapping_of(*a).is_none()) {
            self.refresh_maps();
        }
        let lookups: Vec<u64> = unnamed.iter().map(|a| a.saturating_sub(1)).collect();
        let functions = self.symbolize(&lookups);
        for (addr, function) in unnamed.into_iter().zip(functions) {
            let module = self
                .mapping_of(addr)
                .map_or_else(|| ANONYMOUS.to_owned(), |m| file_name(&m.path));
            self.frame_names
                .insert(addr, frame_label(&module, function.as_deref(), addr));
        }
    }

    /// Whether a frame address lies in mapped code: a walk that leaves it went wrong.
    fn is_code(&self, addr: u64) -> bool {
        plausible(addr) && self.mapping_of(addr).is_some_and(|m| m.exec)
    }

    /// The name of a frame address: as symbolized, else its object's.
    fn frame_name(&self, addr: u64) -> String {
        self.frame_names.get(&addr).cloned().unwrap_or_else(|| {
            let module = self
                .mapping_of(addr)
                .map_or_else(|| ANONYMOUS.to_owned(), |m| file_name(&m.path));
            frame_label(&module, None, addr)
        })
    }

    /// Per-stack totals, stacks with the same frames (after `--stacks N` cut them) summed,
    /// largest outstanding first, [`MAX_STACKS`] at most.
    pub fn stacks(&self) -> Vec<NativeStack> {
        let mut by: BTreeMap<(Vec<String>, bool), NativeStack> = BTreeMap::new();
        for (key, stats) in &self.stack_sites {
            let ips: &[u64] = if key.stack_id == NO_WALK {
                &[]
            } else {
                match u32::try_from(key.stack_id)
                    .ok()
                    .and_then(|id| self.stack_ips.get(&id))
                {
                    Some(ips) => ips,
                    None => continue,
                }
            };
            let frames: Vec<String> =
                stack_frames(key.site, ips, self.stack_depth, |a| self.is_code(a))
                    .into_iter()
                    .map(|a| self.frame_name(a))
                    .collect();
            let nif_api = key.site & NIF_API_SITE != 0;
            let s = by
                .entry((frames.clone(), nif_api))
                .or_insert_with(|| NativeStack {
                    frames,
                    nif_api,
                    ..Default::default()
                });
            s.allocations += stats.allocations;
            s.frees += stats.frees;
            s.outstanding_bytes += Self::outstanding_of(stats);
        }
        let mut out: Vec<NativeStack> = by.into_values().collect();
        out.sort_by(|a, b| {
            b.outstanding_bytes
                .cmp(&a.outstanding_bytes)
                .then(b.allocations.cmp(&a.allocations))
                .then_with(|| a.frames.cmp(&b.frames))
        });
        out.truncate(MAX_STACKS);
        out
    }

    /// Reads the target's mappings again; a target gone (nothing read) keeps the last ones.
    fn refresh_maps(&mut self) {
        let maps = read_maps(self.pid);
        if !maps.is_empty() {
            self.maps = maps;
        }
    }

    fn mapping_of(&self, addr: u64) -> Option<&Mapping> {
        self.maps.iter().find(|m| m.start <= addr && addr < m.end)
    }

    /// Takes the kernel's site totals (every site, as read now).
    pub fn update(&mut self, sites: impl IntoIterator<Item = (u64, NativeSite)>) {
        let mut new = Vec::new();
        for (addr, stats) in sites {
            match self.sites.get_mut(&addr) {
                Some(s) => s.stats = stats,
                None => new.push((addr, stats)),
            }
        }
        if new.is_empty() {
            return;
        }
        // A NIF library loaded after the last read: its mapping is new too.
        if new
            .iter()
            .any(|(a, _)| self.mapping_of(a & !NIF_API_SITE).is_none())
        {
            self.refresh_maps();
        }
        let addrs: Vec<u64> = new
            .iter()
            .map(|(a, _)| (a & !NIF_API_SITE).saturating_sub(1))
            .collect();
        let names = self.symbolize(&addrs);
        for ((key, stats), function) in new.into_iter().zip(names) {
            let addr = key & !NIF_API_SITE;
            let (module, path) = match self.mapping_of(addr) {
                Some(m) => (file_name(&m.path), m.path.clone()),
                None => (ANONYMOUS.to_owned(), String::new()),
            };
            self.sites.insert(
                key,
                Site {
                    module,
                    nif_api: key & NIF_API_SITE != 0,
                    path,
                    function,
                    stats,
                },
            );
        }
    }

    /// Function names of return addresses (the call sites), best effort.
    fn symbolize(&mut self, addrs: &[u64]) -> Vec<Option<String>> {
        let mut names = self.symbolize_files(addrs);
        // Code in no file, or in the JIT's memfd: named from the perf map, if the node has one.
        let jit: Vec<usize> = (0..addrs.len())
            .filter(|&i| names[i].is_none())
            .filter(|&i| {
                self.mapping_of(addrs[i])
                    .is_none_or(|m| m.path.starts_with("/memfd:"))
            })
            .collect();
        if jit.is_empty() {
            return names;
        }
        if let Err(why) = self.perf_map.refresh() {
            log::debug!("JIT names: {why}");
        }
        for i in jit {
            names[i] = self.perf_map.map().name(addrs[i]).map(str::to_owned);
        }
        names
    }

    /// How the object mapped at `m` is named (decided once per path).
    fn object_names(&self, m: &Mapping) -> std::cell::RefMut<'_, ObjectNames> {
        use std::os::unix::fs::MetadataExt;
        let mut objects = self.objects.borrow_mut();
        if !objects.contains_key(&m.path) {
            let names = match crate::target::open::open_mapped_object(self.pid, &self.maps, &m.path)
            {
                Ok((file, _)) => match file.metadata() {
                    Ok(meta) if meta.uid() == 0 && meta.mode() & 0o022 == 0 => {
                        ObjectNames::Blazesym
                    }
                    Ok(_) => crate::symbols::SymbolTable::from_file(file, &m.path)
                        .map_or(ObjectNames::Unreadable, ObjectNames::Own),
                    Err(_) => ObjectNames::Unreadable,
                },
                Err(why) => {
                    log::debug!("{} {why}", m.path);
                    ObjectNames::Unreadable
                }
            };
            objects.insert(m.path.clone(), names);
        }
        std::cell::RefMut::map(objects, |o| o.get_mut(&m.path).expect("just inserted"))
    }

    /// Function names of addresses in mapped ELF files: blazesym for root's files, the
    /// object's own symbol table for the others.
    fn symbolize_files(&self, addrs: &[u64]) -> Vec<Option<String>> {
        let mut names = vec![None; addrs.len()];
        let mut for_blazesym = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            let Some(m) = self.mapping_of(addr) else {
                for_blazesym.push(i);
                continue;
            };
            match &*self.object_names(m) {
                ObjectNames::Blazesym => for_blazesym.push(i),
                ObjectNames::Own(table) => {
                    names[i] = table
                        .name_at_file_offset(addr - m.start + m.offset)
                        .map(str::to_owned);
                }
                ObjectNames::Unreadable => {}
            }
        }
        let batch: Vec<u64> = for_blazesym.iter().map(|&i| addrs[i]).collect();
        for (i, name) in for_blazesym
            .into_iter()
            .zip(self.symbolize_blazesym(&batch))
        {
            names[i] = name;
        }
        names
    }

    /// Function names of addresses in root's ELF files (blazesym).
    fn symbolize_blazesym(&self, addrs: &[u64]) -> Vec<Option<String>> {
        // Code in a deleted file or a memfd (the JIT's double mapping) has no ELF to read: one
        // such address fails the whole batch, so it is left out (named by its object).
        let (ok, skipped): (Vec<usize>, Vec<usize>) = (0..addrs.len()).partition(|&i| {
            !self
                .mapping_of(addrs[i])
                .is_some_and(|m| m.path.ends_with(" (deleted)") || m.path.starts_with("/memfd:"))
        });
        let mut names = vec![None; addrs.len()];
        let batch: Vec<u64> = ok.iter().map(|&i| addrs[i]).collect();
        let found = match self.symbolize_batch(&batch) {
            Ok(found) => found,
            // Another address blazesym cannot read: each alone, so the others keep their names.
            Err(e) => {
                log::debug!("symbolizing native sites: {e}");
                batch
                    .iter()
                    .map(|a| {
                        self.symbolize_batch(std::slice::from_ref(a))
                            .ok()
                            .and_then(|mut v| v.pop().flatten())
                    })
                    .collect()
            }
        };
        for (i, name) in ok.into_iter().zip(found) {
            names[i] = name;
        }
        debug_assert!(skipped.iter().all(|&i| names[i].is_none()));
        names
    }

    fn symbolize_batch(&self, addrs: &[u64]) -> Result<Vec<Option<String>>, blazesym::Error> {
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        let mut process = Process::new(Pid::from(self.pid));
        process.debug_syms = false;
        // The perf map is the node's file: read through the safe open (`self.perf_map`).
        process.perf_map = false;
        // ELF files are opened through /proc/PID/map_files: the very inode mapped, never a
        // FIFO or a symlink the node put at the mapped path since.
        process.map_files = true;
        let source = Source::Process(process);
        Ok(self
            .symbolizer
            .symbolize(&source, Input::AbsAddr(addrs))?
            .into_iter()
            .map(|s| match s {
                Symbolized::Sym(sym) => Some(sym.name.into_owned()),
                Symbolized::Unknown(_) => None,
            })
            .collect())
    }

    fn outstanding_of(stats: &NativeSite) -> i64 {
        stats.bytes_allocated as i64 - stats.bytes_freed as i64
    }

    /// Outstanding bytes of objects other than the emulator, through libc: what the ledger
    /// subtracts (the emulator's own libc use is its carriers, and NIF API memory lives in
    /// carriers: both already counted).
    pub fn outstanding(&self) -> i64 {
        self.sites
            .values()
            .filter(|s| s.module != self.emulator && !s.nif_api)
            .map(|s| Self::outstanding_of(&s.stats))
            .sum()
    }

    fn module_key(s: &Site) -> String {
        crate::recording::native::series_key(&s.module, s.nif_api)
    }

    /// Records the per-object outstanding bytes at `t_s`.
    pub fn record_point(&mut self, t_s: f64) {
        let mut by_module: BTreeMap<String, i64> = BTreeMap::new();
        for s in self.sites.values() {
            *by_module.entry(Self::module_key(s)).or_default() += Self::outstanding_of(&s.stats);
        }
        self.series.push(NativePoint { t_s, by_module });
    }

    /// Puts the size and lifetime buckets each site gained since the last call into `h`, one
    /// series per object (`native_size/lt_native.so`, `native_lifetime/lt_native.so`; values are
    /// log2 bucket lower bounds). Sites not yet named (read before their first `update`) wait.
    pub fn histograms_into(
        &mut self,
        hists: Vec<(u64, NativeHist)>,
        h: &mut crate::recording::histograms::Histograms,
    ) {
        use crate::recording::histograms::HistogramUnit as U;
        for (site, now) in hists {
            let Some(s) = self.sites.get(&site) else {
                continue;
            };
            let key = Self::module_key(s);
            let before = self.hist_seen.get(&site).copied().unwrap_or_default();
            for (i, (n, b)) in now.sizes.iter().zip(before.sizes).enumerate() {
                h.record_n(
                    &format!("native_size/{key}"),
                    U::Bytes,
                    1u64 << i,
                    n.wrapping_sub(b) as u64,
                );
            }
            for (i, (n, b)) in now.lifetimes.iter().zip(before.lifetimes).enumerate() {
                h.record_n(
                    &format!("native_lifetime/{key}"),
                    U::Us,
                    1u64 << i,
                    n.wrapping_sub(b) as u64,
                );
            }
            self.hist_seen.insert(site, now);
        }
    }

    /// Allocations still outstanding per object: their lifetimes are censored.
    pub fn censor_into(&self, h: &mut crate::recording::histograms::Histograms) {
        for m in self.modules() {
            let live = m.allocations.saturating_sub(m.frees);
            if live > 0 {
                h.censored(
                    &format!("native_lifetime/{}", m.series_key()),
                    crate::recording::histograms::HistogramUnit::Us,
                    live,
                );
            }
        }
    }

    /// Per-object totals, largest outstanding first.
    pub fn modules(&self) -> Vec<NativeModule> {
        let mut by: BTreeMap<String, (NativeModule, BTreeMap<String, i64>)> = BTreeMap::new();
        for s in self.sites.values() {
            let (m, functions) = by.entry(Self::module_key(s)).or_insert_with(|| {
                (
                    NativeModule {
                        module: s.module.clone(),
                        path: s.path.clone(),
                        nif_api: s.nif_api,
                        is_emulator: s.module == self.emulator,
                        ..Default::default()
                    },
                    BTreeMap::new(),
                )
            });
            m.allocations += s.stats.allocations;
            m.frees += s.stats.frees;
            m.outstanding_bytes += Self::outstanding_of(&s.stats);
            m.untracked += s.stats.untracked;
            m.untracked_bytes += s.stats.bytes_untracked;
            m.sites += 1;
            if let Some(f) = &s.function {
                *functions.entry(f.clone()).or_default() += Self::outstanding_of(&s.stats);
            }
        }
        let mut out: Vec<NativeModule> = by
            .into_values()
            .map(|(mut m, functions)| {
                let mut f: Vec<(String, i64)> = functions.into_iter().collect();
                f.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
                f.truncate(10);
                m.function = f.first().map(|(n, _)| n.clone());
                m.functions = f;
                let key = m.series_key();
                let pts: Vec<(f64, f64)> = self
                    .series
                    .iter()
                    .filter_map(|p| Some((p.t_s, *p.by_module.get(&key)? as f64)))
                    .collect();
                m.growth_bytes_per_s = crate::trend::fit(&pts).map_or(0.0, |f| f.slope_per_s);
                m
            })
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.outstanding_bytes));
        out
    }

    /// The evidence for the recording.
    pub fn evidence(&self, attached_at_s: Option<f64>, reason: String) -> NativeEvidence {
        let stacks_on = self.stack_depth > 0;
        NativeEvidence {
            attached_at_s,
            reason,
            modules: self.modules(),
            series: self.series.clone(),
            stack_depth: self.stack_depth as u32,
            stacks: if stacks_on { self.stacks() } else { Vec::new() },
            stacks_truncated: stacks_on.then_some(self.stacks_truncated),
            ..Default::default()
        }
    }
}

/// Whether `addr` can be a user-space address (x86-64, 47-bit user half).
fn plausible(addr: u64) -> bool {
    (0x1000..=0x7fff_ffff_ffff).contains(&addr)
}

/// The kernel's frames up to the first outside code (`is_code`): a frame-pointer walk through
/// code without frame pointers reads whatever `rbp` points at, data as frames.
fn walked(kernel_frames: &[u64], is_code: impl Fn(u64) -> bool) -> &[u64] {
    let n = kernel_frames.iter().take_while(|a| is_code(**a)).count();
    &kernel_frames[..n]
}

/// Whether the kernel's walk of a stack was cut short: fewer than 2 frames in code (the
/// probe's own address and nothing past it: the code below has no frame pointers) or as many as
/// it keeps.
pub fn is_truncated(kernel_frames: &[u64], is_code: impl Fn(u64) -> bool) -> bool {
    walked(kernel_frames, is_code).len() < 2
        || kernel_frames.len() >= native_limits::STACK_DEPTH as usize
}

/// The frames of an allocation stack as reported, innermost first, `depth` at most: the call's
/// site (the return address the probe read at `[rsp]`: exact without frame pointers), then the
/// kernel's frames past its first (the probe's own address, inside the allocator) and past
/// copies of the site (a kernel that adds `[rsp]` to stacks taken at a function's entry), up to
/// the first outside code (`is_code`).
pub fn stack_frames(
    site: u64,
    kernel_frames: &[u64],
    depth: usize,
    is_code: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let site = site & !NIF_API_SITE;
    let rest = walked(kernel_frames, is_code).get(1..).unwrap_or_default();
    let rest = &rest[rest.iter().take_while(|a| **a == site).count()..];
    std::iter::once(site)
        .chain(rest.iter().copied())
        .take(depth)
        .collect()
}

/// `object: function`, or `object: 0xADDRESS` without a symbol.
pub fn frame_label(module: &str, function: Option<&str>, addr: u64) -> String {
    match function {
        Some(f) => format!("{module}: {f}"),
        None => format!("{module}: {addr:#x}"),
    }
}

/// `--native auto`: attach when memory outside ERTS carriers grows (the libc side), or when
/// the VM's used memory grows (NIF API memory lives in carriers). Returns the reason, in words
/// for the report, once a line grows by the verdict's own rule over the samples so far (at least
/// `MIN_AUTO_S` of them).
pub fn auto_trigger(
    samples: &[crate::recording::Sample],
    th: &crate::recording::Thresholds,
) -> Option<String> {
    let last = samples.last()?;
    if last.t_s < MIN_AUTO_S || samples.len() < 4 {
        return None;
    }
    // Half the run's growth floor: the probes should be in place before the verdict needs them.
    let early = crate::recording::Thresholds {
        min_total_growth_bytes: th.min_total_growth_bytes / 2.0,
        ..*th
    };
    type Line = fn(&crate::recording::Sample) -> Option<f64>;
    let lines: [(&str, &str, Line); 2] = [
        ("unexplained", "memory outside ERTS carriers", |s| {
            s.unexplained.map(|v| v as f64)
        }),
        ("vm_used", "memory the VM uses", |s| {
            s.vm_used.map(|v| v as f64)
        }),
    ];
    lines.iter().find_map(|(line, what, f)| {
        let g = crate::trend::growth(&crate::trend::series(samples, f), &early)?;
        g.grows.then(|| {
            format!(
                "{what} ({line}) grew {} at {}/s by {:.0} s",
                crate::units::human_bytes(g.total),
                crate::units::human_bytes(g.whole.slope_per_s),
                last.t_s
            )
        })
    })
}

/// Seconds of samples `--native auto` waits for before judging.
pub const MIN_AUTO_S: f64 = 3.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_libc() {
        let text = "55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/lib/erlang/erts-13.1.5/bin/beam.smp\n\
                    7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n\
                    7f1000000000-7f1000200000 r-xp 00028000 08:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f2000000000-7f2000010000 r-xp 00000000 08:01 78 /tmp/my dir/lt_native.so\n";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[2].path, "/tmp/my dir/lt_native.so");
        assert!(maps[0].exec && maps[1].exec && maps[2].exec);
        assert_eq!(
            find_libc(&maps).as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(file_name(&maps[0].path), "beam.smp");
    }

    #[test]
    fn the_emulator_is_kept_out_of_native_outstanding() {
        let mut l = NativeLedger::new(std::process::id(), "/x/beam.smp");
        l.maps = vec![
            Mapping {
                start: 0x1000,
                end: 0x2000,
                path: "/x/beam.smp".into(),
                exec: true,
                offset: 0,
            },
            Mapping {
                start: 0x5000,
                end: 0x6000,
                path: "/x/lt_native.so".into(),
                exec: true,
                offset: 0,
            },
        ];
        let site = |a, b| NativeSite {
            allocations: a,
            frees: b,
            bytes_allocated: a * 100,
            bytes_freed: b * 100,
            ..Default::default()
        };
        l.update([
            (0x1100, site(10, 0)),
            (0x5100, site(10, 4)),
            (0x5200, site(3, 3)),
        ]);
        assert_eq!(l.outstanding(), 600);
        let m = l.modules();
        assert_eq!(m[0].module, "beam.smp");
        assert!(m[0].is_emulator);
        let nif = m.iter().find(|m| m.module == "lt_native.so").unwrap();
        assert_eq!((nif.allocations, nif.frees, nif.sites), (13, 7, 2));
        // A later read replaces a site's totals, never adds them twice.
        l.update([(0x5100, site(20, 4))]);
        assert_eq!(l.outstanding(), 1600);
        l.record_point(1.0);
        assert_eq!(l.series[0].by_module["lt_native.so"], 1600);
    }

    #[test]
    fn stack_frames_start_at_the_site_and_end_where_the_walk_left_code() {
        // libc at 0x9000, beam.smp at 0x1000, the NIF at 0x5000.
        let code = |a: u64| {
            (0x1000..0x2000).contains(&a)
                || (0x5000..0x6000).contains(&a)
                || (0x9000..0xa000).contains(&a)
        };
        let site = 0x5100;
        // The probe's own address (in libc's malloc) is dropped, the site leads.
        assert_eq!(stack_frames(site, &[0x9000], 8, code), vec![0x5100]);
        assert_eq!(
            stack_frames(site, &[0x9000, 0x1200, 0x1300], 8, code),
            vec![0x5100, 0x1200, 0x1300]
        );
        // A kernel that adds [rsp] at a function's entry: the site once.
        assert_eq!(
            stack_frames(site, &[0x9000, 0x5100, 0x1200], 8, code),
            vec![0x5100, 0x1200]
        );
        // A walk through code without frame pointers ends at its first frame outside code.
        assert_eq!(
            stack_frames(site, &[0x9000, 0x1200, 0x7f9d_f97f_1d18, 0x1300], 8, code),
            vec![0x5100, 0x1200]
        );
        assert_eq!(
            stack_frames(site, &[0x9000, 0x8948_e855_8d48_5354], 8, code),
            vec![0x5100]
        );
        // `--stacks N` keeps N frames; NIF API sites are named without their flag bit.
        assert_eq!(
            stack_frames(site | NIF_API_SITE, &[0x9000, 0x1200, 0x1300], 2, code),
            vec![0x5100, 0x1200]
        );
        assert!(stack_frames(site, &[], 0, code).is_empty());

        assert!(is_truncated(&[], code));
        assert!(is_truncated(&[0x9000], code));
        assert!(is_truncated(&[0x9000, 0x2b], code));
        assert!(is_truncated(&[0x9000, 0x7f9d_f97f_1d18, 0x1200], code));
        assert!(!is_truncated(&[0x9000, 0x1200], code));
        let full = vec![0x1200; native_limits::STACK_DEPTH as usize];
        assert!(is_truncated(&full, code));
        assert!(!is_truncated(&full[1..], code));

        assert_eq!(
            frame_label("lt_native.so", Some("leak_malloc"), 0x5100),
            "lt_native.so: leak_malloc"
        );
        assert_eq!(frame_label("beam.smp", None, 0x1200), "beam.smp: 0x1200");
    }

    #[test]
    fn stacks_are_summed_by_their_frames_and_ranked_by_outstanding_bytes() {
        let mut l = NativeLedger::new(std::process::id(), "/x/beam.smp");
        let code = |start, path: &str| Mapping {
            start,
            end: start + 0x1000,
            path: path.into(),
            exec: true,
            offset: 0,
        };
        l.maps = vec![
            code(0x1000, "/x/beam.smp"),
            code(0x5000, "/x/lt_native.so"),
            code(0x9000, "/x/libc.so.6"),
        ];
        // As blazesym would name them; 0x1200 and 0x1300 stay unsymbolized.
        l.frame_names
            .insert(0x5100, "lt_native.so: leak_malloc".into());
        l.frame_names.insert(0x5200, "lt_native.so: churn".into());
        let site = |a: u64, b: u64| NativeSite {
            allocations: a,
            frees: b,
            bytes_allocated: a * 100,
            bytes_freed: b * 100,
            ..Default::default()
        };
        let key = |site, stack_id| StackSiteKey { site, stack_id };
        let kernel: HashMap<u32, Vec<u64>> = [
            (1, vec![0x9000, 0x1200, 0x1300]),
            // Differs from 1 only past the 2 frames kept: the same stack.
            (2, vec![0x9000, 0x1200, 0x1400]),
            // The walk stopped at once: truncated.
            (3, vec![0x9000]),
            // The walk read data (a loop counter as a frame): truncated, the site alone. (An
            // address that could be a library loaded since would have the maps read again.)
            (5, vec![0x9000, 0x2b, 0x1e]),
        ]
        .into();
        let mut asked = Vec::new();
        let read = |asked: &mut Vec<u32>, id: u32| {
            asked.push(id);
            kernel.get(&id).cloned()
        };

        // Stacks off: nothing is read or reported.
        l.update_stacks([(key(0x5100, 1), site(1, 0))], |id| read(&mut asked, id));
        assert!(asked.is_empty());
        let off = l.evidence(Some(0.0), "--native on".into());
        assert!(off.stacks.is_empty() && off.stacks_truncated.is_none());
        let json = serde_json::to_value(&off).unwrap();
        assert!(json.get("stacks").is_none() && json.get("stack_depth").is_none());

        l.set_stack_depth(2);
        l.update_stacks(
            [
                (key(0x5100, 1), site(10, 0)),
                (key(0x5100, 2), site(5, 1)),
                (key(0x5200, 3), site(50, 48)),
                (key(0x5200, 5), site(2, 2)),
                // No frame pointer at the call: no walk, the site alone.
                (key(0x5200, NO_WALK), site(1, 1)),
                // Not readable yet: kept, asked again next time.
                (key(0x5200, 4), site(1, 0)),
            ],
            |id| read(&mut asked, id),
        );
        asked.sort_unstable();
        assert_eq!(asked, [1, 2, 3, 4, 5]);
        assert_eq!(l.stacks_truncated, 3);
        let stacks = l.stacks();
        assert_eq!(stacks.len(), 2, "{stacks:#?}");
        assert_eq!(
            stacks[0].frames,
            ["lt_native.so: leak_malloc", "beam.smp: 0x1200"]
        );
        assert_eq!(
            (
                stacks[0].allocations,
                stacks[0].frees,
                stacks[0].outstanding_bytes
            ),
            (15, 1, 1400)
        );
        assert_eq!(stacks[1].frames, ["lt_native.so: churn"]);
        assert_eq!(
            (stacks[1].allocations, stacks[1].outstanding_bytes),
            (53, 200)
        );

        // Later reads replace the totals; each stack's frames are read once.
        asked.clear();
        l.update_stacks(
            [
                (key(0x5100, 1), site(20, 0)),
                (key(0x5100, 2), site(5, 1)),
                (key(0x5200, 3), site(50, 50)),
            ],
            |id| read(&mut asked, id),
        );
        assert_eq!(asked, [4u32; 0]);
        let e = l.evidence(Some(0.0), "--native on".into());
        assert_eq!(e.stack_depth, 2);
        assert_eq!(e.stacks_truncated, Some(3));
        assert_eq!(e.stacks[0].outstanding_bytes, 2400);
        assert_eq!(e.stacks[0].allocations, 25);
        assert_eq!(e.stacks[1].outstanding_bytes, 0);
    }
}
