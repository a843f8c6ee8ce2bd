//! Validated, immutable configuration. Nothing below the CLI looks at raw arguments.

use std::{path::PathBuf, time::Duration};

use crate::{recording::Thresholds, vm::discover::Cookie};

/// How to trace and what to write.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// Stop after this long (Ctrl-C stops earlier).
    pub duration: Duration,
    /// Ledger sampling interval.
    pub interval: Duration,
    /// Directory for report.json and report.md.
    pub out: Option<PathBuf>,
    /// Print report.json on stdout instead of the terminal summary.
    pub json: bool,
    /// Write the recording here.
    pub record: Option<PathBuf>,
    /// Verdict thresholds.
    pub thresholds: Thresholds,
    /// Show the live view on stderr (only when it is a terminal).
    pub progress: bool,
    /// How to reach the VM (None: `--no-vm`).
    pub vm: Option<VmAccess>,
    /// When to attach the native probes.
    pub native: NativeMode,
    /// Frames of user stack the native probes capture per allocation call (`--stacks`; 0: none,
    /// at most [`MAX_STACK_FRAMES`]).
    pub stacks: u32,
    /// Block probes on erts_alcu (`--blocks[=full|sampled]`; None: off).
    pub blocks: Option<BlockMode>,
    /// Most of one CPU the block probes may cost (a fraction, `--max-overhead` percent / 100):
    /// past it they are detached and the report says when.
    pub max_overhead: f64,
}

/// Most frames `--stacks` takes: as many as the kernel keeps per stack.
pub const MAX_STACK_FRAMES: u32 = leaktrace_common::native_limits::STACK_DEPTH;

/// How the block probes (`--blocks`) watch allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BlockMode {
    /// Every block call, for the whole run.
    #[default]
    Full,
    /// Allocations in windows ([`SAMPLE_WINDOW_S`] of every [`SAMPLE_PERIOD_S`]); frees always
    /// (so every sampled block's end is seen, and growth is not biased by blocks freed outside
    /// a window). Growth figures are scaled by the time the windows were open.
    Sampled,
}

/// `--blocks sampled`: seconds an allocation window stays open...
pub const SAMPLE_WINDOW_S: f64 = 1.0;
/// ...every this many seconds.
pub const SAMPLE_PERIOD_S: f64 = 10.0;

/// When the native probes (the target's libc malloc family) attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeMode {
    /// When memory outside ERTS carriers grows (their cost is paid only when it can matter).
    #[default]
    Auto,
    /// From the start.
    On,
    /// Never.
    Off,
}

/// How to reach the target node over distribution.
#[derive(Clone, Debug, Default)]
pub struct VmAccess {
    /// Node name (default: from the target's -sname/-name).
    pub node: Option<String>,
    /// Cookie given with --cookie.
    pub cookie: Option<Cookie>,
    /// File given with --cookie-file.
    pub cookie_file: Option<PathBuf>,
    /// How many processes/tables the census names.
    pub top: usize,
}

/// What to trace.
#[derive(Clone, Debug)]
pub enum Launch {
    /// A running beam.smp.
    Attach {
        /// Its PID.
        pid: u32,
    },
    /// A command to start, held until the probes are live.
    Run {
        /// Program and arguments.
        command: Vec<String>,
        /// beam.smp the command will exec, when given.
        beam: Option<PathBuf>,
    },
}

/// Re-judge a recording.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// The recording.
    pub file: PathBuf,
    /// Directory for report.json and report.md.
    pub out: Option<PathBuf>,
    /// Print report.json on stdout.
    pub json: bool,
    /// Thresholds to use instead of the recorded ones, field by field.
    pub thresholds: ThresholdOverrides,
}

/// Thresholds given on the command line (None: keep the recorded/default value).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThresholdOverrides {
    /// `--min-growth` in bytes/s.
    pub min_growth_bytes_per_s: Option<f64>,
    /// `--min-total` in bytes.
    pub min_total_growth_bytes: Option<f64>,
    /// `--min-duration` in seconds.
    pub min_duration_s: Option<f64>,
    /// `--explained-fraction`.
    pub explained_fraction: Option<f64>,
    /// `--frag-min-free` in bytes.
    pub frag_min_free_bytes: Option<f64>,
    /// `--frag-max-usage`.
    pub frag_max_usage: Option<f64>,
}

impl ThresholdOverrides {
    /// `base` with the given fields replaced.
    pub fn apply(&self, base: Thresholds) -> Thresholds {
        Thresholds {
            min_growth_bytes_per_s: self
                .min_growth_bytes_per_s
                .unwrap_or(base.min_growth_bytes_per_s),
            min_total_growth_bytes: self
                .min_total_growth_bytes
                .unwrap_or(base.min_total_growth_bytes),
            min_duration_s: self.min_duration_s.unwrap_or(base.min_duration_s),
            explained_fraction: self.explained_fraction.unwrap_or(base.explained_fraction),
            frag_min_free_bytes: self.frag_min_free_bytes.unwrap_or(base.frag_min_free_bytes),
            frag_max_usage: self.frag_max_usage.unwrap_or(base.frag_max_usage),
        }
    }
}
