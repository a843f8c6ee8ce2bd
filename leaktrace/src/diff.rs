//! `leaktrace diff A B`: what changed between two runs.
