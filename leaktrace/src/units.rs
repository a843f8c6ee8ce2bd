//! Byte and rate formatting shared by the verdict, the reports and the live view.

/// Bytes for humans: "12.3 MiB", "-4.0 KiB", "512 B".
pub fn human_bytes(bytes: f64) -> String {
    let sign = if bytes < 0.0 { "-" } else { "" };
    let b = bytes.abs();
    const K: f64 = 1024.0;
    if b >= K * K * K {
        format!("{sign}{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{sign}{:.1} MiB", b / (K * K))
    } else if b >= K {
        format!("{sign}{:.1} KiB", b / K)
    } else {
        format!("{sign}{b:.0} B")
    }
}

/// A rate for humans: "1.5 MiB/s".
pub fn rate(bytes_per_s: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_s))
}

/// A count for humans: "950", "12.3 k", "1.20 M".
pub fn human_count(n: f64) -> String {
    let sign = if n < 0.0 { "-" } else { "" };
    let a = n.abs();
    if a >= 1e6 {
        format!("{sign}{:.2} M", a / 1e6)
    } else if a >= 1e4 {
        format!("{sign}{:.1} k", a / 1e3)
    } else {
        format!("{sign}{a:.0}")
    }
}

/// A share as a percentage: "42%".
pub fn percent(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        "—".into()
    } else {
        format!("{:.0}%", 100.0 * part / whole)
    }
}

/// The share of a growth that `part` explains: "42%", or "all" when it reaches the whole (a
/// part measured a little above its whole is noise between two measurements, not more than
/// everything).
pub fn share(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        "—".into()
    } else if part >= whole {
        "all".into()
    } else {
        percent(part, whole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(-3.0 * 1024.0 * 1024.0), "-3.0 MiB");
        assert_eq!(human_bytes(2.0 * 1024.0 * 1024.0 * 1024.0), "2.00 GiB");
        assert_eq!(rate(2048.0), "2.0 KiB/s");
        assert_eq!(human_count(150_000.0), "150.0 k");
        assert_eq!(human_count(-950.0), "-950");
        assert_eq!(percent(1.0, 4.0), "25%");
        assert_eq!(percent(1.0, 0.0), "—");
        assert_eq!(share(1.01, 1.0), "all");
        assert_eq!(share(0.5, 1.0), "50%");
    }
}
