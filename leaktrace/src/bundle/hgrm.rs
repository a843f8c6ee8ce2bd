//! `.hgrm` percentile tables: the text HdrHistogram's `outputPercentileDistribution` prints
//! and its plotter (`plotFiles.html`) reads, one histogram a file.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::recording::histograms::Histograms;

/// Ticks per half distance of the percentile iteration, as HdrHistogram's own tools print.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The percentile table of `h`, values divided by `scale` (1.0: raw values), in the exact
/// layout of HdrHistogram's Java `outputPercentileDistribution`: the
/// `Value Percentile TotalCount 1/(1-Percentile)` table, then the `#[Mean ...]`, `#[Max ...]`
/// and `#[Buckets ...]` footer lines.
pub fn percentiles(h: &Histogram<u64>, scale: f64) -> String {
    let scale = if scale.is_finite() && scale > 0.0 {
        scale
    } else {
        1.0
    };
    let digits = usize::from(h.sigfig());
    let mut o = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total = total.saturating_add(v.count_since_last_iteration());
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / scale;
            if q < 1.0 {
                let _ = writeln!(
                    o,
                    "{value:>12.digits$} {q:>2.12} {total:>10} {:>14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(o, "{value:>12.digits$} {q:>2.12} {total:>10}");
            }
        }
    }
    let sub_buckets = 1u64 << (2.0 * 10f64.powi(digits as i32)).log2().ceil() as u32;
    let (mean, stdev) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale)
    };
    let _ = writeln!(
        o,
        "#[Mean    = {mean:>12.digits$}, StdDeviation   = {stdev:>12.digits$}]"
    );
    let _ = writeln!(
        o,
        "#[Max     = {:>12.digits$}, Total count    = {:>12}]",
        h.max() as f64 / scale,
        h.len()
    );
    let _ = writeln!(
        o,
        "#[Buckets = {:>12}, SubBuckets     = {sub_buckets:>12}]",
        h.buckets()
    );
    o
}

/// Longest file name stem taken from a series name.
const MAX_STEM: usize = 96;

/// One `.hgrm` file name per series of `h`, in series order: `hist.` and the series name with
/// `/` made `.` and anything but letters, digits, `.`, `_` and `-` made `_`; a name taken
/// already gets `-2`, `-3`... Names from the target never reach the file system as given.
pub fn file_names(h: &Histograms) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in h
        .series
        .iter()
        .take(crate::recording::histograms::MAX_SERIES)
    {
        let stem: String = s
            .name
            .chars()
            .take(MAX_STEM)
            .map(|c| match c {
                '/' => '.',
                c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => c,
                _ => '_',
            })
            .collect();
        let base = format!("hist.{stem}");
        let mut name = format!("{base}.hgrm");
        let mut n = 2;
        while out.contains(&name) {
            name = format!("{base}-{n}.hgrm");
            n += 1;
        }
        out.push(name);
    }
    out
}

/// Whether `name` is one [`file_names`] could make (a stale one is removed from `--out`).
pub fn is_hgrm_name(name: &str) -> bool {
    name.starts_with("hist.")
        && name.ends_with(".hgrm")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::histograms::HistogramUnit;

    #[test]
    fn the_table_has_java_s_layout() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 2, 3).unwrap();
        h.auto(true);
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let t = percentiles(&h, 1.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        assert!(
            lines[2].starts_with("       1.000 0.000000000000          1           1.00"),
            "{}",
            lines[2]
        );
        let last_row = lines[lines.len() - 4];
        assert!(
            last_row.ends_with("1.000000000000       1000"),
            "{last_row}"
        );
        assert!(lines[lines.len() - 3].starts_with("#[Mean    =      500.500"));
        assert!(
            lines[lines.len() - 2]
                .starts_with("#[Max     =     1000.000, Total count    =         1000]")
        );
        assert!(lines[lines.len() - 1].ends_with("SubBuckets     =         2048]"));
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        let mut h = Histograms::default();
        for n in ["carrier_size/ets_alloc", "a/../b", "a/__/b", "x y;<z>"] {
            h.record(n, HistogramUnit::Bytes, 1);
        }
        let names = file_names(&h);
        assert_eq!(
            names,
            [
                "hist.carrier_size.ets_alloc.hgrm",
                "hist.a....b.hgrm",
                "hist.a.__.b.hgrm",
                "hist.x_y__z_.hgrm"
            ]
        );
        assert!(names.iter().all(|n| is_hgrm_name(n) && !n.contains('/')));
    }
}
