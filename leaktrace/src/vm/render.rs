//! Terminal rendering of a VM snapshot (`leaktrace vm`): what recon_alloc:memory/1,
//! recon:proc_count/2 and ets:i() would show, in one screen.

use std::fmt::Write as _;

use serde::Serialize;

use crate::vm::snapshot::{Census, VmSample};

/// A snapshot as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Snapshot<'a> {
    /// Node.
    pub node: &'a str,
    /// Allocator figures and erlang:memory().
    pub allocators: &'a VmSample,
    /// Used / allocated.
    pub usage: f64,
    /// Processes, tables, atoms.
    pub census: &'a Census,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Usage ratio used/allocated (1.0 when nothing is allocated).
pub fn usage(used: u64, allocated: u64) -> f64 {
    if allocated == 0 {
        1.0
    } else {
        used as f64 / allocated as f64
    }
}

/// The snapshot as text tables.
pub fn text(node: &str, s: &VmSample, c: &Census) -> String {
    let mut o = String::new();
    let (used, alloc) = (s.used(), s.allocated());
    let _ = writeln!(o, "node {node}");
    let _ = writeln!(
        o,
        "allocators: used {} of {} allocated (usage {:.0}%), erlang:memory(total) {}",
        mib(used),
        mib(alloc),
        usage(used, alloc) * 100.0,
        mib(s.memory.get("total").copied().unwrap_or(0))
    );
    let _ = writeln!(
        o,
        "\n{:<16} {:>12} {:>12} {:>12} {:>7} {:>12}",
        "allocator", "used", "allocated", "free", "usage", "pooled"
    );
    let mut rows: Vec<_> = s.by_allocator().into_values().collect();
    rows.sort_by_key(|a| std::cmp::Reverse(a.carriers));
    for a in rows.iter().filter(|a| a.carriers > 0) {
        let _ = writeln!(
            o,
            "{:<16} {:>12} {:>12} {:>12} {:>6.0}% {:>12}",
            a.name,
            mib(a.blocks),
            mib(a.carriers),
            mib(a.free()),
            usage(a.blocks, a.carriers) * 100.0,
            mib(a.pool_carriers)
        );
    }
    let _ = writeln!(o, "\nerlang:memory()");
    for (k, v) in &s.memory {
        let _ = writeln!(o, "  {k:<16} {:>12}", mib(*v));
    }
    let _ = writeln!(
        o,
        "\nprocesses: {} (top by memory, mailbox, binaries{})",
        c.process_count,
        if c.binaries_scanned {
            ""
        } else {
            ": binaries not scanned, too many processes"
        }
    );
    let _ = writeln!(
        o,
        "{:<14} {:<32} {:>12} {:>9} {:>12}  current function",
        "pid", "name", "memory", "queue", "binaries"
    );
    for p in &c.processes {
        let _ = writeln!(
            o,
            "{:<14} {:<32} {:>12} {:>9} {:>12}  {}",
            p.pid,
            p.name,
            mib(p.memory),
            p.message_queue_len,
            p.binary_bytes.map_or("—".into(), mib),
            p.current_function
        );
    }
    let _ = writeln!(o, "\nets tables: {} (top by memory)", c.table_count);
    let _ = writeln!(
        o,
        "{:<28} {:>12} {:>10}  owner",
        "name", "memory", "objects"
    );
    for t in &c.tables {
        let _ = writeln!(
            o,
            "{:<28} {:>12} {:>10}  {}",
            t.name,
            mib(t.memory),
            t.size,
            t.owner_display()
        );
    }
    let _ = writeln!(
        o,
        "\natoms: {} of {} ({:.1}%)",
        c.atom_count,
        c.atom_limit,
        usage(c.atom_count, c.atom_limit.max(1)) * 100.0
    );
    if let Some(m) = &c.mseg {
        let _ = writeln!(
            o,
            "mseg cache: hit rate {} since start ({} carrier requests, {} new mappings), {} cached segments",
            m.hit_rate()
                .map_or("—".into(), |r| format!("{:.0}%", r * 100.0)),
            m.alloc_calls,
            m.create_calls,
            m.cached_segments
        );
    }
    o
}
