//! The ledger: what the OS says the target holds (procfs) beside what the probes account for,
//! sampled every interval. The arithmetic is pure and tested; reading procfs is one function.

use std::collections::BTreeMap;

use crate::recording::Sample;

/// Resident memory of a process, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rss {
    /// VmRSS.
    pub rss: u64,
    /// RssAnon.
    pub anon: u64,
    /// RssFile + RssShmem.
    pub file: u64,
    /// The memory cgroup's figures at the same instant (all `None` without a cgroup of its own).
    pub cgroup: crate::cgroup::Figures,
}

/// Reads the RSS of `pid`, and its memory cgroup's figures beside it. `None` once the process
/// is gone or a zombie (no memory lines).
pub fn read_rss(pid: u32) -> Option<Rss> {
    let status = procfs::process::Process::new(pid as i32)
        .ok()?
        .status()
        .ok()?;
    let kib = |v: Option<u64>| v.map(|k| k * 1024);
    Some(Rss {
        rss: kib(status.vmrss)?,
        anon: kib(status.rssanon)?,
        file: kib(status.rssfile)?.saturating_add(kib(status.rssshmem).unwrap_or(0)),
        cgroup: crate::cgroup::read(pid),
    })
}

/// Peak RSS (VmHWM) of this process, bytes.
pub fn own_peak_rss() -> u64 {
    procfs::process::Process::myself()
        .ok()
        .and_then(|p| p.status().ok())
        .and_then(|s| s.vmhwm)
        .map_or(0, |k| k * 1024)
}

/// What the probes account for at one instant (changes since attach).
///
/// `carriers` and `mseg_cache` are *resident* bytes (present pages of exactly the carrier and
/// cached-segment ranges, from `/proc/PID/pagemap`), net since attach, so that they compare
/// with `rss_anon - baseline`: a carrier mapped but not yet touched adds nothing to RSS and
/// nothing here. The mapped sizes stay in [`crate::carriers::CarrierLedger`]
/// (`carriers_net`, `mseg_cache_net`). How carriers made before attach are handled is
/// described in [`crate::carriers`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accounted {
    /// Net resident carrier bytes, `None` when carrier probes are off or residency could not
    /// be read.
    pub carriers: Option<i64>,
    /// Net resident mseg cache bytes, `None` like `carriers`.
    pub mseg_cache: Option<i64>,
    /// Net native bytes outstanding, `None` when native probes are off.
    pub native_outstanding: Option<i64>,
    /// Net resident carrier bytes per allocator name (sums to `carriers`).
    pub carriers_by_allocator: BTreeMap<String, i64>,
    /// Net mapped carrier bytes (created minus destroyed), `None` when carrier probes are off:
    /// compared with the VM's own `carriers_size`, which is mapped too.
    pub carriers_mapped: Option<i64>,
}

/// Builds one sample: `unexplained = rss_anon - baseline - carriers - mseg_cache - native`,
/// computed only from lines that were measured (a missing line counts as not explaining anything).
/// With resident `carriers` and `mseg_cache`, `unexplained` is the change since attach of the
/// resident anonymous memory outside ERTS carriers and the mseg cache (and outside tracked
/// native allocations).
pub fn sample(t_s: f64, rss: Rss, baseline: u64, acc: Accounted) -> Sample {
    let explained = acc.carriers.unwrap_or(0)
        + acc.mseg_cache.unwrap_or(0)
        + acc.native_outstanding.unwrap_or(0);
    Sample {
        t_s,
        rss: Some(rss.rss),
        rss_anon: Some(rss.anon),
        rss_file: Some(rss.file),
        carriers: acc.carriers,
        mseg_cache: acc.mseg_cache,
        vm_used: None,
        vm_allocated: None,
        native_outstanding: acc.native_outstanding,
        baseline: Some(baseline),
        unexplained: Some(rss.anon as i64 - baseline as i64 - explained),
        carriers_by_allocator: acc.carriers_by_allocator,
        carriers_mapped: acc.carriers_mapped,
        cgroup_memory: rss.cgroup.memory,
        cgroup_anon: rss.cgroup.anon,
        cgroup_file: rss.cgroup.file,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unexplained_is_anon_growth_minus_accounted_lines() {
        let rss = Rss {
            rss: 300 << 20,
            anon: 250 << 20,
            file: 50 << 20,
            ..Default::default()
        };
        let s = sample(
            3.0,
            rss,
            200 << 20,
            Accounted {
                carriers: Some(30 << 20),
                mseg_cache: Some(5 << 20),
                native_outstanding: None,
                ..Default::default()
            },
        );
        assert_eq!(s.unexplained, Some(15 << 20));
        assert_eq!(s.cgroup_memory, None, "no cgroup read: null, never 0");
        let figures = crate::cgroup::Figures {
            memory: Some(400 << 20),
            anon: Some(260 << 20),
            file: Some(120 << 20),
        };
        let s = sample(
            1.0,
            Rss {
                cgroup: figures,
                ..rss
            },
            200 << 20,
            Accounted::default(),
        );
        assert_eq!(
            (s.cgroup_memory, s.cgroup_anon, s.cgroup_file),
            (figures.memory, figures.anon, figures.file)
        );
        assert_eq!(s.native_outstanding, None, "unmeasured stays null, never 0");
        assert_eq!(s.vm_used, None);
    }

    #[test]
    fn resident_lines_keep_unexplained_flat_while_a_carrier_fills() {
        // At attach: 100 MiB anonymous. A 16 MiB carrier is mapped, then filled 4 MiB at a
        // time; RSS follows the touched pages, and so does the resident carriers line.
        let baseline = 100u64 << 20;
        for touched in [0u64, 4, 8, 12, 16] {
            let anon = baseline + (touched << 20);
            let rss = Rss {
                rss: anon + (30 << 20),
                anon,
                file: 30 << 20,
                ..Default::default()
            };
            let resident = Accounted {
                carriers: Some((touched << 20) as i64),
                mseg_cache: Some(0),
                ..Default::default()
            };
            assert_eq!(sample(1.0, rss, baseline, resident).unexplained, Some(0));
            // What the mapped size did: drift below zero by the untouched part.
            let mapped = Accounted {
                carriers: Some(16 << 20),
                mseg_cache: Some(0),
                ..Default::default()
            };
            assert_eq!(
                sample(1.0, rss, baseline, mapped).unexplained,
                Some(((touched as i64) - 16) << 20)
            );
        }
    }

    #[test]
    fn reads_own_rss_and_none_for_missing_pid() {
        let own = read_rss(std::process::id()).expect("own status");
        assert!(own.rss > 0 && own.anon > 0 && own.anon <= own.rss);
        assert_eq!(read_rss(99_999_999), None);
        // The kernel's RSS counters are per-CPU approximations, read at two instants here:
        // the peak can trail an earlier RSS reading by a little, never by much.
        let peak = own_peak_rss();
        assert!(
            peak >= own.rss - own.rss / 8,
            "peak {peak} < rss {}",
            own.rss
        );
    }
}
