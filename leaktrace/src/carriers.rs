//! Carrier accounting from probe events: live carriers by address, net bytes per allocator
//! since attach, and the OS mappings under them (whose surplus is the mseg cache).
//!
//! Two measures are kept side by side:
//!
//! * **mapped** bytes, from the events alone ([`CarrierLedger::carriers_net`],
//!   [`CarrierLedger::mseg_cache_net`]): what was created minus what was destroyed since attach;
//! * **resident** bytes ([`CarrierLedger::carriers_resident_net`],
//!   [`CarrierLedger::mseg_cache_resident_net`]), measured at every sample from
//!   `/proc/PID/pagemap` for exactly the address ranges of the carriers and cached segments
//!   known by address. These are the ledger's `carriers` and `mseg_cache` lines, because they
//!   are comparable with `rss_anon`: a fresh carrier is mapped long before its pages are
//!   touched, and subtracting mapped sizes from RSS drifts `unexplained` below zero.
//!
//! # What the resident lines mean
//!
//! Both lines are *changes since attach*, like `rss_anon - baseline`; together with `baseline`
//! they make `unexplained` the change since attach of the resident anonymous memory outside
//! ERTS carriers and the mseg cache. Leaktrace does not learn the carriers that existed before
//! it attached from the probes (their resident pages are inside `baseline`), so:
//!
//! * **Pre-attach address space that looks like ERTS** ([`erts_like_mappings`]: anonymous
//!   writable mappings with both ends 256 KiB-aligned, not malloc arenas) is taken from
//!   `/proc/PID/maps` at attach and measured at every sample as the line
//!   [`CarrierOwner::PreAttach`] ("carriers from before attach"), less its residency at attach.
//!   A node filling the carrier it had at attach therefore does not show that as
//!   `unexplained`. Once an event names part of it (deallocated to the mseg cache, reused,
//!   remapped, unmapped) that part moves to the line of its new role.
//!
//! * Every line is `resident(ranges of the line known now) - offset(line)`, where `offset`
//!   holds the resident bytes of pre-attach ERTS memory that left the unknown part of the
//!   line since attach:
//!   * **adopted**: a pre-attach range outside the above, named by an event (an mseg carrier
//!     made before attach and deallocated into the mseg cache; a pre-attach cached segment
//!     reused by `mseg_alloc`; a pre-attach carrier moved by `mremap`; a literal carrier not
//!     in a mapping seen since attach), is measured at the next sample and its resident bytes
//!     go to the offset of the line it belonged to at attach (the carrier's allocator, or the
//!     mseg cache). From then on only its changes count; when a range moves between lines
//!     (cache -> carrier) the residency moves and the offset stays with the origin: the sum
//!     of the lines is exact, the split says where the memory went. Pages touched between
//!     the event and that sample are counted as pre-attach (they stay `unexplained`).
//!   * **unmapped before measured**: such a range unmapped before any sample saw it left RSS
//!     with its resident pages; they are estimated from a pagemap snapshot of the anonymous
//!     writable mappings taken at attach (without a snapshot: the mapped size).
//!
//! Memory that enters a carrier from malloc (`erts_sys_aligned_alloc`) gets no offset: it was
//! memory outside ERTS carriers before and is inside now, and `unexplained` must show that.
//!
//! Known gaps, all bounded by what existed at attach: pages touched after attach inside
//! pre-attach carriers that do not look like ERTS mappings (malloc-backed main carriers, or a
//! segment whose VMA merged with an unaligned neighbour) count as `unexplained`; pre-attach
//! non-ERTS mappings that happen to be 256 KiB-aligned at both ends are followed as
//! "carriers from before attach" (their growth hidden); a malloc-backed carrier made before
//! attach and freed after (`erts_sys_aligned_free` does not give the size) is not accounted.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use leaktrace_common::{CarrierEvent, CarrierEventKind as K};

use crate::{
    recording::AllocatorCarriers,
    resident::{self, Pagemap, Presence, Range, RangeSet},
};

/// Largest address space the attach snapshot reads (anonymous writable mappings); a node
/// mapping more gets no snapshot (about 3 ms per GiB).
const ATTACH_SNAPSHOT_MAX: u64 = 64 << 30;

/// Who owns a carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CarrierOwner {
    /// An mseg carrier of ERTS allocator number N.
    Mseg(u32),
    /// A malloc-backed carrier (`erts_sys_aligned_alloc`); the allocator is not in the call.
    SysAligned,
    /// A literal_alloc carrier (its own mapper).
    Literal,
    /// Address space that looked like ERTS carriers or cached segments at attach (see
    /// [`erts_like_mappings`]) and no event has named since: carriers made before attach.
    PreAttach,
}

/// A ledger line that resident bytes are attributed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Line {
    /// The carriers of one owner.
    Carriers(CarrierOwner),
    /// Mappings of the default mapper not holding a carrier (the mseg cache).
    MsegCache,
}

/// What one residency measurement cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeasureCost {
    /// Measurements made.
    pub count: u64,
    /// Time of the last one.
    pub last: Duration,
    /// Longest one.
    pub max: Duration,
    /// Address space read by the last one, bytes.
    pub last_bytes: u64,
    /// Ranges in the last one.
    pub last_ranges: usize,
}

/// Resident-bytes state of the ledger (see the module documentation).
#[derive(Debug, Default)]
struct Residency {
    /// Default-mapper mappings known by address: mapped since attach, or pre-attach segments
    /// named by a carrier event. Minus the live carriers, this is the mseg cache.
    segments: RangeSet,
    /// Mappings (both mappers) made since attach, or moved from measured memory, and still
    /// mapped: their pages are not pre-attach memory.
    post_attach: RangeSet,
    /// Pre-attach address space that looked like ERTS mappings at attach and is still mapped.
    pre_attach: RangeSet,
    /// Pre-attach ranges named by an event since the last measurement, with the line they
    /// belonged to at attach. Measured (adopted) at the next measurement.
    pending: Vec<(Range, Line)>,
    /// The ranges measured last time (sorted, disjoint).
    measured: Vec<Range>,
    /// Resident bytes of pre-attach memory that left the unknown part of each line.
    offset: BTreeMap<Line, u64>,
    /// Resident bytes of each line's known ranges at the last measurement.
    resident: BTreeMap<Line, u64>,
    /// Mapped bytes of the mseg cache ranges at the last measurement.
    cache_mapped: u64,
    /// Present pages of the anonymous writable mappings at attach.
    at_attach: Option<Presence>,
    /// Bytes estimated from the attach snapshot (pre-attach segments unmapped unmeasured).
    estimated_unmapped: u64,
    pagemap: Option<Pagemap>,
    /// Why residency could not be measured, if it could not.
    error: Option<String>,
    warned: bool,
    cost: MeasureCost,
}

impl Residency {
    /// A pre-attach range was named by an event: adopt it at the next measurement.
    fn pend(&mut self, r: Range, origin: Line) {
        if r.1 > r.0 {
            self.pending.push((r, origin));
        }
    }

    /// The line a pre-attach range belonged to at attach, as far as events since the last
    /// measurement said (the earliest event naming it wins).
    fn origin_of(&self, r: Range, default: Line) -> Line {
        self.pending
            .iter()
            .find(|((s, e), _)| *s < r.1 && r.0 < *e)
            .map_or(default, |(_, l)| *l)
    }

    /// A default-mapper range named by an mseg carrier event: pre-attach when not known.
    fn learn_segment(&mut self, r: Range, origin: Line) {
        if r.1 <= r.0 || self.segments.covers(r) {
            return;
        }
        for piece in self.segments.missing(r) {
            self.pend(piece, origin);
        }
        self.segments.insert(r);
    }

    fn mapped(&mut self, r: Range, default_mapper: bool) {
        self.pre_attach.remove(r);
        self.post_attach.insert(r);
        if default_mapper {
            self.segments.insert(r);
        }
    }

    fn unmapped(&mut self, r: Range, default_mapper: bool) {
        // Pre-attach memory no sample measured: it leaves RSS with pages we never saw.
        let unseen = resident::subtract(&self.post_attach.missing(r), &self.measured);
        let default = if default_mapper {
            Line::MsegCache
        } else {
            Line::Carriers(CarrierOwner::Literal)
        };
        for piece in unseen {
            let est = match &self.at_attach {
                Some(p) => p.resident_bytes(piece),
                None => piece.1 - piece.0,
            };
            let line = self.origin_of(piece, default);
            *self.offset.entry(line).or_default() += est;
            self.estimated_unmapped += est;
        }
        self.post_attach.remove(r);
        self.pre_attach.remove(r);
        if default_mapper {
            self.segments.remove(r);
        }
    }

    fn remapped(&mut self, old: Range, new: Range, default_mapper: bool) {
        let continuous =
            resident::subtract(&self.post_attach.missing(old), &self.measured).is_empty();
        if !continuous {
            let default = if default_mapper {
                Line::MsegCache
            } else {
                Line::Carriers(CarrierOwner::Literal)
            };
            let origin = self.origin_of(old, default);
            self.pend(new, origin);
        }
        self.post_attach.remove(old);
        self.pre_attach.remove(old);
        self.pre_attach.remove(new);
        if continuous {
            self.post_attach.insert(new);
        }
        if default_mapper {
            self.segments.remove(old);
            self.segments.insert(new);
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    created: u64,
    destroyed: u64,
    net_bytes: i64,
}

/// Running carrier ledger of one target.
#[derive(Debug, Default)]
pub struct CarrierLedger {
    live: HashMap<u64, (CarrierOwner, u64)>,
    totals: BTreeMap<CarrierOwner, Totals>,
    /// Net bytes of OS mappings made with the default mapper since attach.
    os_mapped_net: i64,
    /// Address of `erts_literal_mmapper`, whose mappings are literal carriers, not mseg's.
    literal_mapper: Option<u64>,
    unknown_frees: u64,
    events: u64,
    undecodable: u64,
    res: Residency,
    /// When each carrier seen created was created (`bpf_ktime_get_ns`), for its lifetime.
    born: HashMap<u64, u64>,
    /// Timestamp of the event being applied.
    now_ns: u64,
    /// Sizes of carriers created and lifetimes of carriers destroyed, not yet taken.
    observed: Vec<CarrierObservation>,
    /// Observations past [`MAX_OBSERVED`], not kept.
    dropped_observations: u64,
}

/// Most observations kept between two [`CarrierLedger::take_observations`] (a bound whatever
/// the event rate; past it they are counted in `dropped_observations`).
const MAX_OBSERVED: usize = 1 << 16;

/// A carrier created (its size) or destroyed after being seen created (its lifetime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CarrierObservation {
    /// Created, bytes.
    Size(CarrierOwner, u64),
    /// Destroyed this many microseconds after it was created.
    Lifetime(CarrierOwner, u64),
}

impl CarrierLedger {
    /// A ledger that will tell literal mappings apart once it knows the literal mapper.
    pub fn new() -> CarrierLedger {
        CarrierLedger::default()
    }

    /// Sets the runtime address of `erts_literal_mmapper`.
    pub fn set_literal_mapper(&mut self, addr: u64) {
        self.literal_mapper = Some(addr);
    }

    /// Whether the literal mapper's address is known.
    pub fn knows_literal_mapper(&self) -> bool {
        self.literal_mapper.is_some()
    }

    fn observe(&mut self, o: CarrierObservation) {
        if self.observed.len() < MAX_OBSERVED {
            self.observed.push(o);
        } else {
            self.dropped_observations += 1;
        }
    }

    /// Sizes and lifetimes observed since the last call, and how many were not kept.
    pub fn take_observations(&mut self) -> (Vec<CarrierObservation>, u64) {
        (
            std::mem::take(&mut self.observed),
            std::mem::take(&mut self.dropped_observations),
        )
    }

    /// Carriers seen created and still live: their lifetimes are censored.
    pub fn live_seen_by(&self) -> BTreeMap<CarrierOwner, u64> {
        let mut out: BTreeMap<CarrierOwner, u64> = BTreeMap::new();
        for addr in self.born.keys() {
            if let Some((owner, _)) = self.live.get(addr) {
                *out.entry(*owner).or_default() += 1;
            }
        }
        out
    }

    fn created(&mut self, owner: CarrierOwner, addr: u64, size: u64) {
        self.live.insert(addr, (owner, size));
        self.born.insert(addr, self.now_ns);
        self.observe(CarrierObservation::Size(owner, size));
        let t = self.totals.entry(owner).or_default();
        t.created += 1;
        t.net_bytes += size as i64;
    }

    /// A carrier destroyed. `size` is what the call said (0 = not said: use what we saw).
    /// Returns the size and whether the carrier was seen created, `None` when the size is
    /// unknown.
    fn destroyed(&mut self, owner: CarrierOwner, addr: u64, size: u64) -> Option<(u64, bool)> {
        let seen = self.live.remove(&addr);
        if let Some(b) = self.born.remove(&addr) {
            let us = self.now_ns.saturating_sub(b) / 1000;
            self.observe(CarrierObservation::Lifetime(owner, us));
        }
        let size = match (size, seen) {
            (0, Some((_, s))) => s,
            (0, None) => {
                self.unknown_frees += 1;
                return None;
            }
            (s, _) => s,
        };
        let t = self.totals.entry(owner).or_default();
        t.destroyed += 1;
        t.net_bytes -= size as i64;
        Some((size, seen.is_some()))
    }

    /// A carrier resized; returns the old size and whether the old carrier was seen.
    fn resized(
        &mut self,
        owner: CarrierOwner,
        old_addr: u64,
        old_size: u64,
        addr: u64,
        size: u64,
    ) -> (u64, bool) {
        let seen = self.live.remove(&old_addr);
        if let Some(b) = self.born.remove(&old_addr) {
            self.born.insert(addr, b);
        }
        let old_size = match (old_size, seen) {
            (0, Some((_, s))) => s,
            (s, _) => s,
        };
        self.live.insert(addr, (owner, size));
        self.totals.entry(owner).or_default().net_bytes += size as i64 - old_size as i64;
        (old_size, seen.is_some())
    }

    fn is_literal_mapping(&self, mapper: u64) -> bool {
        self.literal_mapper == Some(mapper)
    }

    /// Applies one probe event.
    pub fn apply(&mut self, ev: &CarrierEvent) {
        self.events += 1;
        self.now_ns = ev.ts_ns;
        let Ok(kind) = K::try_from(ev.kind) else {
            self.undecodable += 1;
            return;
        };
        let range = |addr: u64, size: u64| (addr, addr.saturating_add(size));
        match kind {
            K::MsegAlloc => {
                let owner = CarrierOwner::Mseg(ev.alloc_no);
                // A segment not mapped since attach: a pre-attach cached segment reused.
                self.res
                    .learn_segment(range(ev.addr, ev.size), Line::MsegCache);
                self.created(owner, ev.addr, ev.size);
            }
            K::MsegDealloc => {
                let owner = CarrierOwner::Mseg(ev.alloc_no);
                if let Some((size, _)) = self.destroyed(owner, ev.addr, ev.size) {
                    // Stays mapped (mseg cache) unless an unmap follows; a carrier made
                    // before attach was part of its allocator's line then.
                    self.res
                        .learn_segment(range(ev.addr, size), Line::Carriers(owner));
                }
            }
            K::MsegRealloc => {
                let owner = CarrierOwner::Mseg(ev.alloc_no);
                let (_, old_seen) = self.resized(owner, ev.old_addr, ev.old_size, ev.addr, ev.size);
                let new = range(ev.addr, ev.size);
                self.res.learn_segment(new, Line::Carriers(owner));
                if !old_seen {
                    // The pages moved by the mremap before it belonged to this carrier.
                    for (r, l) in self.res.pending.iter_mut() {
                        if r.0 < new.1 && new.0 < r.1 {
                            *l = Line::Carriers(owner);
                        }
                    }
                }
            }
            K::SysAlignedAlloc => self.created(CarrierOwner::SysAligned, ev.addr, ev.size),
            K::SysAlignedFree => {
                self.destroyed(CarrierOwner::SysAligned, ev.addr, 0);
            }
            K::SysAlignedRealloc => {
                self.resized(
                    CarrierOwner::SysAligned,
                    ev.old_addr,
                    ev.old_size,
                    ev.addr,
                    ev.size,
                );
            }
            K::LiteralAlloc => {
                let r = range(ev.addr, ev.size);
                for piece in self.res.post_attach.missing(r) {
                    self.res.pend(piece, Line::Carriers(CarrierOwner::Literal));
                }
                self.created(CarrierOwner::Literal, ev.addr, ev.size);
            }
            K::LiteralDealloc => {
                if let Some((size, false)) = self.destroyed(CarrierOwner::Literal, ev.addr, ev.size)
                {
                    // Named for the unmap that may follow.
                    self.res
                        .pend(range(ev.addr, size), Line::Carriers(CarrierOwner::Literal));
                }
            }
            K::LiteralRealloc => {
                let (_, old_seen) = self.resized(
                    CarrierOwner::Literal,
                    ev.old_addr,
                    ev.old_size,
                    ev.addr,
                    ev.size,
                );
                let new = range(ev.addr, ev.size);
                if !old_seen {
                    for piece in self.res.post_attach.missing(new) {
                        self.res.pend(piece, Line::Carriers(CarrierOwner::Literal));
                    }
                }
            }
            K::Mmap => {
                let default = !self.is_literal_mapping(ev.mapper);
                if default {
                    self.os_mapped_net += ev.size as i64;
                }
                self.res.mapped(range(ev.addr, ev.size), default);
            }
            K::Munmap => {
                let default = !self.is_literal_mapping(ev.mapper);
                if default {
                    self.os_mapped_net -= ev.size as i64;
                }
                self.res.unmapped(range(ev.addr, ev.size), default);
            }
            K::Mremap => {
                let default = !self.is_literal_mapping(ev.mapper);
                if default {
                    self.os_mapped_net += ev.size as i64 - ev.old_size as i64;
                }
                self.res.remapped(
                    range(ev.old_addr, ev.old_size),
                    range(ev.addr, ev.size),
                    default,
                );
            }
        }
    }

    /// Measures the resident bytes of the known carrier and cached-segment ranges of `pid`
    /// from its pagemap. The first call is the attach: it also snapshots the present pages of
    /// the anonymous writable mappings. Returns false (and keeps the last figures) when the
    /// pagemap cannot be read.
    pub fn measure(&mut self, pid: u32) -> bool {
        if self.res.pagemap.is_none() && self.res.error.is_none() {
            match Pagemap::open(pid) {
                Ok(mut pm) => {
                    let maps = crate::target::maps_text(pid).unwrap_or_default();
                    let anon = resident::parse_anonymous_writable(&maps);
                    self.res.at_attach = Some(anon)
                        .filter(|m| resident::total(m) <= ATTACH_SNAPSHOT_MAX)
                        .and_then(|m| pm.presence(&m).ok());
                    self.set_pre_attach(&erts_like_mappings(&maps));
                    self.res.pagemap = Some(pm);
                }
                Err(e) => self.res.error = Some(format!("/proc/{pid}/pagemap: {e}")),
            }
        }
        let Some(mut pm) = self.res.pagemap.take() else {
            return false;
        };
        let ok = self.measure_with(|ranges| pm.resident_bytes(ranges).ok());
        self.res.pagemap = Some(pm);
        ok
    }

    /// Sets the address space that looks like ERTS carriers and cached segments at attach
    /// (before the first measurement, which adopts its resident bytes as the offset of the
    /// pre-attach line).
    pub fn set_pre_attach(&mut self, ranges: &[Range]) {
        for &r in ranges {
            self.res.pre_attach.insert(r);
            self.res.pend(r, Line::Carriers(CarrierOwner::PreAttach));
        }
    }

    /// Sets the present pages at attach, used to estimate pre-attach segments unmapped before
    /// a measurement saw them.
    pub fn set_attach_presence(&mut self, presence: Presence) {
        self.res.at_attach = Some(presence);
    }

    /// [`CarrierLedger::measure`] with the residency read injected: `read` gives the resident
    /// bytes of each range asked, in order, or `None` when it cannot.
    pub fn measure_with(&mut self, read: impl FnOnce(&[Range]) -> Option<Vec<u64>>) -> bool {
        let t0 = Instant::now();
        let mut carriers: Vec<(Range, CarrierOwner)> = self
            .live
            .iter()
            .map(|(&a, &(o, s))| ((a, a.saturating_add(s)), o))
            .collect();
        carriers.sort_unstable();
        let carrier_union = resident::union(carriers.iter().map(|(r, _)| *r).collect());
        let cache = resident::subtract(&self.res.segments.ranges(), &carrier_union);
        let named = resident::union(carrier_union.iter().chain(&cache).copied().collect());
        let pre = resident::subtract(&self.res.pre_attach.ranges(), &named);
        let known = resident::union(named.iter().chain(&pre).copied().collect());

        // Pre-attach ranges named since the last measurement and still known: adopt them.
        let mut adopted = RangeSet::new();
        let mut adopt: Vec<(Range, Line)> = Vec::new();
        for (r, origin) in std::mem::take(&mut self.res.pending) {
            let inside = resident::subtract(&[r], &resident::subtract(&[r], &known));
            for piece in resident::subtract(&inside, &self.res.measured) {
                for p in adopted.missing(piece) {
                    adopt.push((p, origin));
                }
                adopted.insert(piece);
            }
        }

        let mut ask: Vec<Range> =
            Vec::with_capacity(carriers.len() + cache.len() + pre.len() + adopt.len());
        ask.extend(carriers.iter().map(|(r, _)| *r));
        ask.extend(&cache);
        ask.extend(&pre);
        ask.extend(adopt.iter().map(|(r, _)| *r));
        let Some(got) = read(&ask) else {
            return false;
        };
        if got.len() != ask.len() {
            return false;
        }
        let mut resident: BTreeMap<Line, u64> = BTreeMap::new();
        for ((_, owner), b) in carriers.iter().zip(&got) {
            *resident.entry(Line::Carriers(*owner)).or_default() += b;
        }
        let rest = &got[carriers.len()..];
        resident.insert(Line::MsegCache, rest[..cache.len()].iter().sum());
        let rest = &rest[cache.len()..];
        resident.insert(
            Line::Carriers(CarrierOwner::PreAttach),
            rest[..pre.len()].iter().sum(),
        );
        for ((_, origin), b) in adopt.iter().zip(&rest[pre.len()..]) {
            *self.res.offset.entry(*origin).or_default() += b;
        }
        self.res.resident = resident;
        self.res.cache_mapped = resident::total(&cache);
        self.res.measured = known;
        let took = t0.elapsed();
        let c = &mut self.res.cost;
        c.count += 1;
        c.last = took;
        c.max = c.max.max(took);
        c.last_bytes = resident::total(&ask);
        c.last_ranges = ask.len();
        log::debug!(
            "residency: {} ranges, {} MiB of address space in {:?}",
            c.last_ranges,
            c.last_bytes >> 20,
            took
        );
        true
    }

    /// Resident-bytes line of `line`: resident now minus the offset (see the module docs).
    fn resident_line(&self, line: Line) -> i64 {
        self.res.resident.get(&line).copied().unwrap_or(0) as i64
            - self.res.offset.get(&line).copied().unwrap_or(0) as i64
    }

    /// The ledger's `carriers` line: resident carrier bytes, net since attach, all owners.
    pub fn carriers_resident_net(&self) -> i64 {
        self.resident_lines()
            .filter(|(l, _)| matches!(l, Line::Carriers(_)))
            .map(|(_, v)| v)
            .sum()
    }

    /// The ledger's `mseg_cache` line: resident bytes of the default mapper's mappings not
    /// holding a carrier, net since attach.
    pub fn mseg_cache_resident_net(&self) -> i64 {
        self.resident_line(Line::MsegCache)
    }

    /// Every line with a value (resident or offset), resident net bytes.
    fn resident_lines(&self) -> impl Iterator<Item = (Line, i64)> + '_ {
        let mut lines: Vec<Line> = self
            .res
            .resident
            .keys()
            .chain(self.res.offset.keys())
            .copied()
            .collect();
        lines.sort_unstable();
        lines.dedup();
        lines.into_iter().map(|l| (l, self.resident_line(l)))
    }

    /// Resident net carrier bytes by owner name (the `carriers_by_allocator` breakdown).
    pub fn resident_by_name(&self, name: impl Fn(CarrierOwner) -> String) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for owner in self.totals.keys() {
            out.entry(name(*owner)).or_insert(0);
        }
        for (line, v) in self.resident_lines() {
            if let Line::Carriers(owner) = line {
                *out.entry(name(owner)).or_insert(0) += v;
            }
        }
        out
    }

    /// Resident bytes of the known carriers now (no offsets), all owners.
    pub fn carriers_resident(&self) -> u64 {
        self.res
            .resident
            .iter()
            .filter(|(l, _)| matches!(l, Line::Carriers(_)))
            .map(|(_, v)| v)
            .sum()
    }

    /// Mapped bytes of the live carriers known by address.
    pub fn carriers_mapped(&self) -> u64 {
        self.live.values().map(|(_, s)| s).sum()
    }

    /// Resident and mapped bytes of the cached segments known by address, at the last
    /// measurement.
    pub fn mseg_cache_known(&self) -> (u64, u64) {
        (
            self.res
                .resident
                .get(&Line::MsegCache)
                .copied()
                .unwrap_or(0),
            self.res.cache_mapped,
        )
    }

    /// Bytes of pre-attach segments unmapped before a sample measured them, as estimated.
    pub fn estimated_unmapped(&self) -> u64 {
        self.res.estimated_unmapped
    }

    /// Why residency is not measured, if it is not.
    pub fn residency_error(&self) -> Option<&str> {
        self.res.error.as_deref()
    }

    /// Why residency is not measured, once: `None` on later calls.
    pub fn take_residency_warning(&mut self) -> Option<String> {
        if self.res.warned {
            return None;
        }
        self.res.warned = true;
        Some(
            self.res
                .error
                .clone()
                .unwrap_or_else(|| "reading the target's pagemap failed".into()),
        )
    }

    /// What the residency measurements cost.
    pub fn measure_cost(&self) -> MeasureCost {
        self.res.cost
    }

    /// Net carrier bytes since attach, all owners (mapped sizes).
    pub fn carriers_net(&self) -> i64 {
        self.totals.values().map(|t| t.net_bytes).sum()
    }

    /// OS mappings of the default mapper not holding an mseg carrier, net since attach (mapped
    /// sizes): mseg keeps deallocated carriers mapped in its cache, and a cache hit maps
    /// nothing.
    pub fn mseg_cache_net(&self) -> i64 {
        let mseg: i64 = self
            .totals
            .iter()
            .filter(|(o, _)| matches!(o, CarrierOwner::Mseg(_)))
            .map(|(_, t)| t.net_bytes)
            .sum();
        self.os_mapped_net - mseg
    }

    /// Frees of carriers whose size we never learned (made before attach, size not in the call).
    pub fn unknown_frees(&self) -> u64 {
        self.unknown_frees
    }

    /// Events applied.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Events of an unknown kind (a version mismatch between programs and userspace).
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    /// Allocator numbers seen in mseg events.
    pub fn mseg_allocators(&self) -> impl Iterator<Item = u32> + '_ {
        self.totals.keys().filter_map(|o| match o {
            CarrierOwner::Mseg(n) => Some(*n),
            _ => None,
        })
    }

    /// Net bytes by owner name (mapped sizes).
    pub fn net_by_name(&self, name: impl Fn(CarrierOwner) -> String) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for (owner, t) in &self.totals {
            *out.entry(name(*owner)).or_insert(0) += t.net_bytes;
        }
        out
    }

    /// Per-owner totals for the recording.
    pub fn allocators(&self, name: impl Fn(CarrierOwner) -> String) -> Vec<AllocatorCarriers> {
        self.totals
            .iter()
            .map(|(owner, t)| {
                let (live_seen, live_seen_bytes) = self
                    .live
                    .values()
                    .filter(|(o, _)| o == owner)
                    .fold((0, 0), |(n, b), (_, s)| (n + 1, b + s));
                AllocatorCarriers {
                    name: name(*owner),
                    created: t.created,
                    destroyed: t.destroyed,
                    net_bytes: t.net_bytes,
                    live_seen,
                    live_seen_bytes,
                }
            })
            .collect()
    }
}

/// Alignment of ERTS mseg segments on 64-bit (`ERTS_SUPERALIGNED_SIZE`, 256 KiB): both ends
/// of every segment the default and literal mappers make are multiples of it.
pub const ERTS_SEGMENT_ALIGN: u64 = 1 << 18;

// glibc's `HEAP_MAX_SIZE` on 64-bit: malloc arenas other than the main one are heaps of this
// size, aligned to it.
use crate::target::glibc_heap::HEAP_MAX as GLIBC_HEAP_MAX;

/// The anonymous writable mappings of a `/proc/PID/maps` text that look like ERTS carriers
/// or cached segments made before attach: both ends aligned to [`ERTS_SEGMENT_ALIGN`]
/// (adjacent segments merge into one VMA, which keeps that property), not `[heap]` or
/// `[stack]`, and not a glibc arena heap (aligned to 64 MiB, and either 64 MiB long or
/// followed by its inaccessible reserve up to the next 64 MiB). Thread stacks, malloc's
/// mmapped chunks and the rest of what a NIF maps are page-aligned but almost never
/// 256 KiB-aligned at both ends.
/// ERTS ranges of `pid` told by that shape: carriers and cached segments together, by no
/// allocator (the VM's own carrier sizes by allocator stand beside them in the report).
pub fn erts_ranges_by_shape(maps: &str) -> crate::target::breakdown::ErtsRanges {
    crate::target::breakdown::ErtsRanges {
        carriers: erts_like_mappings(maps)
            .into_iter()
            .map(|r| (String::new(), r))
            .collect(),
        mseg_cache: Vec::new(),
        mseg_known: false,
        known: true,
    }
}

/// Address ranges shaped like ERTS carriers and cached segments (see [`erts_ranges_by_shape`]).
pub fn erts_like_mappings(maps: &str) -> Vec<Range> {
    struct Vma {
        s: u64,
        e: u64,
        rw_anon: bool,
        reserve: bool,
    }
    let vmas: Vec<Vma> = maps
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (s, e) = f.next()?.split_once('-')?;
            let perms = f.next()?;
            let path = f.nth(3).unwrap_or("");
            Some(Vma {
                s: u64::from_str_radix(s, 16).ok()?,
                e: u64::from_str_radix(e, 16).ok()?,
                rw_anon: perms.starts_with("rw") && perms.ends_with('p') && path.is_empty(),
                reserve: perms == "---p" && path.is_empty(),
            })
        })
        .collect();
    let mut out = Vec::new();
    for (i, v) in vmas.iter().enumerate() {
        if !v.rw_anon || v.s % ERTS_SEGMENT_ALIGN != 0 || v.e % ERTS_SEGMENT_ALIGN != 0 {
            continue;
        }
        let arena = v.s % GLIBC_HEAP_MAX == 0
            && (v.e - v.s == GLIBC_HEAP_MAX
                || vmas
                    .get(i + 1)
                    .is_some_and(|n| n.reserve && n.s == v.e && n.e == v.s + GLIBC_HEAP_MAX));
        if !arena {
            out.push((v.s, v.e));
        }
    }
    out
}

/// Names carrier owners; mseg allocator numbers through the VM's own table when read.
#[derive(Clone, Debug, Default)]
pub struct OwnerNames {
    /// `erts_alc_a2ad` as read from the target, by allocator number.
    pub by_number: Vec<Option<String>>,
}

impl OwnerNames {
    /// Display name of an owner: "ets_alloc", "sys_aligned (malloc-backed)", "literal_alloc".
    pub fn name(&self, owner: CarrierOwner) -> String {
        match owner {
            CarrierOwner::Mseg(n) => self
                .by_number
                .get(n as usize)
                .cloned()
                .flatten()
                .unwrap_or_else(|| format!("allocator#{n}")),
            CarrierOwner::SysAligned => "sys_aligned (malloc-backed carriers)".into(),
            CarrierOwner::Literal => "literal_alloc".into(),
            CarrierOwner::PreAttach => "carriers from before attach (not yet named)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: K, alloc_no: u32, addr: u64, size: u64) -> CarrierEvent {
        CarrierEvent {
            kind: kind as u32,
            alloc_no,
            addr,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn mseg_alloc_and_dealloc_balance() {
        let mut l = CarrierLedger::new();
        l.apply(&ev(K::MsegAlloc, 5, 0x1000, 1 << 20));
        l.apply(&ev(K::MsegAlloc, 5, 0x2000, 1 << 20));
        assert_eq!(l.carriers_net(), 2 << 20);
        l.apply(&ev(K::MsegDealloc, 5, 0x1000, 1 << 20));
        assert_eq!(l.carriers_net(), 1 << 20);
        let a = l.allocators(|o| format!("{o:?}"));
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].created, a[0].destroyed, a[0].live_seen), (2, 1, 1));
    }

    #[test]
    fn carrier_made_before_attach_is_accounted_from_its_dealloc_size() {
        let mut l = CarrierLedger::new();
        l.apply(&ev(K::MsegDealloc, 7, 0x9000, 256 << 10));
        assert_eq!(l.carriers_net(), -(256 << 10));
        assert_eq!(l.unknown_frees(), 0);
    }

    #[test]
    fn aligned_free_of_unknown_carrier_is_counted_not_guessed() {
        let mut l = CarrierLedger::new();
        l.apply(&ev(K::SysAlignedFree, u32::MAX, 0x5000, 0));
        assert_eq!(l.carriers_net(), 0);
        assert_eq!(l.unknown_frees(), 1);
        l.apply(&ev(K::SysAlignedAlloc, u32::MAX, 0x6000, 4096));
        l.apply(&ev(K::SysAlignedFree, u32::MAX, 0x6000, 0));
        assert_eq!(l.carriers_net(), 0);
        assert_eq!(l.unknown_frees(), 1);
    }

    #[test]
    fn mseg_cache_is_mappings_minus_carriers() {
        let mut l = CarrierLedger::new();
        l.set_literal_mapper(0xdead);
        let mmap = |addr, size| CarrierEvent {
            mapper: 0xbeef,
            ..ev(K::Mmap, u32::MAX, addr, size)
        };
        // A carrier created with a fresh mapping: no cache.
        l.apply(&mmap(0x10000, 1 << 20));
        l.apply(&ev(K::MsegAlloc, 2, 0x10000, 1 << 20));
        assert_eq!(l.mseg_cache_net(), 0);
        // Deallocated into the cache: still mapped.
        l.apply(&ev(K::MsegDealloc, 2, 0x10000, 1 << 20));
        assert_eq!(l.mseg_cache_net(), 1 << 20);
        // A literal mapping does not count as mseg cache.
        l.apply(&CarrierEvent {
            mapper: 0xdead,
            ..ev(K::Mmap, u32::MAX, 0x90000, 1 << 20)
        });
        assert_eq!(l.mseg_cache_net(), 1 << 20);
        // Cache hit: the same carrier comes back without a mapping.
        l.apply(&ev(K::MsegAlloc, 2, 0x10000, 1 << 20));
        assert_eq!(l.mseg_cache_net(), 0);
    }

    #[test]
    fn realloc_moves_and_resizes() {
        let mut l = CarrierLedger::new();
        l.apply(&ev(K::MsegAlloc, 3, 0x1000, 4096));
        l.apply(&CarrierEvent {
            old_addr: 0x1000,
            old_size: 4096,
            ..ev(K::MsegRealloc, 3, 0x8000, 16384)
        });
        assert_eq!(l.carriers_net(), 16384);
        l.apply(&ev(K::MsegDealloc, 3, 0x8000, 16384));
        assert_eq!(l.carriers_net(), 0);
    }

    #[test]
    fn unknown_kind_is_counted() {
        let mut l = CarrierLedger::new();
        l.apply(&CarrierEvent {
            kind: 999,
            ..Default::default()
        });
        assert_eq!(l.undecodable(), 1);
    }

    // ---- resident lines: a simulated address space ----

    const PAGE: u64 = 4096;
    const MIB: u64 = 1 << 20;
    /// 256 KiB-aligned addresses, like mseg segments.
    const A: u64 = 0x7f00_0000_0000;
    const B: u64 = 0x7f00_1000_0000;
    /// Not 256 KiB-aligned: outside what looks like ERTS at attach.
    const U: u64 = 0x7f00_2000_3000;

    /// Resident pages of a simulated process.
    #[derive(Default)]
    struct Mem {
        pages: std::collections::BTreeSet<u64>,
    }

    impl Mem {
        fn touch(&mut self, at: u64, len: u64) {
            self.pages.extend(at / PAGE..(at + len).div_ceil(PAGE));
        }

        fn unmap(&mut self, at: u64, len: u64) {
            for p in at / PAGE..(at + len).div_ceil(PAGE) {
                self.pages.remove(&p);
            }
        }

        fn rss(&self) -> i64 {
            (self.pages.len() as u64 * PAGE) as i64
        }

        fn read(&self, ranges: &[Range]) -> Option<Vec<u64>> {
            Some(
                ranges
                    .iter()
                    .map(|&(s, e)| {
                        self.pages.range(s / PAGE..e.div_ceil(PAGE)).count() as u64 * PAGE
                    })
                    .collect(),
            )
        }
    }

    /// A ledger attached to a simulated process; `unexplained` as the ledger computes it.
    struct Run {
        l: CarrierLedger,
        mem: Mem,
        baseline: i64,
    }

    impl Run {
        fn attach(mem: Mem, erts_like: &[Range]) -> Run {
            let mut l = CarrierLedger::new();
            l.set_literal_mapper(0xdead);
            l.set_pre_attach(erts_like);
            let pages: Vec<u64> = mem.pages.iter().copied().collect();
            l.set_attach_presence(Presence::from_present_pages(PAGE, &pages));
            let mut r = Run {
                l,
                baseline: mem.rss(),
                mem,
            };
            assert_eq!(r.sample(), 0);
            assert_eq!(r.l.carriers_resident_net(), 0);
            r
        }

        /// Measures; returns `unexplained`.
        fn sample(&mut self) -> i64 {
            let mem = &self.mem;
            assert!(self.l.measure_with(|r| mem.read(r)));
            self.mem.rss()
                - self.baseline
                - self.l.carriers_resident_net()
                - self.l.mseg_cache_resident_net()
        }

        fn ev(&mut self, e: CarrierEvent) {
            self.l.apply(&e);
        }
    }

    fn mmap(addr: u64, size: u64) -> CarrierEvent {
        CarrierEvent {
            mapper: 0xbeef,
            ..ev(K::Mmap, u32::MAX, addr, size)
        }
    }

    fn munmap(addr: u64, size: u64) -> CarrierEvent {
        CarrierEvent {
            mapper: 0xbeef,
            ..ev(K::Munmap, u32::MAX, addr, size)
        }
    }

    #[test]
    fn fresh_carrier_counts_its_touched_pages_not_its_size() {
        let mut mem = Mem::default();
        mem.touch(0x5000_0000, 20 * MIB); // the rest of the process
        let mut r = Run::attach(mem, &[]);
        r.ev(mmap(A, 8 * MIB));
        r.ev(ev(K::MsegAlloc, 5, A, 8 * MIB));
        r.mem.touch(A, MIB);
        assert_eq!(r.sample(), 0);
        assert_eq!(r.l.carriers_resident_net(), MIB as i64);
        // The mapped line would say 8 MiB and push unexplained to -7 MiB.
        assert_eq!(r.l.carriers_net(), 8 * MIB as i64);
        r.mem.touch(A + MIB, 4 * MIB);
        assert_eq!(r.sample(), 0);
        assert_eq!(r.l.carriers_resident_net(), 5 * MIB as i64);
        // Into the cache, reused, then unmapped.
        r.ev(ev(K::MsegDealloc, 5, A, 8 * MIB));
        assert_eq!(r.sample(), 0);
        assert_eq!(r.l.mseg_cache_known(), (5 * MIB, 8 * MIB));
        assert_eq!(
            (r.l.carriers_resident_net(), r.l.mseg_cache_resident_net()),
            (0, 5 * MIB as i64)
        );
        r.ev(ev(K::MsegAlloc, 6, A, 8 * MIB));
        assert_eq!(r.sample(), 0);
        r.ev(ev(K::MsegDealloc, 6, A, 8 * MIB));
        r.ev(munmap(A, 8 * MIB));
        r.mem.unmap(A, 8 * MIB);
        assert_eq!(r.sample(), 0);
        assert_eq!(
            r.l.carriers_resident_net() + r.l.mseg_cache_resident_net(),
            0
        );
        // A native allocation outside carriers is what is left unexplained.
        r.mem.touch(0x6000_0000, 3 * MIB);
        assert_eq!(r.sample(), 3 * MIB as i64);
    }

    #[test]
    fn pre_attach_carrier_that_looks_like_erts_is_followed_from_attach() {
        let mut mem = Mem::default();
        mem.touch(A, 2 * MIB); // a pre-attach carrier of 8 MiB, 2 MiB touched
        let mut r = Run::attach(mem, &[(A, A + 8 * MIB)]);
        // It fills up before any event names it.
        r.mem.touch(A + 2 * MIB, 3 * MIB);
        assert_eq!(r.sample(), 0);
        let names = |o: CarrierOwner| format!("{o:?}");
        assert_eq!(r.l.resident_by_name(names)["PreAttach"], 3 * MIB as i64);
        // Deallocated into the mseg cache: the memory moves from the carriers to the cache.
        r.ev(ev(K::MsegDealloc, 5, A, 8 * MIB));
        assert_eq!(r.sample(), 0);
        assert_eq!(r.l.carriers_resident_net(), -2 * MIB as i64);
        assert_eq!(r.l.mseg_cache_resident_net(), 5 * MIB as i64);
        // Unmapped: what was resident at attach leaves RSS below the baseline.
        r.ev(munmap(A, 8 * MIB));
        r.mem.unmap(A, 8 * MIB);
        assert_eq!(r.sample(), 0);
        assert_eq!(
            r.l.estimated_unmapped(),
            0,
            "it was measured, nothing to estimate"
        );
    }

    #[test]
    fn pre_attach_segment_named_by_an_event_is_adopted_at_its_residency() {
        let mut mem = Mem::default();
        mem.touch(U, 3 * MIB); // pre-attach carrier of 4 MiB, not recognised at attach
        mem.touch(B, MIB); // pre-attach cached segment of 2 MiB, not recognised either
        let mut r = Run::attach(mem, &[]);
        r.ev(ev(K::MsegDealloc, 7, U, 4 * MIB));
        assert_eq!(r.sample(), 0);
        // Attach-time residency is the offset of the allocator's line: the carrier left it.
        assert_eq!(r.l.carriers_resident_net(), -3 * MIB as i64);
        assert_eq!(r.l.mseg_cache_resident_net(), 3 * MIB as i64);
        // A cache hit on the other segment moves its resident bytes from the cache line.
        r.ev(ev(K::MsegAlloc, 7, B, 2 * MIB));
        r.mem.touch(B + MIB, MIB / 2);
        // The one error of adoption: pages touched between the event and the measurement
        // count as pre-attach residency, and stay unexplained.
        let half = MIB as i64 / 2;
        assert_eq!(r.sample(), half, "touched before its first measurement");
        r.mem.touch(B + MIB + MIB / 2, MIB / 2);
        assert_eq!(r.sample(), half, "pages touched later are counted");
        assert_eq!(r.l.carriers_resident_net(), 2 * MIB as i64 - 3 * MIB as i64);
        assert_eq!(r.l.mseg_cache_resident_net(), 3 * MIB as i64 - 3 * half);
    }

    #[test]
    fn pre_attach_segment_unmapped_unmeasured_is_estimated_from_the_attach_snapshot() {
        let mut mem = Mem::default();
        mem.touch(U, 3 * MIB);
        let mut r = Run::attach(mem, &[]);
        r.ev(ev(K::MsegDealloc, 7, U, 4 * MIB));
        r.ev(munmap(U, 4 * MIB));
        r.mem.unmap(U, 4 * MIB);
        assert_eq!(r.sample(), 0);
        assert_eq!(r.l.estimated_unmapped(), 3 * MIB);
        let names = |o: CarrierOwner| format!("{o:?}");
        assert_eq!(r.l.resident_by_name(names)["Mseg(7)"], -3 * MIB as i64);
        // Without a snapshot the mapped size is the estimate.
        let mut l = CarrierLedger::new();
        l.apply(&ev(K::MsegDealloc, 7, U, 4 * MIB));
        l.apply(&munmap(U, 4 * MIB));
        assert!(l.measure_with(|r| Some(vec![0; r.len()])));
        assert_eq!(l.carriers_resident_net(), -4 * MIB as i64);
    }

    #[test]
    fn malloc_backed_carrier_takes_resident_memory_from_outside_carriers() {
        let mut mem = Mem::default();
        mem.touch(U, 2 * MIB); // free malloc memory, resident
        let mut r = Run::attach(mem, &[]);
        r.ev(ev(K::SysAlignedAlloc, u32::MAX, U, MIB));
        // The memory is inside a carrier now: less is outside carriers than at attach.
        assert_eq!(r.sample(), -(MIB as i64));
        r.ev(ev(K::SysAlignedFree, u32::MAX, U, 0));
        assert_eq!(r.sample(), 0);
    }

    #[test]
    fn remapped_carrier_keeps_its_pages() {
        let mut r = Run::attach(Mem::default(), &[]);
        r.ev(mmap(A, MIB));
        r.ev(ev(K::MsegAlloc, 3, A, MIB));
        r.mem.touch(A, MIB);
        assert_eq!(r.sample(), 0);
        // mremap moves the pages to B and grows the mapping.
        r.ev(CarrierEvent {
            mapper: 0xbeef,
            old_addr: A,
            old_size: MIB,
            ..ev(K::Mremap, u32::MAX, B, 4 * MIB)
        });
        r.ev(CarrierEvent {
            old_addr: A,
            old_size: MIB,
            ..ev(K::MsegRealloc, 3, B, 4 * MIB)
        });
        r.mem.unmap(A, MIB);
        r.mem.touch(B, 2 * MIB);
        assert_eq!(r.sample(), 0);
        assert_eq!(r.l.carriers_resident_net(), 2 * MIB as i64);
    }

    #[test]
    fn erts_like_mappings_are_aligned_anonymous_and_not_arenas() {
        let maps = "\
55c7f71b6000-55c7f71f4000 rw-p 00000000 00:00 0
55c81227d000-55c8124d8000 rw-p 00000000 00:00 0                          [heap]
7fbb84800000-7fbc4c000000 rw-p 00000000 00:00 0
7fbc4c000000-7fbc4c040000 rw-p 00000000 00:00 0
7fbc4c040000-7fbc50000000 ---p 00000000 00:00 0
7fbc88400000-7fbc89800000 rw-p 00000000 00:00 0
7fbc8a868000-7fbc8a968000 rw-p 00000000 00:00 0
7fbc8ab68000-7fbc8ab69000 ---p 00000000 00:00 0
7fbc8ab69000-7fbc8abbb000 rw-p 00000000 00:00 0
7fbc90000000-7fbc94000000 rw-p 00000000 00:00 0
7fbc98000000-7fbc98040000 r--p 00000000 fe:00 746313   /usr/lib/erlang/bin/beam.smp
";
        assert_eq!(
            erts_like_mappings(maps),
            vec![
                (0x7fbb84800000, 0x7fbc4c000000),
                (0x7fbc88400000, 0x7fbc89800000)
            ]
        );
    }

    #[test]
    fn owner_names_fall_back_to_numbers() {
        let names = OwnerNames {
            by_number: vec![None, Some("sys_alloc".into()), Some("temp_alloc".into())],
        };
        assert_eq!(names.name(CarrierOwner::Mseg(2)), "temp_alloc");
        assert_eq!(names.name(CarrierOwner::Mseg(9)), "allocator#9");
    }

    #[test]
    fn carrier_sizes_and_lifetimes_are_observed_once_each() {
        let mut l = CarrierLedger::new();
        let at = |kind, addr, size, ms: u64| CarrierEvent {
            ts_ns: ms * 1_000_000,
            ..ev(kind, 6, addr, size)
        };
        l.apply(&at(K::MsegAlloc, 0x1000, 1 << 20, 10));
        l.apply(&at(K::MsegAlloc, 0x9000, 1 << 18, 12));
        l.apply(&at(K::MsegDealloc, 0x1000, 1 << 20, 35));
        // A carrier from before attach: no lifetime.
        l.apply(&at(K::MsegDealloc, 0x5000, 1 << 20, 36));
        let (seen, dropped) = l.take_observations();
        let owner = CarrierOwner::Mseg(6);
        assert_eq!(
            seen,
            vec![
                CarrierObservation::Size(owner, 1 << 20),
                CarrierObservation::Size(owner, 1 << 18),
                CarrierObservation::Lifetime(owner, 25_000),
            ]
        );
        assert_eq!(dropped, 0);
        assert!(l.take_observations().0.is_empty());
        assert_eq!(l.live_seen_by().get(&owner), Some(&1));
    }
}
