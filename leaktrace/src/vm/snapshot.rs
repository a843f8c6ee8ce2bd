//! What the VM reports about its memory, read with read-only BIFs, and the pure parsing of the
//! replies (tested on constructed terms).
//!
//! Costs are bounded for nodes with 10^6 processes: allocator figures every sample are a few
//! hundred bytes; the process and table census (top-N) runs at the start and end of a run only.

use std::collections::BTreeMap;

use erl_dist::term::{Atom, ExternalFun, FixInteger, List, Term};
use serde::{Deserialize, Serialize};

use crate::vm::client::{VmClient, VmError};

/// Used and allocated bytes of one allocator instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocatorUsage {
    /// Allocator (`ets_alloc`, ...).
    pub name: String,
    /// Instance number (0 is the global one).
    pub instance: u32,
    /// Bytes in blocks (mbcs + sbcs + mbcs_pool, blocks of every owner allocator).
    pub blocks: u64,
    /// Bytes in carriers (mbcs + sbcs + mbcs_pool).
    pub carriers: u64,
    /// Of `carriers`, bytes in carriers abandoned to the pool.
    pub pool_carriers: u64,
}

impl AllocatorUsage {
    /// Carrier bytes not holding blocks.
    pub fn free(&self) -> u64 {
        self.carriers.saturating_sub(self.blocks)
    }
}

/// The allocator figures of one sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmSample {
    /// Seconds since attach.
    pub t_s: f64,
    /// Every allocator instance.
    pub allocators: Vec<AllocatorUsage>,
    /// `erlang:memory()` by type.
    pub memory: BTreeMap<String, u64>,
}

impl VmSample {
    /// Sum of blocks (recon_alloc's "used"); literal_alloc excluded as recon does.
    pub fn used(&self) -> u64 {
        self.counted().map(|a| a.blocks).sum()
    }

    /// Sum of carriers (recon_alloc's "allocated"); literal_alloc excluded as recon does.
    pub fn allocated(&self) -> u64 {
        self.counted().map(|a| a.carriers).sum()
    }

    fn counted(&self) -> impl Iterator<Item = &AllocatorUsage> {
        self.allocators.iter().filter(|a| a.name != "literal_alloc")
    }

    /// Totals per allocator (all instances).
    pub fn by_allocator(&self) -> BTreeMap<String, AllocatorUsage> {
        let mut out: BTreeMap<String, AllocatorUsage> = BTreeMap::new();
        for a in &self.allocators {
            let e = out.entry(a.name.clone()).or_insert_with(|| AllocatorUsage {
                name: a.name.clone(),
                ..Default::default()
            });
            e.blocks += a.blocks;
            e.carriers += a.carriers;
            e.pool_carriers += a.pool_carriers;
        }
        out
    }
}

/// One process worth naming.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// `<0.123.0>`.
    pub pid: String,
    /// Registered name, or the initial call `m:f/a`.
    pub name: String,
    /// Current function `m:f/a`.
    pub current_function: String,
    /// `process_info(P, memory)`, bytes.
    pub memory: u64,
    /// Messages waiting.
    pub message_queue_len: u64,
    /// Bytes of refc binaries it references (when measured).
    pub binary_bytes: Option<u64>,
}

/// One ETS table worth naming.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Table id as printed by the VM.
    pub id: String,
    /// Table name.
    pub name: String,
    /// Owner pid.
    pub owner: String,
    /// Registered name of the owner, when it has one.
    pub owner_name: Option<String>,
    /// Bytes.
    pub memory: u64,
    /// Objects.
    pub size: u64,
}

impl TableEntry {
    /// The owner pid, with its registered name when it has one: `<0.9.0> (lt_table_owner)`.
    pub fn owner_display(&self) -> String {
        match &self.owner_name {
            Some(n) => format!("{} ({n})", self.owner),
            None => self.owner.clone(),
        }
    }
}

/// The Erlang-level checklist (Erlang in Anger, ch. 7) at one instant: the heaviest processes,
/// longest mailboxes, biggest binary holders and tables, atoms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Census {
    /// Seconds since attach.
    pub t_s: f64,
    /// Processes on the node.
    pub process_count: u64,
    /// Top processes (union of the top-N by memory, by queue and by binaries).
    pub processes: Vec<ProcessEntry>,
    /// Whether binary_bytes were measured for every process (skipped on very large nodes).
    pub binaries_scanned: bool,
    /// Tables on the node.
    pub table_count: u64,
    /// Top tables by memory.
    pub tables: Vec<TableEntry>,
    /// Atoms in use.
    pub atom_count: u64,
    /// Atom table limit.
    pub atom_limit: u64,
    /// mseg_alloc's segment cache, all instances (absent in recordings without it).
    #[serde(default)]
    pub mseg: Option<MsegCache>,
}

/// mseg_alloc's segment cache counters, summed over instances (`erlang:system_info({allocator,
/// mseg_alloc})`), as recon_alloc:cache_hit_rates/0 reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MsegCache {
    /// `mseg_alloc` calls: carriers asked of mseg.
    pub alloc_calls: u64,
    /// `mseg_create` calls: carriers that needed a new mapping (cache misses).
    pub create_calls: u64,
    /// Segments held in the cache now.
    pub cached_segments: u64,
}

impl MsegCache {
    /// Share of mseg allocations served from the cache, if any were made.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.alloc_calls > 0).then(|| {
            self.alloc_calls.saturating_sub(self.create_calls) as f64 / self.alloc_calls as f64
        })
    }

    /// Hit rate of the calls made between `start` and `self`.
    pub fn hit_rate_since(&self, start: &MsegCache) -> Option<f64> {
        MsegCache {
            alloc_calls: self.alloc_calls.saturating_sub(start.alloc_calls),
            create_calls: self.create_calls.saturating_sub(start.create_calls),
            cached_segments: self.cached_segments,
        }
        .hit_rate()
    }
}

// ---- term access ------------------------------------------------------------------------

fn shape(call: &str, reason: impl Into<String>) -> VmError {
    VmError::Shape {
        call: call.into(),
        reason: reason.into(),
    }
}

/// Integer value of a term (fixnum or bignum).
pub fn int(t: &Term) -> Option<i64> {
    match t {
        Term::FixInteger(i) => Some(i64::from(i.value)),
        Term::BigInteger(b) => b.value.to_string().parse().ok(),
        _ => None,
    }
}

fn uint(t: &Term) -> Option<u64> {
    int(t).and_then(|v| u64::try_from(v).ok())
}

fn atom(t: &Term) -> Option<&str> {
    match t {
        Term::Atom(a) => Some(&a.name),
        _ => None,
    }
}

fn list(t: &Term) -> Option<&[Term]> {
    match t {
        Term::List(l) => Some(&l.elements),
        Term::ByteList(_) => None,
        _ => None,
    }
}

fn tuple(t: &Term) -> Option<&[Term]> {
    match t {
        Term::Tuple(t) => Some(&t.elements),
        _ => None,
    }
}

/// The tuple in a proplist whose first element is atom `key`.
fn prop<'a>(items: &'a [Term], key: &str) -> Option<&'a [Term]> {
    items.iter().find_map(|i| {
        let t = tuple(i)?;
        (atom(t.first()?)? == key).then_some(t)
    })
}

/// `{Key, Value}` value in a proplist.
fn prop_value<'a>(items: &'a [Term], key: &str) -> Option<&'a Term> {
    prop(items, key).and_then(|t| t.get(1))
}

/// Printable form of a pid, atom, tuple `{m,f,a}` or other term.
pub fn display(t: &Term) -> String {
    match t {
        Term::Pid(p) => format!("<0.{}.{}>", p.id, p.serial),
        Term::Atom(a) => a.name.clone(),
        Term::Tuple(tu) if tu.elements.len() == 3 => {
            let e = &tu.elements;
            match (atom(&e[0]), atom(&e[1]), int(&e[2])) {
                (Some(m), Some(f), Some(a)) => format!("{m}:{f}/{a}"),
                _ => format!("{t}"),
            }
        }
        other => format!("{other}"),
    }
}

// ---- parsing ------------------------------------------------------------------------------

/// Parses one `erlang:system_info({allocator_sizes, A})` reply.
///
/// OTP 23+: `{blocks, [{Owner, [{size, Cur, LastMax, Max}]}]}` per carrier kind (blocks of other
/// allocators can sit in a carrier after migration: all are summed); before: `{blocks_size, Cur, ..}`.
/// In `mbcs_pool`, `carriers_size` is a 2-tuple.
pub fn parse_allocator_sizes(name: &str, reply: &Term) -> Result<Vec<AllocatorUsage>, VmError> {
    let call = format!("erlang:system_info({{allocator_sizes, {name}}})");
    let Some(instances) = list(reply) else {
        // `false` for an allocator that is disabled.
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for inst in instances {
        let t = tuple(inst).ok_or_else(|| shape(&call, "instance is not a tuple"))?;
        if t.len() != 3 || atom(&t[0]) != Some("instance") {
            return Err(shape(&call, "expected {instance, N, Props}"));
        }
        let number = uint(&t[1]).ok_or_else(|| shape(&call, "instance number"))? as u32;
        let props = list(&t[2]).ok_or_else(|| shape(&call, "instance props"))?;
        let mut usage = AllocatorUsage {
            name: name.into(),
            instance: number,
            ..Default::default()
        };
        for kind in ["mbcs", "sbcs", "mbcs_pool"] {
            let Some(items) = prop_value(props, kind).and_then(list) else {
                continue;
            };
            let blocks = blocks_bytes(items);
            let carriers = prop(items, "carriers_size")
                .and_then(|t| t.get(1))
                .and_then(uint)
                .unwrap_or(0);
            usage.blocks += blocks;
            usage.carriers += carriers;
            if kind == "mbcs_pool" {
                usage.pool_carriers += carriers;
            }
        }
        out.push(usage);
    }
    Ok(out)
}

fn blocks_bytes(items: &[Term]) -> u64 {
    if let Some(size) = prop(items, "blocks_size")
        .and_then(|t| t.get(1))
        .and_then(uint)
    {
        return size;
    }
    let Some(owners) = prop_value(items, "blocks").and_then(list) else {
        return 0;
    };
    owners
        .iter()
        .filter_map(|o| {
            let t = tuple(o)?;
            let stats = list(t.get(1)?)?;
            prop(stats, "size").and_then(|s| s.get(1)).and_then(uint)
        })
        .sum()
}

/// A `{Name, GigaCalls, Calls}` counter.
fn calls(items: &[Term], key: &str) -> u64 {
    prop(items, key)
        .filter(|t| t.len() == 3)
        .and_then(|t| Some(uint(&t[1])? * 1_000_000_000 + uint(&t[2])?))
        .unwrap_or(0)
}

/// Parses `erlang:system_info({allocator, mseg_alloc})`: per instance, `{memkind, [.., {status,
/// [{cached_segments, N}, ..]}, {calls, [{mseg_alloc, G, N}, {mseg_create, G, N}, ..]}]}`.
/// `None` when mseg_alloc is disabled or the reply has another shape.
pub fn parse_mseg_cache(reply: &Term) -> Option<MsegCache> {
    let mut out = MsegCache::default();
    let mut seen = false;
    for inst in list(reply)? {
        let t = tuple(inst)?;
        let props = list(t.get(2)?)?;
        // OTP 18+ nests the counters in memkind; older releases had them at top level.
        let scope = prop_value(props, "memkind").and_then(list).unwrap_or(props);
        let Some(counters) = prop_value(scope, "calls").and_then(list) else {
            continue;
        };
        seen = true;
        out.alloc_calls += calls(counters, "mseg_alloc");
        out.create_calls += calls(counters, "mseg_create");
        if let Some(status) = prop_value(scope, "status").and_then(list) {
            out.cached_segments += prop_value(status, "cached_segments")
                .and_then(uint)
                .unwrap_or(0);
        }
    }
    seen.then_some(out)
}

/// Parses `erlang:memory()`.
pub fn parse_memory(reply: &Term) -> Result<BTreeMap<String, u64>, VmError> {
    let items = list(reply).ok_or_else(|| shape("erlang:memory/0", "not a list"))?;
    Ok(items
        .iter()
        .filter_map(|i| {
            let t = tuple(i)?;
            Some((atom(t.first()?)?.to_owned(), uint(t.get(1)?)?))
        })
        .collect())
}

// ---- queries ------------------------------------------------------------------------------

fn fun(module: &str, function: &str, arity: u8) -> Term {
    Term::from(ExternalFun {
        module: Atom::from(module),
        function: Atom::from(function),
        arity,
    })
}

fn atoms(names: &[&str]) -> Term {
    Term::from(List::from(
        names
            .iter()
            .map(|n| Term::from(Atom::from(*n)))
            .collect::<Vec<_>>(),
    ))
}

/// Applies `module:function(Item, Arg)` to every item on the node in one call:
/// `lists:zipwith(fun M:F/2, Items, [Arg, ...])` (no code is loaded; the fun is external).
fn zipwith(
    vm: &VmClient,
    module: &str,
    function: &str,
    items: &[Term],
    arg: Term,
) -> Result<Vec<Term>, VmError> {
    let args = List::from(vec![arg; items.len()]);
    let reply = vm.call(
        "lists",
        "zipwith",
        vec![
            fun(module, function, 2),
            Term::from(List::from(items.to_vec())),
            Term::from(args),
        ],
    )?;
    match reply {
        Term::List(l) => Ok(l.elements),
        other => Err(shape("lists:zipwith/3", format!("not a list: {other}"))),
    }
}

/// The allocators to sample (`erlang:system_info(alloc_util_allocators)`).
pub fn allocator_names(vm: &VmClient) -> Result<Vec<String>, VmError> {
    let reply = vm.call(
        "erlang",
        "system_info",
        vec![Term::from(Atom::from("alloc_util_allocators"))],
    )?;
    let names = list(&reply)
        .ok_or_else(|| shape("erlang:system_info(alloc_util_allocators)", "not a list"))?;
    Ok(names.iter().filter_map(atom).map(str::to_owned).collect())
}

/// Allocator figures and `erlang:memory()` now.
pub fn sample(vm: &VmClient, allocators: &[String], t_s: f64) -> Result<VmSample, VmError> {
    let mut out = VmSample {
        t_s,
        ..Default::default()
    };
    // One call for all allocators: every call costs a round trip (tens of ms with Nagle).
    let queries: Vec<Term> = allocators
        .iter()
        .map(|name| {
            Term::from(erl_dist::term::Tuple::from(vec![
                Term::from(Atom::from("allocator_sizes")),
                Term::from(Atom::from(name.as_str())),
            ]))
        })
        .collect();
    let reply = vm.call(
        "lists",
        "map",
        vec![
            fun("erlang", "system_info", 1),
            Term::from(List::from(queries)),
        ],
    )?;
    let replies = list(&reply).ok_or_else(|| shape("lists:map/2", "not a list"))?;
    for (name, reply) in allocators.iter().zip(replies) {
        out.allocators.extend(parse_allocator_sizes(name, reply)?);
    }
    out.memory = parse_memory(&vm.call("erlang", "memory", vec![])?)?;
    Ok(out)
}

/// Processes above this count are not scanned for binaries (one list per process).
const BINARY_SCAN_LIMIT: usize = 100_000;

fn proc_number(items: &[Term], key: &str) -> u64 {
    prop_value(items, key).and_then(uint).unwrap_or(0)
}

/// A sampled process: (index in the process list, memory, message_queue_len, refc binary bytes).
type ProcRow = (usize, u64, u64, Option<u64>);

/// The Erlang-level census: top `n` processes by memory, by queue length and by refc binaries
/// held, top `n` tables by memory, atoms.
pub fn census(vm: &VmClient, n: usize, t_s: f64) -> Result<Census, VmError> {
    let pids = match vm.call("erlang", "processes", vec![])? {
        Term::List(l) => l.elements,
        other => return Err(shape("erlang:processes/0", format!("{other}"))),
    };
    let infos = zipwith(
        vm,
        "erlang",
        "process_info",
        &pids,
        atoms(&["memory", "message_queue_len"]),
    )?;
    let binaries_scanned = pids.len() <= BINARY_SCAN_LIMIT;
    let binaries: Vec<Option<u64>> = if binaries_scanned {
        zipwith(
            vm,
            "erlang",
            "process_info",
            &pids,
            Term::from(Atom::from("binary")),
        )?
        .iter()
        .map(|t| {
            // {binary, [{Id, Size, RefCount}]}
            let bins = list(tuple(t)?.get(1)?)?;
            Some(bins.iter().filter_map(|b| uint(tuple(b)?.get(1)?)).sum())
        })
        .collect()
    } else {
        vec![None; pids.len()]
    };
    let mut rows: Vec<ProcRow> = infos
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let items = list(t)?; // `undefined` for a process that died meanwhile
            Some((
                i,
                proc_number(items, "memory"),
                proc_number(items, "message_queue_len"),
                binaries.get(i).copied().flatten(),
            ))
        })
        .collect();
    let mut chosen: Vec<usize> = Vec::new();
    let mut take_top = |rows: &mut Vec<ProcRow>, key: fn(&ProcRow) -> u64| {
        rows.sort_by_key(|r| std::cmp::Reverse(key(r)));
        for r in rows.iter().take(n).filter(|r| key(r) > 0) {
            if !chosen.contains(&r.0) {
                chosen.push(r.0);
            }
        }
    };
    take_top(&mut rows, |r| r.1);
    take_top(&mut rows, |r| r.2);
    take_top(&mut rows, |r| r.3.unwrap_or(0));
    let chosen_pids: Vec<Term> = chosen.iter().map(|i| pids[*i].clone()).collect();
    let details = zipwith(
        vm,
        "erlang",
        "process_info",
        &chosen_pids,
        atoms(&["registered_name", "initial_call", "current_function"]),
    )?;
    let by_index: BTreeMap<usize, &ProcRow> = rows.iter().map(|r| (r.0, r)).collect();
    let processes = chosen
        .iter()
        .zip(details.iter())
        .filter_map(|(i, d)| {
            let items = list(d)?;
            let row = by_index.get(i)?;
            let registered = prop_value(items, "registered_name")
                .filter(|t| list(t).is_none())
                .map(display);
            let initial = prop_value(items, "initial_call").map(display);
            Some(ProcessEntry {
                pid: display(&pids[*i]),
                name: registered.or(initial).unwrap_or_default(),
                current_function: prop_value(items, "current_function")
                    .map(display)
                    .unwrap_or_default(),
                memory: row.1,
                message_queue_len: row.2,
                binary_bytes: row.3,
            })
        })
        .collect();

    let wordsize = vm
        .call(
            "erlang",
            "system_info",
            vec![Term::from(Atom::from("wordsize"))],
        )
        .ok()
        .and_then(|t| uint(&t))
        .unwrap_or(8);
    let tables = match vm.call("ets", "all", vec![])? {
        Term::List(l) => l.elements,
        other => return Err(shape("ets:all/0", format!("{other}"))),
    };
    let table_words = zipwith(vm, "ets", "info", &tables, Term::from(Atom::from("memory")))?;
    let mut table_rows: Vec<(usize, u64)> = table_words
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((i, uint(t)? * wordsize)))
        .collect();
    table_rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    table_rows.truncate(n);
    let top: Vec<Term> = table_rows.iter().map(|r| tables[r.0].clone()).collect();
    let mut table_entries = Vec::new();
    if !top.is_empty() {
        let names = zipwith(vm, "ets", "info", &top, Term::from(Atom::from("name")))?;
        let owners = zipwith(vm, "ets", "info", &top, Term::from(Atom::from("owner")))?;
        let sizes = zipwith(vm, "ets", "info", &top, Term::from(Atom::from("size")))?;
        let owner_names = zipwith(
            vm,
            "erlang",
            "process_info",
            &owners,
            Term::from(Atom::from("registered_name")),
        )
        .unwrap_or_default();
        for (k, (_, bytes)) in table_rows.iter().enumerate() {
            table_entries.push(TableEntry {
                id: display(&top[k]),
                name: names.get(k).map(display).unwrap_or_default(),
                owner: owners.get(k).map(display).unwrap_or_default(),
                owner_name: owner_names
                    .get(k)
                    .and_then(tuple)
                    .and_then(|t| t.get(1))
                    .map(display),
                memory: *bytes,
                size: sizes.get(k).and_then(uint).unwrap_or(0),
            });
        }
    }
    let info = |key: &str| {
        vm.call("erlang", "system_info", vec![Term::from(Atom::from(key))])
            .ok()
            .and_then(|t| uint(&t))
            .unwrap_or(0)
    };
    Ok(Census {
        t_s,
        process_count: pids.len() as u64,
        processes,
        binaries_scanned,
        table_count: tables.len() as u64,
        tables: table_entries,
        atom_count: info("atom_count"),
        atom_limit: info("atom_limit"),
        mseg: mseg_cache(vm),
    })
}

/// mseg_alloc's cache counters now, if the node has mseg_alloc.
pub fn mseg_cache(vm: &VmClient) -> Option<MsegCache> {
    let query = Term::from(erl_dist::term::Tuple::from(vec![
        Term::from(Atom::from("allocator")),
        Term::from(Atom::from("mseg_alloc")),
    ]));
    parse_mseg_cache(&vm.call("erlang", "system_info", vec![query]).ok()?)
}

/// A small integer term.
pub fn small(v: i32) -> Term {
    Term::from(FixInteger::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use erl_dist::term::Tuple;

    fn a(s: &str) -> Term {
        Term::from(Atom::from(s))
    }
    fn l(v: Vec<Term>) -> Term {
        Term::from(List::from(v))
    }
    fn t(v: Vec<Term>) -> Term {
        Term::from(Tuple::from(v))
    }

    #[test]
    fn parses_otp25_allocator_sizes_with_pool_and_migrated_blocks() {
        // {instance,1,[{mbcs,[{blocks,[{ets_alloc,[{size,214368,..}]},{binary_alloc,[{size,100,..}]}]},
        //   {carriers_size,589824,..}]}, {mbcs_pool,[{blocks,[{ets_alloc,[{size,5000,..}]}]},{carriers_size,1048576}]},
        //   {sbcs,[{blocks,[]},{carriers_size,0,0,0}]}]}
        let size = |v| l(vec![t(vec![a("size"), small(v), small(v), small(v)])]);
        let reply = l(vec![
            t(vec![
                a("instance"),
                small(0),
                l(vec![t(vec![
                    a("mbcs"),
                    l(vec![
                        t(vec![a("blocks"), l(vec![])]),
                        t(vec![a("carriers_size"), small(0), small(0), small(0)]),
                    ]),
                ])]),
            ]),
            t(vec![
                a("instance"),
                small(1),
                l(vec![
                    t(vec![
                        a("mbcs"),
                        l(vec![
                            t(vec![
                                a("blocks"),
                                l(vec![
                                    t(vec![a("ets_alloc"), size(214368)]),
                                    t(vec![a("binary_alloc"), size(100)]),
                                ]),
                            ]),
                            t(vec![
                                a("carriers_size"),
                                small(589824),
                                small(589824),
                                small(589824),
                            ]),
                        ]),
                    ]),
                    t(vec![
                        a("mbcs_pool"),
                        l(vec![
                            t(vec![
                                a("blocks"),
                                l(vec![t(vec![a("ets_alloc"), size(5000)])]),
                            ]),
                            t(vec![a("carriers_size"), small(1048576)]),
                        ]),
                    ]),
                    t(vec![
                        a("sbcs"),
                        l(vec![
                            t(vec![a("blocks"), l(vec![])]),
                            t(vec![a("carriers_size"), small(0), small(0), small(0)]),
                        ]),
                    ]),
                ]),
            ]),
        ]);
        let usage = parse_allocator_sizes("ets_alloc", &reply).unwrap();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[1].blocks, 214368 + 100 + 5000);
        assert_eq!(usage[1].carriers, 589824 + 1048576);
        assert_eq!(usage[1].pool_carriers, 1048576);
        let s = VmSample {
            allocators: usage,
            ..Default::default()
        };
        assert_eq!(s.used(), 219468);
        assert_eq!(
            s.by_allocator()["ets_alloc"].free(),
            589824 + 1048576 - 219468
        );
    }

    #[test]
    fn parses_pre_otp23_blocks_size_and_disabled_allocators() {
        let reply = l(vec![t(vec![
            a("instance"),
            small(0),
            l(vec![t(vec![
                a("mbcs"),
                l(vec![
                    t(vec![
                        a("blocks_size"),
                        small(4096),
                        small(4096),
                        small(4096),
                    ]),
                    t(vec![
                        a("carriers_size"),
                        small(65536),
                        small(65536),
                        small(65536),
                    ]),
                ]),
            ])]),
        ])]);
        let usage = parse_allocator_sizes("std_alloc", &reply).unwrap();
        assert_eq!((usage[0].blocks, usage[0].carriers), (4096, 65536));
        assert!(parse_allocator_sizes("x", &a("false")).unwrap().is_empty());
        assert!(parse_allocator_sizes("x", &l(vec![a("junk")])).is_err());
    }

    #[test]
    fn parses_mseg_cache_counters_of_every_instance() {
        let instance = |n: i32, alloc: i32, create: i32, cached: i32| {
            t(vec![
                a("instance"),
                small(n),
                l(vec![
                    t(vec![a("version"), a("v")]),
                    t(vec![
                        a("memkind"),
                        l(vec![
                            t(vec![a("name"), a("all")]),
                            t(vec![
                                a("status"),
                                l(vec![
                                    t(vec![a("cached_segments"), small(cached)]),
                                    t(vec![a("cache_hits"), small(alloc - create)]),
                                ]),
                            ]),
                            t(vec![
                                a("calls"),
                                l(vec![
                                    t(vec![a("mseg_alloc"), small(1), small(alloc)]),
                                    t(vec![a("mseg_dealloc"), small(0), small(4)]),
                                    t(vec![a("mseg_create"), small(0), small(create)]),
                                ]),
                            ]),
                        ]),
                    ]),
                ]),
            ])
        };
        let m = parse_mseg_cache(&l(vec![instance(0, 9, 7, 2), instance(1, 11, 6, 3)])).unwrap();
        assert_eq!(m.alloc_calls, 2_000_000_020);
        assert_eq!(m.create_calls, 13);
        assert_eq!(m.cached_segments, 5);
        let start = MsegCache {
            alloc_calls: 2_000_000_000,
            create_calls: 3,
            cached_segments: 0,
        };
        assert_eq!(m.hit_rate_since(&start), Some(0.5));
        assert_eq!(parse_mseg_cache(&a("false")), None);
        assert_eq!(MsegCache::default().hit_rate(), None);
    }

    #[test]
    fn parses_memory_and_displays_terms() {
        let m = parse_memory(&l(vec![
            t(vec![a("total"), small(1000)]),
            t(vec![a("ets"), small(10)]),
        ]))
        .unwrap();
        assert_eq!(m["total"], 1000);
        assert_eq!(
            display(&t(vec![a("gen_server"), a("loop"), small(7)])),
            "gen_server:loop/7"
        );
    }
}
