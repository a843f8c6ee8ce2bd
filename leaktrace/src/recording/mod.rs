//! A recorded run: everything the verdict needs, written by `--record FILE` and read back by
//! `leaktrace report FILE`. The verdict is a pure function of a [`Recording`].

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::error::Error;
pub mod blocks;
pub mod histograms;
pub mod native;
pub mod resident;
pub mod vm;
pub use native::{NativeEvidence, NativeModule, NativePoint};
pub use vm::{
    AllocatorUsage, Census, CensusLimits, LoadedCode, MsegCache, PersistentTerms, PortEntry, Ports,
    ProcessEntry, ProcessGroup, TableEntry, VmEvidence, VmGap, VmSample,
};

/// Version of the recording and report.json schema.
pub const SCHEMA: u32 = 1;

/// Largest file `leaktrace report` reads: 256 MiB. Recordings of real runs are a few hundred
/// KiB (samples are a few hundred bytes each; censuses and native stacks are capped).
pub const MAX_RECORDING_BYTES: u64 = 256 << 20;

/// Largest magnitude of any number in a recording: 2^53, where f64 stops counting exactly.
/// Byte figures beyond it (8 PiB) are not real, and within it sums and differences of them
/// cannot wrap.
pub const MAX_NUMBER: u64 = 1 << 53;

/// Longest time a recording may hold, in seconds: 366 days (`--duration` takes at most 365).
pub const MAX_RECORDED_S: f64 = 366.0 * 86400.0;

/// One pass over a recording's JSON that builds nothing (a 256 MiB file of small numbers
/// would be gigabytes as a `serde_json::Value`): it notes the top-level `schema` and the first
/// number of magnitude above [`MAX_NUMBER`], naming where it is (`at`: its path). Nesting is
/// bounded by serde_json's recursion limit (128), which this crate leaves on.
struct Scan<'a> {
    at: &'a mut String,
    schema: &'a mut Option<u64>,
    out_of_range: &'a mut Option<String>,
}

impl Scan<'_> {
    fn number(self, ok: bool, n: &dyn std::fmt::Display) {
        if !ok && self.out_of_range.is_none() {
            *self.out_of_range = Some(format!(
                "the number {n} at {} is out of range: leaktrace writes none beyond ±2^53",
                self.at
            ));
        }
    }

    fn reborrow(&mut self) -> Scan<'_> {
        Scan {
            at: self.at,
            schema: self.schema,
            out_of_range: self.out_of_range,
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Scan<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        if self.at == "schema" {
            *self.schema = Some(v);
        }
        self.number(v <= MAX_NUMBER, &v);
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.number(v.unsigned_abs() <= MAX_NUMBER, &v);
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.number(v.is_finite() && v.abs() <= MAX_NUMBER as f64, &v);
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let len = self.at.len();
            let _ = std::fmt::Write::write_fmt(self.at, format_args!("[{i}]"));
            let more = seq.next_element_seed(self.reborrow())?.is_some();
            self.at.truncate(len);
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let len = self.at.len();
            if !self.at.is_empty() {
                self.at.push('.');
            }
            self.at.push_str(&key);
            map.next_value_seed(self.reborrow())?;
            self.at.truncate(len);
        }
        Ok(())
    }
}

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
    /// What the block probes saw (`--blocks`; None: not asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<blocks::BlockEvidence>,
    /// Where the resident memory lay at attach and at the end (older recordings have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident: Option<resident::ResidentLevels>,
    /// Size and lifetime distributions (HdrHistograms over time), when measured.
    #[serde(default, skip_serializing_if = "histograms::Histograms::is_empty")]
    pub histograms: histograms::Histograms,
    /// Kernel release of the traced host (`uname -r`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// leaktrace's own command line, secrets removed ([`crate::report::redact_command_line`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_line: Vec<String>,
    /// The capabilities leaktrace held, phase by phase (every one at attach, then only what
    /// the rest of the run needs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub privileges: Vec<PrivilegePhase>,
}

/// The capabilities held from one point of a run on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivilegePhase {
    /// What the run was doing ("attach", "tracing (every probe placed)").
    pub phase: String,
    /// Seconds since attach.
    pub at_s: f64,
    /// Effective capabilities, by name.
    pub held: Vec<String>,
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
    /// The target's memory cgroup and its version (`cgroup v2 /system.slice/app.service
    /// (/sys/fs/cgroup/...)`), when it has one other than the root: where the `cgroup_*`
    /// sample lines come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
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
    /// Net resident bytes of ERTS carriers since attach (mseg + malloc-backed + literal, and
    /// segments that existed at attach), read from pagemap: comparable with `rss_anon`.
    pub carriers: Option<i64>,
    /// Net resident bytes of erts_mmap mappings (default mapper) not held by a carrier, since
    /// attach.
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
    /// `--blocks`: net bytes of ERTS blocks allocated since the block probes attached
    /// (probe-derived: blocks from before attach are not in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_net: Option<i64>,
    /// Net mapped carrier bytes since attach (created minus destroyed), beside the resident
    /// `carriers`: what the cross-check compares with the VM's mapped `carriers_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carriers_mapped: Option<i64>,
    /// Net carrier bytes since attach, per allocator name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub carriers_by_allocator: BTreeMap<String, i64>,
    /// What the target's memory cgroup is charged (`memory.current`, v1
    /// `memory.usage_in_bytes`): what its limit and the OOM killer read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_memory: Option<u64>,
    /// Anonymous memory of the cgroup (`anon`, v1 `total_rss` of `memory.stat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_anon: Option<u64>,
    /// Page cache of the cgroup, shared memory included (`file`, v1 `total_cache`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_file: Option<u64>,
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Losses {
    /// Ring buffer full.
    pub events_lost: u64,
    /// Of `events_lost`, ends of carriers or mappings (dealloc, munmap, free): the carriers
    /// they ended stay counted, so carrier figures are too high by up to their size.
    #[serde(default)]
    pub events_lost_frees: u64,
    /// Of `events_lost`, reallocs and mremaps (either direction).
    #[serde(default)]
    pub events_lost_resizes: u64,
    /// Pending-call map full.
    pub map_full: u64,
    /// Helper failures in probes.
    pub probe_errors: u64,
    /// Return probes without their entry.
    pub missed_entries: u64,
    /// Frees of malloc-backed carriers made before attach (size unknown, not accounted).
    pub unknown_frees: u64,
    /// Counters that could not be read from the kernel: their figures above are unknown (shown
    /// as such), not zero.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

impl Losses {
    /// Carrier events lost that created a carrier (or mapping): the carrier figures miss them,
    /// so they are too low.
    pub fn lost_creations(&self) -> u64 {
        self.events_lost
            .saturating_sub(self.events_lost_frees)
            .saturating_sub(self.events_lost_resizes)
    }

    /// Which way lost carrier events bend the carrier figures, or None when none were lost
    /// and every counter was read.
    pub fn carrier_bound(&self) -> Option<String> {
        let frees = self.events_lost_frees;
        let creations = self.lost_creations() + self.map_full + self.missed_entries;
        let resizes = self.events_lost_resizes;
        let unread = self
            .unreadable
            .iter()
            .any(|c| c.contains("events") || c.contains("map"));
        let what = match (creations + resizes > 0, frees > 0) {
            (false, false) if !unread => return None,
            (false, false) => {
                "some loss counters could not be read: carrier figures are of unknown accuracy"
                    .to_owned()
            }
            (true, false) if resizes == 0 => format!(
                "{creations} carrier creation events were lost (ring buffer or map full, missed entries): carrier figures are a lower bound"
            ),
            (false, true) => format!(
                "{frees} carrier release events were lost (ring buffer full): carriers they ended stay counted, so carrier figures are an upper bound"
            ),
            _ => format!(
                "{} carrier events were lost ({creations} creations, {frees} releases, {resizes} resizes): carrier figures may be too high or too low",
                creations + frees + resizes
            ),
        };
        Some(what)
    }
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
    /// Resident memory outside the VM's carriers at attach is a finding from this many bytes...
    #[serde(default = "default_outside_min")]
    pub outside_min_bytes: f64,
    /// ...and this share of RSS (0..1).
    #[serde(default = "default_outside_min_share")]
    pub outside_min_share: f64,
}

fn default_outside_min() -> f64 {
    Thresholds::default().outside_min_bytes
}

fn default_outside_min_share() -> f64 {
    Thresholds::default().outside_min_share
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
            outside_min_bytes: 64.0 * 1024.0 * 1024.0,
            outside_min_share: 0.3,
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
    ///
    /// Only a regular file of at most [`MAX_RECORDING_BYTES`] is read (a FIFO, directory or
    /// device is refused without blocking on it); every number in it must be within ±2^53
    /// ([`MAX_NUMBER`]) and the fields must pass [`Recording::validate`].
    pub fn read(path: &Path) -> Result<Recording, Error> {
        let io = |source| Error::RecordingIo {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| Error::RecordingCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        let not_file = |meta: &fs::Metadata| Error::RecordingNotFile {
            path: path.to_path_buf(),
            kind: crate::report::file_kind(meta.mode()),
        };
        let too_large = |size| Error::RecordingTooLarge {
            path: path.to_path_buf(),
            size,
            cap: MAX_RECORDING_BYTES,
        };
        // Refused before opening (opening some devices does something); checked again on the
        // open file, which O_NONBLOCK keeps from waiting for a FIFO's writer.
        let meta = fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(not_file(&meta));
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(not_file(&meta));
        }
        if meta.len() > MAX_RECORDING_BYTES {
            return Err(too_large(meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_RECORDING_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_RECORDING_BYTES {
            return Err(too_large(bytes.len() as u64));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(corrupt("the file is empty".into()));
        }
        let (mut at, mut schema, mut out_of_range) = (String::new(), None, None);
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        serde::de::DeserializeSeed::deserialize(
            Scan {
                at: &mut at,
                schema: &mut schema,
                out_of_range: &mut out_of_range,
            },
            &mut de,
        )
        .and_then(|()| de.end())
        .map_err(|e| {
            corrupt(match e.classify() {
                serde_json::error::Category::Eof => format!(
                    "truncated: the JSON ends at line {} column {} before the recording does",
                    e.line(),
                    e.column()
                ),
                _ => format!("not JSON: {e}"),
            })
        })?;
        match schema {
            Some(s) if s == u64::from(SCHEMA) => {}
            Some(s) => {
                return Err(corrupt(format!(
                    "schema {s}, this leaktrace reads schema {SCHEMA}"
                )));
            }
            None => {
                return Err(corrupt(
                    "no \"schema\" field: not a leaktrace recording".into(),
                ));
            }
        }
        if let Some(why) = out_of_range {
            return Err(corrupt(why));
        }
        let rec: Recording = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("not the shape of a schema {SCHEMA} recording: {e}")))?;
        rec.validate().map_err(corrupt)?;
        Ok(rec)
    }

    /// Writes the recording as JSON, atomically (a temporary file beside `path`, synced, then
    /// renamed over it) and never through a symbolic link at `path`.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        self.write_with_mode(path, crate::config::OutMode::default())
    }

    /// [`Recording::write`] with the file mode of `--out-mode`.
    pub fn write_with_mode(&self, path: &Path, mode: crate::config::OutMode) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).expect("a recording always serializes");
        crate::report::write_file(path, text.as_bytes(), mode).map_err(|e| Error::Write {
            what: "the recording",
            flag: "--record",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks what serde cannot: times are finite, non-negative, within [`MAX_RECORDED_S`] and
    /// increasing; the interval is positive; the thresholds are finite, their floors not
    /// negative and their fractions within 0..1.
    pub fn validate(&self) -> Result<(), String> {
        let time = |name: &str, v: f64| {
            if v.is_finite() && (0.0..=MAX_RECORDED_S).contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "{name} is {v}: not a time between 0 and {MAX_RECORDED_S} s (366 days)"
                ))
            }
        };
        time("duration_s", self.duration_s)?;
        time("interval_s", self.interval_s)?;
        if self.interval_s <= 0.0 {
            return Err(format!(
                "interval_s is {}: it must be positive",
                self.interval_s
            ));
        }
        let mut last: Option<f64> = None;
        for (i, s) in self.samples.iter().enumerate() {
            time(&format!("sample {i}: t_s"), s.t_s)?;
            if let Some(last) = last
                && s.t_s <= last
            {
                return Err(format!(
                    "times go backwards: sample {i} at t_s {} s does not come after sample {} at {last} s",
                    s.t_s,
                    i - 1
                ));
            }
            last = Some(s.t_s);
        }
        let t = &self.thresholds;
        let floor = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "thresholds.{name} is {v}: it must be a finite number >= 0"
                ))
            }
        };
        let fraction = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("thresholds.{name} is {v}: it must be within 0..1"))
            }
        };
        floor("min_growth_bytes_per_s", t.min_growth_bytes_per_s)?;
        floor("min_total_growth_bytes", t.min_total_growth_bytes)?;
        time("thresholds.min_duration_s", t.min_duration_s)?;
        floor("frag_min_free_bytes", t.frag_min_free_bytes)?;
        fraction("explained_fraction", t.explained_fraction)?;
        fraction("frag_max_usage", t.frag_max_usage)?;
        Ok(())
    }
}

/// Fuzzing the path `leaktrace report FILE` takes: [`Recording::read`] of a file, then judging
/// and rendering what it accepted. Arbitrary JSON, and real recordings mutated (a field
/// deleted, a number made huge, negative or fractional, a subtree replaced, the text cut short
/// or its bytes flipped): nothing may panic, and a refusal is a `RecordingCorrupt` (or, for
/// bytes that are not UTF-8, a `RecordingIo` of kind InvalidData).
#[cfg(test)]
mod fuzz {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use serde_json::{Map, Number, Value, json};

    use super::Recording;
    use crate::{error::Error, report};

    /// 256 cases of each property (a few seconds in release): CI's time-boxed run.
    /// PROPTEST_CASES=N fuzzes longer.
    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn seed(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/recordings")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The real recordings mutations start from: VM evidence, native evidence, carriers only.
    fn seeds() -> &'static [(String, Value)] {
        static SEEDS: std::sync::OnceLock<Vec<(String, Value)>> = std::sync::OnceLock::new();
        SEEDS.get_or_init(|| {
            ["healthy.json", "native_leak.json", "carriers_no_vm.json"]
                .iter()
                .map(|n| {
                    let text = seed(n);
                    let value = serde_json::from_str(&text).unwrap();
                    (text, value)
                })
                .collect()
        })
    }

    /// Reads `bytes` as a recording file the way `leaktrace report` does, and on success judges
    /// and renders it.
    fn report_of(bytes: &[u8]) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("rec.json");
        std::fs::write(&path, bytes).unwrap();
        match Recording::read(&path) {
            Ok(rec) => {
                let r = report::Report::new(rec);
                let _ = report::to_json(&r);
                let _ = report::to_markdown(&r);
                let _ = report::terminal_summary(&r);
                let _ = r.verdict.kind.exit_code();
                Ok(())
            }
            Err(Error::RecordingCorrupt { reason, .. }) => {
                prop_assert!(!reason.is_empty());
                Ok(())
            }
            Err(Error::RecordingIo { source, .. })
                if source.kind() == std::io::ErrorKind::InvalidData =>
            {
                Ok(())
            }
            Err(other) => Err(TestCaseError::fail(format!("unexpected error: {other}"))),
        }
    }

    fn arb_number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from), // NaN and infinities become null
            prop::sample::select(vec![
                json!(0),
                json!(-1),
                json!(u64::MAX),
                json!(i64::MIN),
                json!(1e308),
                json!(-1e308),
                json!(5e-324),
                json!(0.5),
                json!(18446744073709551616.0),
            ]),
        ]
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            arb_number(),
            "[a-z_]{0,10}".prop_map(Value::String),
            prop::sample::select(vec![
                "duration",
                "target_exited",
                "native_leak",
                "NaN",
                "inf"
            ])
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// JSON pointers of every node under `v`, `v` itself first.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    pointers(c, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    pointers(c, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    /// One change to a parsed recording.
    #[derive(Clone, Debug)]
    enum Mutation {
        /// Remove the node (a field, or an array element).
        Delete(prop::sample::Index),
        /// Replace the node, if a number, by this one.
        Number(prop::sample::Index, Value),
        /// Replace the node by arbitrary JSON.
        Replace(prop::sample::Index, Value),
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            1 => any::<prop::sample::Index>().prop_map(Mutation::Delete),
            3 => (any::<prop::sample::Index>(), arb_number())
                .prop_map(|(i, n)| Mutation::Number(i, n)),
            1 => (any::<prop::sample::Index>(), arb_json())
                .prop_map(|(i, v)| Mutation::Replace(i, v)),
        ]
    }

    fn apply(v: &mut Value, m: &Mutation) {
        let mut all = Vec::new();
        pointers(v, String::new(), &mut all);
        match m {
            Mutation::Delete(i) => {
                let p = &all[i.index(all.len())];
                let Some((parent, last)) = p.rsplit_once('/') else {
                    return; // the root
                };
                let last = last.replace("~1", "/").replace("~0", "~");
                match v.pointer_mut(parent) {
                    Some(Value::Object(o)) => {
                        o.remove(&last);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(n) = last.parse::<usize>()
                            && n < a.len()
                        {
                            a.remove(n);
                        }
                    }
                    _ => {}
                }
            }
            Mutation::Number(i, n) => {
                let numbers: Vec<&String> = all
                    .iter()
                    .filter(|p| v.pointer(p).is_some_and(Value::is_number))
                    .collect();
                if numbers.is_empty() {
                    return;
                }
                let p = numbers[i.index(numbers.len())].clone();
                *v.pointer_mut(&p).unwrap() = n.clone();
            }
            Mutation::Replace(i, new) => {
                let p = &all[i.index(all.len())];
                *v.pointer_mut(p).unwrap() = new.clone();
            }
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_json_is_read_or_refused(mut v in arb_json(), schema in any::<bool>()) {
            // With "schema": 1 half the time, to get past the first check.
            if schema && let Value::Object(o) = &mut v {
                o.insert("schema".into(), Value::Number(Number::from(super::SCHEMA)));
            }
            report_of(serde_json::to_string(&v).unwrap().as_bytes())?;
        }

        #[test]
        fn mutated_recordings_are_read_or_refused(
            which in 0..3usize,
            mutations in prop::collection::vec(arb_mutation(), 1..4),
        ) {
            let mut v = seeds()[which].1.clone();
            for m in &mutations {
                apply(&mut v, m);
            }
            report_of(serde_json::to_string(&v).unwrap().as_bytes())?;
        }

        #[test]
        fn cut_or_flipped_recordings_are_read_or_refused(
            which in 0..3usize,
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            truncate in any::<bool>(),
        ) {
            let mut bytes = seeds()[which].0.clone().into_bytes();
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            for (at, x) in &flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] ^= x;
                }
            }
            report_of(&bytes)?;
        }
    }

    /// Reads `bytes` as a recording file and returns the refusal, which must be a clear one.
    fn refusal_of(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        std::fs::write(&path, bytes).unwrap();
        match Recording::read(&path) {
            Ok(_) => panic!(
                "read: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
            Err(e @ Error::RecordingCorrupt { .. }) => e.to_string(),
            Err(e) => panic!("not a corrupt-recording error: {e}"),
        }
    }

    #[test]
    fn deep_nesting_stops_at_the_recursion_limit() {
        for open in ["[", "{\"a\":"] {
            let mut text = String::from("{\"schema\":1,\"x\":");
            text.push_str(&open.repeat(100_000));
            let e = refusal_of(text.as_bytes());
            assert!(e.contains("recursion limit"), "{e}");
        }
    }

    #[test]
    fn huge_numbers_are_refused_with_their_place() {
        let e = refusal_of(br#"{"schema":1,"samples":[{"t_s":1e999}]}"#);
        assert!(e.contains("not JSON") && e.contains("out of range"), "{e}");
        let digits = "9".repeat(100_000);
        let e = refusal_of(format!(r#"{{"schema":1,"a":[{digits}]}}"#).as_bytes());
        assert!(e.contains("not JSON") && e.contains("out of range"), "{e}");
        let e = refusal_of(br#"{"schema":1,"a":{"b":[0,99999999999999999999]}}"#);
        assert!(e.contains("a.b[1]") && e.contains("out of range"), "{e}");
        let e = refusal_of(br#"{"schema":1,"x":-9007199254740993}"#);
        assert!(e.contains("at x is out of range"), "{e}");
        // The schema is looked at first: a foreign file is named as such.
        let e = refusal_of(br#"{"x":1e300}"#);
        assert!(e.contains("no \"schema\" field"), "{e}");
    }

    #[test]
    fn a_large_file_of_small_values_is_refused() {
        // 64 MiB of `0,`: 32 M values, ~1 GiB as a serde_json::Value tree; the one-pass check
        // and the typed decode build nothing per value (measured alone: the peak RSS grows by
        // the file's own 64 MiB; other tests of this binary run beside it, so no bound here).
        let mut text = String::from("{\"schema\":1,\"x\":[");
        text.push_str(&"0,".repeat(32 << 20));
        text.push_str("0]}");
        let e = refusal_of(text.as_bytes());
        assert!(e.contains("not the shape"), "{e}");
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn random_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            report_of(&bytes)?;
        }

        #[test]
        fn nested_arrays_and_objects_are_read_or_refused(depth in 0..300usize, object in any::<bool>()) {
            let (open, close) = if object { ("{\"k\":", "}") } else { ("[", "]") };
            let text = format!(
                "{{\"schema\":1,\"samples\":{}0{}}}",
                open.repeat(depth),
                close.repeat(depth)
            );
            report_of(text.as_bytes())?;
        }
    }

    #[test]
    fn the_seeds_themselves_are_read() {
        for (text, _) in seeds() {
            report_of(text.as_bytes()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("rec.json");
            std::fs::write(&path, text).unwrap();
            Recording::read(&path).unwrap();
        }
    }
}
