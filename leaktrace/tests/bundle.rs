//! The `--out` bundle, read back with the formats' own readers: every file of a bundle written
//! from real recordings (tests/recordings) and from recordings built here (histograms, native
//! stacks, hostile names) parses, and holds the figures of the recording. Also `leaktrace diff`.
//! No root needed.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use hdrhistogram::{
    Histogram,
    serialization::{
        Deserializer,
        interval_log::{IntervalLogIterator, LogEntry},
    },
};
use leaktrace::{
    bundle::{self, FIXED_FILES, pprof::Profile},
    config::OutMode,
    recording::{
        Recording,
        histograms::HistogramUnit,
        native::{NativeEvidence, NativeModule, NativeStack},
    },
    report::{self, Report},
};
use prost::Message as _;

const LEAKTRACE: &str = env!("CARGO_BIN_EXE_leaktrace");

/// A name a hostile target could give its objects: markup, quotes, a table breaker, an escape.
const EVIL: &str = "ev<il>&\"q'|;\u{1b}[2J.so";

fn recording_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/recordings")
        .join(name)
}

fn recording(name: &str) -> Recording {
    Recording::read(&recording_path(name)).unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// two_problems.json (native modules without stacks) given histograms, stacks and hostile
/// names; also what each histogram series was given.
fn constructed() -> (Recording, BTreeMap<String, Vec<u64>>) {
    let mut r = recording("two_problems.json");
    let mut given: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let h = &mut r.histograms;
    let mut rec =
        |h: &mut leaktrace::recording::histograms::Histograms, name: &str, unit, v: u64| {
            h.record(name, unit, v);
            given.entry(name.to_owned()).or_default().push(v);
        };
    for t in 0..10u64 {
        for i in 0..50 {
            rec(
                h,
                "carrier_size/ets_alloc",
                HistogramUnit::Bytes,
                262_144 << (i % 3),
            );
            rec(
                h,
                "carrier_lifetime/ets_alloc",
                HistogramUnit::Us,
                1_000 * (i + 1) * (t + 1),
            );
            rec(
                h,
                &format!("native_size/{EVIL}"),
                HistogramUnit::Bytes,
                64 + i * 8,
            );
        }
        h.close_interval(t as f64 + 1.0);
    }
    h.censored("carrier_lifetime/ets_alloc", HistogramUnit::Us, 12);
    r.command_line = ["leaktrace", "attach", "--pid", "1", "--cookie", "SECRET1"]
        .into_iter()
        .chain(["--cookie=SECRET2", "--out", "/tmp/x"])
        .map(String::from)
        .collect();
    (r, given)
}

/// `r` with native stacks (one naming [`EVIL`]).
fn with_stacks(mut r: Recording) -> Recording {
    let n = r.native.get_or_insert_with(NativeEvidence::default);
    n.stack_depth = 8;
    n.stacks = vec![
        NativeStack {
            frames: vec![
                "libc.so.6: malloc".into(),
                "lt_nif.so: leak".into(),
                "beam.smp: erts_call_dirty_nif".into(),
            ],
            nif_api: false,
            allocations: 500,
            frees: 20,
            outstanding_bytes: 30 << 20,
        },
        NativeStack {
            frames: vec![format!("{EVIL}: grab"), "beam.smp: process_main".into()],
            nif_api: true,
            allocations: 7,
            frees: 0,
            outstanding_bytes: 7 * 4096,
        },
        NativeStack {
            frames: vec!["lt_nif.so: freed".into()],
            nif_api: false,
            allocations: 3,
            frees: 3,
            outstanding_bytes: 0,
        },
    ];
    n.modules.push(NativeModule {
        module: EVIL.into(),
        nif_api: true,
        path: format!("/opt/{EVIL}"),
        outstanding_bytes: 7 * 4096,
        allocations: 7,
        functions: vec![("grab".into(), 7 * 4096)],
        ..Default::default()
    });
    r
}

fn write(report: &Report, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bundle")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    report::write_dir(report, &dir, OutMode::default()).unwrap();
    dir
}

/// One row of a `.hgrm` table.
#[derive(Debug)]
struct Row {
    value: f64,
    percentile: f64,
    total: u64,
}

/// Parses a `.hgrm` table: rows, footer max and total count.
fn parse_hgrm(text: &str) -> (Vec<Row>, f64, u64) {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    );
    assert_eq!(lines.next(), Some(""));
    let mut rows = Vec::new();
    let (mut max, mut count) = (None, None);
    for l in lines {
        if let Some(rest) = l.strip_prefix("#[Max     =") {
            let (m, c) = rest.split_once(", Total count    =").unwrap();
            max = Some(m.trim().parse::<f64>().unwrap());
            count = Some(
                c.trim()
                    .trim_end_matches(']')
                    .trim()
                    .parse::<u64>()
                    .unwrap(),
            );
        } else if l.starts_with("#[") {
            continue;
        } else {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() == 4 || f.len() == 3, "{l}");
            rows.push(Row {
                value: f[0].parse().unwrap(),
                percentile: f[1].parse().unwrap(),
                total: f[2].parse().unwrap(),
            });
        }
    }
    (rows, max.expect("#[Max line"), count.expect("Total count"))
}

/// Parses an SVG (inferno's flame graphs carry a DOCTYPE).
fn parse_svg(text: &str) -> roxmltree::Document<'_> {
    let opt = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, opt).unwrap()
}

/// Parses an SVG and renders it; returns the count of saturated (coloured) pixels.
fn render_svg(path: &Path) -> usize {
    let text = fs::read_to_string(path).unwrap();
    parse_svg(&text);
    let tree = resvg::usvg::Tree::from_str(&text, &resvg::usvg::Options::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(&tree, Default::default(), &mut pixmap.as_mut());
    pixmap
        .pixels()
        .iter()
        .filter(|p| {
            let (r, g, b) = (p.red() as i32, p.green() as i32, p.blue() as i32);
            p.alpha() > 0 && (r - g).abs().max((g - b).abs()).max((r - b).abs()) > 40
        })
        .count()
}

/// All text of an SVG, as a parser reads it (entities decoded).
fn svg_text(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let doc = parse_svg(&text);
    doc.descendants()
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_bundle_from_a_built_recording_reads_back_with_each_format_s_own_reader() {
    let (rec, given) = constructed();
    let rec = with_stacks(rec);
    let report = Report::new(rec.clone());
    let dir = write(&report, "built");

    // Exactly the files the manifest lists, and report.md lists them all.
    let manifest = bundle::manifest(&rec);
    let mut expected: Vec<String> = manifest.iter().map(|e| e.name.clone()).collect();
    expected.sort();
    assert_eq!(names_in(&dir), expected);
    assert_eq!(manifest.len(), FIXED_FILES.len() + 3);
    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    for e in &manifest {
        assert!(md.contains(&format!("| {} |", e.name)), "{}", e.name);
    }

    // .hgrm: monotonic, ending at the max and the count given.
    let names = bundle::hgrm::file_names(&rec.histograms);
    for (s, file) in rec.histograms.series.iter().zip(&names) {
        let (rows, max, count) = parse_hgrm(&fs::read_to_string(dir.join(file)).unwrap());
        let values = &given[&s.name];
        assert_eq!(count, values.len() as u64, "{file}");
        let distinct: std::collections::BTreeSet<&u64> = values.iter().collect();
        assert!(rows.len() >= distinct.len().min(10), "{file}");
        assert!(rows.windows(2).all(|w| w[0].value <= w[1].value
            && w[0].percentile <= w[1].percentile
            && w[0].total <= w[1].total));
        let last = rows.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert_eq!(last.total, count);
        assert_eq!(last.value, max);
        let true_max = *values.iter().max().unwrap() as f64;
        assert!(
            max >= true_max && max <= true_max * 1.001,
            "{file}: max {max}, true {true_max}"
        );
    }

    // .hlog: every interval, decoded by HdrHistogram's reader, counts per tag as given.
    let log = fs::read(dir.join("histograms.hlog")).unwrap();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut intervals = 0;
    let mut last_start = 0.0;
    for entry in IntervalLogIterator::new(&log) {
        match entry.unwrap() {
            LogEntry::Interval(i) => {
                intervals += 1;
                let start = i.start_timestamp().as_secs_f64();
                assert!(start >= last_start, "time order");
                last_start = start;
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(i.encoded_histogram())
                    .unwrap();
                let h: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .unwrap();
                assert_eq!(i.max(), h.max() as f64);
                *counts
                    .entry(i.tag().unwrap().as_str().to_owned())
                    .or_default() += h.len();
            }
            LogEntry::BaseTime(t) => assert_eq!(t.as_secs(), 0),
            LogEntry::StartTime(_) => {}
        }
    }
    assert_eq!(intervals, 30);
    for (name, values) in &given {
        assert_eq!(
            counts[&bundle::hlog::tag(name)],
            values.len() as u64,
            "{name}"
        );
    }

    // pprof and folded: the stacks' outstanding bytes, nothing more.
    let expected_bytes: i64 = (30 << 20) + 7 * 4096;
    let mut gz = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(dir.join("native.pb.gz")).unwrap())
        .read_to_end(&mut gz)
        .unwrap();
    let p = Profile::decode(gz.as_slice()).unwrap();
    let s = |i: i64| p.string_table[i as usize].as_str();
    assert_eq!(s(0), "");
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(
        types,
        [
            ("outstanding_objects", "count"),
            ("outstanding_space", "bytes")
        ]
    );
    assert_eq!(s(p.default_sample_type), "outstanding_space");
    assert_eq!(
        p.sample.iter().map(|x| x.value[1]).sum::<i64>(),
        expected_bytes
    );
    assert_eq!(p.sample.iter().map(|x| x.value[0]).sum::<i64>(), 480 + 7);
    // Leaf first: the first location of the biggest sample is malloc.
    let biggest = p.sample.iter().max_by_key(|x| x.value[1]).unwrap();
    let leaf = p
        .function
        .iter()
        .find(|f| f.id == biggest.location_id[0])
        .unwrap();
    assert_eq!(s(leaf.name), "libc.so.6: malloc");
    let folded = fs::read_to_string(dir.join("native.folded")).unwrap();
    let mut sum = 0i64;
    for l in folded.lines() {
        let (stack, n) = l.rsplit_once(' ').unwrap();
        sum += n.parse::<i64>().unwrap();
        assert!(!stack.is_empty());
    }
    assert_eq!(sum, expected_bytes);
    assert!(
        folded.contains("beam.smp: erts_call_dirty_nif;lt_nif.so: leak;libc.so.6: malloc 31457280")
    );
    // The hostile frame: `;` made `:`, the escape written out.
    assert!(
        folded.contains("[NIF API];beam.smp: process_main;ev<il>&\"q'|:\\u{1b}[2J.so: grab 28672"),
        "{folded}"
    );

    // SVGs: parse, render not blank, hostile names escaped (the parser reads them back).
    for (file, min_coloured) in [
        ("timeline.svg", 2000),
        ("native.svg", 2000),
        ("sizes.svg", 2000),
    ] {
        let coloured = render_svg(&dir.join(file));
        assert!(
            coloured >= min_coloured,
            "{file}: {coloured} coloured pixels"
        );
    }
    assert!(svg_text(&dir.join("native.svg")).contains("ev<il>&\"q'|:\\u{1b}[2J.so: grab"));
    assert!(svg_text(&dir.join("sizes.svg")).contains("native_size/ev<il>&\"q'|;\\u{1b}[2J.so"));
    let timeline = svg_text(&dir.join("timeline.svg"));
    assert!(timeline.contains(&format!("verdict: {}", report.verdict.kind.as_str())));
    assert!(
        timeline.contains("native probes attached (3.0 s)"),
        "{timeline}"
    );

    // report.md: verdict first, sections, escaped names, no secret.
    assert!(md.starts_with(&format!(
        "# leaktrace report: {}",
        report.verdict.kind.as_str()
    )));
    let at = |h: &str| md.find(h).unwrap_or_else(|| panic!("{h} missing"));
    assert!(at("## Evidence") < at("## Culprits"));
    assert!(at("## Culprits") < at("## Ruled out"));
    assert!(at("## Ruled out") < at("## How measured"));
    assert!(at("## How measured") < at("## Versions"));
    assert!(at("## Versions") < at("## Command line"));
    assert!(at("## Command line") < at("## Files in this bundle"));
    assert!(md.contains("ev&lt;il&gt;&\"q'\\|;\\u{1b}[2J.so"), "{md}");
    assert!(!md.contains('\u{1b}'));
    assert!(
        md.contains("--cookie '<redacted>' '--cookie=<redacted>'"),
        "{md}"
    );
    for f in names_in(&dir) {
        let bytes = fs::read(dir.join(&f)).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("SECRET"),
            "{f} holds the cookie"
        );
    }
    // Every table row of report.md has as many cells as its header.
    let mut cells = None;
    for l in md.lines() {
        if l.starts_with('|') {
            let n = l.replace("\\|", "").matches('|').count();
            match cells {
                None => cells = Some(n),
                Some(c) => assert_eq!(c, n, "{l}"),
            }
        } else {
            cells = None;
        }
    }
}

#[test]
fn every_real_recording_makes_a_bundle_that_reads_back() {
    for entry in fs::read_dir(recording_path("")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let rec = Recording::read(&path).unwrap();
        let report = Report::new(rec.clone());
        let dir = write(&report, &name);
        // The fixed files, and one percentile table per histogram series the run recorded.
        let mut expected: Vec<String> = FIXED_FILES.iter().map(|f| f.to_string()).collect();
        expected.extend(leaktrace::bundle::hgrm::file_names(&rec.histograms));
        expected.sort();
        assert_eq!(names_in(&dir), expected, "{name}");
        assert!(render_svg(&dir.join("timeline.svg")) > 2000, "{name}");
        for svg in ["sizes.svg", "native.svg"] {
            parse_svg(&fs::read_to_string(dir.join(svg)).unwrap());
        }
        // Native totals: the objects' outstanding bytes (no stacks in these recordings).
        let total: i64 = rec
            .native
            .iter()
            .flat_map(|n| &n.modules)
            .map(|m| m.outstanding_bytes.max(0))
            .sum();
        let folded = fs::read_to_string(dir.join("native.folded")).unwrap();
        let sum: i64 = folded
            .lines()
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<i64>().unwrap())
            .sum();
        assert_eq!(sum, total, "{name}");
        let mut gz = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(dir.join("native.pb.gz")).unwrap())
            .read_to_end(&mut gz)
            .unwrap();
        let p = Profile::decode(gz.as_slice()).unwrap();
        assert_eq!(
            p.sample.iter().map(|x| x.value[1]).sum::<i64>(),
            total,
            "{name}"
        );
        if total > 0 {
            assert!(render_svg(&dir.join("native.svg")) > 2000, "{name}");
        }
        // The hlog holds every interval of every series (none without histograms), each one
        // decoding, and report.md says when there are none.
        let log = fs::read(dir.join("histograms.hlog")).unwrap();
        let intervals: usize = rec
            .histograms
            .series
            .iter()
            .map(|s| s.intervals.len())
            .sum();
        let read = IntervalLogIterator::new(&log)
            .filter(|e| matches!(e, Ok(LogEntry::Interval(_))))
            .count();
        assert_eq!(read, intervals, "{name}");
        let md = fs::read_to_string(dir.join("report.md")).unwrap();
        assert_eq!(
            md.contains("No size or lifetime histograms"),
            intervals == 0,
            "{name}"
        );
    }
}

#[test]
fn symlinks_at_any_bundle_file_are_refused_before_anything_is_written() {
    let (rec, _) = constructed();
    let report = Report::new(rec.clone());
    let hgrm = bundle::hgrm::file_names(&rec.histograms)[0].clone();
    for planted in [
        "native.svg",
        "native.pb.gz",
        "histograms.hlog",
        hgrm.as_str(),
    ] {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("bundle-symlink")
            .join(planted);
        let _ = fs::remove_dir_all(&base);
        let out = base.join("out");
        fs::create_dir_all(&out).unwrap();
        let victim = base.join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, out.join(planted)).unwrap();
        let err = report::write_dir(&report, &out, OutMode::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{planted} is a symbolic link")),
            "{planted}: {err}"
        );
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(names_in(&out), [planted], "nothing else written");
    }
}

#[test]
fn a_bundle_replaces_an_older_one_whole() {
    let (rec, _) = constructed();
    let dir = write(&Report::new(rec), "replaced");
    assert!(names_in(&dir).iter().any(|n| n.ends_with(".hgrm")));
    // The same directory, a run without histograms: no stale table stays.
    report::write_dir(
        &Report::new(recording("healthy.json")),
        &dir,
        OutMode::default(),
    )
    .unwrap();
    let mut fixed = FIXED_FILES.to_vec();
    fixed.sort();
    assert_eq!(names_in(&dir), fixed);
}

#[test]
fn report_files_are_the_operators_alone_and_a_foreign_directory_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bundle-modes");
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let report = Report::new(recording("healthy.json"));
    let mode_of = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Default: the directory created 0700, every file 0600.
    let dir = base.join("private/deeper");
    report::write_dir(&report, &dir, OutMode::default()).unwrap();
    assert_eq!(mode_of(&dir), 0o700, "{}", dir.display());
    for name in names_in(&dir) {
        assert_eq!(mode_of(&dir.join(&name)), 0o600, "{name}");
    }
    // --out-mode 0644 shares them: directory 0755.
    let shared = base.join("shared");
    report::write_dir(&report, &shared, OutMode::parse("0644").unwrap()).unwrap();
    assert_eq!(mode_of(&shared), 0o755);
    assert_eq!(mode_of(&shared.join("report.md")), 0o644);
    for bad in ["0666", "0400", "1777", "rw", "0o600"] {
        assert!(OutMode::parse(bad).is_err(), "{bad} accepted");
    }
    // An existing directory another user owns is refused, and nothing is written in it.
    let foreign = base.join("foreign");
    fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    if fs::metadata(&foreign).unwrap().uid() == 65534 {
        let err = report::write_dir(&report, &foreign, OutMode::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("belongs to uid 65534") && err.contains("choose a new directory"),
            "{err}"
        );
        assert!(names_in(&foreign).is_empty(), "{:?}", names_in(&foreign));
        // The command line refuses it before attaching: exit 2, nothing written.
        let out = Command::new(LEAKTRACE)
            .args(["report", "--out"])
            .arg(&foreign)
            .arg(recording_path("healthy.json"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
        assert!(names_in(&foreign).is_empty());
    } else {
        eprintln!("not root: the foreign-directory case needs chown");
    }
}

#[test]
fn the_cookie_is_redacted_in_every_form() {
    let args = [
        "leaktrace",
        "attach",
        "--cookie",
        "a",
        "--cookie=b",
        "--",
        "erl",
        "-setcookie",
        "c",
        "--cookie",
    ];
    assert_eq!(
        report::redact_command_line(&args),
        [
            "leaktrace",
            "attach",
            "--cookie",
            "<redacted>",
            "--cookie=<redacted>",
            "--",
            "erl",
            "-setcookie",
            "<redacted>",
            "--cookie"
        ]
    );
    // The two-argument form, secret variables, and commands inside one argument.
    let args = [
        "leaktrace",
        "run",
        "--",
        "env",
        "RELEASE_COOKIE=s1",
        "ERL_AFLAGS=-setcookie s2 -sname x",
        "DB_PASSWORD=s3",
        "sh",
        "-c",
        "erl -setcookie other@h s4 -sname app",
        "erl",
        "-setcookie",
        "peer@host",
        "s5",
        "-sname",
        "app",
    ];
    let out = report::redact_command_line(&args);
    let joined = out.join(" ");
    for secret in ["s1", "s2", "s3", "s4", "s5"] {
        assert!(
            !out.iter()
                .any(|w| w.split_whitespace().any(|t| t.ends_with(secret))),
            "{secret} left in {joined}"
        );
    }
    assert_eq!(out[4], "RELEASE_COOKIE=<redacted>");
    assert_eq!(out[5], "ERL_AFLAGS=-setcookie <redacted> -sname x");
    assert_eq!(out[9], "erl -setcookie <redacted> <redacted> -sname app");
    assert_eq!(
        &out[11..],
        ["-setcookie", "<redacted>", "<redacted>", "-sname", "app"]
    );
}

fn diff(a: &Path, b: &Path, json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(LEAKTRACE);
    cmd.arg("diff").arg(a).arg(b);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn diff_says_whether_the_leak_is_gone() {
    // "Before": lt_nif.so leaks (two_problems.json); "after": the same node with lt_nif.so's
    // allocations flat (its series constant, RSS minus its growth).
    let before = recording("two_problems.json");
    let mut after = before.clone();
    let n = after.native.as_mut().unwrap();
    let key = "lt_nif.so".to_string();
    let first = n
        .series
        .iter()
        .find_map(|p| p.by_module.get(&key).copied())
        .unwrap();
    for p in &mut n.series {
        if let Some(v) = p.by_module.get_mut(&key) {
            *v = first;
        }
    }
    let m = n.modules.iter_mut().find(|m| m.module == key).unwrap();
    m.outstanding_bytes = first;
    m.growth_bytes_per_s = 0.0;
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bundle-diff");
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let (a, b) = (base.join("before"), base.join("after.json"));
    report::write_dir(&Report::new(before), &a, OutMode::default()).unwrap();
    after.write(&b).unwrap();

    let (code, out, err) = diff(&a, &b, false);
    assert!(
        out.starts_with("diff: the leak in lt_nif.so is gone"),
        "{out}{err}"
    );
    assert_eq!(code, 1, "the VM growth of lt_growing remains: {out}");
    assert!(out.contains("lt_growing still leaks"), "{out}");
    let (code, out, _) = diff(&b, &a, false);
    assert!(out.contains("new growth in lt_nif.so"), "{out}");
    assert_eq!(code, 1);

    // Against a healthy run: everything gone, exit 0; the reverse: everything new, exit 1.
    let healthy = recording_path("healthy.json");
    let (code, out, _) = diff(&a, &healthy, true);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["conclusion"].as_str().unwrap().contains("are gone"));
    let gone: Vec<&str> = v["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["change"] == "gone")
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(gone, ["lt_growing", "lt_nif.so"]);
    let lt_nif = v["native"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "lt_nif.so")
        .unwrap();
    assert_eq!(lt_nif["a"]["leaks"], true);
    assert!(lt_nif["b"]["bytes"].is_null());
    let (code, out, _) = diff(&healthy, &a, false);
    assert_eq!(code, 1);
    assert!(out.contains("new growth in lt_growing, lt_nif.so"), "{out}");

    // Bad inputs: exit 2 with what to do.
    let empty = base.join("empty");
    fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = diff(&empty, &healthy, false);
    assert_eq!(code, 2);
    assert!(err.contains("holds no report.json"), "{err}");
    let garbage = base.join("garbage.json");
    fs::write(&garbage, "{\"schema\": 1, \"samples\": 3}").unwrap();
    let (code, _, err) = diff(&healthy, &garbage, false);
    assert_eq!(code, 2);
    assert!(err.contains("not a valid leaktrace recording"), "{err}");
    assert!(!err.contains("panicked"));
}
