//! Carrier accounting from probe events: live carriers by address, net bytes per allocator
//! since attach, and the OS mappings under them (whose surplus is the mseg cache).

use std::collections::{BTreeMap, HashMap};

use leaktrace_common::{CarrierEvent, CarrierEventKind as K};

use crate::recording::AllocatorCarriers;

/// Who owns a carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CarrierOwner {
    /// An mseg carrier of ERTS allocator number N.
    Mseg(u32),
    /// A malloc-backed carrier (`erts_sys_aligned_alloc`); the allocator is not in the call.
    SysAligned,
    /// A literal_alloc carrier (its own mapper).
    Literal,
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

    fn created(&mut self, owner: CarrierOwner, addr: u64, size: u64) {
        self.live.insert(addr, (owner, size));
        let t = self.totals.entry(owner).or_default();
        t.created += 1;
        t.net_bytes += size as i64;
    }

    /// A carrier destroyed. `size` is what the call said (0 = not said: use what we saw).
    fn destroyed(&mut self, owner: CarrierOwner, addr: u64, size: u64) {
        let seen = self.live.remove(&addr);
        let size = match (size, seen) {
            (0, Some((_, s))) => s,
            (0, None) => {
                self.unknown_frees += 1;
                return;
            }
            (s, _) => s,
        };
        let t = self.totals.entry(owner).or_default();
        t.destroyed += 1;
        t.net_bytes -= size as i64;
    }

    fn resized(&mut self, owner: CarrierOwner, old_addr: u64, old_size: u64, addr: u64, size: u64) {
        let old_size = match (old_size, self.live.remove(&old_addr)) {
            (0, Some((_, s))) => s,
            (s, _) => s,
        };
        self.live.insert(addr, (owner, size));
        self.totals.entry(owner).or_default().net_bytes += size as i64 - old_size as i64;
    }

    fn is_literal_mapping(&self, mapper: u64) -> bool {
        self.literal_mapper == Some(mapper)
    }

    /// Applies one probe event.
    pub fn apply(&mut self, ev: &CarrierEvent) {
        self.events += 1;
        let Ok(kind) = K::try_from(ev.kind) else {
            self.undecodable += 1;
            return;
        };
        match kind {
            K::MsegAlloc => self.created(CarrierOwner::Mseg(ev.alloc_no), ev.addr, ev.size),
            K::MsegDealloc => self.destroyed(CarrierOwner::Mseg(ev.alloc_no), ev.addr, ev.size),
            K::MsegRealloc => self.resized(
                CarrierOwner::Mseg(ev.alloc_no),
                ev.old_addr,
                ev.old_size,
                ev.addr,
                ev.size,
            ),
            K::SysAlignedAlloc => self.created(CarrierOwner::SysAligned, ev.addr, ev.size),
            K::SysAlignedFree => self.destroyed(CarrierOwner::SysAligned, ev.addr, 0),
            K::SysAlignedRealloc => self.resized(
                CarrierOwner::SysAligned,
                ev.old_addr,
                ev.old_size,
                ev.addr,
                ev.size,
            ),
            K::LiteralAlloc => self.created(CarrierOwner::Literal, ev.addr, ev.size),
            K::LiteralDealloc => self.destroyed(CarrierOwner::Literal, ev.addr, ev.size),
            K::LiteralRealloc => self.resized(
                CarrierOwner::Literal,
                ev.old_addr,
                ev.old_size,
                ev.addr,
                ev.size,
            ),
            K::Mmap if !self.is_literal_mapping(ev.mapper) => self.os_mapped_net += ev.size as i64,
            K::Munmap if !self.is_literal_mapping(ev.mapper) => {
                self.os_mapped_net -= ev.size as i64
            }
            K::Mremap if !self.is_literal_mapping(ev.mapper) => {
                self.os_mapped_net += ev.size as i64 - ev.old_size as i64
            }
            K::Mmap | K::Munmap | K::Mremap => {}
        }
    }

    /// Net carrier bytes since attach, all owners.
    pub fn carriers_net(&self) -> i64 {
        self.totals.values().map(|t| t.net_bytes).sum()
    }

    /// OS mappings of the default mapper not holding an mseg carrier, net since attach: mseg
    /// keeps deallocated carriers mapped in its cache, and a cache hit maps nothing.
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

    /// Net bytes by owner name.
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

    #[test]
    fn owner_names_fall_back_to_numbers() {
        let names = OwnerNames {
            by_number: vec![None, Some("sys_alloc".into()), Some("temp_alloc".into())],
        };
        assert_eq!(names.name(CarrierOwner::Mseg(2)), "temp_alloc");
        assert_eq!(names.name(CarrierOwner::Mseg(9)), "allocator#9");
    }
}
