use super::*;
use serde_json::json;

fn slice(value: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(value).unwrap()
}

/// A slice `name` with one ready endpoint per address, on port `http` 8080.
fn web(name: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    slice(json!({
        "metadata": {"name": name},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
}

fn addresses(cache: &SliceCache) -> Vec<String> {
    cache
        .endpoints(Some("http"))
        .iter()
        .map(|e| e.address.ip().to_string())
        .collect()
}

#[test]
fn merges_slices_maps_conditions_and_picks_the_named_port() {
    let a = slice(json!({
        "metadata": {"name": "web-abc"},
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "web-1"}, "zone": "europe-west1-b"},
            {"addresses": ["10.0.0.2"],
             "conditions": {"ready": false, "serving": true, "terminating": true}}
        ]
    }));
    let b = slice(json!({
        "metadata": {"name": "web-def"},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.0.0.3"]}]
    }));
    let fqdn = slice(json!({
        "metadata": {"name": "web-fqdn"}, "addressType": "FQDN",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["example.com"]}]
    }));
    let set = endpoints_from_slices([&a, &b, &fqdn].into_iter(), Some("http"));
    let got: Vec<_> = set
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.name.clone(),
                e.ready,
                e.serving,
                e.terminating,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "10.0.0.1:8080".into(),
                Some("web-1".into()),
                true,
                true,
                false
            ),
            ("10.0.0.2:8080".into(), None, false, true, true),
            ("10.0.0.3:8080".into(), None, true, true, false),
        ]
    );
    assert_eq!(
        set.iter().next().unwrap().zone.as_deref(),
        Some("europe-west1-b")
    );
}

#[test]
fn nothing_is_published_until_the_list_is_complete() {
    let mut cache = SliceCache::default();
    assert!(!cache.apply(Event::Init));
    assert!(!cache.apply(Event::InitApply(web("web-a", &["10.0.0.1"]))));
    assert!(!cache.apply(Event::InitApply(web("web-b", &["10.0.0.2"]))));
    assert!(addresses(&cache).is_empty(), "a partial list leaked out");
    assert!(cache.apply(Event::InitDone));
    assert_eq!(addresses(&cache), ["10.0.0.1", "10.0.0.2"]);
}

#[test]
fn an_empty_list_is_published() {
    let mut cache = SliceCache::default();
    cache.apply(Event::Init);
    assert!(cache.apply(Event::InitDone), "an empty Service is a result");
    assert!(addresses(&cache).is_empty());
}

#[test]
fn apply_and_delete_change_one_slice() {
    let mut cache = SliceCache::default();
    cache.apply(Event::Init);
    cache.apply(Event::InitApply(web("web-a", &["10.0.0.1"])));
    cache.apply(Event::InitDone);
    assert!(cache.apply(Event::Apply(web("web-b", &["10.0.0.2"]))));
    assert!(cache.apply(Event::Apply(web("web-a", &["10.0.0.3"]))));
    assert_eq!(addresses(&cache), ["10.0.0.2", "10.0.0.3"]);
    assert!(cache.apply(Event::Delete(web("web-b", &[]))));
    assert_eq!(addresses(&cache), ["10.0.0.3"]);
    assert!(
        !cache.apply(Event::Delete(web("web-unknown", &[]))),
        "deleting a slice never seen changes nothing"
    );
}

#[test]
fn a_relist_replaces_the_whole_set_and_keeps_the_old_one_until_it_is_done() {
    let mut cache = SliceCache::default();
    cache.apply(Event::Init);
    cache.apply(Event::InitApply(web("web-a", &["10.0.0.1"])));
    cache.apply(Event::InitApply(web("web-b", &["10.0.0.2"])));
    cache.apply(Event::InitDone);
    // The watch broke; web-b was deleted and web-c created meanwhile.
    assert!(!cache.apply(Event::Init));
    assert!(!cache.apply(Event::InitApply(web("web-a", &["10.0.0.1"]))));
    assert_eq!(
        addresses(&cache),
        ["10.0.0.1", "10.0.0.2"],
        "the last good set stays while the list runs"
    );
    assert!(!cache.apply(Event::InitApply(web("web-c", &["10.0.0.3"]))));
    assert!(cache.apply(Event::InitDone));
    assert_eq!(addresses(&cache), ["10.0.0.1", "10.0.0.3"]);
}

#[test]
fn a_list_that_restarts_midway_starts_from_an_empty_buffer() {
    let mut cache = SliceCache::default();
    cache.apply(Event::Init);
    cache.apply(Event::InitApply(web("web-a", &["10.0.0.1"])));
    // A page failed: the watcher starts over with Init.
    cache.apply(Event::Init);
    cache.apply(Event::InitApply(web("web-b", &["10.0.0.2"])));
    cache.apply(Event::InitDone);
    assert_eq!(addresses(&cache), ["10.0.0.2"]);
}

#[test]
fn an_endpoint_moving_between_slices_is_never_doubled_nor_missing() {
    let mut cache = SliceCache::default();
    cache.apply(Event::Init);
    cache.apply(Event::InitApply(web("web-a", &["10.0.0.1", "10.0.0.2"])));
    cache.apply(Event::InitApply(web("web-b", &["10.0.0.3"])));
    cache.apply(Event::InitDone);
    // The EndpointSlice controller adds the endpoint to its new slice first...
    cache.apply(Event::Apply(web("web-b", &["10.0.0.3", "10.0.0.2"])));
    assert_eq!(addresses(&cache), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    // ...then removes it from the old one.
    cache.apply(Event::Apply(web("web-a", &["10.0.0.1"])));
    assert_eq!(addresses(&cache), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
}
