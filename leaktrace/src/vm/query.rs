//! The read-only calls leaktrace makes on the node. Each call is one round trip; everything
//! that scales with the node (processes, binaries, ports) is capped, and the caps are recorded.
//! Only BIFs and read-only standard-library functions are called (`lists:zipwith/3` with an
//! external fun applies a BIF to many items in one call); no code is loaded, except OTP's own
//! `instrument` module by the carrier picture when the node had not loaded it (the picture
//! says so).

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use erl_dist::term::Term;

use crate::{
    recording::{
        Census, CensusLimits, LoadedCode, PortEntry, Ports, ProcessEntry, TableEntry, VmSample,
        vm::{CarrierEntry, CarrierOptions, CarrierPicture, CarrierTally, cut_text},
    },
    vm::{
        client::{VmClient, VmError, term_text},
        parse::{self, PROC_LIB_INIT, ProcessRow, shape},
        term::{
            atom, atom_term, atoms, display, fun, list, list_term, mfa, prop, prop_value, tuple,
            tuple_term, uint,
        },
    },
};

/// Processes examined by one census (memory, queue, initial call).
pub const PROCESS_CAP: usize = 250_000;
/// References to binaries read by one census (largest processes first).
pub const BINARY_REF_CAP: u64 = 2_000_000;
/// Ports examined by one census.
pub const PORT_CAP: usize = 20_000;
/// proc_lib processes whose `'$initial_call'` one census reads; past it, a sample.
pub const TRANSLATE_CAP: usize = 10_000;
/// Process groups kept per census.
pub const GROUP_CAP: usize = 200;
/// Pids per process_info call: the reply of one call stays a few MB at most.
const PROCESS_CHUNK: usize = 5_000;
/// Longest wait for a sample (a few hundred bytes the node answers in milliseconds): a node
/// too busy to answer costs a gap in the VM figures, not a stalled view.
pub const SAMPLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Applies `module:function(Item, Arg)` to every item on the node in one call:
/// `lists:zipwith(fun M:F/2, Items, [Arg, ...])`.
fn zipwith(
    vm: &VmClient,
    module: &str,
    function: &str,
    items: &[Term],
    arg: Term,
) -> Result<Vec<Term>, VmError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let reply = vm.call(
        "lists",
        "zipwith",
        vec![
            fun(module, function, 2),
            list_term(items.to_vec()),
            list_term(vec![arg; items.len()]),
        ],
    )?;
    let out = match reply {
        Term::List(l) => l.elements,
        other => {
            return Err(shape(
                "lists:zipwith/3",
                format!("not a list: {}", term_text(&other)),
            ));
        }
    };
    if out.len() != items.len() {
        return Err(shape("lists:zipwith/3", "reply length differs"));
    }
    Ok(out)
}

/// Applies `module:function(Item)` to every item on the node in one call.
fn map(vm: &VmClient, module: &str, function: &str, items: &[Term]) -> Result<Vec<Term>, VmError> {
    map_within(vm, crate::vm::client::CALL_TIMEOUT, module, function, items)
}

fn map_within(
    vm: &VmClient,
    limit: std::time::Duration,
    module: &str,
    function: &str,
    items: &[Term],
) -> Result<Vec<Term>, VmError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let reply = vm.call_within(
        limit,
        "lists",
        "map",
        vec![fun(module, function, 1), list_term(items.to_vec())],
    )?;
    match reply {
        Term::List(l) if l.elements.len() == items.len() => Ok(l.elements),
        other => Err(shape(
            "lists:map/2",
            format!("unexpected reply: {}", term_text(&other)),
        )),
    }
}

fn system_info(vm: &VmClient, key: Term) -> Result<Term, VmError> {
    vm.call("erlang", "system_info", vec![key])
}

/// The node's allocators: those to sample, and those it runs without.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorSet {
    /// Enabled alloc_util allocators.
    pub enabled: Vec<String>,
    /// Disabled ones (their memory comes from malloc).
    pub disabled: Vec<String>,
}

/// Reads `alloc_util_allocators` and which of them are enabled.
pub fn allocators(vm: &VmClient) -> Result<AllocatorSet, VmError> {
    let reply = system_info(vm, atom_term("alloc_util_allocators"))?;
    let names: Vec<String> = list(&reply)
        .ok_or_else(|| shape("erlang:system_info(alloc_util_allocators)", "not a list"))?
        .iter()
        .filter_map(atom)
        .map(str::to_owned)
        .collect();
    let info = system_info(vm, atom_term("allocator"))?;
    let disabled = parse::disabled_allocators(&names, &info);
    Ok(AllocatorSet {
        enabled: names
            .iter()
            .filter(|n| !disabled.contains(n))
            .cloned()
            .collect(),
        disabled,
    })
}

/// `erlang:memory()`, empty when the node answers `notsup` (allocators disabled).
fn memory(
    vm: &VmClient,
    limit: std::time::Duration,
) -> Result<std::collections::BTreeMap<String, u64>, VmError> {
    match vm.call_within(limit, "erlang", "memory", vec![]) {
        Ok(reply) => parse::parse_memory(&reply),
        Err(VmError::Call { reason, .. }) if reason.contains("notsup") => Ok(Default::default()),
        Err(e) => Err(e),
    }
}

/// Allocator figures and `erlang:memory()` now.
pub fn sample(vm: &VmClient, allocators: &[String], t_s: f64) -> Result<VmSample, VmError> {
    let mut out = VmSample {
        t_s,
        ..Default::default()
    };
    // One call for all allocators: every call costs a round trip.
    let queries: Vec<Term> = allocators
        .iter()
        .map(|name| tuple_term(vec![atom_term("allocator_sizes"), atom_term(name)]))
        .collect();
    let replies = map_within(vm, SAMPLE_TIMEOUT, "erlang", "system_info", &queries)?;
    for (name, reply) in allocators.iter().zip(&replies) {
        out.allocators
            .extend(parse::parse_allocator_sizes(name, reply)?);
    }
    out.memory = memory(vm, SAMPLE_TIMEOUT)?;
    Ok(out)
}

/// A sampled process with what the census learns of it.
type Chosen = Vec<usize>;

/// Picks the union of the top `n` rows by each key.
fn top_rows(rows: &[ProcessRow], held: &[Option<parse::HeldBinaries>], n: usize) -> Chosen {
    let mut chosen: Chosen = Vec::new();
    let mut by = |key: &dyn Fn(&ProcessRow) -> u64| {
        let mut idx: Vec<&ProcessRow> = rows.iter().collect();
        idx.sort_by_key(|r| std::cmp::Reverse(key(r)));
        for r in idx.into_iter().take(n).filter(|r| key(r) > 0) {
            if !chosen.contains(&r.index) {
                chosen.push(r.index);
            }
        }
    };
    by(&|r| r.memory);
    by(&|r| r.message_queue_len);
    by(&|r| {
        held.get(r.index)
            .copied()
            .flatten()
            .map_or(0, |h| h.distinct_bytes)
    });
    chosen
}

/// The Erlang-level census: processes (top `n` by memory, queue and binaries; groups by
/// initial call), binaries (deduplicated), tables, persistent terms, ports, code, atoms.
pub fn census(vm: &VmClient, n: usize, t_s: f64) -> Result<Census, VmError> {
    let started = Instant::now();
    let mut limits = CensusLimits {
        process_cap: PROCESS_CAP as u64,
        binary_ref_cap: BINARY_REF_CAP,
        ..Default::default()
    };
    let mut pids = match vm.call("erlang", "processes", vec![])? {
        Term::List(l) => l.elements,
        other => return Err(shape("erlang:processes/0", term_text(&other))),
    };
    let process_count = pids.len() as u64;
    pids.truncate(PROCESS_CAP);
    limits.processes_examined = pids.len() as u64;

    // One signal round trip per process gives its memory, queue, names and binaries: asking
    // for them in separate passes costs the node a round trip each. Chunks keep each reply
    // small; once the reference budget is spent, binaries are no longer asked for.
    let mut rows: Vec<ProcessRow> = Vec::with_capacity(pids.len());
    let mut refs: Vec<Option<Vec<parse::BinaryRef>>> = vec![None; pids.len()];
    let mut complete = true;
    for (c, chunk) in pids.chunks(PROCESS_CHUNK).enumerate() {
        let mut items = vec![
            "memory",
            "message_queue_len",
            "registered_name",
            "initial_call",
        ];
        if limits.binary_refs_examined < BINARY_REF_CAP {
            items.push("binary");
        } else {
            complete = false;
        }
        let replies = zipwith(vm, "erlang", "process_info", chunk, atoms(&items))?;
        for (k, reply) in replies.iter().enumerate() {
            let index = c * PROCESS_CHUNK + k;
            let Some(row) = parse::parse_process_row(index, reply) else {
                continue; // `undefined`: the process ended meanwhile
            };
            if let Some(list) = list(reply)
                .and_then(|items| prop_value(items, "binary"))
                .and_then(parse::parse_binary_list)
            {
                limits.binary_refs_examined += list.len() as u64;
                limits.binary_processes_examined += 1;
                refs[index] = Some(list);
            }
            rows.push(row);
        }
    }

    // gen_servers and friends all start in proc_lib: their real initial call is in their
    // dictionary, which proc_lib reads on the node (only the MFA crosses the wire).
    let wrapped: Vec<usize> = rows
        .iter()
        .filter(|r| r.initial_call == PROC_LIB_INIT)
        .map(|r| r.index)
        .collect();
    // Reading a dictionary costs the node a signal round trip per process: past the cap, an
    // even sample stands for the rest.
    let stride = wrapped.len().div_ceil(TRANSLATE_CAP).max(1);
    let sample: Vec<usize> = wrapped.iter().copied().step_by(stride).collect();
    let sample_pids: Vec<Term> = sample.iter().map(|i| pids[*i].clone()).collect();
    let mut translated = parse::Translated {
        weight: wrapped.len() as f64 / sample.len().max(1) as f64,
        unread: wrapped
            .iter()
            .enumerate()
            .filter(|(k, _)| k % stride != 0)
            .map(|(_, i)| *i)
            .collect(),
        ..Default::default()
    };
    for (k, reply) in map(vm, "proc_lib", "translate_initial_call", &sample_pids)?
        .iter()
        .enumerate()
    {
        if let Some(m) = mfa(reply).filter(|m| m != PROC_LIB_INIT) {
            translated.names.insert(sample[k], m);
        }
    }
    limits.initial_calls_read = sample.len() as u64;
    limits.initial_calls_wrapped = wrapped.len() as u64;
    let groups = parse::group_processes(&rows, &translated, GROUP_CAP);

    let (held, binary_total) = parse::dedup_binaries(&refs);
    drop(refs);

    let chosen = top_rows(&rows, &held, n);
    let chosen_pids: Vec<Term> = chosen.iter().map(|i| pids[*i].clone()).collect();
    let current = zipwith(
        vm,
        "erlang",
        "process_info",
        &chosen_pids,
        atom_term("current_function"),
    )?;
    let row_of: HashMap<usize, &ProcessRow> = rows.iter().map(|r| (r.index, r)).collect();
    let processes = chosen
        .iter()
        .zip(&current)
        .filter_map(|(i, cf)| {
            let row = row_of.get(i)?;
            let h = held.get(*i).copied().flatten();
            Some(ProcessEntry {
                pid: display(&pids[*i]),
                name: row
                    .registered
                    .clone()
                    .or_else(|| translated.names.get(i).cloned())
                    .unwrap_or_else(|| row.initial_call.clone()),
                current_function: tuple(cf)
                    .and_then(|t| t.get(1))
                    .map(display)
                    .unwrap_or_default(),
                memory: row.memory,
                message_queue_len: row.message_queue_len,
                binary_bytes: h.map(|h| h.distinct_bytes),
                binary_shared_bytes: h.map(|h| h.shared_bytes),
                binary_refs: h.map(|h| h.refs),
            })
        })
        .collect();

    let (table_count, tables) = tables(vm, n)?;
    let ports = ports(vm, n, &mut limits).ok();
    let memory = memory(vm, crate::vm::client::CALL_TIMEOUT)?;
    let persistent_term = vm
        .call("persistent_term", "info", vec![])
        .ok()
        .and_then(|t| parse::parse_persistent_term(&t));
    let code = vm
        .call("erlang", "loaded", vec![])
        .ok()
        .and_then(|t| list(&t).map(|l| l.len() as u64))
        .map(|modules| LoadedCode {
            modules,
            memory: memory.get("code").copied(),
        });
    let info = |key: &str| {
        system_info(vm, atom_term(key))
            .ok()
            .and_then(|t| uint(&t))
            .unwrap_or(0)
    };
    let (atom_count, atom_limit) = (info("atom_count"), info("atom_limit"));
    let mseg = mseg_cache(vm);
    limits.wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(Census {
        t_s,
        process_count,
        processes,
        binaries_scanned: complete && process_count == limits.processes_examined,
        table_count,
        tables,
        atom_count,
        atom_limit,
        mseg,
        groups,
        binary_distinct_bytes: Some(binary_total),
        persistent_term,
        ports,
        code,
        memory,
        limits,
    })
}

/// Top `n` tables by memory, and how many there are.
fn tables(vm: &VmClient, n: usize) -> Result<(u64, Vec<TableEntry>), VmError> {
    let wordsize = system_info(vm, atom_term("wordsize"))
        .ok()
        .and_then(|t| uint(&t))
        .unwrap_or(8);
    let tables = match vm.call("ets", "all", vec![])? {
        Term::List(l) => l.elements,
        other => return Err(shape("ets:all/0", term_text(&other))),
    };
    let words = zipwith(vm, "ets", "info", &tables, atom_term("memory"))?;
    let mut rows: Vec<(usize, u64)> = words
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((i, uint(t)?.saturating_mul(wordsize))))
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    rows.truncate(n);
    let top: Vec<Term> = rows.iter().map(|r| tables[r.0].clone()).collect();
    let mut out = Vec::new();
    if !top.is_empty() {
        let names = zipwith(vm, "ets", "info", &top, atom_term("name"))?;
        let owners = zipwith(vm, "ets", "info", &top, atom_term("owner"))?;
        let sizes = zipwith(vm, "ets", "info", &top, atom_term("size"))?;
        let owner_names = zipwith(
            vm,
            "erlang",
            "process_info",
            &owners,
            atom_term("registered_name"),
        )
        .unwrap_or_default();
        for (k, (_, bytes)) in rows.iter().enumerate() {
            out.push(TableEntry {
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
    Ok((tables.len() as u64, out))
}

/// Ports: count, memory and queue totals, the top `n`.
fn ports(vm: &VmClient, n: usize, limits: &mut CensusLimits) -> Result<Ports, VmError> {
    let mut ports = match vm.call("erlang", "ports", vec![])? {
        Term::List(l) => l.elements,
        other => return Err(shape("erlang:ports/0", term_text(&other))),
    };
    let count = ports.len() as u64;
    ports.truncate(PORT_CAP);
    limits.ports_examined = ports.len() as u64;
    // port_info(P, Item) answers {Item, Value}, or undefined for a port closed meanwhile.
    let value = |t: &Term| tuple(t).and_then(|t| t.get(1)).and_then(uint).unwrap_or(0);
    let memory: Vec<u64> = zipwith(vm, "erlang", "port_info", &ports, atom_term("memory"))?
        .iter()
        .map(value)
        .collect();
    let queue: Vec<u64> = zipwith(vm, "erlang", "port_info", &ports, atom_term("queue_size"))?
        .iter()
        .map(value)
        .collect();
    let mut idx: Vec<usize> = (0..ports.len()).collect();
    idx.sort_by_key(|i| std::cmp::Reverse(memory[*i] + queue[*i]));
    idx.truncate(n);
    let top_ports: Vec<Term> = idx.iter().map(|i| ports[*i].clone()).collect();
    let names = zipwith(vm, "erlang", "port_info", &top_ports, atom_term("name"))?;
    let owners = zipwith(
        vm,
        "erlang",
        "port_info",
        &top_ports,
        atom_term("connected"),
    )?;
    let second = |t: &Term| tuple(t).and_then(|t| t.get(1)).cloned();
    let top = idx
        .iter()
        .enumerate()
        .map(|(k, i)| PortEntry {
            id: display(&ports[*i]),
            name: names
                .get(k)
                .and_then(second)
                .map(|t| match t {
                    Term::ByteList(b) => String::from_utf8_lossy(&b.bytes).into_owned(),
                    other => display(&other),
                })
                .map(|name| parse::port_program(&name))
                .unwrap_or_default(),
            owner: owners
                .get(k)
                .and_then(second)
                .map(|t| display(&t))
                .unwrap_or_default(),
            memory: memory[*i],
            queue_size: queue[*i],
        })
        .collect();
    Ok(Ports {
        count,
        memory: memory.iter().sum(),
        queue_size: queue.iter().sum(),
        top,
    })
}

/// mseg_alloc's cache counters now, if the node has mseg_alloc.
pub fn mseg_cache(vm: &VmClient) -> Option<crate::recording::MsegCache> {
    let query = tuple_term(vec![atom_term("allocator"), atom_term("mseg_alloc")]);
    parse::parse_mseg_cache(&system_info(vm, query).ok()?)
}

/// Nodes with more carriers than this get no carrier picture: `instrument:carriers/0` walks
/// every carrier and its reply grows with them (measured here, OTP 25: 2225 carriers in 10 ms
/// and 185 KB, so this cap stays near half a second and 8 MB).
pub const PICTURE_CARRIER_CAP: u64 = 100_000;
/// Longest wait for `instrument:carriers/0`: the end of a run does not wait much longer.
pub const PICTURE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Carriers the node's allocator figures count, summed over `erlang:system_info({allocator,
/// A})` replies (mbcs, sbcs and the pool of every instance), with each allocator's carrier
/// options (from its highest instance: instance 0 serves no scheduler and pools nothing).
pub fn parse_carrier_counts(
    names: &[String],
    replies: &[Term],
) -> (u64, BTreeMap<String, CarrierOptions>) {
    let mut count = 0u64;
    let mut options = BTreeMap::new();
    for (name, reply) in names.iter().zip(replies) {
        let Some(instances) = list(reply) else {
            continue; // `false`: the allocator is disabled
        };
        let mut highest: Option<(u64, &[Term])> = None;
        for inst in instances {
            let Some([tag, n, props]) = tuple(inst).and_then(|t| <&[Term; 3]>::try_from(t).ok())
            else {
                continue;
            };
            let (Some("instance"), Some(n), Some(props)) = (atom(tag), uint(n), list(props)) else {
                continue;
            };
            for kind in ["mbcs", "sbcs", "mbcs_pool"] {
                let current = prop_value(props, kind)
                    .and_then(list)
                    .and_then(|k| prop(k, "carriers"))
                    .and_then(|t| t.get(1))
                    .and_then(uint)
                    .unwrap_or(0);
                count = count.saturating_add(current);
            }
            if let Some(opts) = prop_value(props, "options").and_then(list)
                && highest.is_none_or(|(h, _)| n > h)
            {
                highest = Some((n, opts));
            }
        }
        if let Some((_, opts)) = highest {
            let strategy = prop_value(opts, "as")
                .and_then(atom)
                .filter(|a| a.len() <= 16 && a.bytes().all(|b| b.is_ascii_lowercase()))
                .map(str::to_owned);
            options.insert(
                name.clone(),
                CarrierOptions {
                    strategy,
                    acul: prop_value(opts, "acul")
                        .and_then(uint)
                        .filter(|v| *v <= 100),
                    lmbcs: prop_value(opts, "lmbcs").and_then(uint),
                },
            );
        }
    }
    (count, options)
}

/// Reads one `instrument:carriers/0` reply into `tally`: `{ok, {HistogramStart, [{Allocator,
/// InPool, TotalSize, UnscannedSize, [{Type, Count, Size}], FreeHistogram}]}}` (OTP 21+,
/// lib/runtime_tools/src/instrument.erl). Returns the histogram start and how many carriers
/// were dropped: a carrier whose figures cannot be (blocks larger than the carrier, a size of
/// zero, a non-integer) is counted as rejected, never trusted.
pub fn parse_carriers(reply: &Term, tally: &mut CarrierTally) -> Result<(u64, u64), VmError> {
    const CALL: &str = "instrument:carriers/0";
    let body = match tuple(reply) {
        Some([tag, body]) if atom(tag) == Some("ok") => body,
        Some([tag, reason]) if atom(tag) == Some("error") => {
            return Err(VmError::Call {
                call: CALL.into(),
                reason: format!("{{error, {}}}", term_text(reason)),
            });
        }
        _ => return Err(shape(CALL, format!("not {{ok, _}}: {}", term_text(reply)))),
    };
    let (start, carriers) = match tuple(body) {
        Some([start, carriers]) => (
            uint(start).ok_or_else(|| shape(CALL, "histogram start is not an integer"))?,
            list(carriers).ok_or_else(|| shape(CALL, "carriers are not a list"))?,
        ),
        _ => return Err(shape(CALL, "not {HistogramStart, Carriers}")),
    };
    let mut rejected = 0u64;
    for c in carriers {
        match parse_carrier(c) {
            Some((name, entry, free, unscanned)) if tally.add(name, entry, &free, unscanned) => {}
            _ => rejected += 1,
        }
    }
    Ok((start, rejected))
}

/// One carrier of the reply, checked: `None` when any field has the wrong type or the figures
/// contradict each other.
fn parse_carrier(t: &Term) -> Option<(&str, CarrierEntry, Vec<u64>, u64)> {
    let [name, in_pool, size, unscanned, blocks, free] = tuple(t)? else {
        return None;
    };
    let name = atom(name).filter(|n| n.len() <= 64)?;
    let in_pool = match atom(in_pool)? {
        "true" => true,
        "false" => false,
        _ => return None,
    };
    let size = uint(size).filter(|s| *s > 0)?;
    let unscanned = uint(unscanned).filter(|u| *u <= size)?;
    let (mut count, mut bytes) = (0u64, 0u64);
    for b in list(blocks)? {
        let [kind, n, b] = tuple(b)? else {
            return None;
        };
        atom(kind)?;
        count = count.checked_add(uint(n)?)?;
        bytes = bytes.checked_add(uint(b)?)?;
    }
    if bytes > size || count > bytes {
        return None;
    }
    let free: Vec<u64> = tuple(free)?.iter().map(uint).collect::<Option<_>>()?;
    // Each free block takes at least a few words of the carrier.
    if free.iter().try_fold(0u64, |a, n| a.checked_add(*n))? > size {
        return None;
    }
    Some((
        name,
        CarrierEntry {
            size,
            in_pool,
            blocks: count,
            block_bytes: bytes,
            free_holes: 0,
        },
        free,
        unscanned,
    ))
}

/// Every carrier by allocator (`instrument:carriers/0`), when the node has at most
/// [`PICTURE_CARRIER_CAP`] of them per its allocator figures; else a picture saying why not.
pub fn carrier_picture(
    vm: &VmClient,
    allocators: &[String],
    t_s: f64,
) -> Result<CarrierPicture, VmError> {
    let started = Instant::now();
    let queries: Vec<Term> = allocators
        .iter()
        .map(|name| tuple_term(vec![atom_term("allocator"), atom_term(name)]))
        .collect();
    let replies = map(vm, "erlang", "system_info", &queries)?;
    let (counted, mut options) = parse_carrier_counts(allocators, &replies);
    let mut picture = CarrierPicture {
        t_s,
        carriers_counted: counted,
        ..Default::default()
    };
    if counted > PICTURE_CARRIER_CAP {
        picture.skipped = Some(format!(
            "the node has {counted} carriers, more than {PICTURE_CARRIER_CAP}: instrument:carriers/0 would walk them all"
        ));
        picture.wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        return Ok(picture);
    }
    // Calling a module the node has not loaded makes its code server load it: say so.
    let loaded = vm.call("code", "is_loaded", vec![atom_term("instrument")])?;
    picture.loaded_instrument = atom(&loaded) == Some("false");
    let reply = vm.call_within(PICTURE_TIMEOUT, "instrument", "carriers", vec![]);
    picture.wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut tally = CarrierTally::default();
    match reply.and_then(|r| parse_carriers(&r, &mut tally)) {
        Ok((start, rejected)) => {
            picture.histogram_start = start;
            picture.rejected = rejected;
            picture.allocators = tally.finish();
            for a in &mut picture.allocators {
                a.options = options.remove(&a.name);
            }
        }
        Err(e @ VmError::ReplyOverCap { .. }) => return Err(e),
        Err(e) => picture.skipped = Some(cut_text(&format!("{e}"))),
    }
    Ok(picture)
}

#[cfg(test)]
mod tests {
    use erl_dist::term::BigInteger;

    use super::*;
    use crate::vm::term::small;

    fn carrier(name: &str, pool: bool, size: u64, blocks: &[(u64, u64)], free: &[u64]) -> Term {
        let big = |v: u64| Term::from(BigInteger::from(v));
        tuple_term(vec![
            atom_term(name),
            atom_term(if pool { "true" } else { "false" }),
            big(size),
            small(0),
            list_term(
                blocks
                    .iter()
                    .map(|(n, b)| tuple_term(vec![atom_term(name), big(*n), big(*b)]))
                    .collect(),
            ),
            tuple_term(free.iter().map(|v| big(*v)).collect()),
        ])
    }

    fn reply(carriers: Vec<Term>) -> Term {
        tuple_term(vec![
            atom_term("ok"),
            tuple_term(vec![small(512), list_term(carriers)]),
        ])
    }

    #[test]
    fn carriers_are_summed_and_nonsense_is_rejected() {
        // As OTP 25 answers after an ETS table was filled and 95% emptied.
        let mut carriers: Vec<Term> = (0..34)
            .map(|_| {
                carrier(
                    "ets_alloc",
                    true,
                    8 << 20,
                    &[(589, 414_656)],
                    &[0, 0, 0, 583, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                )
            })
            .collect();
        carriers.push(carrier("ets_alloc", false, 65536, &[], &[1]));
        // Hostile entries: blocks larger than their carrier, more blocks than bytes, a string
        // for a size, holes beyond any carrier, a 5-tuple, an atom that is not a boolean.
        carriers.push(carrier("ets_alloc", false, 100, &[(1, 200)], &[]));
        carriers.push(carrier("ets_alloc", false, 100, &[(50, 10)], &[]));
        carriers.push(carrier("ets_alloc", false, 100, &[], &[u64::MAX, 2]));
        carriers.push(tuple_term(vec![
            atom_term("ets_alloc"),
            atom_term("false"),
            Term::from(erl_dist::term::Binary::from(b"8388608".to_vec())),
            small(0),
            list_term(vec![]),
            tuple_term(vec![]),
        ]));
        carriers.push(tuple_term(vec![atom_term("ets_alloc"); 5]));
        carriers.push(tuple_term(vec![
            atom_term("ets_alloc"),
            atom_term("maybe"),
            small(100),
            small(0),
            list_term(vec![]),
            tuple_term(vec![]),
        ]));
        let mut tally = CarrierTally::default();
        let (start, rejected) = parse_carriers(&reply(carriers), &mut tally).unwrap();
        assert_eq!((start, rejected), (512, 6));
        let out = tally.finish();
        let e = &out[0];
        assert_eq!(
            (e.carriers, e.pool_carriers, e.pinned, e.empty),
            (35, 34, 34, 1)
        );
        assert_eq!(e.pinned_median_blocks, Some(589));
        assert_eq!(e.free_holes, 34 * 589 + 1);
        assert_eq!(e.block_bytes, 34 * 414_656);
    }

    #[test]
    fn an_error_or_a_strange_reply_is_an_error_not_an_empty_picture() {
        let mut tally = CarrierTally::default();
        let err = tuple_term(vec![atom_term("error"), atom_term("not_enabled")]);
        let e = parse_carriers(&err, &mut tally).unwrap_err();
        assert!(e.to_string().contains("not_enabled"), "{e}");
        for odd in [
            atom_term("ok"),
            tuple_term(vec![atom_term("ok"), small(1)]),
            tuple_term(vec![
                atom_term("ok"),
                tuple_term(vec![small(-1), list_term(vec![])]),
            ]),
        ] {
            assert!(parse_carriers(&odd, &mut tally).is_err(), "{odd}");
        }
    }

    #[test]
    fn carrier_counts_sum_every_kind_and_options_come_from_the_highest_instance() {
        let t = tuple_term;
        let a = atom_term;
        let instance = |n: i32, acul: i32, mbcs: i32, pool: i32| {
            t(vec![
                a("instance"),
                small(n),
                list_term(vec![
                    t(vec![
                        a("options"),
                        list_term(vec![
                            t(vec![a("acul"), small(acul)]),
                            t(vec![a("as"), a("aoffcbf")]),
                            t(vec![a("lmbcs"), small(5_242_880)]),
                        ]),
                    ]),
                    t(vec![
                        a("mbcs"),
                        list_term(vec![t(vec![
                            a("carriers"),
                            small(mbcs),
                            small(41),
                            small(41),
                        ])]),
                    ]),
                    t(vec![
                        a("mbcs_pool"),
                        list_term(vec![t(vec![a("carriers"), small(pool)])]),
                    ]),
                    t(vec![
                        a("sbcs"),
                        list_term(vec![t(vec![a("carriers"), small(1), small(1), small(1)])]),
                    ]),
                ]),
            ])
        };
        let names = vec!["ets_alloc".to_owned(), "exec_alloc".to_owned()];
        let replies = vec![
            list_term(vec![
                instance(0, 0, 0, 0),
                instance(2, 60, 9, 28),
                instance(1, 50, 1, 0),
            ]),
            a("false"),
        ];
        let (count, options) = parse_carrier_counts(&names, &replies);
        assert_eq!(count, 1 + (9 + 28 + 1) + (1 + 1));
        let o = &options["ets_alloc"];
        assert_eq!(o.acul, Some(60));
        assert_eq!(o.strategy.as_deref(), Some("aoffcbf"));
        assert_eq!(o.lmbcs, Some(5_242_880));
        assert!(!options.contains_key("exec_alloc"));
    }
}
