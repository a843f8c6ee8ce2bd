//! A bounded decoder of the Erlang external term format. Every byte of a reply comes from the
//! node, whose owner may replace any module our calls go through (erpc included): before it
//! allocates or recurses, the decoder checks the nesting depth, every element count against the
//! bytes actually left, a budget on decoded memory and on the number of terms, and caps what a
//! compressed term may inflate to. What it builds is the `erl_dist::term::Term` the accessors in
//! `vm::term` read, so a reply decoded here reads exactly like one decoded by eetf.

use std::{collections::HashMap, io::Read, mem::size_of};

use erl_dist::term::{
    Atom, BigInteger, Binary, BitBinary, ExternalFun, FixInteger, Float, ImproperList, InternalFun,
    List, Map, Pid, Port, Reference, Term, Tuple,
};

/// Deepest nesting accepted: the replies leaktrace asks for are under 10 levels deep, and the
/// decoder (and dropping what it built) recurses once a level.
pub const MAX_DEPTH: usize = 64;
/// Most memory one reply may take once decoded.
pub const MAX_DECODED_BYTES: usize = 96 << 20;
/// Most terms one reply may hold.
pub const MAX_TERMS: usize = 4_000_000;
/// Most bytes a compressed term may inflate to (the same cap as a frame on the wire).
pub const MAX_INFLATED_BYTES: usize = 32 << 20;
/// Longest big integer accepted, in bytes of magnitude (`vm::term::int` converts through text;
/// the figures asked for fit in 8 bytes).
pub const MAX_BIG_BYTES: usize = 256;
/// Longest atom, in bytes: 255 characters of up to 4 UTF-8 bytes.
const MAX_ATOM_BYTES: usize = 255 * 4;
/// What malloc takes beyond the bytes asked for, per heap allocation (glibc: an 8-byte header,
/// 16-byte granules): a million 1-byte binaries cost far more than a megabyte.
const HEAP_OVERHEAD: usize = 16;

const VERSION: u8 = 131;
const NEW_FLOAT_EXT: u8 = 70;
const BIT_BINARY_EXT: u8 = 77;
const COMPRESSED: u8 = 80;
const ATOM_CACHE_REF: u8 = 82;
const NEW_PID_EXT: u8 = 88;
const NEW_PORT_EXT: u8 = 89;
const NEWER_REFERENCE_EXT: u8 = 90;
const SMALL_INTEGER_EXT: u8 = 97;
const INTEGER_EXT: u8 = 98;
const FLOAT_EXT: u8 = 99;
const ATOM_EXT: u8 = 100;
const REFERENCE_EXT: u8 = 101;
const PORT_EXT: u8 = 102;
const PID_EXT: u8 = 103;
const SMALL_TUPLE_EXT: u8 = 104;
const LARGE_TUPLE_EXT: u8 = 105;
const NIL_EXT: u8 = 106;
const STRING_EXT: u8 = 107;
const LIST_EXT: u8 = 108;
const BINARY_EXT: u8 = 109;
const SMALL_BIG_EXT: u8 = 110;
const LARGE_BIG_EXT: u8 = 111;
const NEW_FUN_EXT: u8 = 112;
const EXPORT_EXT: u8 = 113;
const NEW_REFERENCE_EXT: u8 = 114;
const SMALL_ATOM_EXT: u8 = 115;
const MAP_EXT: u8 = 116;
const FUN_EXT: u8 = 117;
const ATOM_UTF8_EXT: u8 = 118;
const SMALL_ATOM_UTF8_EXT: u8 = 119;
const V4_PORT_EXT: u8 = 120;

/// Why a reply was refused. The cap variants name what was exceeded; see [`WireError::is_cap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("a reply nested deeper than {0} levels")]
    TooDeep(usize),
    /// A frame or a compressed term larger than its cap.
    #[error("a reply of {} MB, over the {} MiB cap", mb(*bytes), cap >> 20)]
    TooLarge {
        /// Declared size.
        bytes: u64,
        /// The cap.
        cap: usize,
    },
    /// A container whose elements would take more than the decoding budget.
    #[error("a {what} of {count} elements needs more than the {} MiB decoding budget", MAX_DECODED_BYTES >> 20)]
    OverBudget {
        /// "list", "tuple", "binary", ...
        what: &'static str,
        /// Its declared element count.
        count: u64,
    },
    /// More terms than [`MAX_TERMS`].
    #[error("a reply of more than {MAX_TERMS} terms")]
    TooManyTerms,
    /// A big integer longer than [`MAX_BIG_BYTES`].
    #[error("an integer of {0} bytes, over the {MAX_BIG_BYTES}-byte cap")]
    BigTooLarge(u64),
    /// Truncated, lying counts, unknown tags, invalid text.
    #[error("a malformed reply: {0}")]
    Malformed(String),
}

impl WireError {
    /// Whether a cap was exceeded (as opposed to a reply that is merely malformed).
    pub fn is_cap(&self) -> bool {
        !matches!(self, WireError::Malformed(_))
    }
}

fn mb(bytes: u64) -> u64 {
    bytes.div_ceil(1_000_000)
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// Decodes one term with its version byte from `bytes`, which it must fill exactly.
pub fn decode(bytes: &[u8]) -> Result<Term, WireError> {
    let mut d = Decoder::new(bytes);
    let t = d.term()?;
    if !d.rest().is_empty() {
        return Err(malformed(format!(
            "{} bytes after the term",
            d.rest().len()
        )));
    }
    Ok(t)
}

/// Reads terms one after the other from a buffer (a distribution frame holds a control term and
/// a payload term), with one budget for all of them.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of memory the terms decoded so far take.
    used: usize,
    terms: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Decoder<'a> {
        Decoder {
            buf,
            pos: 0,
            used: 0,
            terms: 0,
        }
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Decodes the next term: a version byte, then a term or a compressed term.
    pub fn term(&mut self) -> Result<Term, WireError> {
        let v = self.u8()?;
        if v != VERSION {
            return Err(malformed(format!("version byte {v}, expected {VERSION}")));
        }
        if self.rest().first() == Some(&COMPRESSED) {
            self.pos += 1;
            return self.compressed();
        }
        self.decode(0)
    }

    fn compressed(&mut self) -> Result<Term, WireError> {
        let size = self.u32()? as usize;
        if size > MAX_INFLATED_BYTES {
            return Err(WireError::TooLarge {
                bytes: size as u64,
                cap: MAX_INFLATED_BYTES,
            });
        }
        // One byte more than declared: a stream that goes on past it is refused without
        // inflating the rest.
        // Capacity reserved, not touched: pages a lying size never fills never become resident.
        let mut inflated = Vec::with_capacity(size + 1);
        let mut z = flate2::bufread::ZlibDecoder::new(self.rest());
        (&mut z)
            .take(size as u64 + 1)
            .read_to_end(&mut inflated)
            .map_err(|e| malformed(format!("compressed term: {e}")))?;
        if inflated.len() != size {
            return Err(malformed(format!(
                "compressed term inflates to {}{} bytes, not the {size} declared",
                inflated.len().min(size),
                if inflated.len() > size { "+" } else { "" }
            )));
        }
        // A payload term may follow: go on after the bytes the stream took.
        self.pos += usize::try_from(z.total_in())
            .unwrap_or(usize::MAX)
            .min(self.rest().len());
        self.charge(inflated.len())?;
        let mut inner = Decoder {
            buf: &inflated,
            pos: 0,
            used: self.used,
            terms: self.terms,
        };
        let t = inner.decode(0)?;
        if !inner.rest().is_empty() {
            return Err(malformed("bytes after the compressed term"));
        }
        self.used = inner.used;
        self.terms = inner.terms;
        Ok(t)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() - self.pos < n {
            return Err(malformed(format!(
                "truncated: {n} bytes needed at offset {}, {} left",
                self.pos,
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// Adds `bytes` to the memory budget.
    fn charge(&mut self, bytes: usize) -> Result<(), WireError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > MAX_DECODED_BYTES {
            return Err(WireError::OverBudget {
                what: "reply",
                count: self.terms as u64,
            });
        }
        Ok(())
    }

    /// Checks a container of `count` elements of at least `min_bytes` each on the wire, and of
    /// `slot` bytes each in memory, before anything is allocated for it.
    fn admit(
        &mut self,
        what: &'static str,
        count: usize,
        min_bytes: usize,
        slot: usize,
    ) -> Result<(), WireError> {
        let left = self.buf.len() - self.pos;
        if count.saturating_mul(min_bytes) > left {
            return Err(malformed(format!(
                "a {what} of {count} elements in {left} bytes"
            )));
        }
        let over = self.used.saturating_add(count.saturating_mul(slot)) > MAX_DECODED_BYTES;
        if over {
            return Err(WireError::OverBudget {
                what,
                count: count as u64,
            });
        }
        if self.terms.saturating_add(count) > MAX_TERMS {
            return Err(WireError::TooManyTerms);
        }
        self.used += count * slot;
        Ok(())
    }

    fn decode(&mut self, depth: usize) -> Result<Term, WireError> {
        if depth >= MAX_DEPTH {
            return Err(WireError::TooDeep(MAX_DEPTH));
        }
        self.terms += 1;
        if self.terms > MAX_TERMS {
            return Err(WireError::TooManyTerms);
        }
        if depth == 0 {
            self.charge(size_of::<Term>())?;
        }
        let tag = self.u8()?;
        let t: Term = match tag {
            SMALL_INTEGER_EXT => FixInteger::from(i32::from(self.u8()?)).into(),
            INTEGER_EXT => FixInteger::from(self.u32()? as i32).into(),
            NEW_FLOAT_EXT => float(f64::from_bits(self.u64()?))?,
            FLOAT_EXT => {
                let b = self.take(31)?;
                let s = std::str::from_utf8(b)
                    .map_err(|_| malformed("float text is not ASCII"))?
                    .trim_end_matches('\0');
                float(
                    s.trim()
                        .parse::<f64>()
                        .map_err(|_| malformed("float text"))?,
                )?
            }
            ATOM_EXT | SMALL_ATOM_EXT | ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT => {
                self.atom_body(tag)?.into()
            }
            SMALL_TUPLE_EXT => {
                let n = usize::from(self.u8()?);
                Tuple::from(self.elements("tuple", n, depth)?).into()
            }
            LARGE_TUPLE_EXT => {
                let n = self.u32()? as usize;
                Tuple::from(self.elements("tuple", n, depth)?).into()
            }
            NIL_EXT => List::nil().into(),
            STRING_EXT => {
                let n = usize::from(self.u16()?);
                let bytes = self.bytes(n)?;
                erl_dist::term::Term::ByteList(bytes.into())
            }
            LIST_EXT => {
                let n = self.u32()? as usize;
                let elements = self.elements("list", n, depth)?;
                match self.decode(depth + 1)? {
                    Term::List(l) if l.is_nil() => List::from(elements).into(),
                    last => {
                        // The tail is boxed.
                        self.charge(size_of::<Term>())?;
                        ImproperList::from((elements, last)).into()
                    }
                }
            }
            BINARY_EXT => {
                let n = self.u32()? as usize;
                Binary::from(self.bytes(n)?).into()
            }
            BIT_BINARY_EXT => {
                let n = self.u32()? as usize;
                let bits = self.u8()?;
                if !(1..=8).contains(&bits) || n == 0 {
                    return Err(malformed("bit binary with a bad bit count"));
                }
                let mut bytes = self.bytes(n)?;
                // eetf keeps the last byte's bits in the low end.
                if let Some(last) = bytes.last_mut() {
                    *last >>= 8 - bits;
                }
                BitBinary::from((bytes, bits)).into()
            }
            SMALL_BIG_EXT => {
                let n = usize::from(self.u8()?);
                self.big(n)?
            }
            LARGE_BIG_EXT => {
                let n = self.u32()? as usize;
                self.big(n)?
            }
            MAP_EXT => {
                let n = self.u32()? as usize;
                // Keys and values both take a slot, plus the hash table's own word per entry.
                self.admit("map", n.saturating_mul(2), 1, size_of::<Term>() + 4)?;
                let mut map = HashMap::with_capacity(n);
                for _ in 0..n {
                    let k = self.decode(depth + 1)?;
                    let v = self.decode(depth + 1)?;
                    map.insert(k, v);
                }
                Map::from(map).into()
            }
            PID_EXT | NEW_PID_EXT => {
                let node = self.atom()?;
                let id = self.u32()?;
                let serial = self.u32()?;
                let creation = if tag == PID_EXT {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                Pid {
                    node,
                    id,
                    serial,
                    creation,
                }
                .into()
            }
            PORT_EXT | NEW_PORT_EXT | V4_PORT_EXT => {
                let node = self.atom()?;
                let id = if tag == V4_PORT_EXT {
                    self.u64()?
                } else {
                    u64::from(self.u32()?)
                };
                let creation = if tag == PORT_EXT {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                Port { node, id, creation }.into()
            }
            REFERENCE_EXT => {
                let node = self.atom()?;
                let id = vec![self.u32()?];
                let creation = u32::from(self.u8()?);
                Reference { node, id, creation }.into()
            }
            NEW_REFERENCE_EXT | NEWER_REFERENCE_EXT => {
                let n = usize::from(self.u16()?);
                // OTP sends at most 5 words (3 before OTP 24).
                if n > 5 {
                    return Err(malformed(format!("a reference of {n} words")));
                }
                let node = self.atom()?;
                let creation = if tag == NEW_REFERENCE_EXT {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                let mut id = Vec::with_capacity(n);
                for _ in 0..n {
                    id.push(self.u32()?);
                }
                self.charge(n * 4 + HEAP_OVERHEAD)?;
                Reference { node, id, creation }.into()
            }
            EXPORT_EXT => {
                let module = self.atom()?;
                let function = self.atom()?;
                let arity = match self.decode(depth + 1)? {
                    Term::FixInteger(i) if (0..=255).contains(&i.value) => i.value as u8,
                    _ => return Err(malformed("export arity")),
                };
                ExternalFun {
                    module,
                    function,
                    arity,
                }
                .into()
            }
            NEW_FUN_EXT => self.new_fun(depth)?,
            FUN_EXT => return Err(malformed("an old-style fun (FUN_EXT): refused")),
            ATOM_CACHE_REF => {
                return Err(malformed(
                    "an atom cache reference, though the atom cache was not negotiated",
                ));
            }
            COMPRESSED => return Err(malformed("a compressed term inside a term")),
            other => return Err(malformed(format!("unknown tag {other}"))),
        };
        Ok(t)
    }

    /// `n` elements, each decoded one level deeper.
    fn elements(
        &mut self,
        what: &'static str,
        n: usize,
        depth: usize,
    ) -> Result<Vec<Term>, WireError> {
        self.admit(what, n, 1, size_of::<Term>())?;
        if n > 0 {
            self.charge(HEAP_OVERHEAD)?;
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.decode(depth + 1)?);
        }
        Ok(v)
    }

    /// `n` raw bytes, charged to the budget.
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, WireError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(malformed(format!("a binary of {n} bytes in {left} bytes")));
        }
        let cost = n + HEAP_OVERHEAD;
        if self.used.saturating_add(cost) > MAX_DECODED_BYTES {
            return Err(WireError::OverBudget {
                what: "binary",
                count: n as u64,
            });
        }
        self.used += cost;
        Ok(self.take(n)?.to_vec())
    }

    fn big(&mut self, n: usize) -> Result<Term, WireError> {
        if n > MAX_BIG_BYTES {
            return Err(WireError::BigTooLarge(n as u64));
        }
        let sign = match self.u8()? {
            0 => num_bigint::Sign::Plus,
            1 => num_bigint::Sign::Minus,
            s => return Err(malformed(format!("big integer sign {s}"))),
        };
        let digits = self.take(n)?;
        self.charge(n + HEAP_OVERHEAD)?;
        let value = num_bigint::BigInt::from_bytes_le(sign, digits);
        Ok(BigInteger { value }.into())
    }

    /// The body of an atom whose tag was just read.
    fn atom_body(&mut self, tag: u8) -> Result<Atom, WireError> {
        let n = match tag {
            ATOM_EXT | ATOM_UTF8_EXT => usize::from(self.u16()?),
            _ => usize::from(self.u8()?),
        };
        if n > MAX_ATOM_BYTES {
            return Err(malformed(format!("an atom of {n} bytes")));
        }
        let b = self.take(n)?;
        let name = match tag {
            ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT => std::str::from_utf8(b)
                .map_err(|_| malformed("an atom that is not UTF-8"))?
                .to_owned(),
            // Latin-1: every byte is the code point of the same value.
            _ => b.iter().map(|&c| char::from(c)).collect(),
        };
        if name.chars().count() > 255 {
            return Err(malformed("an atom of more than 255 characters"));
        }
        self.charge(name.len() + HEAP_OVERHEAD)?;
        Ok(Atom::from(name))
    }

    /// An atom (any of the atom tags), as in the fields of pids, ports, references and funs.
    fn atom(&mut self) -> Result<Atom, WireError> {
        let tag = self.u8()?;
        match tag {
            ATOM_EXT | SMALL_ATOM_EXT | ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT => self.atom_body(tag),
            other => Err(malformed(format!("expected an atom, found tag {other}"))),
        }
    }

    fn small_int(&mut self) -> Result<i32, WireError> {
        match self.u8()? {
            SMALL_INTEGER_EXT => Ok(i32::from(self.u8()?)),
            INTEGER_EXT => Ok(self.u32()? as i32),
            other => Err(malformed(format!("expected an integer, found tag {other}"))),
        }
    }

    /// NEW_FUN_EXT: decoded (bounded like the rest) though no call of ours returns a fun.
    fn new_fun(&mut self, depth: usize) -> Result<Term, WireError> {
        // Size counts itself.
        let start = self.pos;
        let size = self.u32()? as usize;
        if size < 4 || size - 4 > self.buf.len() - self.pos {
            return Err(malformed(format!("a fun of {size} bytes")));
        }
        let arity = self.u8()?;
        let mut uniq = [0; 16];
        uniq.copy_from_slice(self.take(16)?);
        let index = self.u32()?;
        let num_free = self.u32()? as usize;
        let module = self.atom()?;
        let old_index = self.small_int()?;
        let old_uniq = self.small_int()?;
        let pid = match self.decode(depth + 1)? {
            Term::Pid(p) => p,
            _ => return Err(malformed("fun without a pid")),
        };
        let free_vars = self.elements("fun", num_free, depth)?;
        if self.pos - start != size {
            return Err(malformed("a fun whose size does not match its content"));
        }
        Ok(Term::from(InternalFun::New {
            module,
            arity,
            pid,
            free_vars,
            index,
            uniq,
            old_index,
            old_uniq,
        }))
    }
}

fn float(v: f64) -> Result<Term, WireError> {
    Float::try_from(v)
        .map(Term::from)
        .map_err(|_| malformed("a float that is not finite"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    fn encode(t: &Term) -> Vec<u8> {
        let mut v = Vec::new();
        t.encode(&mut v).expect("eetf encodes");
        v
    }

    fn a(s: &str) -> Term {
        Atom::from(s).into()
    }

    /// `[[[...]]]` `depth` levels deep, written by hand (eetf's encoder recurses too).
    fn nested_list(depth: usize) -> Vec<u8> {
        let mut v = vec![VERSION];
        for _ in 0..depth {
            v.extend_from_slice(&[LIST_EXT, 0, 0, 0, 1]);
        }
        v.push(NIL_EXT);
        v.extend(std::iter::repeat_n(NIL_EXT, depth));
        v
    }

    /// A proper list of `n` small integers.
    fn wide_list(n: u32) -> Vec<u8> {
        let mut v = vec![VERSION, LIST_EXT];
        v.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            v.extend_from_slice(&[SMALL_INTEGER_EXT, 7]);
        }
        v.push(NIL_EXT);
        v
    }

    fn compressed(inner: &[u8], declared: u32) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(inner).unwrap();
        let mut v = vec![VERSION, COMPRESSED];
        v.extend_from_slice(&declared.to_be_bytes());
        v.extend(z.finish().unwrap());
        v
    }

    #[test]
    fn normal_replies_read_as_eetf_reads_them() {
        let mut map = HashMap::new();
        map.insert(a("count"), FixInteger::from(3).into());
        map.insert(a("memory"), BigInteger::from(1u64 << 40).into());
        let pid = Pid::new(Atom::from("n@h"), 1, 2, 3);
        let reply = Term::from(Tuple::from(vec![
            a("ok"),
            FixInteger::from(-5).into(),
            FixInteger::from(1_000_000).into(),
            BigInteger::from(-(1i64 << 50)).into(),
            Float::try_from(2.5f64).unwrap().into(),
            List::from(vec![pid.clone().into(), a("été")]).into(),
            Term::ByteList(vec![1, 2, 3].into()),
            Binary::from(vec![0u8; 300]).into(),
            BitBinary::from((vec![0xff, 0x0f], 4)).into(),
            ImproperList::from((vec![a("x")], a("tail"))).into(),
            Map::from(map).into(),
            Reference {
                node: Atom::from("n@h"),
                id: vec![1, 2, 3],
                creation: 9,
            }
            .into(),
            Port {
                node: Atom::from("n@h"),
                id: 77,
                creation: 2,
            }
            .into(),
            ExternalFun {
                module: Atom::from("m"),
                function: Atom::from("f"),
                arity: 2,
            }
            .into(),
            List::nil().into(),
        ]));
        let bytes = encode(&reply);
        assert_eq!(decode(&bytes).unwrap(), reply);
        assert_eq!(decode(&bytes).unwrap(), Term::decode(&bytes[..]).unwrap());
        // Compressed as term_to_binary(T, [compressed]) does.
        let z = compressed(&bytes[1..], (bytes.len() - 1) as u32);
        assert_eq!(decode(&z).unwrap(), reply);
    }

    #[test]
    fn deep_nesting_is_refused_at_the_limit() {
        assert!(decode(&nested_list(MAX_DEPTH - 2)).is_ok());
        let e = decode(&nested_list(2_000_000)).unwrap_err();
        assert_eq!(e, WireError::TooDeep(MAX_DEPTH));
        assert_eq!(e.to_string(), "a reply nested deeper than 64 levels");
    }

    #[test]
    fn a_long_list_is_refused_before_it_is_allocated() {
        // 30 M elements: over the term count and the budget, refused from the count alone.
        let mut v = vec![VERSION, LIST_EXT];
        v.extend_from_slice(&30_000_000u32.to_be_bytes());
        v.extend(std::iter::repeat_n(NIL_EXT, 30_000_001));
        let e = decode(&v).unwrap_err();
        assert!(e.is_cap(), "{e}");
        // 3 M elements fit the term count but not the memory budget.
        let e = decode(&wide_list(3_500_000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a list of 3500000 elements needs more than the 96 MiB decoding budget"
        );
        assert!(decode(&wide_list(100_000)).is_ok());
    }

    #[test]
    fn many_small_binaries_count_what_malloc_takes_for_them() {
        // 2 M one-byte binaries: 12 MB on the wire, far more than 2 MB once allocated.
        let n = 2_000_000u32;
        let mut v = vec![VERSION, LIST_EXT];
        v.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            v.extend_from_slice(&[BINARY_EXT, 0, 0, 0, 1, 0xaa]);
        }
        v.push(NIL_EXT);
        let e = decode(&v).unwrap_err();
        assert!(e.is_cap(), "{e}");
        assert!(e.to_string().contains("96 MiB decoding budget"), "{e}");
    }

    #[test]
    fn lying_counts_are_refused_from_the_bytes_left() {
        for tag in [LIST_EXT, LARGE_TUPLE_EXT, MAP_EXT, BINARY_EXT] {
            let mut v = vec![VERSION, tag];
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v.extend_from_slice(&[NIL_EXT; 16]);
            let e = decode(&v).unwrap_err();
            assert!(matches!(e, WireError::Malformed(_)), "tag {tag}: {e}");
        }
    }

    #[test]
    fn a_zlib_bomb_stops_at_the_cap() {
        // 40 MiB of one byte, a few KiB compressed: refused by its declared size.
        let mut inner = vec![BINARY_EXT];
        inner.extend_from_slice(&(40u32 << 20).to_be_bytes());
        inner.resize(5 + (40 << 20), 0);
        let z = compressed(&inner, inner.len() as u32);
        assert!(z.len() < 100_000);
        let e = decode(&z).unwrap_err();
        assert!(e.to_string().contains("over the 32 MiB cap"), "{e}");
        // Declared small, inflating past it: refused after size + 1 bytes.
        let z = compressed(&inner, 1000);
        assert!(matches!(decode(&z), Err(WireError::Malformed(_))));
    }

    #[test]
    fn big_integers_and_atoms_are_capped() {
        let mut v = vec![VERSION, LARGE_BIG_EXT];
        v.extend_from_slice(&100_000u32.to_be_bytes());
        v.push(0);
        v.resize(v.len() + 100_000, 0xff);
        assert_eq!(decode(&v).unwrap_err(), WireError::BigTooLarge(100_000));
        let mut v = vec![VERSION, ATOM_UTF8_EXT, 0xff, 0xff];
        v.resize(v.len() + 0xffff, b'a');
        assert!(matches!(decode(&v), Err(WireError::Malformed(_))));
        let v = vec![VERSION, SMALL_ATOM_UTF8_EXT, 2, 0xc3, 0x28];
        assert!(matches!(decode(&v), Err(WireError::Malformed(_))));
        let v = vec![VERSION, ATOM_CACHE_REF, 0];
        assert!(matches!(decode(&v), Err(WireError::Malformed(_))));
    }

    #[test]
    fn a_frame_reads_as_control_then_payload() {
        let control = encode(&Tuple::from(vec![FixInteger::from(2).into(), a("x")]).into());
        let payload = encode(&a("hello"));
        let z = compressed(&payload[1..], (payload.len() - 1) as u32);
        for second in [payload.clone(), z] {
            let mut frame = control.clone();
            frame.extend_from_slice(&second);
            let mut d = Decoder::new(&frame);
            assert!(matches!(d.term().unwrap(), Term::Tuple(_)));
            assert_eq!(d.term().unwrap(), a("hello"));
            assert!(d.rest().is_empty());
        }
    }

    /// A term as a recursive strategy (depth and width small: this is about shapes).
    fn arb_term() -> impl Strategy<Value = Term> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(|i| Term::from(FixInteger::from(i))),
            any::<i64>().prop_map(|i| Term::from(BigInteger::from(i))),
            "[a-zé_]{0,12}".prop_map(|s| a(&s)),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| Term::from(Binary::from(b))),
            (-1e9f64..1e9).prop_map(|f| Term::from(Float::try_from(f).unwrap())),
            Just(Term::from(List::nil())),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(|v| Term::from(List::from(v))),
                prop::collection::vec(inner.clone(), 0..6).prop_map(|v| Term::from(Tuple::from(v))),
                (prop::collection::vec(inner.clone(), 1..4), inner.clone()).prop_map(
                    |(v, last)| match last {
                        Term::List(l) if l.is_nil() => Term::from(List::from(v)),
                        last => Term::from(ImproperList::from((v, last))),
                    }
                ),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn round_trips_what_eetf_encodes(t in arb_term()) {
            let bytes = encode(&t);
            prop_assert_eq!(decode(&bytes).unwrap(), Term::decode(&bytes[..]).unwrap());
        }

        #[test]
        fn truncated_replies_are_errors(t in arb_term(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&t);
            let n = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..n]).is_err());
        }

        #[test]
        fn corrupted_replies_never_panic(
            t in arb_term(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode(&t);
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let _ = decode(&bytes);
        }

        #[test]
        fn random_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            bytes.insert(0, VERSION);
            let _ = decode(&bytes);
        }

        #[test]
        fn lying_counts_never_allocate_what_they_claim(
            tag in prop::sample::select(vec![LIST_EXT, LARGE_TUPLE_EXT, MAP_EXT, BINARY_EXT, LARGE_BIG_EXT]),
            count in any::<u32>(),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut v = vec![VERSION, tag];
            v.extend_from_slice(&count.to_be_bytes());
            v.extend_from_slice(&body);
            // Would abort on allocation failure (or take gigabytes) if counts were trusted.
            let _ = decode(&v);
        }

        #[test]
        fn deep_terms_fail_at_the_limit(depth in MAX_DEPTH..5000usize) {
            prop_assert_eq!(decode(&nested_list(depth)), Err(WireError::TooDeep(MAX_DEPTH)));
        }
    }
}
