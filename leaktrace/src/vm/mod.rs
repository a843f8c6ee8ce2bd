//! The VM's own view of its memory, over Erlang distribution as a hidden node.

pub mod client;
pub mod discover;
pub mod snapshot;

pub use client::{VmClient, VmError};
pub mod render;
pub mod view;
