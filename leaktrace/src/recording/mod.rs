//! A recorded run: everything the verdict needs, written by `--record FILE` and read back by
//! `leaktrace report FILE`. The verdict is a pure function of a [`Recording`].

use std::{collections::BTreeMap, fs, path::Path};

use serde::{Deserialize, Serialize};

use crate::error::Error;
pub mod native;
pub mod vm;
pub use native::{NativeEvidence, NativeModule, NativePoint};
pub use vm::{
    AllocatorUsage, Census, CensusLimits, LoadedCode, MsegCache, PersistentTerms, PortEntry, Ports,
    ProcessEntry, ProcessGroup, TableEntry, VmEvidence, VmGap, VmSample,
};

/// Version of the recording and report.json schema.
pub const SCHEMA: u32 = 1;

/// A whole run, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    /// Schema version ([`SCHEMA`]).
    pub schema: u32,
    /// leaktrace version that recorded the run.
    pub tool_version: String,
    /// The traced process.
    pub target: Target,
    /// Seconds from attach to the end of the run.
    pub duration_s: f64,
    /// Sampling interval in seconds.
    pub interval_s: f64,
    /// Why the run ended.
    pub end: EndReason,
    /// Which evidence sources were live.
    pub sources: Sources,
    /// Why a source is missing or partial, one line each (shown in the report).
    pub source_notes: Vec<String>,
    /// Every probe leaktrace tried to attach.
    pub probes: Vec<ProbeStat>,
    /// The ledger, one sample per interval.
    pub samples: Vec<Sample>,
    /// Carriers per allocator at the end of the run (change since attach).
    pub allocators: Vec<AllocatorCarriers>,
    /// Events that could not be recorded.
    pub losses: Losses,
    /// Thresholds the verdict used (re-judging a recording uses these unless overridden).
    pub thresholds: Thresholds,
    /// What the tracer itself cost.
    pub tracer: TracerStats,
    /// The VM's own figures, when a distribution connection answered.
    #[serde(default)]
    pub vm: Option<VmEvidence>,
    /// What the native probes saw (None: not attached in this run).
    #[serde(default)]
    pub native: Option<NativeEvidence>,
}

/// The traced process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Process id.
    pub pid: u32,
    /// Path of the executable (`/proc/PID/exe`).
    pub exe: String,
    /// OTP release, e.g. "25", when it could be found.
    pub otp_release: Option<String>,
    /// Erlang node name (`-sname`/`-name`), when distributed.
    pub node: Option<String>,
}

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `--duration` elapsed.
    Duration,
    /// Ctrl-C / SIGTERM.
    Interrupted,
    /// The target process exited.
    TargetExited,
}

/// Evidence sources, true when live during the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    /// Carrier probes (mseg, erts_mmap, aligned, literal) attached.
    pub carrier_probes: bool,
    /// enif/driver allocation API probes attached.
    pub nif_api_probes: bool,
    /// libc malloc family / mmap probes attached.
    pub native_probes: bool,
    /// Block-level erts_alcu probes attached.
    pub block_probes: bool,
    /// A distribution connection to the VM answered.
    pub vm_connection: bool,
}

/// One probe and how it fared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeStat {
    /// Program name (e.g. `mseg_alloc_ret`).
    pub name: String,
    /// Symbol it attaches to (e.g. `erts_mseg_alloc_opt`).
    pub symbol: String,
    /// Whether it attached.
    pub attached: bool,
    /// Times it fired.
    pub hits: u64,
    /// Why it did not attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where in the function it sits and the instruction under it (native probes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
}

/// One ledger sample. Byte figures; `None` (JSON null) when the source was not available.
///
/// Probe-derived lines (`carriers`, `mseg_cache`, `native_outstanding`) are the change since
/// attach, so they can be negative; `baseline` is `rss_anon` at attach, and
/// `unexplained = rss_anon - baseline - carriers - mseg_cache - native_outstanding`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since attach.
    pub t_s: f64,
    /// VmRSS.
    pub rss: Option<u64>,
    /// RssAnon.
    pub rss_anon: Option<u64>,
    /// RssFile + RssShmem.
    pub rss_file: Option<u64>,
    /// Net carrier bytes since attach (mseg + malloc-backed + literal).
    pub carriers: Option<i64>,
    /// Net bytes of erts_mmap mappings (default mapper) not held by a carrier, since attach.
    pub mseg_cache: Option<i64>,
    /// VM: sum of blocks sizes (filled by the VM view).
    pub vm_used: Option<u64>,
    /// VM: sum of carriers sizes (filled by the VM view).
    pub vm_allocated: Option<u64>,
    /// Native bytes allocated and not freed since attach (filled by native probes).
    pub native_outstanding: Option<i64>,
    /// `rss_anon` at attach.
    pub baseline: Option<u64>,
    /// What none of the other lines explains.
    pub unexplained: Option<i64>,
    /// Net carrier bytes since attach, per allocator name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub carriers_by_allocator: BTreeMap<String, i64>,
}

/// Carrier totals of one allocator over the run (changes since attach).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocatorCarriers {
    /// Allocator name (`ets_alloc`, `binary_alloc`, ..., `sys_aligned`, `literal_alloc`).
    pub name: String,
    /// Carriers created during the run.
    pub created: u64,
    /// Carriers destroyed during the run (including ones created before attach).
    pub destroyed: u64,
    /// Net carrier bytes (created minus destroyed) since attach.
    pub net_bytes: i64,
    /// Live carriers seen created during the run and not destroyed.
    pub live_seen: u64,
    /// Bytes of those live carriers.
    pub live_seen_bytes: u64,
}

/// Events that could not be recorded. Nothing is dropped silently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Losses {
    /// Ring buffer full.
    pub events_lost: u64,
    /// Pending-call map full.
    pub map_full: u64,
    /// Helper failures in probes.
    pub probe_errors: u64,
    /// Return probes without their entry.
    pub missed_entries: u64,
    /// Frees of malloc-backed carriers made before attach (size unknown, not accounted).
    pub unknown_frees: u64,
}

/// Verdict thresholds. Each has a default (documented in README) and a CLI flag.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// A line "grows" only if its least-squares slope exceeds this (bytes/s)...
    pub min_growth_bytes_per_s: f64,
    /// ...and its fitted growth over the run exceeds this (bytes).
    pub min_total_growth_bytes: f64,
    /// Runs shorter than this are inconclusive (seconds).
    pub min_duration_s: f64,
    /// Fraction of RSS growth a line must explain to be called the cause (0..1).
    pub explained_fraction: f64,
    /// Fragmentation: an allocator holds at least this many free carrier bytes...
    #[serde(default = "default_frag_min_free")]
    pub frag_min_free_bytes: f64,
    /// ...and uses at most this fraction of its carriers (0..1).
    #[serde(default = "default_frag_max_usage")]
    pub frag_max_usage: f64,
}

fn default_frag_min_free() -> f64 {
    Thresholds::default().frag_min_free_bytes
}

fn default_frag_max_usage() -> f64 {
    Thresholds::default().frag_max_usage
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_growth_bytes_per_s: 64.0 * 1024.0,
            min_total_growth_bytes: 4.0 * 1024.0 * 1024.0,
            min_duration_s: 5.0,
            explained_fraction: 0.5,
            frag_min_free_bytes: 64.0 * 1024.0 * 1024.0,
            frag_max_usage: 0.5,
        }
    }
}

/// What tracing cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TracerStats {
    /// Peak RSS of the leaktrace process (VmHWM), bytes.
    pub peak_rss: u64,
    /// Carrier events received.
    pub events: u64,
}

impl Recording {
    /// Reads and validates a recording; a corrupt or foreign file is a clear error.
    pub fn read(path: &Path) -> Result<Recording, Error> {
        let text = fs::read_to_string(path).map_err(|source| Error::RecordingIo {
            path: path.to_path_buf(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::RecordingCorrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        match value.get("schema").and_then(|s| s.as_u64()) {
            Some(s) if s == u64::from(SCHEMA) => {}
            Some(s) => {
                return Err(Error::RecordingCorrupt {
                    path: path.to_path_buf(),
                    reason: format!("schema {s}, this leaktrace reads schema {SCHEMA}"),
                });
            }
            None => {
                return Err(Error::RecordingCorrupt {
                    path: path.to_path_buf(),
                    reason: "no \"schema\" field: not a leaktrace recording".into(),
                });
            }
        }
        let rec: Recording =
            serde_json::from_value(value).map_err(|e| Error::RecordingCorrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        rec.validate().map_err(|reason| Error::RecordingCorrupt {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(rec)
    }

    /// Writes the recording as JSON.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).expect("a recording always serializes");
        fs::write(path, text).map_err(|source| Error::RecordingIo {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks what serde cannot: times increase, numbers are finite.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.duration_s.is_finite() && self.duration_s >= 0.0) {
            return Err(format!("duration_s is {}", self.duration_s));
        }
        if !(self.interval_s.is_finite() && self.interval_s > 0.0) {
            return Err(format!("interval_s is {}", self.interval_s));
        }
        let mut last = f64::NEG_INFINITY;
        for (i, s) in self.samples.iter().enumerate() {
            if !s.t_s.is_finite() || s.t_s < last {
                return Err(format!("sample {i}: t_s {} is not after {last}", s.t_s));
            }
            last = s.t_s;
        }
        Ok(())
    }
}
