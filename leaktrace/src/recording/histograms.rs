//! Distributions a run measured (carrier sizes and lifetimes per allocator, native allocation
//! sizes per object), as a recording holds them: named series of HdrHistograms over time, each
//! interval's histogram in HdrHistogram's own V2 deflate encoding, base64, so that the recording
//! stays JSON and the `--out` bundle can hand them to HdrHistogram's tools unchanged.
//!
//! The live session records values into the open interval of a series and closes the interval
//! at each sample; memory stays bounded: at most [`MAX_SERIES`] series and [`MAX_INTERVALS`]
//! intervals a series (adjacent intervals are merged pairwise when a series is full).

use std::io::Read as _;

use base64::Engine as _;
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer as _, V2DeflateSerializer},
};
use serde::{Deserialize, Serialize};

/// Most series a recording holds; values for further names are counted in
/// [`Histograms::dropped`], not recorded.
pub const MAX_SERIES: usize = 256;

/// Most intervals a series holds; past it, adjacent intervals are merged two by two (the time
/// resolution halves, no value is lost).
pub const MAX_INTERVALS: usize = 600;

/// Significant digits of every histogram: values within 0.1% are told apart. Three keeps a
/// decoded histogram under 1 MiB whatever its range (a file may claim any range; see
/// [`HistogramInterval::decode`]).
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// Longest base64 text of one interval's histogram read back (1 MiB); real ones are a few KiB.
pub const MAX_ENCODED_CHARS: usize = 1 << 20;

/// Largest inflated histogram read back (4 MiB): a V2 histogram of 3 significant digits over
/// the whole u64 range is about 0.6 MiB.
const MAX_INFLATED_BYTES: u64 = 4 << 20;

/// The V2 cookies of HdrHistogram's encoding (`V2_COOKIE_BASE | 0x10` and the compressed one).
const V2_COOKIE: u32 = 0x1c84_9313;
const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9314;

/// What a series measures its values in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistogramUnit {
    /// Sizes in bytes.
    Bytes,
    /// Durations (lifetimes) in microseconds.
    Us,
}

impl HistogramUnit {
    /// `bytes` or `us`, as in the recording.
    pub fn as_str(self) -> &'static str {
        match self {
            HistogramUnit::Bytes => "bytes",
            HistogramUnit::Us => "us",
        }
    }
}

/// All series of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Histograms {
    /// Series in the order they were first recorded.
    #[serde(default)]
    pub series: Vec<HistogramSeries>,
    /// Values not recorded because [`MAX_SERIES`] series existed already, or a histogram
    /// could not be encoded: nothing is dropped silently.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    /// Start of the open interval, seconds since attach.
    #[serde(skip)]
    open_since_s: f64,
}

/// Equal when what a recording keeps is equal (values recorded into an interval not yet closed
/// are not part of the recording).
impl PartialEq for Histograms {
    fn eq(&self, other: &Histograms) -> bool {
        self.series == other.series && self.dropped == other.dropped
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One named distribution over the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistogramSeries {
    /// What is measured and of what: `carrier_size/ets_alloc`, `carrier_lifetime/ets_alloc`,
    /// `native_size/lt_native.so`.
    pub name: String,
    /// The unit of its values.
    pub unit: HistogramUnit,
    /// Values still unknown at the end of the run (a lifetime of something still live): they
    /// are in no interval, and every percentile of a lifetime series is a lower bound when
    /// this is not zero.
    #[serde(default)]
    pub censored: u64,
    /// Closed intervals, in time order.
    #[serde(default)]
    pub intervals: Vec<HistogramInterval>,
    /// Values recorded since the last [`Histograms::close_interval`].
    #[serde(skip)]
    open: Option<Histogram<u64>>,
}

impl PartialEq for HistogramSeries {
    fn eq(&self, other: &HistogramSeries) -> bool {
        self.name == other.name
            && self.unit == other.unit
            && self.censored == other.censored
            && self.intervals == other.intervals
    }
}

/// The values of one series recorded between two times.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistogramInterval {
    /// Seconds since attach when the interval began.
    pub start_s: f64,
    /// Seconds since attach when it ended.
    pub end_s: f64,
    /// The histogram: HdrHistogram V2 deflate encoding, base64 (what an `.hlog` line holds).
    pub histogram: String,
}

impl HistogramInterval {
    /// Decodes the histogram (auto-resizing, so that others can be added to it). A recording
    /// is untrusted: the text, the inflated bytes and the
    /// histogram's precision are capped before anything is allocated for it, and a bad one is
    /// an error saying what is wrong, never a panic.
    pub fn decode(&self) -> Result<Histogram<u64>, String> {
        decode(&self.histogram)
    }

    /// The interval's length in seconds, 0 when the times are out of order.
    pub fn duration_s(&self) -> f64 {
        (self.end_s - self.start_s).max(0.0)
    }
}

/// A new empty histogram that grows to the values recorded.
fn empty() -> Histogram<u64> {
    // 1..2 and auto-resize: the counts array grows to the largest value recorded only.
    let mut h =
        Histogram::new_with_bounds(1, 2, SIGNIFICANT_DIGITS).expect("constant bounds are valid");
    h.auto(true);
    h
}

/// V2 deflate, base64.
fn encode(h: &Histogram<u64>) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| format!("cannot encode a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// See [`HistogramInterval::decode`].
fn decode(text: &str) -> Result<Histogram<u64>, String> {
    if text.len() > MAX_ENCODED_CHARS {
        return Err(format!(
            "an encoded histogram of {} characters, over the {MAX_ENCODED_CHARS} leaktrace writes",
            text.len()
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("a histogram that is not base64: {e}"))?;
    let be32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    if be32(&bytes, 0) != Some(V2_COMPRESSED_COOKIE) {
        return Err("a histogram not in HdrHistogram's V2 deflate encoding".into());
    }
    let mut inflated = Vec::new();
    flate2::read::ZlibDecoder::new(bytes.get(8..).unwrap_or_default())
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| format!("a histogram whose deflate stream is corrupt: {e}"))?;
    if inflated.len() as u64 > MAX_INFLATED_BYTES {
        return Err(format!(
            "a histogram that inflates past {MAX_INFLATED_BYTES} bytes"
        ));
    }
    // The V2 header: cookie, payload length, normalizing offset, significant digits, lowest,
    // highest, conversion ratio (40 bytes). The payload length and precision are checked here
    // because the decoder allocates what they say before reading.
    let (Some(cookie), Some(payload), Some(digits)) =
        (be32(&inflated, 0), be32(&inflated, 4), be32(&inflated, 12))
    else {
        return Err("a histogram cut short in its header".into());
    };
    if cookie != V2_COOKIE {
        return Err("a histogram whose inflated header is not HdrHistogram V2".into());
    }
    if payload as usize > inflated.len().saturating_sub(40) {
        return Err(format!(
            "a histogram claiming {payload} bytes of counts but holding {}",
            inflated.len().saturating_sub(40)
        ));
    }
    if digits > u32::from(SIGNIFICANT_DIGITS) {
        return Err(format!(
            "a histogram of {digits} significant digits: leaktrace writes {SIGNIFICANT_DIGITS}"
        ));
    }
    let mut h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut inflated.as_slice())
        .map_err(|e| format!("a histogram that does not decode: {e:?}"))?;
    // So that histograms of other ranges can be added to it.
    h.auto(true);
    Ok(h)
}

impl Histograms {
    /// No series and nothing dropped (the recording leaves the field out).
    pub fn is_empty(&self) -> bool {
        self.series.is_empty() && self.dropped == 0
    }

    /// The series named `name`, created with `unit` when new; None when [`MAX_SERIES`] exist.
    fn series_mut(&mut self, name: &str, unit: HistogramUnit) -> Option<&mut HistogramSeries> {
        let at = match self.series.iter().position(|s| s.name == name) {
            Some(i) => i,
            None if self.series.len() >= MAX_SERIES => return None,
            None => {
                self.series.push(HistogramSeries {
                    name: name.to_owned(),
                    unit,
                    censored: 0,
                    intervals: Vec::new(),
                    open: None,
                });
                self.series.len() - 1
            }
        };
        Some(&mut self.series[at])
    }

    /// Records one value into the open interval of series `name` (created with `unit` on its
    /// first value; a later call with another unit records into it still).
    pub fn record(&mut self, name: &str, unit: HistogramUnit, value: u64) {
        self.record_n(name, unit, value, 1);
    }

    /// Records `value` `n` times (the kernel side may aggregate equal values).
    pub fn record_n(&mut self, name: &str, unit: HistogramUnit, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        match self.series_mut(name, unit) {
            Some(s) => {
                let h = s.open.get_or_insert_with(empty);
                // Auto-resize grows the histogram to the value; saturating_record_n would clamp
                // it to the current top instead. It fails only past what a u64 histogram holds.
                if h.record_n(value, n).is_err() {
                    h.saturating_record_n(value, n);
                }
            }
            None => self.dropped = self.dropped.saturating_add(n),
        }
    }

    /// Sets how many values of `name` are still unknown at the end of the run (lifetimes of
    /// carriers or blocks still live): they make every percentile of it a lower bound.
    pub fn censored(&mut self, name: &str, unit: HistogramUnit, n: u64) {
        match self.series_mut(name, unit) {
            Some(s) => s.censored = n,
            None => self.dropped = self.dropped.saturating_add(n),
        }
    }

    /// Ends the open interval at `t_s` (seconds since attach): every series that recorded a
    /// value since the last call gets an interval from then to `t_s`. Call it at each sample
    /// and once at the end of the run, before the recording is written.
    pub fn close_interval(&mut self, t_s: f64) {
        let start_s = self.open_since_s.min(t_s);
        let mut dropped = 0;
        for s in &mut self.series {
            let Some(h) = s.open.take() else { continue };
            if h.is_empty() {
                continue;
            }
            match encode(&h) {
                Ok(histogram) => s.intervals.push(HistogramInterval {
                    start_s,
                    end_s: t_s,
                    histogram,
                }),
                Err(_) => dropped += h.len(),
            }
            if s.intervals.len() > MAX_INTERVALS {
                dropped += merge_pairs(&mut s.intervals);
            }
        }
        self.dropped = self.dropped.saturating_add(dropped);
        self.open_since_s = t_s;
    }
}

/// Merges intervals two by two (the first with the second, ...); returns the values lost when
/// a pair could not be decoded or encoded again.
fn merge_pairs(intervals: &mut Vec<HistogramInterval>) -> u64 {
    let mut lost = 0;
    let old = std::mem::take(intervals);
    let mut it = old.into_iter();
    while let Some(a) = it.next() {
        let Some(b) = it.next() else {
            intervals.push(a);
            break;
        };
        let merged = a.decode().and_then(|mut h| {
            let other = b.decode()?;
            h.add(&other).map_err(|e| format!("{e:?}"))?;
            encode(&h)
        });
        match merged {
            Ok(histogram) => intervals.push(HistogramInterval {
                start_s: a.start_s,
                end_s: b.end_s,
                histogram,
            }),
            Err(_) => {
                // Keep the later one whole: counts from the other are lost, and counted.
                lost += a.decode().map_or(0, |h| h.len());
                intervals.push(b);
            }
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_into_intervals_closed_at_each_sample() {
        let mut h = Histograms::default();
        assert!(h.is_empty());
        h.record("carrier_size/ets_alloc", HistogramUnit::Bytes, 262_144);
        h.record_n("carrier_size/ets_alloc", HistogramUnit::Bytes, 1 << 20, 3);
        h.close_interval(1.0);
        h.close_interval(2.0); // nothing recorded: no interval
        h.record("carrier_size/ets_alloc", HistogramUnit::Bytes, 4096);
        h.censored("carrier_lifetime/ets_alloc", HistogramUnit::Us, 7);
        h.close_interval(3.0);
        let s = &h.series[0];
        assert_eq!(s.intervals.len(), 2);
        assert_eq!((s.intervals[0].start_s, s.intervals[0].end_s), (0.0, 1.0));
        assert_eq!((s.intervals[1].start_s, s.intervals[1].end_s), (2.0, 3.0));
        let first = s.intervals[0].decode().unwrap();
        assert_eq!(first.len(), 4);
        assert!(first.equivalent(first.max(), 1 << 20));
        assert_eq!(h.series[1].censored, 7);
        assert!(h.series[1].intervals.is_empty());
        // Through JSON and back.
        let back: Histograms = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn series_and_intervals_are_bounded_and_nothing_is_lost_silently() {
        let mut h = Histograms::default();
        for i in 0..MAX_SERIES + 3 {
            h.record(&format!("s{i}"), HistogramUnit::Bytes, 8);
        }
        assert_eq!(h.series.len(), MAX_SERIES);
        assert_eq!(h.dropped, 3);
        let mut h = Histograms::default();
        for i in 0..(MAX_INTERVALS * 2) {
            h.record("x", HistogramUnit::Us, i as u64 + 1);
            h.close_interval(i as f64 + 1.0);
        }
        let s = &h.series[0];
        assert!(s.intervals.len() <= MAX_INTERVALS, "{}", s.intervals.len());
        let total: u64 = s.intervals.iter().map(|i| i.decode().unwrap().len()).sum();
        assert_eq!(total, MAX_INTERVALS as u64 * 2);
        assert_eq!(s.intervals[0].start_s, 0.0);
        assert_eq!(
            s.intervals.last().unwrap().end_s,
            MAX_INTERVALS as f64 * 2.0
        );
        assert!(s.intervals.windows(2).all(|w| w[0].end_s <= w[1].start_s));
        assert_eq!(h.dropped, 0);
    }

    #[test]
    fn bad_encodings_are_errors_not_panics() {
        let good = {
            let mut h = empty();
            h.record(100).unwrap();
            encode(&h).unwrap()
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&good)
            .unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut cases = vec![
            String::new(),
            "not base64!".into(),
            b64(&[0, 1, 2]),
            b64(&raw[..raw.len() / 2]),
            "A".repeat(MAX_ENCODED_CHARS + 1),
        ];
        let mut flipped = raw.clone();
        for b in flipped.iter_mut().skip(8) {
            *b ^= 0x5a;
        }
        cases.push(b64(&flipped));
        // A V2 header claiming 5 digits and a huge payload, deflated: refused before decoding.
        let mut header = Vec::new();
        for v in [V2_COOKIE, u32::MAX, 0, 5] {
            header.extend(v.to_be_bytes());
        }
        header.extend(1u64.to_be_bytes());
        header.extend(u64::MAX.to_be_bytes());
        header.extend(1f64.to_be_bytes());
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut z, &header).unwrap();
        let deflated = z.finish().unwrap();
        let mut forged = V2_COMPRESSED_COOKIE.to_be_bytes().to_vec();
        forged.extend((deflated.len() as u32).to_be_bytes());
        forged.extend(deflated);
        cases.push(b64(&forged));
        for c in cases {
            assert!(decode(&c).is_err(), "{}", &c[..c.len().min(40)]);
        }
        assert_eq!(decode(&good).unwrap().len(), 1);
    }
}
