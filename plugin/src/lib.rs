//! `kubectl ballast`: a live view of a BalancedService's rollout and the commands that
//! steer it, from the API server alone.
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod list;
pub mod read;
pub mod render;
pub mod snapshot;
pub mod steer;
pub mod tree;
