//! The `BalancedService` API (`ballast.dev/v1alpha1`).
//!
//! The Rust types are the source of truth: the CRD in `crds/` is generated from them
//! (`cargo run -p ballast-operator -- crd`) and a test fails when the committed copy
//! differs.
//!
//! Two contracts between ballast's own binaries live here too, serde only: [`admin`],
//! the proxy's admin API that the operator and the drain helper read, and [`settings`],
//! the flags the operator passes to the proxy and the drain helper. The proxy depends
//! on this crate without its default `resource` feature, so it carries neither the
//! resource types nor their dependencies. [`meta`] names the labels, the pod condition
//! and the rollout-request annotations the operator and the kubectl plugin share.
#![forbid(unsafe_code)]

pub mod admin;
pub mod meta;
#[cfg(feature = "resource")]
mod resource;
pub mod settings;
#[cfg(feature = "resource")]
pub mod spec;
#[cfg(feature = "resource")]
pub mod status;
#[cfg(feature = "resource")]
pub use resource::*;
