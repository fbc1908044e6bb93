//! ballast-proxy: balances each request (not each connection) across a Service's pods
//! and reports per-pod in-flight requests and connections for the drain gate.
#![forbid(unsafe_code)]
