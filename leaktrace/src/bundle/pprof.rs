//! `native.pb.gz`: outstanding native bytes and allocations by stack as a pprof profile
//! (profile.proto, gzipped), for `go tool pprof` and the tools that read its format.
//!
//! The messages are written out by hand with prost's derive (only the fields used), so that
//! the build needs no protoc; field numbers are profile.proto's.

use std::io::Write as _;

use prost::Message as _;

use super::flame::Stack;

/// profile.proto `Profile` (the fields leaktrace writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// What each value of a sample measures.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples: one per stack.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Locations, one per distinct frame.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions, one per distinct frame.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string of the profile; index 0 is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// Free-form comments (indices into the string table).
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// The sample type shown by default (index into the string table).
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// profile.proto `ValueType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    /// String table index of the type (`outstanding_space`).
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// String table index of the unit (`bytes`).
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// profile.proto `Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Locations, leaf (innermost) first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
}

/// profile.proto `Location`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    /// Non-zero id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The function at this location.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// profile.proto `Line`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    /// The function's id.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// Source line (0: unknown).
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// profile.proto `Function`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    /// Non-zero id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// String table index of the name (`object: function`).
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// String table index of the system name (the same).
    #[prost(int64, tag = "3")]
    pub system_name: i64,
}

/// The string table being built.
struct Strings {
    table: Vec<String>,
    index: std::collections::HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        Strings {
            table: vec![String::new()],
            index: [(String::new(), 0)].into_iter().collect(),
        }
    }

    fn of(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// The profile of `stacks`: sample types `outstanding_objects/count` and
/// `outstanding_space/bytes` (the default), one location and function per distinct frame.
pub fn profile(stacks: &[Stack], comments: &[String]) -> Profile {
    let mut strings = Strings::new();
    let sample_type = vec![
        ValueType {
            r#type: strings.of("outstanding_objects"),
            unit: strings.of("count"),
        },
        ValueType {
            r#type: strings.of("outstanding_space"),
            unit: strings.of("bytes"),
        },
    ];
    let default_sample_type = strings.of("outstanding_space");
    let mut ids: std::collections::HashMap<String, u64> = Default::default();
    let mut location = Vec::new();
    let mut function = Vec::new();
    let mut sample = Vec::new();
    for s in stacks {
        let mut location_id = Vec::with_capacity(s.frames.len());
        // Leaf first in pprof; folded stacks are outermost first.
        for f in s.frames.iter().rev() {
            let id = match ids.get(f) {
                Some(id) => *id,
                None => {
                    let id = ids.len() as u64 + 1;
                    ids.insert(f.clone(), id);
                    let name = strings.of(f);
                    function.push(Function {
                        id,
                        name,
                        system_name: name,
                    });
                    location.push(Location {
                        id,
                        line: vec![Line {
                            function_id: id,
                            line: 0,
                        }],
                    });
                    id
                }
            };
            location_id.push(id);
        }
        sample.push(Sample {
            location_id,
            value: vec![
                i64::try_from(s.objects).unwrap_or(i64::MAX),
                i64::try_from(s.bytes).unwrap_or(i64::MAX),
            ],
        });
    }
    let comment = comments.iter().map(|c| strings.of(c)).collect();
    Profile {
        sample_type,
        sample,
        location,
        function,
        string_table: strings.table,
        comment,
        default_sample_type,
    }
}

/// The profile encoded and gzipped, as `native.pb.gz` holds it.
pub fn gzipped(p: &Profile) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&p.encode_to_vec())?;
    gz.finish()
}
