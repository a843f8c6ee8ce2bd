//! The VM's own view of its memory, over Erlang distribution as a hidden node.

pub mod client;
pub mod discover;
pub mod epmd;
pub mod parse;
pub mod query;
pub mod render;
pub mod sandbox;
pub mod term;
pub mod view;
pub mod wire;

pub use client::{VmClient, VmError};
