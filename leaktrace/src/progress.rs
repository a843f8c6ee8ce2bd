//! The live progress line a terminal shows once per interval.

use crate::{recording::Sample, units::human_bytes};

/// One line: RSS and its rate since attach, carriers, the mseg cache, unexplained, VM figures.
pub fn line(s: &Sample, rss0: u64, events: u64) -> String {
    let opt = |v: Option<i64>| v.map_or("—".to_string(), |b| human_bytes(b as f64));
    let rate = if s.t_s > 0.0 {
        (s.rss.unwrap_or(0) as f64 - rss0 as f64) / s.t_s
    } else {
        0.0
    };
    let vm = match (s.vm_used, s.vm_allocated) {
        (Some(u), Some(a)) => format!(
            "  vm used/alloc {}/{}",
            human_bytes(u as f64),
            human_bytes(a as f64)
        ),
        _ => String::new(),
    };
    format!(
        "[{:>5.0}s] rss {} ({}/s)  carriers {}  mseg_cache {}  unexplained {}{vm}  events {}",
        s.t_s,
        human_bytes(s.rss.unwrap_or(0) as f64),
        human_bytes(rate),
        opt(s.carriers),
        opt(s.mseg_cache),
        opt(s.unexplained),
        events
    )
}
