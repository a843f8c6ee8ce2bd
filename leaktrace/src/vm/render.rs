//! Terminal rendering of a VM snapshot (`leaktrace vm`): what recon_alloc:memory/1,
//! recon:proc_count/2 and ets:i() would show, in one screen.

use std::fmt::Write as _;

use serde::Serialize;

use crate::recording::{Census, VmSample, vm::CarrierPicture};

/// A snapshot as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Snapshot<'a> {
    /// Node.
    pub node: &'a str,
    /// How the node was found.
    pub found_by: &'a str,
    /// ERTS allocators the node runs without.
    pub disabled_allocators: &'a [String],
    /// Allocator figures and erlang:memory().
    pub allocators: &'a VmSample,
    /// Used / allocated.
    pub usage: f64,
    /// Processes, tables, atoms.
    pub census: &'a Census,
    /// Every carrier by allocator (`instrument:carriers/0`).
    pub carriers: &'a CarrierPicture,
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

/// A name from the node, safe to print: control characters (terminal escapes) are shown as
/// `\u{..}` escapes.
pub fn clean(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The snapshot as text tables.
pub fn text(snap: &Snapshot<'_>) -> String {
    let (s, c) = (snap.allocators, snap.census);
    let mut o = String::new();
    let (used, alloc) = (s.used(), s.allocated());
    let _ = writeln!(
        o,
        "node {} (found by {})",
        clean(snap.node),
        clean(snap.found_by)
    );
    if !snap.disabled_allocators.is_empty() {
        let _ = writeln!(
            o,
            "the node runs without ERTS allocators {}: their memory comes from malloc and no carrier figure covers it",
            snap.disabled_allocators.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "allocators (literal_alloc included): used {} of {} allocated (usage {:.0}%), erlang:memory(total) {}",
        mib(used),
        mib(alloc),
        usage(used, alloc) * 100.0,
        s.memory.get("total").map_or("notsup".into(), |t| mib(*t))
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
    let l = &c.limits;
    let _ = writeln!(
        o,
        "\nprocesses: {} (top by memory, mailbox, binaries; {})",
        c.process_count,
        c.examined()
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
            clean(&p.name),
            mib(p.memory),
            p.message_queue_len,
            p.binary_bytes.map_or("—".into(), mib),
            clean(&p.current_function)
        );
    }
    if let Some(b) = c.binary_distinct_bytes {
        let _ = writeln!(
            o,
            "binaries: {} distinct refc binaries referenced by the examined processes, erlang:memory(binary) {}",
            mib(b),
            s.memory.get("binary").map_or("notsup".into(), |v| mib(*v))
        );
    }
    let _ = writeln!(
        o,
        "\nprocess groups (by initial call): {}{}\n{:<44} {:>9} {:>12} {:>9}",
        c.groups.len(),
        if l.initial_calls_read < l.initial_calls_wrapped {
            format!(
                " (estimated: initial calls of {} of {} proc_lib processes read)",
                l.initial_calls_read, l.initial_calls_wrapped
            )
        } else {
            String::new()
        },
        "initial call",
        "count",
        "memory",
        "queue"
    );
    for g in c.groups.iter().take(c.processes.len().max(5)) {
        let _ = writeln!(
            o,
            "{:<44} {:>9} {:>12} {:>9}",
            clean(&g.name),
            g.count,
            mib(g.memory),
            g.message_queue_len
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
            clean(&t.name),
            mib(t.memory),
            t.size,
            clean(&t.owner_display())
        );
    }
    if let Some(p) = &c.persistent_term {
        let _ = writeln!(o, "\npersistent_term: {} terms, {}", p.count, mib(p.memory));
    }
    if let Some(code) = &c.code {
        let _ = writeln!(
            o,
            "loaded code: {} modules, {}",
            code.modules,
            code.memory.map_or("notsup".into(), mib)
        );
    }
    if let Some(sys) = c.system_other() {
        let _ = writeln!(
            o,
            "other system memory (erlang:memory(system) minus atoms, binaries, code, ETS): {}",
            mib(sys)
        );
    }
    if let Some(p) = &c.ports {
        let _ = writeln!(
            o,
            "ports: {} ({} examined), memory {}, driver queues {}",
            p.count,
            c.limits.ports_examined,
            mib(p.memory),
            mib(p.queue_size)
        );
        for t in &p.top {
            let _ = writeln!(
                o,
                "  {:<16} {:<20} {:>12} {:>12}  owner {}",
                t.id,
                clean(&t.name),
                mib(t.memory),
                mib(t.queue_size),
                clean(&t.owner)
            );
        }
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
    let _ = writeln!(o, "census took {:.0} ms", c.limits.wall_ms);
    carriers_text(&mut o, snap.carriers);
    o
}

/// The carrier picture: per allocator, how many carriers are pinned by few live blocks.
pub fn carriers_text(o: &mut String, p: &CarrierPicture) {
    let _ = writeln!(
        o,
        "\ncarriers (instrument:carriers, {:.0} ms{}): {}",
        p.wall_ms,
        if p.loaded_instrument {
            "; the call loaded OTP's instrument module on the node"
        } else {
            ""
        },
        match &p.skipped {
            Some(why) => format!("none: {}", clean(why)),
            None => format!(
                "pinned = carriers whose live blocks take under {:.0}% of them, median/pinned = live blocks in the median pinned carrier{}",
                crate::recording::vm::PINNED_USAGE * 100.0,
                if p.rejected > 0 {
                    format!("; {} malformed entries dropped", p.rejected)
                } else {
                    String::new()
                }
            ),
        }
    );
    if p.skipped.is_some() {
        return;
    }
    let _ = writeln!(
        o,
        "{:<16} {:>8} {:>12} {:>6} {:>11} {:>7} {:>13} {:>11}",
        "allocator",
        "carriers",
        "size",
        "pool",
        "live blocks",
        "pinned",
        "median/pinned",
        "free holes"
    );
    for a in &p.allocators {
        let _ = writeln!(
            o,
            "{:<16} {:>8} {:>12} {:>6} {:>11} {:>7} {:>13} {:>11}",
            clean(&a.name),
            a.carriers,
            mib(a.carrier_bytes),
            a.pool_carriers,
            a.blocks,
            a.pinned,
            a.pinned_median_blocks.map_or("—".into(), |m| m.to_string()),
            a.free_holes
        );
    }
}
