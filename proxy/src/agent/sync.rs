//! Keeps the data plane's maps equal to the frontends the services want,
//! touching only what one service's change affects.

use std::collections::{BTreeMap, HashMap};

use vipr_dataplane::{Dataplane, DataplaneError, Frontend};

use super::frontends::{FrontendSpec, FrontendTable};

/// A service by namespace and name.
pub type ServiceName = (String, String);

/// One service's programmed frontends, sorted by frontend. Kept for every
/// service, so as tight as it gets: a `FrontendTable` (a B-tree) allocates
/// room for eleven entries where a service usually has one or two.
type Programmed = Box<[(Frontend, FrontendSpec)]>;

/// What has been programmed, per service, so a change is applied as a diff.
#[derive(Default)]
pub struct DataplaneSync {
    programmed: HashMap<ServiceName, Programmed>,
    /// Which service owns each frontend, so two services cannot fight over one.
    owners: BTreeMap<Frontend, ServiceName>,
}

/// How much one sync changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub programmed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

impl DataplaneSync {
    /// Programs `desired` for `service`, removing its frontends that are no
    /// longer wanted. An empty table removes the service.
    pub fn sync_service(
        &mut self,
        dataplane: &mut Dataplane,
        service: &ServiceName,
        desired: FrontendTable,
    ) -> Result<SyncStats, DataplaneError> {
        let mut stats = SyncStats::default();
        let previous = self.programmed.remove(service).unwrap_or_default();
        let previous_spec = |frontend: &Frontend| {
            previous
                .binary_search_by_key(frontend, |(f, _)| *f)
                .ok()
                .map(|i| &previous[i].1)
        };
        for frontend in previous
            .iter()
            .map(|(f, _)| f)
            .filter(|f| !desired.contains_key(f))
        {
            if self.owners.get(frontend) == Some(service) {
                dataplane.remove_service(frontend)?;
                self.owners.remove(frontend);
                stats.removed += 1;
            }
        }
        for (frontend, spec) in &desired {
            match self.owners.get(frontend) {
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
            if previous_spec(frontend) == Some(spec) {
                stats.unchanged += 1;
                continue;
            }
            dataplane.program_service_with(*frontend, &spec.backends, &spec.options)?;
            self.owners.insert(*frontend, service.clone());
            stats.programmed += 1;
        }
        if !desired.is_empty() {
            let programmed = desired
                .into_iter()
                .map(|(frontend, mut spec)| {
                    spec.backends.shrink_to_fit();
                    (frontend, spec)
                })
                .collect();
            self.programmed.insert(service.clone(), programmed);
        }
        Ok(stats)
    }

    /// Frontends the data plane holds that no known service wants (left from
    /// before a restart): removed after the first full sync.
    pub fn remove_strays(&mut self, dataplane: &mut Dataplane) -> Result<usize, DataplaneError> {
        let strays: Vec<Frontend> = dataplane
            .frontends()
            .into_iter()
            .map(|(f, _)| f)
            .filter(|f| !self.owners.contains_key(f))
            .collect();
        for frontend in &strays {
            dataplane.remove_service(frontend)?;
        }
        Ok(strays.len())
    }

    pub fn frontend_count(&self) -> usize {
        self.owners.len()
    }
}
