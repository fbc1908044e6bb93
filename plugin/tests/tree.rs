//! Snapshot tests of the rendered tree: a rollout in progress, a paused one and a
//! drain that timed out, each from the objects the API server would return.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Moment, now, snapshot};
use kubectl_ballast::render::{self, Layout};
use kubectl_ballast::tree::{PodState, Tree};

fn rendered(moment: Moment) -> (Tree, String) {
    let tree = Tree::build(&snapshot(moment, 1), Some(&snapshot(moment, 0)));
    let text = render::tree(&tree, Layout { width: None });
    (tree, text)
}

#[test]
fn a_rollout_in_progress() {
    let (tree, text) = rendered(Moment::InProgress);
    insta::assert_snapshot!("rollout_in_progress", text);
    // The facts the snapshot shows, asserted so a changed snapshot cannot hide them.
    let state = |name: &str| tree.pods().find(|p| p.name == name).unwrap().state.clone();
    assert_eq!(
        state("demo-7b2a41c9-ccccc"),
        PodState::WaitingForGate {
            proxies: vec!["demo-proxy-x2".to_owned()],
            message: None
        }
    );
    assert_eq!(state("demo-7b2a41c9-ddddd"), PodState::Starting);
    match state("demo-5d8f9c7b-bbbbb") {
        PodState::Draining {
            in_flight,
            connections,
            since,
            forced,
        } => {
            assert_eq!((in_flight, connections, forced), (3, 2, None));
            assert_eq!(since.map(|s| now().as_second() - s.as_second()), Some(12));
        }
        other => panic!("{other:?}"),
    }
    // Shares of the requests between the two reads: 120, 100, 110 and 4 of 334.
    let shares: Vec<(String, u32)> = tree
        .pods()
        .filter_map(|p| {
            p.share
                .map(|s| (p.name.clone(), (s * 1000.0).round() as u32))
        })
        .collect();
    assert_eq!(
        shares,
        [
            ("demo-7b2a41c9-aaaaa".to_owned(), 359),
            ("demo-7b2a41c9-bbbbb".to_owned(), 299),
            ("demo-7b2a41c9-ccccc".to_owned(), 0),
            ("demo-5d8f9c7b-aaaaa".to_owned(), 329),
            ("demo-5d8f9c7b-bbbbb".to_owned(), 12),
        ]
    );
    // The old ReplicaSet scaled to 0 without pods is not shown.
    assert!(!text.contains("1a2b3c4d"), "{text}");
}

#[test]
fn a_paused_rollout() {
    let (tree, text) = rendered(Moment::Paused);
    insta::assert_snapshot!("rollout_paused", text);
    assert_eq!(tree.phase, "Paused");
    assert!(
        text.contains("PAUSED 20s ago: 2 drains reached the timeout"),
        "{text}"
    );
    assert!(tree.pods().all(|p| p.state == PodState::Ready));
}

#[test]
fn a_drain_that_timed_out() {
    let (tree, text) = rendered(Moment::DrainTimedOut);
    insta::assert_snapshot!("drain_timed_out", text);
    let old = tree
        .pods()
        .find(|p| p.name == "demo-5d8f9c7b-bbbbb")
        .unwrap();
    assert!(
        matches!(old.state, PodState::Draining { forced: Some(f), .. } if f.in_flight == 1 && f.connections == 2),
        "{:?}",
        old.state
    );
    assert!(
        text.contains("DRAIN TIMED OUT 31s: 1 in flight, 2 connections left"),
        "{text}"
    );
}

#[test]
fn on_a_terminal_lines_are_cut_to_its_width() {
    let tree = Tree::build(&snapshot(Moment::Paused, 1), None);
    let text = render::tree(&tree, Layout { width: Some(80) });
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    assert!(text.lines().any(|l| l.ends_with('…')), "{text}");
    // Without a previous read there is no share to show.
    assert!(tree.pods().all(|p| p.share.is_none()));
}

#[test]
fn without_live_proxy_reads_a_drain_comes_from_the_status() {
    let mut now = snapshot(Moment::InProgress, 1);
    for proxy in &mut now.proxies {
        proxy.endpoints = Err("no answer through the API server within 3s".to_owned());
    }
    let tree = Tree::build(&now, None);
    let old = tree
        .pods()
        .find(|p| p.name == "demo-5d8f9c7b-bbbbb")
        .unwrap();
    assert!(
        matches!(
            old.state,
            PodState::Draining {
                in_flight: 3,
                connections: 2,
                ..
            }
        ),
        "{:?}",
        old.state
    );
    let gated = tree
        .pods()
        .find(|p| p.name == "demo-7b2a41c9-ccccc")
        .unwrap();
    assert_eq!(
        gated.state,
        PodState::WaitingForGate {
            proxies: Vec::new(),
            message: Some("10.0.0.7 not yet in the endpoints of proxy demo-proxy-x2".to_owned())
        }
    );
    let text = render::tree(&tree, Layout { width: None });
    assert!(
        text.contains("admin not read: no answer through the API server within 3s"),
        "{text}"
    );
}
