//! Harness for cross-process tests: processes on distinct loopback addresses stand in
//! for pods. It is a test harness, never presented as Kubernetes.
#![forbid(unsafe_code)]
