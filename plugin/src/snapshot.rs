//! What one look at a BalancedService reads from the API server: the resource, its app
//! ReplicaSets and pods, its proxy pods with what each reports on its admin port
//! (through the API server's pod proxy), and its Events. The reading is in [`crate::read`];
//! this is the data, so that the tree is a pure function of it.

use ballast_api::BalancedService;
use ballast_api::admin::EndpointReport;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;

/// Everything one look read.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// When it was read.
    pub at: Timestamp,
    /// The BalancedService.
    pub service: BalancedService,
    /// Its app ReplicaSets (every revision still around).
    pub replica_sets: Vec<ReplicaSet>,
    /// Its app pods.
    pub pods: Vec<Pod>,
    /// Its proxy pods, each with its admin report.
    pub proxies: Vec<ProxyReading>,
    /// Its Events, in any order.
    pub events: Vec<Event>,
}

/// A proxy pod and what its admin port said.
#[derive(Clone, Debug)]
pub struct ProxyReading {
    /// The proxy pod.
    pub pod: Pod,
    /// `GET /endpoints`, or why it could not be read (not ready, no IP, the API server
    /// could not reach it).
    pub endpoints: Result<Vec<EndpointReport>, String>,
}
