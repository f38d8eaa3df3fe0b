//! Keeps the data plane's maps equal to the frontends the services want,
//! touching only what one service's change affects. What it has programmed
//! is the agent's intent, shared (read-only) with the API and metrics so
//! `vipr service list` and `vipr lb list` can compare it with the maps.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, RwLockReadGuard},
};

use vipr_dataplane::{Dataplane, DataplaneError, Frontend};

use super::frontends::{FrontendSpec, FrontendTable};

/// A service by namespace and name.
pub type ServiceName = (String, String);

/// What has been programmed, per service, and who owns each frontend.
#[derive(Default)]
pub struct Programmed {
    pub by_service: HashMap<ServiceName, ServiceFrontends>,
    /// Which service owns each frontend, so two services cannot fight over one.
    pub owners: BTreeMap<Frontend, ServiceName>,
}

/// One service's programmed frontends, sorted by frontend. Kept for every
/// service, so as tight as it gets: a `FrontendTable` (a B-tree) allocates
/// room for eleven entries where a service usually has one or two.
#[derive(Default)]
pub struct ServiceFrontends(Box<[(Frontend, FrontendSpec)]>);

impl ServiceFrontends {
    fn from_table(table: FrontendTable) -> Self {
        ServiceFrontends(
            table
                .into_iter()
                .map(|(frontend, mut spec)| {
                    spec.backends.shrink_to_fit();
                    (frontend, spec)
                })
                .collect(),
        )
    }

    pub fn get(&self, frontend: &Frontend) -> Option<&FrontendSpec> {
        self.0
            .binary_search_by_key(frontend, |(f, _)| *f)
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Frontend, &FrontendSpec)> {
        self.0.iter().map(|(f, s)| (f, s))
    }
}

impl<'a> IntoIterator for &'a ServiceFrontends {
    type Item = (&'a Frontend, &'a FrontendSpec);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Frontend, FrontendSpec)>,
        fn(&'a (Frontend, FrontendSpec)) -> (&'a Frontend, &'a FrontendSpec),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(f, s)| (f, s))
    }
}

/// A read-only view of what the agent has programmed.
#[derive(Clone, Default)]
pub struct Intent(Arc<RwLock<Programmed>>);

impl Intent {
    pub fn read(&self) -> RwLockReadGuard<'_, Programmed> {
        self.0.read().unwrap()
    }
}

/// What has been programmed, per service, so a change is applied as a diff.
#[derive(Default)]
pub struct DataplaneSync {
    state: Intent,
}

/// How much one sync changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub programmed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

impl DataplaneSync {
    /// The intent this sync keeps, for readers elsewhere in the agent.
    pub fn intent(&self) -> Intent {
        self.state.clone()
    }

    /// Programs `desired` for `service`, removing its frontends that are no
    /// longer wanted. An empty table removes the service.
    pub fn sync_service(
        &mut self,
        dataplane: &mut Dataplane,
        service: &ServiceName,
        desired: FrontendTable,
    ) -> Result<SyncStats, DataplaneError> {
        let mut state = self.state.0.write().unwrap();
        let Programmed { by_service, owners } = &mut *state;
        let mut stats = SyncStats::default();
        let previous = by_service.remove(service).unwrap_or_default();
        for (frontend, _) in previous.iter().filter(|(f, _)| !desired.contains_key(f)) {
            if owners.get(frontend) == Some(service) {
                dataplane.remove_service(frontend)?;
                owners.remove(frontend);
                stats.removed += 1;
            }
        }
        for (frontend, spec) in &desired {
            match owners.get(frontend) {
                Some(owner) if owner != service => {
                    tracing::warn!(
                        %frontend,
                        owner = %format!("{}/{}", owner.0, owner.1),
                        wanted_by = %format!("{}/{}", service.0, service.1),
                        "frontend already served by another service; ignoring"
                    );
                    continue;
                }
                _ => {}
            }
            if previous.get(frontend) == Some(spec) {
                stats.unchanged += 1;
                continue;
            }
            dataplane.program_service_with(*frontend, &spec.backends, &spec.options)?;
            owners.insert(*frontend, service.clone());
            stats.programmed += 1;
        }
        if !desired.is_empty() {
            by_service.insert(service.clone(), ServiceFrontends::from_table(desired));
        }
        Ok(stats)
    }

    /// Frontends the data plane holds that no known service wants (left from
    /// before a restart): removed after the first full sync.
    pub fn remove_strays(&mut self, dataplane: &mut Dataplane) -> Result<usize, DataplaneError> {
        let state = self.state.read();
        let strays: Vec<Frontend> = dataplane
            .frontends()
            .into_iter()
            .map(|(f, _)| f)
            .filter(|f| !state.owners.contains_key(f))
            .collect();
        for frontend in &strays {
            dataplane.remove_service(frontend)?;
        }
        Ok(strays.len())
    }

    /// Every service with programmed frontends.
    pub fn programmed_services(&self) -> Vec<ServiceName> {
        self.state.read().by_service.keys().cloned().collect()
    }

    pub fn frontend_count(&self) -> usize {
        self.state.read().owners.len()
    }
}
