//! User-written EndpointSlices by the service they belong to (the
//! `kubernetes.io/service-name` label), kept up to date from the change feed
//! so syncing a service finds its slices without scanning its namespace:
//! with a slice per service, that scan made programming 10,000 services
//! quadratic (seconds instead of a few hundred milliseconds).

use std::{collections::HashMap, sync::Arc};

use vipr_store::{Event, EventType, Kind, Object, Store, endpoints, slice::EndpointSlice};

use super::sync::ServiceName;

/// A slice's identity: namespace and name.
type SliceKey = (String, String);

#[derive(Default)]
pub struct SliceIndex {
    /// Each service's slices, sorted by name. A vector, not a map: a service
    /// usually has one slice, and a B-tree node per service would hold room
    /// for eleven (4 MiB at 10,000 services).
    by_service: HashMap<ServiceName, Vec<Arc<Object>>>,
    /// Which service each indexed slice is filed under, to refile it when
    /// its label changes.
    service_of: HashMap<SliceKey, ServiceName>,
}

impl SliceIndex {
    /// Indexes every slice the store holds now.
    pub fn from_store(store: &Store) -> Self {
        let mut index = SliceIndex::default();
        for object in store.list(Kind::EndpointSlice, None) {
            index.upsert(object);
        }
        index
    }

    /// Follows one change; returns the services whose slices changed (the
    /// old one too when a slice moved to another service).
    pub fn update(&mut self, event: &Event) -> Vec<ServiceName> {
        let Some(slice) = event.object.as_endpoint_slice() else {
            return Vec::new();
        };
        let mut affected: Vec<ServiceName> = self.remove(&slice_key(slice)).into_iter().collect();
        if event.event_type != EventType::Deleted
            && let Some(service) = self.upsert(event.object.clone())
            && !affected.contains(&service)
        {
            affected.push(service);
        }
        affected
    }

    /// The slices of `service`.
    pub fn slices_of(&self, service: &ServiceName) -> impl Iterator<Item = &EndpointSlice> {
        self.by_service
            .get(service)
            .into_iter()
            .flat_map(|slices| slices.iter())
            .filter_map(|o| o.as_endpoint_slice())
    }

    /// Files `object` under its service; `None` for a slice without one.
    fn upsert(&mut self, object: Arc<Object>) -> Option<ServiceName> {
        let slice = object.as_endpoint_slice()?;
        let key = slice_key(slice);
        self.remove(&key);
        let service = (
            key.0.clone(),
            endpoints::slice_service_name(slice)?.to_owned(),
        );
        let slices = self.by_service.entry(service.clone()).or_default();
        let at = slices.partition_point(|o| o.metadata().name.as_ref() < Some(&key.1));
        slices.insert(at, object.clone());
        self.service_of.insert(key, service.clone());
        Some(service)
    }

    fn remove(&mut self, key: &SliceKey) -> Option<ServiceName> {
        let service = self.service_of.remove(key)?;
        if let Some(slices) = self.by_service.get_mut(&service) {
            slices.retain(|o| o.metadata().name.as_ref() != Some(&key.1));
            if slices.is_empty() {
                self.by_service.remove(&service);
            }
        }
        Some(service)
    }
}

fn slice_key(slice: &EndpointSlice) -> SliceKey {
    (
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice_event(event_type: EventType, name: &str, service: Option<&str>) -> Event {
        let mut slice = EndpointSlice {
            address_type: "IPv4".into(),
            ..Default::default()
        };
        slice.metadata.namespace = Some("default".into());
        slice.metadata.name = Some(name.into());
        slice.metadata.labels = service.map(|s| {
            [(endpoints::SERVICE_NAME_LABEL.to_owned(), s.to_owned())]
                .into_iter()
                .collect()
        });
        Event {
            event_type,
            object: Arc::new(slice.into()),
            revision: 1,
        }
    }

    fn svc(name: &str) -> ServiceName {
        ("default".into(), name.into())
    }

    fn names(index: &SliceIndex, service: &str) -> Vec<String> {
        index
            .slices_of(&svc(service))
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    }

    #[test]
    fn follows_adds_moves_and_deletes() {
        let mut index = SliceIndex::default();
        assert_eq!(
            index.update(&slice_event(EventType::Added, "a-1", Some("a"))),
            vec![svc("a")]
        );
        index.update(&slice_event(EventType::Added, "a-2", Some("a")));
        index.update(&slice_event(EventType::Added, "loose", None));
        assert_eq!(names(&index, "a"), ["a-1", "a-2"]);

        // Relabelled to another service: both services are affected.
        assert_eq!(
            index.update(&slice_event(EventType::Modified, "a-2", Some("b"))),
            vec![svc("a"), svc("b")]
        );
        assert_eq!(names(&index, "a"), ["a-1"]);
        assert_eq!(names(&index, "b"), ["a-2"]);

        assert_eq!(
            index.update(&slice_event(EventType::Deleted, "a-1", Some("a"))),
            vec![svc("a")]
        );
        assert!(names(&index, "a").is_empty());
        assert!(
            !index.by_service.contains_key(&svc("a")),
            "no empty entries left"
        );
    }
}
