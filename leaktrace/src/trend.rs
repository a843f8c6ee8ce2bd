//! Trends of ledger lines: least-squares slopes over the whole run, and the rule for when a
//! line "grows" (above a noise floor, and still growing in the second half of the run).

use crate::recording::{Sample, Thresholds};

/// A least-squares line through (t, y) points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Slope, units of y per second.
    pub slope_per_s: f64,
    /// y at t = 0.
    pub intercept: f64,
    /// Coefficient of determination (1 = perfect line; 1 when y is constant).
    pub r2: f64,
    /// Points used.
    pub n: usize,
    /// Time covered, seconds.
    pub span_s: f64,
}

/// Fits a line; `None` for fewer than 2 points or no time span.
pub fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len();
    if n < 2 {
        return None;
    }
    let nf = n as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let (mut stt, mut sty, mut syy) = (0.0, 0.0, 0.0);
    for (t, y) in points {
        let (dt, dy) = (t - mean_t, y - mean_y);
        stt += dt * dt;
        sty += dt * dy;
        syy += dy * dy;
    }
    let span_s = points.last()?.0 - points.first()?.0;
    if stt <= 0.0 || span_s <= 0.0 {
        return None;
    }
    let slope = sty / stt;
    let r2 = if syy == 0.0 {
        1.0
    } else {
        (sty * sty) / (stt * syy)
    };
    Some(Fit {
        slope_per_s: slope,
        intercept: mean_y - slope * mean_t,
        r2,
        n,
        span_s,
    })
}

/// The (t, y) points of one ledger line, skipping samples where it was not measured.
pub fn series(samples: &[Sample], line: impl Fn(&Sample) -> Option<f64>) -> Vec<(f64, f64)> {
    samples
        .iter()
        .filter_map(|s| line(s).map(|y| (s.t_s, y)))
        .collect()
}

/// Whether and how fast a line grows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    /// Fit over the whole run.
    pub whole: Fit,
    /// Fit over the second half (None with too few points).
    pub second_half: Option<Fit>,
    /// Fitted growth over the run, bytes.
    pub total: f64,
    /// Above both floors over the whole run and in the second half.
    pub grows: bool,
}

/// Judges growth of a series against the thresholds.
///
/// A line grows when its slope exceeds `min_growth_bytes_per_s`, its fitted growth over the run
/// exceeds `min_total_growth_bytes`, and the second half of the run still grows faster than the
/// slope floor: growth that stopped early (a node warming up, a cache filling) is not a leak.
pub fn growth(points: &[(f64, f64)], th: &Thresholds) -> Option<Growth> {
    let whole = fit(points)?;
    let total = whole.slope_per_s * whole.span_s;
    let mid = points.first()?.0 + whole.span_s / 2.0;
    let half: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 >= mid).collect();
    let second_half = if half.len() >= 3 { fit(&half) } else { None };
    let sustained = second_half.is_none_or(|h| h.slope_per_s > th.min_growth_bytes_per_s);
    let grows = whole.slope_per_s > th.min_growth_bytes_per_s
        && total > th.min_total_growth_bytes
        && sustained;
    Some(Growth {
        whole,
        second_half,
        total,
        grows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize, slope: f64, noise: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let t = i as f64;
                let wobble = if i % 2 == 0 { noise } else { -noise };
                (t, 1e8 + slope * t + wobble)
            })
            .collect()
    }

    #[test]
    fn fits_exact_lines() {
        let f = fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((f.slope_per_s - 2.0).abs() < 1e-12 && (f.intercept - 1.0).abs() < 1e-12);
        assert!((f.r2 - 1.0).abs() < 1e-12);
        assert_eq!(fit(&[(1.0, 1.0)]), None);
        assert_eq!(fit(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn steady_growth_grows_and_noise_does_not() {
        let th = Thresholds::default();
        let g = growth(&line(20, 10.0 * 1024.0 * 1024.0, 1e5), &th).unwrap();
        assert!(g.grows);
        assert!((g.whole.slope_per_s - 10.0 * 1024.0 * 1024.0).abs() < 1e5);
        let flat = growth(&line(20, 0.0, 2.0 * 1024.0 * 1024.0), &th).unwrap();
        assert!(!flat.grows, "{flat:?}");
    }

    #[test]
    fn warm_up_that_stops_is_not_growth() {
        let th = Thresholds::default();
        // +40 MiB in the first 4 s, then flat for 16 s.
        let pts: Vec<(f64, f64)> = (0..20)
            .map(|i| {
                let t = i as f64;
                (t, 1e8 + 10.0 * 1024.0 * 1024.0 * t.min(4.0))
            })
            .collect();
        let g = growth(&pts, &th).unwrap();
        assert!(
            g.whole.slope_per_s > th.min_growth_bytes_per_s,
            "whole-run slope is positive"
        );
        assert!(!g.grows, "stopped growth must not count: {g:?}");
    }

    #[test]
    fn small_total_is_not_growth() {
        let th = Thresholds::default();
        // 100 KiB/s for 5 s = 0.5 MiB < 4 MiB.
        let g = growth(&line(6, 100.0 * 1024.0, 0.0), &th).unwrap();
        assert!(!g.grows);
    }
}
