//! The stand-in's objects: one global resourceVersion counter, the current objects and
//! a bounded history of changes that watches replay from.

use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};

use super::ResourceType;
use super::selector::Selector;

/// Where an object lives: its type's apiVersion and plural, namespace ("" when
/// cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ObjectKey {
    pub api_version: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

/// What a LIST or WATCH request asks for: a collection, optionally one namespace, and
/// the selectors.
#[derive(Clone, Debug)]
pub(super) struct Collection {
    pub resource: ResourceType,
    pub namespace: Option<String>,
    pub selector: Selector,
}

impl Collection {
    fn holds(&self, key: &ObjectKey) -> bool {
        key.api_version == self.resource.api_version
            && key.plural == self.resource.plural
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
    }
}

/// One change: the object before (None when created) and after (None when deleted).
#[derive(Clone, Debug)]
struct Change {
    resource_version: u64,
    key: ObjectKey,
    old: Option<Value>,
    new: Option<Value>,
}

/// Why a watch cannot continue from where it asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Debug)]
pub(super) struct Store {
    pub types: Vec<ResourceType>,
    objects: BTreeMap<ObjectKey, Value>,
    /// The last resourceVersion handed out (the API server's "now").
    pub resource_version: u64,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Changes up to this version are gone from the history: a watch from an older
    /// version gets 410 Gone.
    pub compacted: u64,
    next_uid: u64,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        // Not 0 or 1: a resourceVersion is opaque, and "0" means "any" to a watch.
        let start = 1000;
        Self {
            types: Vec::new(),
            objects: BTreeMap::new(),
            resource_version: start,
            history: VecDeque::new(),
            history_limit,
            compacted: start,
            next_uid: 0,
        }
    }

    pub fn register(&mut self, resource: ResourceType) {
        if !self.types.contains(&resource) {
            self.types.push(resource);
        }
    }

    pub fn resource(&self, api_version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.api_version == api_version && t.plural == plural)
    }

    fn resource_of_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.api_version == api_version && t.kind == kind)
    }

    /// Creates or replaces `object` (which names its apiVersion and kind); returns its
    /// new resourceVersion.
    pub fn apply(&mut self, mut object: Value) -> Result<u64, String> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let resource = self
            .resource_of_kind(&api_version, &kind)
            .cloned()
            .ok_or_else(|| format!("{api_version} {kind} is not served"))?;
        let name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or("metadata.name is missing")?
            .to_owned();
        let key = ObjectKey {
            api_version,
            plural: resource.plural,
            namespace: object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            name,
        };
        let old = self.objects.get(&key).cloned();
        self.resource_version += 1;
        let rv = self.resource_version;
        let uid = match old.as_ref().and_then(|o| o["metadata"]["uid"].as_str()) {
            Some(uid) => uid.to_owned(),
            None => {
                self.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
            }
        };
        let metadata = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or("metadata is not an object")?;
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        metadata.insert("uid".into(), json!(uid));
        self.objects.insert(key.clone(), object.clone());
        self.record(key, old, Some(object));
        Ok(rv)
    }

    /// Deletes an object; returns the resourceVersion of the deletion.
    pub fn delete(&mut self, key: &ObjectKey) -> Option<u64> {
        let mut old = self.objects.remove(key)?;
        self.resource_version += 1;
        // The DELETED event carries the object at the version of its deletion.
        old["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.record(key.clone(), Some(old), None);
        Some(self.resource_version)
    }

    fn record(&mut self, key: ObjectKey, old: Option<Value>, new: Option<Value>) {
        self.history.push_back(Change {
            resource_version: self.resource_version,
            key,
            old,
            new,
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.resource_version;
            }
        }
    }

    /// Forgets every change so far (etcd compaction, a watch cache that moved on).
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.resource_version;
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The objects of `collection`, in namespace/name order.
    pub fn list(&self, collection: &Collection) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(k, v)| collection.holds(k) && collection.selector.matches(v))
            .map(|(_, v)| v)
            .collect()
    }

    /// Watch events `(type, object)` of `collection` after version `since`, as a
    /// selector-aware watch sees them: an object that starts matching is ADDED, one that
    /// stops matching is DELETED.
    pub fn events_since(
        &self,
        collection: &Collection,
        since: u64,
    ) -> Result<Vec<(&'static str, Value)>, Expired> {
        if since < self.compacted {
            return Err(Expired {
                requested: since,
                oldest: self.compacted,
            });
        }
        let mut out = Vec::new();
        for change in self.history.iter().filter(|c| c.resource_version > since) {
            if !collection.holds(&change.key) {
                continue;
            }
            let matches =
                |o: &Option<Value>| o.as_ref().is_some_and(|o| collection.selector.matches(o));
            let event = match (matches(&change.old), &change.new, matches(&change.new)) {
                (false, Some(new), true) => Some(("ADDED", new.clone())),
                (true, Some(new), true) => Some(("MODIFIED", new.clone())),
                (true, Some(new), false) => Some(("DELETED", new.clone())),
                (true, None, _) => change.old.clone().map(|old| ("DELETED", old)),
                _ => None,
            };
            out.extend(event);
        }
        Ok(out)
    }
}
