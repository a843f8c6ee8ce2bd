//! leaktrace: tells why a running Erlang VM (beam.smp) keeps growing.
//!
//! The pipeline: `cli` -> `config` -> `target`/`symbols` -> `probes` (load + attach) ->
//! `carriers` (event aggregation) -> `ledger` (sampling) -> `recording` -> `verdict` (pure) ->
//! `report`. `session` runs it.

pub mod blocks;
pub mod bundle;
pub mod carriers;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod diff;
pub mod error;
pub mod image;
pub mod launch;
pub mod ledger;
pub mod live;
pub mod lock;
pub mod namespace;
pub mod native;
pub mod placement;
pub mod privilege;
pub mod probes;
pub mod recording;
pub mod report;
pub mod resident;
pub mod session;
pub mod symbols;
pub mod target;
pub mod trend;
pub mod units;
pub mod verdict;
pub mod vm;

pub use error::Error;
