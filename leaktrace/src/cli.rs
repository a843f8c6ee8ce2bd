//! Command line (clap derive), turned into a validated [`crate::config`] value.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{
        Launch, MAX_STACK_FRAMES, NativeMode, OutMode, ReportConfig, RunAs, ThresholdOverrides,
        TraceConfig, VmAccess,
    },
    error::Error,
    recording::Thresholds,
    vm::discover::Cookie,
};

/// Tells why a running Erlang VM (beam.smp) keeps growing: fragmentation, a native leak, or VM growth.
#[derive(Debug, Parser)]
#[command(name = "leaktrace", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Trace a running beam.smp by PID (no restart, no code loaded into the node).
    Attach {
        /// PID of the beam.smp process.
        #[arg(long)]
        pid: u32,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Start a command (e.g. `erl ...`) and trace its beam.smp from its first allocation.
    Run {
        /// The beam.smp the command runs (default: found from the command's Erlang root).
        #[arg(long)]
        beam: Option<PathBuf>,
        /// Start the command as this user (name or uid), with its groups and home, as sudo
        /// would; default: the user who ran sudo (SUDO_USER), else leaktrace's own user.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        trace: TraceArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// One-shot snapshot of the VM's memory: allocators (used vs allocated), top processes,
    /// mailboxes, binaries, ETS tables, atoms. Needs a distributed node; loads no code.
    Vm {
        /// PID of the beam.smp (node name and cookie are found from it).
        #[arg(long, required_unless_present = "node")]
        pid: Option<u32>,
        #[command(flatten)]
        vm: VmArgs,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Re-render and re-judge a recording made with --record.
    Report {
        /// The recording file.
        file: PathBuf,
        /// Write report.json and report.md to this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print report.json on stdout.
        #[arg(long)]
        json: bool,
        /// Permissions of the report files (octal; see `attach --out-mode`).
        #[arg(long, value_name = "MODE", default_value = "0600", value_parser = OutMode::parse)]
        out_mode: OutMode,
        #[command(flatten)]
        thresholds: ThresholdArgs,
    },
    /// Compare two runs (before and after a fix): per native object and allocator, growth and
    /// outstanding bytes, and whether each leak is gone, remains or is new. Exit 0 when
    /// nothing got worse, 1 when a leak remains or appeared, 2 on error.
    Diff {
        /// The earlier run: an --out directory, a report.json or a recording.
        a: PathBuf,
        /// The later run, the same kinds.
        b: PathBuf,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options of attach and run.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// How long to trace (e.g. 60s, 5m); Ctrl-C ends earlier and still reports.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Ledger sampling interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Write report.json and report.md to this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print report.json on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Write the recording to FILE (re-judge it later with `leaktrace report FILE`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Permissions of the report files and the recording (octal); a directory --out creates
    /// gets the matching search bits (0600 -> 0700, 0644 -> 0755).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = OutMode::parse)]
    pub out_mode: OutMode,
    /// No live view (it is off anyway when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Do not connect to the VM: OS and probe evidence only.
    #[arg(long)]
    pub no_vm: bool,
    /// Native attribution (libc malloc family of the target): `auto` attaches it when memory
    /// outside ERTS carriers grows, `on` from the start, `off` never.
    #[arg(long, value_enum, default_value_t = NativeMode::Auto)]
    pub native: NativeMode,
    /// With the native probes: also capture N frames of each allocation's user stack
    /// (frame pointers, best effort; 0 = off, at most 32).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub stacks: u32,
    /// Block probes on ERTS's own allocator (erts_alcu alloc/realloc/free): allocations,
    /// sizes and lifetimes per allocator and type, aggregated in the kernel. Works without a
    /// VM connection (`--no-vm`): usage and growth then come from the probes.
    /// `--blocks sampled` watches allocations in windows (1 s of every 10 s) and every free:
    /// cheaper, growth scaled by the time the windows were open (the report says so).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "full", value_name = "MODE")]
    pub blocks: Option<crate::config::BlockMode>,
    /// Most of one CPU, in percent, each probe family may cost (native and block probes,
    /// estimated each interval from their hit rate); past it the family is detached and the
    /// report says when.
    #[arg(long, value_name = "PERCENT", default_value_t = 10.0)]
    pub max_overhead: f64,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub thresholds: ThresholdArgs,
}

/// How to reach the node over distribution.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Node name (default: the target's -sname/-name).
    #[arg(long)]
    pub node: Option<String>,
    /// Distribution cookie (prefer --cookie-file: arguments are visible in ps).
    #[arg(long, conflicts_with = "cookie_file")]
    pub cookie: Option<String>,
    /// File holding the distribution cookie.
    #[arg(long, value_name = "FILE")]
    pub cookie_file: Option<PathBuf>,
    /// How many processes and tables to name.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

impl VmArgs {
    fn access(&self) -> VmAccess {
        VmAccess {
            node: self.node.clone(),
            cookie: self.cookie.as_deref().map(Cookie::new),
            cookie_file: self.cookie_file.clone(),
            top: self.top.max(1),
        }
    }
}

/// Verdict thresholds.
#[derive(Debug, Args)]
pub struct ThresholdArgs {
    /// A line grows only above this slope, KiB/s [default: 64].
    #[arg(long, value_name = "KIB_PER_S")]
    pub min_growth: Option<f64>,
    /// ...and only if it grew more than this over the run, MiB [default: 4].
    #[arg(long, value_name = "MIB")]
    pub min_total: Option<f64>,
    /// Shorter runs are inconclusive [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    pub min_duration: Option<Duration>,
    /// Share of the RSS growth a line must explain to be named the cause, 0..1 [default: 0.5].
    #[arg(long)]
    pub explained_fraction: Option<f64>,
    /// Fragmentation needs an allocator with at least this much free carrier space, MiB [default: 64].
    #[arg(long, value_name = "MIB")]
    pub frag_min_free: Option<f64>,
    /// ...using at most this share of its carriers, 0..1 [default: 0.5].
    #[arg(long)]
    pub frag_max_usage: Option<f64>,
    /// Resident memory outside the VM's carriers at attach is reported from this size, MiB [default: 64]...
    #[arg(long, value_name = "MIB")]
    pub outside_min: Option<f64>,
    /// ...and this share of RSS, 0..1 [default: 0.3].
    #[arg(long)]
    pub outside_min_share: Option<f64>,
}

/// Longest duration any option takes: 365 days (so that start + duration never overflows).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

/// Parses "60s", "5m", "500ms", or a bare number of seconds; at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_nan() || secs < 0.0 => {
            return Err(format!("{s} is not a duration: it must be 0 or more"));
        }
        Ok(secs) if secs > MAX_DURATION.as_secs_f64() => None,
        Ok(secs) => Some(Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())?),
        Err(_) => match humantime::parse_duration(s) {
            Ok(d) => Some(d),
            Err(e @ humantime::DurationError::NumberOverflow) => {
                return Err(format!("{s}: {e}; durations are at most 365 days"));
            }
            Err(e) => return Err(format!("{e} (examples: 30s, 5m, 500ms)")),
        },
    };
    match d {
        Some(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!(
            "{s} is too long: durations are at most 365 days (e.g. 365d, 8760h)"
        )),
    }
}

impl ThresholdArgs {
    fn overrides(&self) -> Result<ThresholdOverrides, Error> {
        // A floor in KiB or MiB, returned in bytes: finite and >= 0 both as given and in bytes
        // (1e306 MiB is finite, its bytes are not).
        let positive = |name: &str, v: Option<f64>, unit: f64| match v {
            Some(x) if !(x.is_finite() && x >= 0.0 && (x * unit).is_finite()) => Err(Error::Usage(
                format!("--{name} must be a finite number >= 0, got {x}"),
            )),
            _ => Ok(v.map(|x| x * unit)),
        };
        let unit = |name: &str, v: Option<f64>| match v {
            Some(f) if !(f > 0.0 && f <= 1.0) => {
                Err(Error::Usage(format!("--{name} must be in (0, 1], got {f}")))
            }
            f => Ok(f),
        };
        Ok(ThresholdOverrides {
            min_growth_bytes_per_s: positive("min-growth", self.min_growth, 1024.0)?,
            min_total_growth_bytes: positive("min-total", self.min_total, 1024.0 * 1024.0)?,
            min_duration_s: self.min_duration.map(|d| d.as_secs_f64()),
            explained_fraction: unit("explained-fraction", self.explained_fraction)?,
            frag_min_free_bytes: positive("frag-min-free", self.frag_min_free, 1024.0 * 1024.0)?,
            frag_max_usage: unit("frag-max-usage", self.frag_max_usage)?,
            outside_min_bytes: positive("outside-min", self.outside_min, 1024.0 * 1024.0)?,
            outside_min_share: unit("outside-min-share", self.outside_min_share)?,
        })
    }
}

impl TraceArgs {
    fn config(&self) -> Result<TraceConfig, Error> {
        if self.interval < Duration::from_millis(100) {
            return Err(Error::Usage(format!(
                "--interval {:?} is too short: use 100ms or more",
                self.interval
            )));
        }
        if self.duration < self.interval {
            return Err(Error::Usage(format!(
                "--duration {:?} is shorter than --interval {:?}",
                self.duration, self.interval
            )));
        }
        if self.stacks > MAX_STACK_FRAMES {
            return Err(Error::Usage(format!(
                "--stacks {} is too deep: the kernel keeps {MAX_STACK_FRAMES} frames a stack, use 0 to {MAX_STACK_FRAMES}",
                self.stacks
            )));
        }
        if self.stacks > 0 && self.native == NativeMode::Off {
            return Err(Error::Usage(
                "--stacks needs the native probes: drop --native off".into(),
            ));
        }
        if !(self.max_overhead > 0.0 && self.max_overhead <= 200.0) {
            return Err(Error::Usage(format!(
                "--max-overhead {} is out of range: give a percentage of one CPU, above 0 and at most 200",
                self.max_overhead
            )));
        }
        Ok(TraceConfig {
            duration: self.duration,
            interval: self.interval,
            out: self.out.clone(),
            json: self.json,
            record: self.record.clone(),
            out_mode: self.out_mode,
            thresholds: self.thresholds.overrides()?.apply(Thresholds::default()),
            progress: !self.quiet,
            vm: (!self.no_vm).then(|| self.vm.access()),
            native: self.native,
            stacks: self.stacks,
            blocks: self.blocks,
            max_overhead: self.max_overhead / 100.0,
        })
    }
}

/// A validated command.
#[derive(Debug)]
pub enum Command {
    /// attach or run.
    Trace(Launch, TraceConfig),
    /// report FILE.
    Report(ReportConfig),
    /// vm: a one-shot snapshot.
    Vm {
        /// The beam.smp PID, when given.
        pid: Option<u32>,
        /// How to reach it.
        access: VmAccess,
        /// JSON output.
        json: bool,
    },
    /// diff A B: compare two runs.
    Diff {
        /// The earlier run (directory, report.json or recording).
        a: PathBuf,
        /// The later run.
        b: PathBuf,
        /// JSON output.
        json: bool,
    },
}

impl Cli {
    /// Validates the arguments.
    pub fn into_command(self) -> Result<Command, Error> {
        Ok(match self.command {
            CliCommand::Attach { pid, trace } => {
                Command::Trace(Launch::Attach { pid }, trace.config()?)
            }
            CliCommand::Run {
                beam,
                user,
                trace,
                command,
            } => {
                let user = match user {
                    Some(u) => Some(RunAs::lookup(&u).map_err(Error::Usage)?),
                    // Started through sudo: the command runs as the one who asked, not as root.
                    None => match std::env::var("SUDO_USER") {
                        Ok(u) if !u.is_empty() && u != "root" => {
                            Some(RunAs::lookup(&u).map_err(|e| {
                                Error::Usage(format!("SUDO_USER: {e}; pass --user USER"))
                            })?)
                        }
                        _ => None,
                    },
                };
                Command::Trace(
                    Launch::Run {
                        command,
                        beam,
                        user,
                    },
                    trace.config()?,
                )
            }
            CliCommand::Vm { pid, vm, json } => Command::Vm {
                pid,
                access: vm.access(),
                json,
            },
            CliCommand::Report {
                file,
                out,
                json,
                out_mode,
                thresholds,
            } => Command::Report(ReportConfig {
                file,
                out,
                json,
                out_mode,
                thresholds: thresholds.overrides()?,
            }),
            CliCommand::Diff { a, b, json } => Command::Diff { a, b, json },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        cli.into_command().map_err(|e| e.to_string())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION);
        for huge in [
            "366d",
            "99999999999999999999h",
            "584942417356y",
            "18446744073709551615s",
            "18446744073709551615",
            "1e300",
            "inf",
            "NaN",
            "-1",
        ] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
    }

    #[test]
    fn durations_that_overflow_are_usage_errors() {
        for huge in [
            "99999999999999999999h",
            "584942417356y",
            "18446744073709551615s",
        ] {
            let err =
                parse(&["leaktrace", "attach", "--pid", "1", "--duration", huge]).unwrap_err();
            assert!(
                err.contains("365 days") || err.contains("too large"),
                "{huge}: {err}"
            );
        }
    }

    #[test]
    fn thresholds_out_of_range_are_refused() {
        for args in [
            ["--min-growth=-1"],
            ["--min-growth=NaN"],
            ["--min-total=inf"],
            ["--frag-min-free=1e306"],
            ["--explained-fraction=0"],
            ["--explained-fraction=1.5"],
            ["--frag-max-usage=NaN"],
            ["--min-duration=400d"],
        ] {
            let mut all = vec!["leaktrace", "report", "x.json"];
            all.extend(args);
            assert!(parse(&all).is_err(), "{args:?}");
        }
    }

    #[test]
    fn attach_defaults_and_thresholds() {
        let Command::Trace(Launch::Attach { pid }, cfg) =
            parse(&["leaktrace", "attach", "--pid", "42", "--min-growth", "128"]).unwrap()
        else {
            panic!("not attach");
        };
        assert_eq!(pid, 42);
        assert_eq!(cfg.duration, Duration::from_secs(60));
        assert_eq!(cfg.interval, Duration::from_secs(1));
        assert_eq!(cfg.thresholds.min_growth_bytes_per_s, 128.0 * 1024.0);
        assert_eq!(
            cfg.thresholds.min_total_growth_bytes,
            Thresholds::default().min_total_growth_bytes
        );
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let Command::Trace(Launch::Run { command, beam, .. }, _) = parse(&[
            "leaktrace",
            "run",
            "--duration",
            "10s",
            "--",
            "erl",
            "-noshell",
        ])
        .unwrap() else {
            panic!("not run");
        };
        assert_eq!(command, vec!["erl", "-noshell"]);
        assert_eq!(beam, None);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["leaktrace", "attach", "--pid", "x"]).is_err());
        assert!(parse(&["leaktrace", "attach", "--pid", "1", "--interval", "1ms"]).is_err());
        assert!(
            parse(&[
                "leaktrace",
                "attach",
                "--pid",
                "1",
                "--duration",
                "1s",
                "--interval",
                "2s"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "leaktrace",
                "attach",
                "--pid",
                "1",
                "--explained-fraction",
                "2"
            ])
            .is_err()
        );
        assert!(parse(&["leaktrace", "run"]).is_err());
    }
}
