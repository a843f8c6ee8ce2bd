//! `histograms.hlog`: every interval of every series in HdrHistogram's interval log format
//! (V2 deflate histograms, one tagged line each), readable by HdrHistogram's
//! `HistogramLogProcessor` and by the interval log readers of its ports.

use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::{
    V2DeflateSerializer,
    interval_log::{IntervalLogWriterBuilder, Tag},
};

use crate::recording::histograms::{MAX_INTERVALS, MAX_SERIES};
use crate::recording::{Recording, histograms::Histograms};

/// The tag of a series in the log: its name with what a tag cannot hold (`,`, spaces, line
/// breaks) and anything but printable ASCII made `_`.
pub fn tag(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ',' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The interval log of `r`'s histograms, and one line for each interval that could not be
/// written (an undecodable histogram in the recording: it is left out, and said).
///
/// Times are seconds since attach: the log carries `BaseTime: 0`, so that readers take the
/// interval timestamps as offsets and not as dates.
pub fn interval_log(r: &Recording) -> (Vec<u8>, Vec<String>) {
    let h: &Histograms = &r.histograms;
    let mut problems = Vec::new();
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let mut builder = IntervalLogWriterBuilder::new();
    builder
        .add_comment(&format!(
            "leaktrace {}: histograms of PID {} ({}); times are seconds since attach; each line is tagged with its series; units: bytes for *_size, microseconds for *_lifetime",
            crate::vm::render::clean(&r.tool_version),
            r.target.pid,
            crate::vm::render::clean(&r.target.exe)
        ))
        .with_base_time(SystemTime::UNIX_EPOCH);
    let mut writer = match builder.begin_log_with(&mut out, &mut serializer) {
        Ok(w) => w,
        Err(e) => return (Vec::new(), vec![format!("histograms.hlog: {e}")]),
    };
    // Lines in time order across series, as the log format expects.
    let mut lines: Vec<(f64, usize, usize)> = Vec::new();
    for (si, s) in h.series.iter().enumerate().take(MAX_SERIES) {
        for (ii, i) in s.intervals.iter().enumerate().take(MAX_INTERVALS) {
            lines.push((i.start_s, si, ii));
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for (_, si, ii) in lines {
        let s = &h.series[si];
        let i = &s.intervals[ii];
        let hist = match i.decode() {
            Ok(hist) => hist,
            Err(e) => {
                problems.push(format!(
                    "series {} interval at {:.1} s left out: {e}",
                    crate::vm::render::clean(&s.name),
                    i.start_s
                ));
                continue;
            }
        };
        let tag = tag(&s.name);
        let secs = |t: f64| Duration::try_from_secs_f64(t.max(0.0)).unwrap_or_default();
        if let Err(e) =
            writer.write_histogram(&hist, secs(i.start_s), secs(i.duration_s()), Tag::new(&tag))
        {
            problems.push(format!(
                "series {} interval at {:.1} s left out: {e}",
                crate::vm::render::clean(&s.name),
                i.start_s
            ));
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_hold_no_separator() {
        assert_eq!(tag("native_size/a b,c\n"), "native_size/a_b_c_");
        assert!(Tag::new(&tag("x, y\r\n")).is_some());
    }
}
