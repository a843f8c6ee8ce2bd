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
}

/// Reads the RSS of `pid`. `None` once the process is gone or a zombie (no memory lines).
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
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accounted {
    /// Net carrier bytes, `None` when carrier probes are off.
    pub carriers: Option<i64>,
    /// Net mseg cache bytes, `None` when carrier probes are off.
    pub mseg_cache: Option<i64>,
    /// Net native bytes outstanding, `None` when native probes are off.
    pub native_outstanding: Option<i64>,
    /// Carriers per allocator name.
    pub carriers_by_allocator: BTreeMap<String, i64>,
}

/// Builds one sample: `unexplained = rss_anon - baseline - carriers - mseg_cache - native`,
/// computed only from lines that were measured (a missing line counts as not explaining anything).
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
        assert_eq!(s.native_outstanding, None, "unmeasured stays null, never 0");
        assert_eq!(s.vm_used, None);
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
