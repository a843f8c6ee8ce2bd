//! Native allocations by the object that made them: the kernel keeps totals per call site
//! (return address); this names each site's object from the target's mappings and its
//! function from ELF symbols (blazesym), and sums them per object over time.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Read,
};

use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer,
        source::{Process, Source},
    },
};
use leaktrace_common::{NIF_API_SITE, NativeSite};

use crate::recording::{NativeEvidence, NativeModule, NativePoint};

/// Largest /proc/PID/maps read (a hostile target cannot make the tracer read without end).
const MAPS_CAP: u64 = 16 << 20;

/// One file-backed mapping of the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Path as the target sees it.
    pub path: String,
}

/// Parses `/proc/PID/maps` text: file-backed mappings only.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let _perms = f.next()?;
            let (_off, _dev, _inode) = (f.next()?, f.next()?, f.next()?);
            let path: String = f.collect::<Vec<_>>().join(" ");
            let (a, b) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                path,
            })
        })
        .filter(|m| m.path.starts_with('/'))
        .collect()
}

/// Reads the target's file-backed mappings (capped).
pub fn read_maps(pid: u32) -> Vec<Mapping> {
    let mut text = String::new();
    let _ = fs::File::open(format!("/proc/{pid}/maps"))
        .and_then(|f| f.take(MAPS_CAP).read_to_string(&mut text));
    parse_maps(&text)
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

fn file_name(path: &str) -> String {
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
            self.maps = read_maps(self.pid);
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
    fn symbolize(&self, addrs: &[u64]) -> Vec<Option<String>> {
        let mut process = Process::new(Pid::from(self.pid));
        process.debug_syms = false;
        process.perf_map = true;
        let source = Source::Process(process);
        match self.symbolizer.symbolize(&source, Input::AbsAddr(addrs)) {
            Ok(found) => found
                .into_iter()
                .map(|s| match s {
                    Symbolized::Sym(sym) => Some(sym.name.into_owned()),
                    Symbolized::Unknown(_) => None,
                })
                .collect(),
            Err(e) => {
                log::debug!("symbolizing native sites: {e}");
                vec![None; addrs.len()]
            }
        }
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
        NativeEvidence {
            attached_at_s,
            reason,
            modules: self.modules(),
            series: self.series.clone(),
            ..Default::default()
        }
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
            },
            Mapping {
                start: 0x5000,
                end: 0x6000,
                path: "/x/lt_native.so".into(),
            },
        ];
        let site = |a, b| NativeSite {
            allocations: a,
            frees: b,
            bytes_allocated: a * 100,
            bytes_freed: b * 100,
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
}
