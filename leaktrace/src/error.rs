//! Errors of the library. Each message says what failed and what to do about it.

use std::path::PathBuf;

/// Everything that can stop leaktrace. All of these exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PID names no process.
    #[error(
        "no process with PID {pid}: check the PID (`pgrep -f beam.smp` lists running Erlang VMs)"
    )]
    NoSuchProcess {
        /// The PID given.
        pid: u32,
    },
    /// The PID is not an Erlang VM.
    #[error(
        "PID {pid} is {exe}, not beam.smp: give the PID of the Erlang VM itself (`pgrep -f beam.smp`), not of a wrapper script or another program"
    )]
    NotBeam {
        /// The PID given.
        pid: u32,
        /// What it runs.
        exe: String,
    },
    /// Cannot read what we need of the target.
    #[error("cannot read {what} of PID {pid}: {source} (run leaktrace as root)")]
    TargetIo {
        /// The PID.
        pid: u32,
        /// What was read.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The binary lacks a symbol a required probe needs.
    #[error(
        "{binary} exports no {symbol}: this OTP build differs from the ones leaktrace knows (OTP 21+ exports it); check with `nm -D {binary} | grep {symbol}`"
    )]
    MissingSymbol {
        /// Path of the binary.
        binary: String,
        /// The symbol.
        symbol: String,
    },
    /// The binary could not be parsed.
    #[error("cannot read the symbols of {binary}: {reason}")]
    BadBinary {
        /// Path of the binary.
        binary: String,
        /// Why.
        reason: String,
    },
    /// Not enough privilege to load eBPF programs, attach uprobes or read the target.
    #[error("leaktrace needs root (or {needed}); missing: {missing}. Fix: {fix}")]
    NotPrivileged {
        /// What suffices short of root (the capabilities, or the lock directory).
        needed: String,
        /// Each missing capability with what it is for.
        missing: String,
        /// How to grant them.
        fix: String,
    },
    /// Another leaktrace already traces this PID.
    #[error(
        "another leaktrace (PID {holder}) is already tracing PID {pid}: wait for it to finish or stop it (kill -INT {holder})"
    )]
    AlreadyTraced {
        /// The target.
        pid: u32,
        /// The leaktrace holding the lock.
        holder: u32,
    },
    /// Could not take the per-target lock.
    #[error("cannot create the lock file {path}: {source}")]
    Lock {
        /// Lock path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// This binary was built without its eBPF programs.
    #[error(
        "this leaktrace was built with AYA_BUILD_SKIP and has no eBPF programs: build it with `cargo xtask build`"
    )]
    NoEbpfObject,
    /// The kernel refused the eBPF programs.
    #[error("loading the eBPF programs failed: {0} (is the BPF syscall allowed? check `dmesg`)")]
    Load(String),
    /// A probe could not be attached.
    #[error("attaching {program} to {symbol} in {binary} failed: {reason}")]
    Attach {
        /// Program name.
        program: String,
        /// Symbol.
        symbol: String,
        /// Binary.
        binary: String,
        /// Why.
        reason: String,
    },
    /// `run`: the command could not be started.
    #[error("cannot start {command}: {reason}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        reason: String,
    },
    /// `run`: beam.smp could not be located for the command.
    #[error("cannot find the beam.smp that {command} will run: {reason}; pass it with --beam PATH")]
    BeamNotFound {
        /// The command.
        command: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing a recording failed.
    #[error("cannot access the recording {path}: {source}")]
    RecordingIo {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A recording that is not valid.
    #[error("{path} is not a valid leaktrace recording: {reason}")]
    RecordingCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the report failed.
    #[error("cannot write the report to {path}: {source} (check --out)")]
    ReportIo {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The lock directory is not safe to hold locks in (anyone could forge or remove them).
    #[error(
        "refusing the lock directory {path}: {reason}. It must be a real directory owned by root (or by the user running leaktrace) and writable by its owner only: `sudo chown root:root {path} && sudo chmod 0700 {path}`, or remove it and leaktrace recreates it"
    )]
    LockDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file given to `leaktrace report` is a FIFO, directory, device...
    #[error(
        "{path} is {kind}, not a regular file: give `leaktrace report` the file written by --record"
    )]
    RecordingNotFile {
        /// The path given.
        path: PathBuf,
        /// What it is ("a directory", "a FIFO", ...).
        kind: &'static str,
    },
    /// The file given to `leaktrace report` is larger than any recording.
    #[error(
        "{path} is {size} bytes, over the {cap}-byte (256 MiB) limit of a recording: it is not a file leaktrace wrote with --record"
    )]
    RecordingTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size (at least; a growing file is read only up to the cap).
        size: u64,
        /// The limit.
        cap: u64,
    },
    /// `--out` or `--record` cannot be written (checked before anything is attached, and when
    /// writing).
    #[error("could not write {what} to {path}: {reason} (check {flag})")]
    Write {
        /// "the report" or "the recording".
        what: &'static str,
        /// The option naming the path: "--out" or "--record".
        flag: &'static str,
        /// The directory (--out) or file (--record).
        path: PathBuf,
        /// What failed: the path at fault and why.
        reason: String,
    },
    /// A failure after the verdict was printed on stdout: the verdict is still valid.
    #[error("{0} (the verdict above stands)")]
    AfterVerdict(Box<Error>),
    /// The VM view could not be had (for `leaktrace vm`, where it is the whole point).
    #[error("{0}")]
    Vm(String),
    /// Invalid options.
    #[error("{0}")]
    Usage(String),
}
