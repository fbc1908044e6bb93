//! ballast-operator: reconciles `BalancedService`s (group `ballast.dev`) into the app
//! Deployment, its Services, the bundled proxy and disruption budgets.
//!
//! The reconcile is a pipeline: [`validate`] and [`build`] are pure functions of the
//! spec; [`controller`] applies the result with server-side apply and writes the
//! [`status`] computed from what the API server returned.
#![forbid(unsafe_code)]

pub mod admin;
pub mod adopt;
pub mod api_requests;
pub mod build;
pub mod bypass;
pub mod cache;
pub mod cli;
pub mod controller;
#[cfg(test)]
mod fixtures;
pub mod gate;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod proxy_watch;
pub mod render;
pub mod rollout;
pub mod status;
pub mod triggers;
pub mod validate;

pub use ballast_process::error_chain;
