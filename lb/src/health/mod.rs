//! Where a backend's health comes from, one task each: the active [`probe`] of every pool
//! member (Azure's health probe), and the LB's own [`data_path`] probe through each frontend.
//! The third source, passive failures of client connects, is the connection path's
//! (`conn`); all three go through `Shared::observe_health`, the one place a backend goes down.
//! The pure state machine and the state they feed are in [`crate::backend`].

pub mod data_path;
pub mod probe;
