//! Pure parsing of the node's replies into the recorded model, and the arithmetic done on them
//! (binary deduplication, process groups). Tested on constructed terms; no I/O.

use std::collections::{BTreeMap, HashMap};

use erl_dist::term::Term;

use crate::{
    recording::{AllocatorUsage, MsegCache, PersistentTerms, ProcessGroup},
    vm::{
        client::VmError,
        term::{atom, list, map_value, prop, prop_value, tuple, uint},
    },
};

pub(crate) fn shape(call: &str, reason: impl Into<String>) -> VmError {
    VmError::Shape {
        call: call.into(),
        reason: crate::vm::client::cap_text(&reason.into()),
    }
}

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
            // Saturating: the figures come from the node, a bogus bignum must not wrap.
            usage.blocks = usage.blocks.saturating_add(blocks);
            usage.carriers = usage.carriers.saturating_add(carriers);
            if kind == "mbcs_pool" {
                usage.pool_carriers = usage.pool_carriers.saturating_add(carriers);
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
        .fold(0, u64::saturating_add)
}

/// A `{Name, GigaCalls, Calls}` counter.
fn calls(items: &[Term], key: &str) -> u64 {
    prop(items, key)
        .filter(|t| t.len() == 3)
        .and_then(|t| {
            Some(
                uint(&t[1])?
                    .saturating_mul(1_000_000_000)
                    .saturating_add(uint(&t[2])?),
            )
        })
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
        out.alloc_calls = out
            .alloc_calls
            .saturating_add(calls(counters, "mseg_alloc"));
        out.create_calls = out
            .create_calls
            .saturating_add(calls(counters, "mseg_create"));
        if let Some(status) = prop_value(scope, "status").and_then(list) {
            out.cached_segments = out.cached_segments.saturating_add(
                prop_value(status, "cached_segments")
                    .and_then(uint)
                    .unwrap_or(0),
            );
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

/// Allocators the node runs without: those of `alloc_util_allocators` missing from the
/// features of `erlang:system_info(allocator)` (`{glibc, Vsn, Features, Settings}`). With
/// `+Mea min` every allocator but temp_alloc and literal_alloc is disabled.
pub fn disabled_allocators(alloc_util: &[String], allocator_info: &Term) -> Vec<String> {
    let Some(features) = tuple(allocator_info).and_then(|t| t.get(2)).and_then(list) else {
        return Vec::new();
    };
    let enabled: Vec<&str> = features.iter().filter_map(atom).collect();
    alloc_util
        .iter()
        .filter(|a| !enabled.contains(&a.as_str()))
        .cloned()
        .collect()
}

/// Parses `persistent_term:info()`: `#{count => N, memory => Bytes}`.
pub fn parse_persistent_term(reply: &Term) -> Option<PersistentTerms> {
    Some(PersistentTerms {
        count: uint(map_value(reply, "count")?)?,
        memory: uint(map_value(reply, "memory")?)?,
    })
}

/// One reference to a refc binary from `process_info(P, binary)`: `{Id, Size, RefCount}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BinaryRef {
    /// The binary's identity (its address on the node).
    pub id: u64,
    /// Bytes.
    pub size: u64,
    /// References to it node-wide (processes, tables, ports).
    pub refc: u64,
}

/// Parses the `[{Id, Size, RefCount}]` of `process_info(P, binary)`.
pub fn parse_binary_list(reply: &Term) -> Option<Vec<BinaryRef>> {
    let items = list(reply)?;
    Some(
        items
            .iter()
            .filter_map(|b| {
                let t = tuple(b)?;
                Some(BinaryRef {
                    id: uint(t.first()?)?,
                    size: uint(t.get(1)?)?,
                    refc: uint(t.get(2)?)?,
                })
            })
            .collect(),
    )
}

/// What one process holds in refc binaries, each binary counted once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldBinaries {
    /// Bytes of the distinct binaries referenced.
    pub distinct_bytes: u64,
    /// Of those, bytes of binaries also referenced from elsewhere.
    pub shared_bytes: u64,
    /// References held (one per sub-binary or copy received).
    pub refs: u64,
}

/// Deduplicates binary references: per process by binary id (a process holding a thousand
/// sub-binaries of one binary holds that binary's bytes once), and node-wide. A binary is
/// shared when another examined process references it too, or when its reference count
/// exceeds the references this process holds (tables, ports, unexamined processes).
/// Returns the per-process figures and the distinct bytes over all processes.
pub fn dedup_binaries(per_process: &[Option<Vec<BinaryRef>>]) -> (Vec<Option<HeldBinaries>>, u64) {
    let mut holders: HashMap<u64, (u64, u32)> = HashMap::new();
    // Per process: binary id -> (size, highest refc seen, references held).
    type Own = HashMap<u64, (u64, u64, u64)>;
    let own: Vec<Option<Own>> = per_process
        .iter()
        .map(|refs| {
            let refs = refs.as_ref()?;
            let mut m = Own::new();
            for r in refs {
                let e = m.entry(r.id).or_insert((r.size, r.refc, 0));
                e.1 = e.1.max(r.refc);
                e.2 += 1;
            }
            for (id, (size, _, _)) in &m {
                holders.entry(*id).or_insert((*size, 0)).1 += 1;
            }
            Some(m)
        })
        .collect();
    let total = holders
        .values()
        .map(|(size, _)| *size)
        .fold(0, u64::saturating_add);
    let held = own
        .into_iter()
        .map(|m| {
            let m = m?;
            let mut h = HeldBinaries::default();
            for (id, (size, refc, count)) in m {
                h.distinct_bytes = h.distinct_bytes.saturating_add(size);
                h.refs += count;
                let others = holders.get(&id).is_some_and(|(_, n)| *n > 1);
                if others || refc > count {
                    h.shared_bytes = h.shared_bytes.saturating_add(size);
                }
            }
            Some(h)
        })
        .collect();
    (held, total)
}

/// One examined process: what the census groups and ranks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessRow {
    /// Index in the examined pid list.
    pub index: usize,
    /// Bytes.
    pub memory: u64,
    /// Messages waiting.
    pub message_queue_len: u64,
    /// Registered name, if any.
    pub registered: Option<String>,
    /// `initial_call` as `m:f/a`.
    pub initial_call: String,
}

/// The spawn wrapper every gen_server, gen_statem and supervisor shows as its initial call.
pub const PROC_LIB_INIT: &str = "proc_lib:init_p/5";

/// Parses `process_info(P, [memory, message_queue_len, registered_name, initial_call])`;
/// `None` for a process that died meanwhile (`undefined`).
pub fn parse_process_row(index: usize, reply: &Term) -> Option<ProcessRow> {
    let items = list(reply)?;
    let registered = prop_value(items, "registered_name")
        .and_then(atom)
        .map(str::to_owned);
    Some(ProcessRow {
        index,
        memory: prop_value(items, "memory").and_then(uint).unwrap_or(0),
        message_queue_len: prop_value(items, "message_queue_len")
            .and_then(uint)
            .unwrap_or(0),
        registered,
        initial_call: prop_value(items, "initial_call")
            .map(crate::vm::term::display)
            .unwrap_or_default(),
    })
}

/// How the proc_lib `'$initial_call'`s were read: all of them, or a sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translated {
    /// Examined-process index -> real initial call, for the processes read.
    pub names: HashMap<usize, String>,
    /// proc_lib processes not read (outside the sample): left out of the groups.
    pub unread: std::collections::HashSet<usize>,
    /// Each read proc_lib process stands for this many (1 when all were read).
    pub weight: f64,
}

/// Groups processes by what they run: the proc_lib `'$initial_call'` when read, else
/// `initial_call`. When only a sample of proc_lib processes was read, each read one counts for
/// `weight` processes (counts and memory are estimates then). Largest groups (by count, then
/// memory) first, at most `cap` groups.
pub fn group_processes(
    rows: &[ProcessRow],
    translated: &Translated,
    cap: usize,
) -> Vec<ProcessGroup> {
    let mut groups: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| !translated.unread.contains(&r.index))
    {
        let (name, w) = match translated.names.get(&r.index) {
            Some(n) => (n.clone(), translated.weight.max(1.0)),
            None => (r.initial_call.clone(), 1.0),
        };
        let g = groups.entry(name).or_default();
        g.0 += w;
        g.1 += w * r.memory as f64;
        g.2 += w * r.message_queue_len as f64;
    }
    let mut out: Vec<ProcessGroup> = groups
        .into_iter()
        .map(|(name, (count, memory, queue))| ProcessGroup {
            name,
            count: count.round() as u64,
            memory: memory.round() as u64,
            message_queue_len: queue.round() as u64,
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(b.memory.cmp(&a.memory)));
    out.truncate(cap);
    out
}

/// What a report keeps of a port's name: the driver (`tcp_inet`, `efile`) or the program a
/// spawned port runs, without its arguments or environment assignments, which may carry
/// credentials (`sh -c "curl -u user:password ..."`, `PGPASSWORD=x psql`).
pub fn port_program(name: &str) -> String {
    let mut words = name.split_whitespace();
    let program = words.by_ref().find(|w| {
        !w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
    });
    match program {
        Some(p) if p.len() == name.len() => p.to_owned(),
        Some(p) => format!("{p} (arguments not recorded)"),
        None if name.trim().is_empty() => String::new(),
        None => "(command not recorded)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_keep_the_program_only() {
        assert_eq!(port_program("tcp_inet"), "tcp_inet");
        assert_eq!(port_program("/usr/bin/cat"), "/usr/bin/cat");
        assert_eq!(
            port_program("sh -c 'curl -u admin:hunter2 http://x'"),
            "sh (arguments not recorded)"
        );
        assert_eq!(
            port_program("PGPASSWORD=hunter2 psql -h db"),
            "psql (arguments not recorded)"
        );
        assert_eq!(port_program("TOKEN=hunter2"), "(command not recorded)");
        assert_eq!(port_program(""), "");
    }
    use crate::recording::VmSample;
    use crate::vm::term::{display, small};
    use erl_dist::term::{Atom, List, Tuple};

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

    #[test]
    fn binaries_are_counted_once_per_process_and_node() {
        let r = |id, size, refc| BinaryRef { id, size, refc };
        // Process 0 holds 1000 sub-binaries of one 1 MB binary and a private 10 kB one;
        // process 1 holds the same 1 MB binary once.
        let mut p0: Vec<BinaryRef> = (0..1000).map(|_| r(7, 1 << 20, 1001)).collect();
        p0.push(r(9, 10_000, 1));
        let p1 = vec![r(7, 1 << 20, 1001)];
        let (held, total) = dedup_binaries(&[Some(p0), Some(p1), None]);
        let h0 = held[0].unwrap();
        assert_eq!(h0.distinct_bytes, (1 << 20) + 10_000);
        assert_eq!(h0.shared_bytes, 1 << 20);
        assert_eq!(h0.refs, 1001);
        assert_eq!(held[1].unwrap().distinct_bytes, 1 << 20);
        assert_eq!(held[2], None);
        assert_eq!(total, (1 << 20) + 10_000);
    }

    #[test]
    fn processes_group_by_their_real_initial_call() {
        let row = |index, memory, ic: &str| ProcessRow {
            index,
            memory,
            message_queue_len: 0,
            registered: None,
            initial_call: ic.into(),
        };
        let rows = vec![
            row(0, 100, PROC_LIB_INIT),
            row(1, 100, PROC_LIB_INIT),
            row(2, 100, PROC_LIB_INIT),
            row(3, 5000, "erlang:apply/2"),
        ];
        let all = Translated {
            names: [
                (0, "my_worker:init/1".to_string()),
                (1, "my_worker:init/1".to_string()),
                (2, "my_queue:init/1".to_string()),
            ]
            .into(),
            unread: Default::default(),
            weight: 1.0,
        };
        let g = group_processes(&rows, &all, 10);
        assert_eq!(g[0].name, "my_worker:init/1");
        assert_eq!((g[0].count, g[0].memory), (2, 200));
        assert_eq!(g.len(), 3);
        assert_eq!(group_processes(&rows, &all, 1).len(), 1);
        // A sample of one proc_lib process in three stands for all three.
        let sampled = Translated {
            names: [(0, "my_worker:init/1".to_string())].into(),
            unread: [1, 2].into(),
            weight: 3.0,
        };
        let g = group_processes(&rows, &sampled, 10);
        assert_eq!(g[0].name, "my_worker:init/1");
        assert_eq!((g[0].count, g[0].memory), (3, 300));
    }

    #[test]
    fn disabled_allocators_and_persistent_terms() {
        let aua: Vec<String> = ["ets_alloc", "temp_alloc", "literal_alloc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let info = t(vec![
            a("glibc"),
            l(vec![]),
            l(vec![a("sys_alloc"), a("temp_alloc"), a("literal_alloc")]),
            l(vec![]),
        ]);
        assert_eq!(disabled_allocators(&aua, &info), vec!["ets_alloc"]);
        assert!(disabled_allocators(&aua, &a("junk")).is_empty());
        let mut m = std::collections::HashMap::new();
        m.insert(a("count"), small(3));
        m.insert(a("memory"), small(4096));
        let pt = parse_persistent_term(&Term::from(erl_dist::term::Map::from(m))).unwrap();
        assert_eq!((pt.count, pt.memory), (3, 4096));
        assert_eq!(parse_persistent_term(&a("x")), None);
    }

    // Property tests: every reply is untrusted input, so arbitrary terms, and well-formed
    // replies with one subterm replaced by an arbitrary one, must never panic a parser; and a
    // well-formed allocator_sizes reply must sum exactly.

    use erl_dist::term::{BigInteger, Binary, Float, ImproperList, Map, Pid};
    use proptest::prelude::*;

    /// The atoms the parsers look for, so that random trees hit their paths.
    const KEYS: &[&str] = &[
        "instance",
        "mbcs",
        "sbcs",
        "mbcs_pool",
        "blocks",
        "blocks_size",
        "carriers_size",
        "size",
        "memkind",
        "calls",
        "mseg_alloc",
        "mseg_create",
        "status",
        "cached_segments",
        "count",
        "memory",
        "registered_name",
        "message_queue_len",
        "initial_call",
        "ets_alloc",
        "binary_alloc",
        "total",
        "glibc",
        "undefined",
    ];

    /// 256 cases (well under a second in release): CI's time-boxed run. PROPTEST_CASES=N fuzzes
    /// longer.
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

    fn arb_atom() -> impl Strategy<Value = Term> {
        prop_oneof![
            3 => prop::sample::select(KEYS).prop_map(a),
            1 => "[a-z_]{0,8}".prop_map(|s| a(&s)),
        ]
    }

    /// Integers as the node sends them: fixnums, and bignums up to and past i64/u64.
    fn arb_int() -> impl Strategy<Value = Term> {
        prop_oneof![
            any::<i32>().prop_map(small),
            (0i32..1 << 20).prop_map(small),
            any::<i64>().prop_map(|v| Term::from(BigInteger::from(v))),
            any::<u64>().prop_map(|v| Term::from(BigInteger::from(v))),
            prop::sample::select(vec![i64::MAX, i64::MIN, -1, u32::MAX as i64 + 1])
                .prop_map(|v| Term::from(BigInteger::from(v))),
            Just(Term::from(BigInteger::from(u64::MAX))),
        ]
    }

    fn arb_leaf() -> impl Strategy<Value = Term> {
        prop_oneof![
            4 => arb_atom(),
            4 => arb_int(),
            1 => any::<f64>()
                .prop_filter_map("finite", |f| Float::try_from(f).ok())
                .prop_map(Term::from),
            1 => prop::collection::vec(any::<u8>(), 0..16)
                .prop_map(|b| Term::from(Binary::from(b))),
            1 => (any::<u32>(), any::<u32>())
                .prop_map(|(i, s)| Term::from(Pid::from(("n@h", i, s)))),
        ]
    }

    /// Trees of lists, tuples, maps and improper lists, nested up to depth 4.
    fn arb_term() -> impl Strategy<Value = Term> {
        arb_leaf().prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(l),
                prop::collection::vec(inner.clone(), 0..6).prop_map(t),
                prop::collection::vec((arb_atom(), inner.clone()), 0..4).prop_map(|kv| {
                    Term::from(Map::from(kv.into_iter().collect::<HashMap<_, _>>()))
                }),
                (prop::collection::vec(inner.clone(), 1..4), inner).prop_map(|(e, last)| {
                    Term::from(ImproperList {
                        elements: e,
                        last: Box::new(last),
                    })
                }),
            ]
        })
    }

    /// Number of subterms of `term`, itself included.
    fn subterms(term: &Term) -> usize {
        1 + match term {
            Term::List(x) => x.elements.iter().map(subterms).sum(),
            Term::Tuple(x) => x.elements.iter().map(subterms).sum(),
            Term::ImproperList(x) => {
                x.elements.iter().map(subterms).sum::<usize>() + subterms(&x.last)
            }
            Term::Map(x) => x.map.values().map(subterms).sum(),
            _ => 0,
        }
    }

    /// `term` with its `n`th subterm (pre-order) replaced by `with`.
    fn replace(term: &mut Term, n: &mut usize, with: &Term) -> bool {
        if *n == 0 {
            *term = with.clone();
            return true;
        }
        *n -= 1;
        let children: Vec<&mut Term> = match term {
            Term::List(x) => x.elements.iter_mut().collect(),
            Term::Tuple(x) => x.elements.iter_mut().collect(),
            Term::ImproperList(x) => {
                let mut c: Vec<&mut Term> = x.elements.iter_mut().collect();
                c.push(&mut x.last);
                c
            }
            Term::Map(x) => x.map.values_mut().collect(),
            _ => Vec::new(),
        };
        children.into_iter().any(|c| replace(c, n, with))
    }

    /// Every parser of node replies, fed `term`: none may panic.
    fn parse_all(term: &Term) {
        let _ = parse_allocator_sizes("ets_alloc", term);
        let _ = parse_mseg_cache(term);
        let _ = parse_memory(term);
        let _ = parse_persistent_term(term);
        let _ = parse_binary_list(term);
        if let Some(row) = parse_process_row(0, term) {
            let _ = group_processes(&[row], &Translated::default(), 10);
        }
        let _ = disabled_allocators(&["ets_alloc".to_owned(), "eheap_alloc".to_owned()], term);
        let refs = parse_binary_list(term);
        let _ = dedup_binaries(&[refs.clone(), refs]);
        let _ = display(term);
    }

    /// One carrier kind of a well-formed reply: its props and the blocks and carriers it adds.
    #[derive(Clone, Debug)]
    struct Kind {
        name: &'static str,
        /// Block sizes per owner (OTP 23+), or one `blocks_size` (before).
        owners: Vec<u32>,
        old_format: bool,
        carriers: u32,
        /// Props leaktrace does not read, before and after the ones it does.
        noise: bool,
    }

    fn arb_kind() -> impl Strategy<Value = Kind> {
        (
            prop::sample::select(vec!["mbcs", "sbcs", "mbcs_pool"]),
            prop::collection::vec(0u32..1 << 30, 0..4),
            any::<bool>(),
            0u32..1 << 31,
            any::<bool>(),
        )
            .prop_map(|(name, owners, old_format, carriers, noise)| Kind {
                name,
                owners,
                old_format,
                carriers,
                noise,
            })
    }

    fn kind_term(k: &Kind) -> Term {
        let size = |v: u32| {
            l(vec![t(vec![
                a("size"),
                Term::from(BigInteger::from(v)),
                small(0),
                small(0),
            ])])
        };
        let mut props = Vec::new();
        if k.noise {
            props.push(t(vec![a("blocks_count"), small(7), small(7), small(7)]));
        }
        if k.old_format {
            let sum: u64 = k.owners.iter().map(|&v| u64::from(v)).sum();
            props.push(t(vec![
                a("blocks_size"),
                Term::from(BigInteger::from(sum)),
                small(0),
                small(0),
            ]));
        } else {
            let owners = ["ets_alloc", "binary_alloc", "eheap_alloc", "temp_alloc"];
            props.push(t(vec![
                a("blocks"),
                l(k.owners
                    .iter()
                    .zip(owners)
                    .map(|(&v, o)| t(vec![a(o), size(v)]))
                    .collect()),
            ]));
        }
        let carriers = Term::from(BigInteger::from(k.carriers));
        props.push(if k.name == "mbcs_pool" {
            t(vec![a("carriers_size"), carriers])
        } else {
            t(vec![a("carriers_size"), carriers, small(0), small(0)])
        });
        if k.noise {
            props.push(t(vec![a("carriers"), small(1), small(1), small(1)]));
        }
        t(vec![a(k.name), l(props)])
    }

    /// A well-formed allocator_sizes reply: instances of distinct carrier kinds.
    fn arb_allocator_sizes() -> impl Strategy<Value = Vec<Vec<Kind>>> {
        prop::collection::vec(
            prop::collection::vec(arb_kind(), 0..3).prop_map(|mut kinds| {
                kinds.sort_by_key(|k| k.name);
                kinds.dedup_by_key(|k| k.name);
                kinds
            }),
            0..5,
        )
    }

    fn allocator_sizes_term(instances: &[Vec<Kind>]) -> Term {
        l(instances
            .iter()
            .enumerate()
            .map(|(i, kinds)| {
                let mut props: Vec<Term> = kinds.iter().map(kind_term).collect();
                props.insert(0, t(vec![a("versions"), l(vec![]), l(vec![])]));
                t(vec![a("instance"), small(i as i32), l(props)])
            })
            .collect())
    }

    /// Well-formed replies of the other calls, with arbitrary integers where counts go.
    fn arb_shaped() -> impl Strategy<Value = Term> {
        let mseg = prop::collection::vec((arb_int(), arb_int(), arb_int(), any::<bool>()), 0..3)
            .prop_map(|insts| {
                l(insts
                    .into_iter()
                    .enumerate()
                    .map(|(i, (g, n, cached, nested))| {
                        let scope = vec![
                            t(vec![
                                a("status"),
                                l(vec![t(vec![a("cached_segments"), cached])]),
                            ]),
                            t(vec![
                                a("calls"),
                                l(vec![
                                    t(vec![a("mseg_alloc"), g.clone(), n.clone()]),
                                    t(vec![a("mseg_create"), g, n]),
                                ]),
                            ]),
                        ];
                        let props = if nested {
                            vec![t(vec![a("memkind"), l(scope)])]
                        } else {
                            scope
                        };
                        t(vec![a("instance"), small(i as i32), l(props)])
                    })
                    .collect())
            });
        let memory = prop::collection::vec((arb_atom(), arb_int()), 0..6)
            .prop_map(|kv| l(kv.into_iter().map(|(k, v)| t(vec![k, v])).collect()));
        let persistent = (arb_int(), arb_int()).prop_map(|(c, m)| {
            let mut map = HashMap::new();
            map.insert(a("count"), c);
            map.insert(a("memory"), m);
            Term::from(Map::from(map))
        });
        let binaries = prop::collection::vec((arb_int(), arb_int(), arb_int()), 0..6)
            .prop_map(|bs| l(bs.into_iter().map(|(i, s, r)| t(vec![i, s, r])).collect()));
        let row = (arb_int(), arb_int(), arb_term()).prop_map(|(m, q, call)| {
            l(vec![
                t(vec![a("memory"), m]),
                t(vec![a("message_queue_len"), q]),
                t(vec![a("registered_name"), a("my_server")]),
                t(vec![a("initial_call"), call]),
            ])
        });
        prop_oneof![mseg, memory, persistent, binaries, row]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn parsers_never_panic_on_arbitrary_terms(term in arb_term()) {
            parse_all(&term);
        }

        #[test]
        fn parsers_never_panic_on_shaped_replies_with_a_bad_subterm(
            base in prop_oneof![
                arb_allocator_sizes().prop_map(|i| allocator_sizes_term(&i)),
                arb_shaped(),
            ],
            at in any::<prop::sample::Index>(),
            with in arb_term(),
        ) {
            parse_all(&base);
            let mut bad = base.clone();
            let mut n = at.index(subterms(&base));
            prop_assert!(replace(&mut bad, &mut n, &with));
            parse_all(&bad);
        }

        #[test]
        fn allocator_sizes_sum_blocks_and_carriers(instances in arb_allocator_sizes()) {
            let usage = parse_allocator_sizes("ets_alloc", &allocator_sizes_term(&instances))
                .unwrap();
            prop_assert_eq!(usage.len(), instances.len());
            for (i, (u, kinds)) in usage.iter().zip(&instances).enumerate() {
                let blocks: u64 = kinds
                    .iter()
                    .flat_map(|k| &k.owners)
                    .map(|&v| u64::from(v))
                    .sum();
                let carriers: u64 = kinds.iter().map(|k| u64::from(k.carriers)).sum();
                let pool: u64 = kinds
                    .iter()
                    .filter(|k| k.name == "mbcs_pool")
                    .map(|k| u64::from(k.carriers))
                    .sum();
                prop_assert_eq!(u.instance as usize, i);
                prop_assert_eq!(&u.name, "ets_alloc");
                prop_assert_eq!(u.blocks, blocks);
                prop_assert_eq!(u.carriers, carriers);
                prop_assert_eq!(u.pool_carriers, pool);
            }
        }
    }
}
