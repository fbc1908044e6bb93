//! ballast-proxy: balances each request (not each connection) across a Service's pods
//! and reports per-pod in-flight requests and connections for the drain gate.
//!
//! Data flow: [`discovery`] publishes [`endpoint::EndpointSet`]s; the
//! [`registry::Registry`] turns them into live endpoint state and a snapshot that
//! [`forward::Proxy`] selects from per request; [`pool`] keeps connections per endpoint;
//! [`admin`] serves health, metrics, the endpoint table and the drain API.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod drain;
pub mod endpoint;
pub mod forward;
pub mod grpc;
pub mod load;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod replay;
pub mod server;
pub mod workers;
