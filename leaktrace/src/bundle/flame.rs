//! Outstanding native bytes by stack: the folded lines of `native.folded` and the flame graph
//! of `native.svg` (drawn by inferno from the same lines).
//!
//! With `--stacks`, the recorded allocation stacks; without, each object and its symbolized
//! functions (`object;function`), the object's bytes no function accounts for under
//! `object;[other]`.

use crate::recording::native::{NativeEvidence, series_key};

/// One stack and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Stack {
    /// Outermost frame first (the folded order).
    pub frames: Vec<String>,
    /// Bytes allocated and not freed.
    pub bytes: u64,
    /// Allocations not freed (0 when unknown: functions have bytes only).
    pub objects: u64,
}

/// Where the stacks came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackSource {
    /// Recorded allocation stacks (`--stacks`).
    Stacks,
    /// Objects and their functions (no stacks recorded).
    Modules,
    /// Nothing: the native probes did not attach, or everything was freed.
    None,
}

/// A frame safe in a folded line: no `;` (the separator: made `:`), no control character.
fn frame(name: &str) -> String {
    let f = crate::vm::render::clean(name).replace(';', ":");
    if f.trim().is_empty() {
        "[unnamed]".into()
    } else {
        f
    }
}

/// The stacks holding outstanding bytes, largest first, and where they came from.
pub fn stacks(native: Option<&NativeEvidence>) -> (Vec<Stack>, StackSource) {
    let Some(n) = native else {
        return (Vec::new(), StackSource::None);
    };
    let mut out = Vec::new();
    let source = if !n.stacks.is_empty() {
        for s in &n.stacks {
            if s.outstanding_bytes <= 0 {
                continue;
            }
            let mut frames: Vec<String> = s.frames.iter().rev().map(|f| frame(f)).collect();
            if frames.is_empty() {
                frames.push("[no frame]".into());
            }
            if s.nif_api {
                frames.insert(0, "[NIF API]".into());
            }
            out.push(Stack {
                frames,
                bytes: s.outstanding_bytes as u64,
                objects: s.allocations.saturating_sub(s.frees),
            });
        }
        StackSource::Stacks
    } else {
        for m in &n.modules {
            if m.outstanding_bytes <= 0 {
                continue;
            }
            let module = frame(&series_key(&m.module, m.nif_api));
            let total = m.outstanding_bytes as u64;
            let mut attributed = 0u64;
            for (f, b) in &m.functions {
                if *b <= 0 || attributed >= total {
                    continue;
                }
                // Never more than the object holds, whatever the file says.
                let b = (*b as u64).min(total - attributed);
                attributed += b;
                out.push(Stack {
                    frames: vec![module.clone(), frame(f)],
                    bytes: b,
                    objects: 0,
                });
            }
            // The object's own line: bytes no function accounts for, and all its objects
            // (counts are per object only).
            let objects = m.allocations.saturating_sub(m.frees);
            let rest = total - attributed;
            if rest > 0 || objects > 0 {
                out.push(Stack {
                    frames: if m.functions.is_empty() {
                        vec![module.clone()]
                    } else {
                        vec![module.clone(), "[other]".into()]
                    },
                    bytes: rest,
                    objects,
                });
            }
        }
        StackSource::Modules
    };
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.frames.cmp(&b.frames)));
    if out.is_empty() {
        return (out, StackSource::None);
    }
    (out, source)
}

/// Total outstanding bytes of `stacks`.
pub fn total_bytes(stacks: &[Stack]) -> u64 {
    stacks.iter().map(|s| s.bytes).sum()
}

/// `native.folded`: `frame;frame;frame bytes`, one stack a line (lines of 0 bytes left out).
pub fn folded(stacks: &[Stack]) -> String {
    let mut o = String::new();
    for s in stacks.iter().filter(|s| s.bytes > 0) {
        o.push_str(&s.frames.join(";"));
        o.push(' ');
        o.push_str(&s.bytes.to_string());
        o.push('\n');
    }
    o
}

/// `native.svg`: the flame graph of the folded lines (inferno), or a short picture saying why
/// there is none.
pub fn flamegraph(stacks: &[Stack], source: StackSource, subtitle: &str) -> String {
    let text = folded(stacks);
    let title = "leaktrace: outstanding native bytes";
    if text.is_empty() {
        return super::svg::message(
            title,
            "No native allocation outstanding: the native probes did not attach in this run, or everything they saw allocated was freed.",
        );
    }
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = title.into();
    opt.subtitle = Some(format!(
        "{} ({})",
        subtitle,
        match source {
            StackSource::Stacks => "by allocation stack",
            _ => "by object and function; no stacks recorded (--stacks N)",
        }
    ));
    opt.count_name = "bytes".into();
    opt.name_type = "Frame:".into();
    opt.deterministic = true;
    opt.min_width = 0.0;
    let mut svg = Vec::new();
    match inferno::flamegraph::from_lines(&mut opt, text.lines(), &mut svg) {
        Ok(()) => String::from_utf8_lossy(&svg).into_owned(),
        Err(e) => super::svg::message(title, &format!("The flame graph could not be drawn: {e}")),
    }
}
