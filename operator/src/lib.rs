//! ballast-operator: reconciles `BalancedService`s (group `ballast.dev`).
//!
//! The reconcile pipeline (validate -> build -> apply -> status) arrives with the
//! operator issue; today the crate provides the command line and the CRD generator.
#![forbid(unsafe_code)]

pub mod cli;
