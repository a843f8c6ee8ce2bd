//! Names of JIT code from the node's perf map (`/tmp/perf-PID.map`, written by a node started
//! with `+JPperf true`): one `START SIZE NAME` line per function, addresses in hex.
//!
//! The node owns that file and may make it anything: a symlink to a root-only file, a FIFO, a
//! sparse file of gigabytes. It is opened by [`crate::target::open`] inside the node's root (no
//! symlink, a regular file owned by the node's user, at most [`PERF_MAP_CAP`] bytes), read a
//! line at a time (at most [`LINES_CAP`] lines, names cut at [`NAME_CAP`] bytes), and kept as
//! a sorted table.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::target::open::{FileRule, Refusal, open_in_root};

/// Largest perf map read.
pub const PERF_MAP_CAP: u64 = 64 << 20;
/// Most lines (functions) kept.
pub const LINES_CAP: usize = 1 << 20;
/// Longest function name kept (longer ones are cut).
pub const NAME_CAP: usize = 256;
/// Longest line looked at; the rest of a longer one is skipped.
const LINE_CAP: u64 = 4096;

/// JIT functions by address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerfMap {
    /// (start, end, name), sorted by start.
    entries: Vec<(u64, u64, String)>,
}

impl PerfMap {
    /// Parses perf map text (at most [`LINES_CAP`] lines); malformed lines are skipped.
    pub fn parse(reader: impl BufRead) -> PerfMap {
        let mut reader = reader;
        let mut entries = Vec::new();
        let mut line = Vec::new();
        let mut lines = 0;
        while lines < LINES_CAP {
            line.clear();
            match (&mut reader).take(LINE_CAP).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            lines += 1;
            if line.last() != Some(&b'\n') && line.len() as u64 == LINE_CAP {
                // Skip the rest of an overlong line.
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    match (&mut reader).take(LINE_CAP).read_until(b'\n', &mut rest) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if rest.last() == Some(&b'\n') => break,
                        Ok(_) => {}
                    }
                }
            }
            if let Some(entry) = parse_line(&line) {
                entries.push(entry);
            }
        }
        entries.sort_unstable_by_key(|e| e.0);
        PerfMap { entries }
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no function is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The function holding `addr`, if any (the last one starting at or before it).
    pub fn name(&self, addr: u64) -> Option<&str> {
        let i = self
            .entries
            .partition_point(|e| e.0 <= addr)
            .checked_sub(1)?;
        let (start, end, name) = &self.entries[i];
        (*start <= addr && addr < *end).then_some(name.as_str())
    }
}

fn parse_line(line: &[u8]) -> Option<(u64, u64, String)> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.trim_end().splitn(3, ' ');
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let start = hex(parts.next()?)?;
    let size = hex(parts.next()?)?;
    let name = parts.next()?.trim();
    if name.is_empty() || size == 0 {
        return None;
    }
    let mut cut = name.len().min(NAME_CAP);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let name: String = name[..cut]
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Some((start, start.checked_add(size)?, name))
}

/// The perf map of `pid` as the node names it (`/tmp/perf-N.map`, N its PID as it sees it),
/// opened safely; `None` path when it has none.
#[derive(Debug)]
pub struct PerfMapSource {
    pid: u32,
    path: PathBuf,
    /// (size, mtime) of the file last parsed.
    stamp: Option<(u64, i64, i64)>,
    map: PerfMap,
}

impl PerfMapSource {
    /// The perf map source of `pid` (nothing read yet).
    pub fn new(pid: u32) -> PerfMapSource {
        let inner = crate::namespace::inner_pid(pid).unwrap_or(pid);
        PerfMapSource {
            pid,
            path: PathBuf::from(format!("/tmp/perf-{inner}.map")),
            stamp: None,
            map: PerfMap::default(),
        }
    }

    fn open(&self) -> Result<File, Refusal> {
        let uid =
            crate::vm::discover::target_uid(self.pid).ok_or("the node's uid is unreadable")?;
        open_in_root(
            Path::new(&format!("/proc/{}/root", self.pid)),
            None,
            &self.path,
            FileRule {
                owners: &[uid],
                node_uid: uid,
                cap: PERF_MAP_CAP,
            },
        )
    }

    /// Reads the perf map again if it changed since last read; a refusal keeps the last table.
    pub fn refresh(&mut self) -> Result<(), Refusal> {
        let file = self
            .open()
            .map_err(|why| format!("{} {why}", self.path.display()))?;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        let stamp = (meta.len(), meta.mtime(), meta.mtime_nsec());
        if self.stamp == Some(stamp) {
            return Ok(());
        }
        self.map = PerfMap::parse(BufReader::new(file.take(PERF_MAP_CAP)));
        self.stamp = Some(stamp);
        Ok(())
    }

    /// The table as last read.
    pub fn map(&self) -> &PerfMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_addresses_inside_functions_only() {
        let text = "\
7f0000001000 40 $lists:reverse/2\n\
0x7f0000000000 100 $erlang:apply/2\n\
garbage line\n\
7f0000002000 0 empty\n\
7f0000003000 10 \n";
        let map = PerfMap::parse(text.as_bytes());
        assert_eq!(map.len(), 2);
        assert_eq!(map.name(0x7f00_0000_0000), Some("$erlang:apply/2"));
        assert_eq!(map.name(0x7f00_0000_00ff), Some("$erlang:apply/2"));
        assert_eq!(map.name(0x7f00_0000_0100), None);
        assert_eq!(map.name(0x7f00_0000_1020), Some("$lists:reverse/2"));
        assert_eq!(map.name(0x7f00_0000_2000), None);
        assert_eq!(map.name(1), None);
    }

    #[test]
    fn long_names_and_lines_are_cut() {
        let long = "n".repeat(10_000);
        let text = format!("1000 10 {long}\n2000 10 short\n");
        let map = PerfMap::parse(text.as_bytes());
        assert_eq!(map.name(0x2000), Some("short"));
        // The 10 kB line is longer than a line may be: its name is cut or it is dropped.
        assert!(map.name(0x1000).is_none_or(|n| n.len() <= NAME_CAP));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(raw in proptest::collection::vec(any::<u8>(), 0..4096),
                                         probe in any::<u64>()) {
            let map = PerfMap::parse(raw.as_slice());
            if let Some(name) = map.name(probe) {
                prop_assert!(name.len() <= NAME_CAP);
            }
        }
    }
}
