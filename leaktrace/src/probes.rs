//! Loads leaktrace's eBPF programs into the kernel and attaches them to a binary.
//!
//! Dropping a [`Tracer`] detaches every probe and unloads the programs, so no probe outlives
//! leaktrace, whatever path it exits by.

use std::{collections::HashMap, num::NonZeroU32, path::Path};

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf, StackTraceMap},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use leaktrace_common::{
    BlockStats, CARRIER_EVENT_SIZE, CarrierEvent, NativeHist, NativeSite, StackSiteKey, counter,
    native_config, probe_id as P,
};

use crate::{
    error::Error,
    placement::{self, Skip},
    recording::{Losses, NativeEvidence, ProbeStat},
    symbols::SymbolTable,
};

#[cfg(not(leaktrace_ebpf_stub))]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));
#[cfg(leaktrace_ebpf_stub)]
static OBJECT: &[u8] = &[];

/// One program and where it attaches.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Program name in the eBPF object.
    pub program: &'static str,
    /// Symbol in the target binary.
    pub symbol: &'static str,
    /// Id for its hit counter.
    pub id: u32,
    /// Tracing without it would be misleading: refuse to run.
    pub required: bool,
}

const fn spec(program: &'static str, symbol: &'static str, id: u32, required: bool) -> ProbeSpec {
    ProbeSpec {
        program,
        symbol,
        id,
        required,
    }
}

/// Carrier-level probes on beam.smp. Entry probes come before their return probes: attaching
/// in this order means a call caught between the two is never seen half.
pub const CARRIER_PROBES: &[ProbeSpec] = &[
    spec("mseg_alloc", "erts_mseg_alloc_opt", P::MSEG_ALLOC, true),
    spec(
        "mseg_alloc_ret",
        "erts_mseg_alloc_opt",
        P::MSEG_ALLOC_RET,
        true,
    ),
    spec(
        "mseg_dealloc",
        "erts_mseg_dealloc_opt",
        P::MSEG_DEALLOC,
        true,
    ),
    spec(
        "mseg_realloc",
        "erts_mseg_realloc_opt",
        P::MSEG_REALLOC,
        false,
    ),
    spec(
        "mseg_realloc_ret",
        "erts_mseg_realloc_opt",
        P::MSEG_REALLOC_RET,
        false,
    ),
    spec("mmap", "erts_mmap", P::MMAP, true),
    spec("mmap_ret", "erts_mmap", P::MMAP_RET, true),
    spec("munmap", "erts_munmap", P::MUNMAP, true),
    spec("mremap", "erts_mremap", P::MREMAP, false),
    spec("mremap_ret", "erts_mremap", P::MREMAP_RET, false),
    spec(
        "sys_aligned_alloc",
        "erts_sys_aligned_alloc",
        P::SYS_ALIGNED_ALLOC,
        false,
    ),
    spec(
        "sys_aligned_alloc_ret",
        "erts_sys_aligned_alloc",
        P::SYS_ALIGNED_ALLOC_RET,
        false,
    ),
    spec(
        "sys_aligned_free",
        "erts_sys_aligned_free",
        P::SYS_ALIGNED_FREE,
        false,
    ),
    spec(
        "sys_aligned_realloc",
        "erts_sys_aligned_realloc",
        P::SYS_ALIGNED_REALLOC,
        false,
    ),
    spec(
        "sys_aligned_realloc_ret",
        "erts_sys_aligned_realloc",
        P::SYS_ALIGNED_REALLOC_RET,
        false,
    ),
    spec(
        "literal_alloc",
        "erts_alcu_mmapper_mseg_alloc",
        P::LITERAL_ALLOC,
        false,
    ),
    spec(
        "literal_alloc_ret",
        "erts_alcu_mmapper_mseg_alloc",
        P::LITERAL_ALLOC_RET,
        false,
    ),
    spec(
        "literal_dealloc",
        "erts_alcu_mmapper_mseg_dealloc",
        P::LITERAL_DEALLOC,
        false,
    ),
    spec(
        "literal_realloc",
        "erts_alcu_mmapper_mseg_realloc",
        P::LITERAL_REALLOC,
        false,
    ),
    spec(
        "literal_realloc_ret",
        "erts_alcu_mmapper_mseg_realloc",
        P::LITERAL_REALLOC_RET,
        false,
    ),
];

/// A native probe on the target's libc.
#[derive(Clone, Copy, Debug)]
pub struct NativeSpec {
    /// Program name in the eBPF object.
    pub program: &'static str,
    /// Symbol in libc.
    pub symbol: &'static str,
    /// Id for its hit counter (shared by the symbols one program serves).
    pub id: u32,
    /// A return probe (placed at +0 by the kernel's return trampoline).
    pub ret: bool,
    /// What an entry probe may skip to land on an emulated instruction.
    pub skip: Skip,
}

const fn native(program: &'static str, symbol: &'static str, id: u32, ret: bool) -> NativeSpec {
    NativeSpec {
        program,
        symbol,
        id,
        ret,
        skip: Skip::Nothing,
    }
}

/// Native probes on libc, in attach order: return probes first (a return without its entry is
/// ignored), then frees (a free of something allocated before is counted as unknown), then the
/// entries. The same program serves symbols with the same arguments.
pub const NATIVE_PROBES: &[NativeSpec] = &[
    native("native_malloc_ret", "malloc", P::MALLOC_RET, true),
    native("native_malloc_ret", "valloc", P::MALLOC_RET, true),
    native("native_malloc_ret", "pvalloc", P::MALLOC_RET, true),
    native("native_calloc_ret", "calloc", P::CALLOC_RET, true),
    native("native_realloc_ret", "realloc", P::REALLOC_RET, true),
    native(
        "native_memalign_ret",
        "aligned_alloc",
        P::MEMALIGN_RET,
        true,
    ),
    native("native_memalign_ret", "memalign", P::MEMALIGN_RET, true),
    native(
        "native_posix_memalign_ret",
        "posix_memalign",
        P::POSIX_MEMALIGN_RET,
        true,
    ),
    native("native_mmap_ret", "mmap", P::MMAP_ANON_RET, true),
    NativeSpec {
        skip: Skip::NullTest,
        ..native("native_free", "free", P::FREE, false)
    },
    native("native_munmap", "munmap", P::MUNMAP_ANON, false),
    native("native_malloc", "malloc", P::MALLOC, false),
    native("native_malloc", "valloc", P::MALLOC, false),
    native("native_malloc", "pvalloc", P::MALLOC, false),
    native("native_calloc", "calloc", P::CALLOC, false),
    native("native_realloc", "realloc", P::REALLOC, false),
    native("native_memalign", "aligned_alloc", P::MEMALIGN, false),
    native("native_memalign", "memalign", P::MEMALIGN, false),
    native(
        "native_posix_memalign",
        "posix_memalign",
        P::POSIX_MEMALIGN,
        false,
    ),
    native("native_mmap", "mmap", P::MMAP_ANON, false),
];

/// NIF and driver API probes on beam.smp, in the same attach order (returns, releases,
/// entries). Their memory is inside ERTS carriers: it names the NIF behind carrier growth.
pub const NIF_API_PROBES: &[NativeSpec] = &[
    native("nif_alloc_ret", "enif_alloc", P::NIF_ALLOC_RET, true),
    native("nif_alloc_ret", "driver_alloc", P::NIF_ALLOC_RET, true),
    native("nif_realloc_ret", "enif_realloc", P::NIF_REALLOC_RET, true),
    native(
        "nif_realloc_ret",
        "driver_realloc",
        P::NIF_REALLOC_RET,
        true,
    ),
    native(
        "nif_resource_ret",
        "enif_alloc_resource",
        P::NIF_RESOURCE_RET,
        true,
    ),
    native("nif_free", "enif_free", P::NIF_FREE, false),
    native("nif_free", "driver_free", P::NIF_FREE, false),
    NativeSpec {
        skip: Skip::Locked,
        ..native("nif_keep", "enif_keep_resource", P::NIF_KEEP, false)
    },
    native(
        "nif_release",
        "enif_release_resource",
        P::NIF_RELEASE,
        false,
    ),
    native("nif_alloc", "enif_alloc", P::NIF_ALLOC, false),
    native("nif_alloc", "driver_alloc", P::NIF_ALLOC, false),
    native("nif_realloc", "enif_realloc", P::NIF_REALLOC, false),
    native("nif_realloc", "driver_realloc", P::NIF_REALLOC, false),
    native(
        "nif_resource",
        "enif_alloc_resource",
        P::NIF_RESOURCE,
        false,
    ),
];

/// Block probes (`--blocks`) on the erts_alcu functions in `used` (see
/// [`crate::blocks::used_functions`]), in attach order: returns, frees, entries (as for the
/// native probes). A free moves past its NULL test to the `push` after it (emulated).
pub fn block_specs(used: &[&'static str]) -> Vec<NativeSpec> {
    use crate::blocks::{ALLOC_FUNCTIONS, FREE_FUNCTIONS, REALLOC_FUNCTIONS};
    let of = |list: &[&'static str]| -> Vec<&'static str> {
        list.iter().filter(|f| used.contains(f)).copied().collect()
    };
    let (allocs, reallocs, frees) = (
        of(&ALLOC_FUNCTIONS),
        of(&REALLOC_FUNCTIONS),
        of(&FREE_FUNCTIONS),
    );
    let mut specs = Vec::new();
    for f in &allocs {
        specs.push(native("block_alloc_ret", f, P::BLOCK_ALLOC_RET, true));
    }
    for f in &reallocs {
        specs.push(native("block_realloc_ret", f, P::BLOCK_REALLOC_RET, true));
    }
    for f in &frees {
        specs.push(NativeSpec {
            skip: Skip::NullTest,
            ..native("block_free", f, P::BLOCK_FREE, false)
        });
    }
    for f in &allocs {
        specs.push(native("block_alloc", f, P::BLOCK_ALLOC, false));
    }
    for f in &reallocs {
        specs.push(native("block_realloc", f, P::BLOCK_REALLOC, false));
    }
    specs
}

/// Symbols without which carrier tracing refuses to start.
pub fn required_symbols(specs: &[ProbeSpec]) -> Vec<&'static str> {
    let mut symbols: Vec<&'static str> = specs
        .iter()
        .filter(|s| s.required)
        .map(|s| s.symbol)
        .collect();
    symbols.dedup();
    symbols
}

/// Loaded programs, their maps, and what attached.
pub struct Tracer {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    native_sites: PerCpuHashMap<MapData, u64, NativeSite>,
    probes: Vec<(ProbeSpec, Result<(), String>)>,
    placements: HashMap<(&'static str, &'static str), String>,
    /// Probes placed by [`Tracer::attach_native`]: where, and their link while attached (for
    /// [`Tracer::pause`] and [`Tracer::resume`]).
    placed: Vec<Placed>,
}

/// A probe placed by `attach_native`, and its link while attached.
struct Placed {
    program: &'static str,
    symbol: &'static str,
    /// File offset of the probed instruction.
    file_offset: u64,
    binary: std::path::PathBuf,
    pid: NonZeroU32,
    link: Option<aya::programs::uprobe::UProbeLinkId>,
}

impl Tracer {
    /// Loads the embedded eBPF object into the kernel (nothing is attached yet).
    pub fn load() -> Result<Tracer, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoEbpfObject);
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| Error::Load(format!("{e:#}")))?;
        let events = ebpf
            .take_map("CARRIER_EVENTS")
            .ok_or_else(|| Error::Load("map CARRIER_EVENTS missing from the object".into()))?;
        let events = RingBuf::try_from(events).map_err(|e| Error::Load(e.to_string()))?;
        let counters = ebpf
            .take_map("COUNTERS")
            .ok_or_else(|| Error::Load("map COUNTERS missing from the object".into()))?;
        let counters = PerCpuArray::try_from(counters).map_err(|e| Error::Load(e.to_string()))?;
        let sites = ebpf
            .take_map("NATIVE_SITES")
            .ok_or_else(|| Error::Load("map NATIVE_SITES missing from the object".into()))?;
        let native_sites =
            PerCpuHashMap::try_from(sites).map_err(|e| Error::Load(e.to_string()))?;
        Ok(Tracer {
            ebpf,
            events,
            counters,
            native_sites,
            probes: Vec::new(),
            placements: HashMap::new(),
            placed: Vec::new(),
        })
    }

    /// Attaches `specs` to `binary` for process `pid` only. A missing optional symbol is recorded
    /// and skipped; a required one, or any attach failure of a required probe, is an error.
    pub fn attach(
        &mut self,
        binary: &Path,
        symbols: &SymbolTable,
        pid: u32,
        specs: &[ProbeSpec],
    ) -> Result<(), Error> {
        symbols.require(&required_symbols(specs))?;
        let pid = NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?;
        for spec in specs {
            let outcome = if let Some(file_offset) = symbols.file_offset_of(spec.symbol) {
                self.attach_one(spec, binary, file_offset, pid)
            } else {
                Err(format!(
                    "{} does not export {}",
                    binary.display(),
                    spec.symbol
                ))
            };
            if let (Err(reason), true) = (&outcome, spec.required) {
                return Err(Error::Attach {
                    program: spec.program.into(),
                    symbol: spec.symbol.into(),
                    binary: binary.display().to_string(),
                    reason: reason.clone(),
                });
            }
            self.probes.push((*spec, outcome));
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        spec: &ProbeSpec,
        binary: &Path,
        file_offset: u64,
        pid: NonZeroU32,
    ) -> Result<(), String> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(spec.program)
            .ok_or_else(|| format!("program {} missing from the eBPF object", spec.program))?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        // Programs are loaded on first use; a family's second symbol reuses the loaded program.
        if program.fd().is_err() {
            program.load().map_err(|e| format!("{e:#}"))?;
        }
        // At the offset read here: given a symbol name, aya would open and map the file itself.
        program
            .attach(
                UProbeAttachLocation::AbsoluteOffset(file_offset),
                binary,
                UProbeScope::OneProcess(pid),
            )
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    /// Attaches native probes `specs` to `binary` (a path the kernel resolves to the very file
    /// the target maps: `/proc/PID/exe`, `/proc/PID/map_files/...`, or `/proc/self/fd/N` of
    /// the file `symbols` were read from) for process `pid`. Each entry probe goes on the first
    /// emulated instruction its arguments survive to; what was chosen is in the probe table.
    /// Fails only when none of the `essential` programs attached.
    pub fn attach_native(
        &mut self,
        binary: &Path,
        symbols: &SymbolTable,
        pid: u32,
        specs: &[NativeSpec],
        essential: &[&str],
    ) -> Result<(), String> {
        let libc = binary;
        let pid = NonZeroU32::new(pid).ok_or("PID 0")?;
        let mut seen: Vec<(&str, u64)> = Vec::new();
        for spec in specs {
            let stat = ProbeSpec {
                program: spec.program,
                symbol: spec.symbol,
                id: spec.id,
                required: false,
            };
            let Some((vaddr, _)) = symbols.get(spec.symbol) else {
                self.probes.push((
                    stat,
                    Err(format!(
                        "{} does not export {}",
                        libc.display(),
                        spec.symbol
                    )),
                ));
                continue;
            };
            // aligned_alloc and memalign can be one function: one probe serves both.
            if seen.contains(&(spec.program, vaddr)) {
                continue;
            }
            seen.push((spec.program, vaddr));
            let offset = if spec.ret {
                0
            } else {
                match placement::for_symbol(symbols, vaddr, spec.skip) {
                    Ok(p) => {
                        self.placements.insert(
                            (spec.program, spec.symbol),
                            format!(
                                "+{} {} ({})",
                                p.offset,
                                p.instruction,
                                if p.emulated {
                                    "emulated"
                                } else {
                                    "single-stepped"
                                }
                            ),
                        );
                        p.offset
                    }
                    Err(e) => {
                        log::debug!("placing {}: {e}", spec.symbol);
                        0
                    }
                }
            };
            let Some(file_offset) = symbols.file_offset(vaddr + offset) else {
                self.probes.push((
                    stat,
                    Err(format!(
                        "{} has no file bytes at {}'s address",
                        libc.display(),
                        spec.symbol
                    )),
                ));
                continue;
            };
            let outcome = match self.attach_at(spec.program, file_offset, libc, pid) {
                Ok(link) => {
                    self.placed.push(Placed {
                        program: spec.program,
                        symbol: spec.symbol,
                        file_offset,
                        binary: libc.to_path_buf(),
                        pid,
                        link: Some(link),
                    });
                    Ok(())
                }
                Err(e) => Err(e),
            };
            self.probes.push((stat, outcome));
        }
        let any = self
            .probes
            .iter()
            .any(|(s, r)| r.is_ok() && essential.contains(&s.program));
        if any {
            Ok(())
        } else {
            Err(format!(
                "no allocation probe attached to {}",
                libc.display()
            ))
        }
    }

    fn attach_at(
        &mut self,
        program: &str,
        file_offset: u64,
        binary: &Path,
        pid: NonZeroU32,
    ) -> Result<aya::programs::uprobe::UProbeLinkId, String> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| format!("program {program} missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        if program.fd().is_err() {
            program.load().map_err(|e| format!("{e:#}"))?;
        }
        program
            .attach(
                UProbeAttachLocation::AbsoluteOffset(file_offset),
                binary,
                UProbeScope::OneProcess(pid),
            )
            .map_err(|e| format!("{e:#}"))
    }

    /// Takes the probes of `programs` out of the target for a while (sampling windows): their
    /// links are dropped on a thread of their own, since the kernel removes uprobes one grace
    /// period (~100 ms) after another. [`Tracer::resume`] puts them back where they were.
    pub fn pause(&mut self, programs: &[&str]) -> Detaching {
        let mut links = Vec::new();
        for p in self
            .placed
            .iter_mut()
            .filter(|p| programs.contains(&p.program))
        {
            let Some(id) = p.link.take() else { continue };
            if let Some(prog) = self.ebpf.program_mut(p.program)
                && let Ok(u) = <&mut UProbe>::try_from(prog)
                && let Ok(link) = u.take_link(id)
            {
                links.push(link);
            }
        }
        Detaching(
            std::thread::Builder::new()
                .name("leaktrace-pause".into())
                .spawn(move || drop(links))
                .ok(),
        )
    }

    /// Attaches again the probes of `programs` that [`Tracer::pause`] took out; returns how
    /// many could not be (each is then left out until the next resume).
    pub fn resume(&mut self, programs: &[&str]) -> usize {
        let todo: Vec<(
            usize,
            &'static str,
            &'static str,
            u64,
            std::path::PathBuf,
            NonZeroU32,
        )> = self
            .placed
            .iter()
            .enumerate()
            .filter(|(_, p)| p.link.is_none() && programs.contains(&p.program))
            .map(|(i, p)| {
                (
                    i,
                    p.program,
                    p.symbol,
                    p.file_offset,
                    p.binary.clone(),
                    p.pid,
                )
            })
            .collect();
        let mut failed = 0;
        for (i, program, symbol, file_offset, binary, pid) in todo {
            match self.attach_at(program, file_offset, &binary, pid) {
                Ok(link) => self.placed[i].link = Some(link),
                Err(e) => {
                    log::warn!("re-attaching {program} on {symbol}: {e}");
                    failed += 1;
                }
            }
        }
        failed
    }

    /// The kernel's per-site native totals, summed over CPUs.
    pub fn native_sites(&self) -> Vec<(u64, NativeSite)> {
        self.native_sites
            .iter()
            .filter_map(Result::ok)
            .map(|(site, per_cpu)| (site, sum_cpus(&per_cpu)))
            .collect()
    }

    /// Makes the native entry probes capture `depth` frames of user stack (`--stacks`; 0:
    /// none). Set before they attach.
    pub fn set_stack_depth(&mut self, depth: u32) -> Result<(), String> {
        let map = self
            .ebpf
            .map_mut("NATIVE_CONFIG")
            .ok_or("map NATIVE_CONFIG missing from the eBPF object")?;
        let mut config: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|e| e.to_string())?;
        config
            .set(native_config::STACK_DEPTH, depth, 0)
            .map_err(|e| e.to_string())
    }

    /// The kernel's per-site native size and lifetime buckets, summed over CPUs.
    pub fn native_hists(&self) -> Vec<(u64, NativeHist)> {
        let Some(map) = self.ebpf.map("NATIVE_HIST") else {
            return Vec::new();
        };
        let Ok(hists) = PerCpuHashMap::<&MapData, u64, NativeHist>::try_from(map) else {
            return Vec::new();
        };
        hists
            .iter()
            .filter_map(Result::ok)
            .map(|(site, per_cpu)| {
                let mut sum = NativeHist::default();
                for v in per_cpu.iter() {
                    for (a, b) in sum.sizes.iter_mut().zip(v.sizes) {
                        *a = a.wrapping_add(b);
                    }
                    for (a, b) in sum.lifetimes.iter_mut().zip(v.lifetimes) {
                        *a = a.wrapping_add(b);
                    }
                }
                (site, sum)
            })
            .collect()
    }

    /// The kernel's per-type block totals (`--blocks`), summed over CPUs.
    pub fn block_stats(&self) -> Vec<(u32, BlockStats)> {
        let Some(map) = self.ebpf.map("BLOCK_STATS") else {
            return Vec::new();
        };
        let Ok(stats) = PerCpuHashMap::<&MapData, u32, BlockStats>::try_from(map) else {
            return Vec::new();
        };
        stats
            .iter()
            .filter_map(Result::ok)
            .map(|(t, per_cpu)| {
                let mut sum = BlockStats::default();
                for v in per_cpu.iter() {
                    sum.add(v);
                }
                (t, sum)
            })
            .collect()
    }

    /// Block probe losses: blocks untracked (live map full), calls uncounted (type map full).
    pub fn block_losses(&self) -> (u64, u64) {
        (
            self.counter(counter::BLOCK_LIVE_FULL),
            self.counter(counter::BLOCK_TYPES_FULL),
        )
    }

    /// Hits so far of the probes with ids in `ids`.
    pub fn hits_of(&self, ids: &[u32]) -> u64 {
        ids.iter()
            .map(|id| self.counter(counter::HITS_BASE + id))
            .sum()
    }

    /// Detaches the probes of the programs named, now (on this thread): `--max-overhead`.
    pub fn detach_programs(&mut self, programs: &[&str]) {
        for name in programs {
            if let Some(p) = self.ebpf.program_mut(name)
                && let Ok(u) = <&mut UProbe>::try_from(p)
            {
                let _ = u.unload();
            }
        }
    }

    /// The kernel's per-(site, stack) native totals (`--stacks`), summed over CPUs.
    pub fn stack_sites(&self) -> Vec<(StackSiteKey, NativeSite)> {
        let Some(map) = self.ebpf.map("STACK_SITES") else {
            return Vec::new();
        };
        let Ok(sites) = PerCpuHashMap::<&MapData, StackSiteKey, NativeSite>::try_from(map) else {
            return Vec::new();
        };
        sites
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, sum_cpus(&per_cpu)))
            .collect()
    }

    /// The frames (addresses, innermost first) of user stack `id` as the kernel walked them.
    pub fn stack_frames(&self, id: u32) -> Option<Vec<u64>> {
        let stacks = StackTraceMap::<&MapData>::try_from(self.ebpf.map("STACKS")?).ok()?;
        let trace = stacks.get(&id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// The native loss counters, into `evidence`; returns the names of those that could not be
    /// read (their figure is unknown, not 0).
    pub fn native_losses(&self, evidence: &mut NativeEvidence) -> Vec<String> {
        let mut unreadable = Vec::new();
        let mut read = |index: u32, name: &str| {
            self.try_counter(index).unwrap_or_else(|| {
                unreadable.push(name.to_owned());
                0
            })
        };
        evidence.unknown_frees = read(counter::NATIVE_UNKNOWN_FREES, "native unknown frees");
        evidence.outstanding_full = read(counter::NATIVE_OUTSTANDING_FULL, "native map full");
        evidence.sites_full = read(counter::NATIVE_SITES_FULL, "native sites map full");
        evidence.stale_calls = read(counter::NATIVE_STALE_PENDING, "native stale calls");
        if evidence.stack_depth > 0 {
            evidence.stack_errors = Some(read(counter::STACK_ERRORS, "stack errors"));
        }
        unreadable
    }

    /// Detaches every probe on a thread of its own: the kernel removes uprobes one after
    /// another, each after a grace period (~100 ms here, two seconds for a run's probes), so the
    /// report need not wait for it. [`Detaching::wait`] before exiting.
    pub fn detach_in_background(self) -> Detaching {
        Detaching(
            std::thread::Builder::new()
                .name("leaktrace-detach".into())
                .spawn(move || drop(self))
                .ok(),
        )
    }

    /// Whether every probe in `specs` that the binary has attached.
    pub fn attached(&self, program: &str) -> bool {
        self.probes
            .iter()
            .any(|(s, r)| s.program == program && r.is_ok())
    }

    /// Hands every queued carrier event to `sink`; returns how many there were.
    pub fn drain(&mut self, mut sink: impl FnMut(CarrierEvent)) -> u64 {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            if item.len() >= CARRIER_EVENT_SIZE {
                // The ring buffer only guarantees 8-byte alignment of records; read unaligned.
                let event =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<CarrierEvent>()) };
                sink(event);
                n += 1;
            }
        }
        n
    }

    /// A counter summed over CPUs, or None when the kernel would not give it.
    fn try_counter(&self, index: u32) -> Option<u64> {
        self.counters
            .get(&index, 0)
            .ok()
            .map(|values| values.iter().sum())
    }

    /// A hit counter for progress and statistics (0 when unreadable; [`Tracer::losses`] says
    /// which counters could not be read).
    fn counter(&self, index: u32) -> u64 {
        self.try_counter(index).unwrap_or(0)
    }

    /// Losses counted by the probes so far. A counter the kernel would not give is named in
    /// `unreadable`, never taken as 0 silently.
    pub fn losses(&self) -> Losses {
        let mut unreadable = Vec::new();
        let mut read = |index: u32, name: &str| {
            self.try_counter(index).unwrap_or_else(|| {
                unreadable.push(name.to_owned());
                0
            })
        };
        let mut l = Losses {
            events_lost: read(counter::EVENTS_LOST, "events lost"),
            events_lost_frees: read(counter::EVENTS_LOST_FREES, "release events lost"),
            events_lost_resizes: read(counter::EVENTS_LOST_RESIZES, "resize events lost"),
            map_full: read(counter::MAP_FULL, "pending map full"),
            probe_errors: read(counter::PROBE_ERRORS, "probe errors"),
            missed_entries: read(counter::MISSED_ENTRY, "missed entries"),
            unknown_frees: 0,
            unreadable: Vec::new(),
        };
        if (0..P::COUNT).any(|id| self.try_counter(counter::HITS_BASE + id).is_none()) {
            unreadable.push("probe hits".into());
        }
        l.unreadable = unreadable;
        l
    }

    /// Every probe tried, with its hit count.
    pub fn probe_stats(&self) -> Vec<ProbeStat> {
        self.probes
            .iter()
            .map(|(spec, outcome)| ProbeStat {
                name: spec.program.into(),
                symbol: spec.symbol.into(),
                attached: outcome.is_ok(),
                hits: self.counter(counter::HITS_BASE + spec.id),
                error: outcome.as_ref().err().cloned(),
                placement: self.placements.get(&(spec.program, spec.symbol)).cloned(),
            })
            .collect()
    }

    /// Total probe hits so far.
    pub fn total_hits(&self) -> u64 {
        (0..P::COUNT)
            .map(|id| self.counter(counter::HITS_BASE + id))
            .sum()
    }
}

/// One site's totals summed over CPUs.
fn sum_cpus(per_cpu: &PerCpuValues<NativeSite>) -> NativeSite {
    let mut t = NativeSite::default();
    for v in per_cpu.iter() {
        t.allocations += v.allocations;
        t.frees += v.frees;
        t.bytes_allocated += v.bytes_allocated;
        t.bytes_freed += v.bytes_freed;
        t.untracked += v.untracked;
        t.bytes_untracked += v.bytes_untracked;
    }
    t
}

/// Probes being detached; [`Detaching::wait`] returns once none is left in the kernel.
#[derive(Debug)]
pub struct Detaching(Option<std::thread::JoinHandle<()>>);

impl Detaching {
    /// Waits until every probe is gone.
    pub fn wait(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Detaching {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}
