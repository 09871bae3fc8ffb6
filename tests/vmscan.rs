//! vmscan against the real kernel (to be written).

#[path = "common/mod.rs"]
mod common;
