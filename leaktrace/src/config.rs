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
    /// Permissions of the files written (`--out-mode`); directories get the matching search bits.
    pub out_mode: OutMode,
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
    /// Most of one CPU each probe family (native, block) may cost (a fraction, `--max-overhead`
    /// percent / 100): past it the family is detached and the report says when.
    pub max_overhead: f64,
}

/// Permissions of report files, recordings and the `--out` directory leaktrace creates. The
/// default, 0600 (directory 0700), keeps what a report says of the node (process names, port
/// programs, paths) to the operator; `--out-mode 0644` shares it with the host's users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutMode(u32);

impl Default for OutMode {
    fn default() -> OutMode {
        OutMode(0o600)
    }
}

impl OutMode {
    /// Parses an octal mode (`0600`, `644`): permission bits only, readable and writable by
    /// the owner (leaktrace replaces its files whole: it must be able to).
    pub fn parse(s: &str) -> Result<OutMode, String> {
        let digits = s.trim();
        let mode = u32::from_str_radix(digits, 8)
            .map_err(|_| format!("{s:?} is not an octal mode such as 0600 or 0644"))?;
        if mode > 0o777 {
            return Err(format!(
                "{s} has bits beyond rwx for user, group and others: give e.g. 0600 or 0644"
            ));
        }
        if mode & 0o600 != 0o600 {
            return Err(format!(
                "{s} does not let the owner read and write the files: give e.g. 0600 or 0644"
            ));
        }
        if mode & 0o022 != 0 {
            return Err(format!(
                "{s} lets other users change the report: give e.g. 0600 or 0644"
            ));
        }
        Ok(OutMode(mode))
    }

    /// Mode of the files.
    pub fn file(self) -> u32 {
        self.0
    }

    /// Mode of a directory leaktrace creates: the files' mode with search where read is given.
    pub fn dir(self) -> u32 {
        self.0 | ((self.0 & 0o444) >> 2)
    }
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
        /// The user the command runs as (None: leaktrace's own).
        user: Option<RunAs>,
    },
}

/// A user a `run` command is started as: looked up once, in the host's user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (HOME of the command; where erl keeps its cookie).
    pub home: PathBuf,
}

impl RunAs {
    /// Looks up `user`, a login name or a numeric uid.
    pub fn lookup(user: &str) -> Result<RunAs, String> {
        use std::ffi::{CStr, CString};
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let r = match user.parse::<u32>() {
            // SAFETY: getpwuid_r writes into pwd and buf, both sized as passed.
            Ok(uid) => unsafe {
                libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found)
            },
            Err(_) => {
                let name =
                    CString::new(user).map_err(|_| format!("--user {user:?}: a NUL byte"))?;
                // SAFETY: as above, with a valid C string.
                unsafe {
                    libc::getpwnam_r(
                        name.as_ptr(),
                        &mut pwd,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut found,
                    )
                }
            }
        };
        if r != 0 || found.is_null() {
            return Err(format!(
                "--user {user}: no such user in the host's user database (getent passwd {user})"
            ));
        }
        // SAFETY: on success pw_name and pw_dir point to NUL-terminated strings inside buf.
        let (name, home) = unsafe {
            (
                CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned(),
                CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned(),
            )
        };
        Ok(RunAs {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: PathBuf::from(home),
        })
    }
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
    /// Permissions of the files written (`--out-mode`).
    pub out_mode: OutMode,
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
    /// `--outside-min` in bytes.
    pub outside_min_bytes: Option<f64>,
    /// `--outside-min-share`.
    pub outside_min_share: Option<f64>,
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
            outside_min_bytes: self.outside_min_bytes.unwrap_or(base.outside_min_bytes),
            outside_min_share: self.outside_min_share.unwrap_or(base.outside_min_share),
        }
    }
}
