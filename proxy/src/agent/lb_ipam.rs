//! LoadBalancer address assignment (`--lb-ip-pool`), like Cilium's LB IPAM
//! or MetalLB's controller: every `type: LoadBalancer` service gets one
//! address of the pool in `status.loadBalancer.ingress`, which the data
//! plane then serves like an external IP. Announcing the pool to the
//! network (ARP, BGP) is not done here: the pool must be routed to the node.
//!
//! An address once given stays with its service while it is a LoadBalancer;
//! `spec.loadBalancerIP` asks for a particular one. A service that stops
//! being a LoadBalancer (or is deleted) gives its address back. Ingress
//! addresses outside the pool are someone else's and left alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};
use vipr_store::{Kind, ObjectKey, Status, Store, WatchError};

/// What one service's ingress should become.
#[derive(Debug, PartialEq, Eq)]
pub struct Assignment {
    pub key: ObjectKey,
    /// The pool address it gets, or `None`: no pool address (any it had goes).
    pub ip: Option<Ipv4Addr>,
}

fn is_load_balancer(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

fn ingress_ips(service: &Service) -> impl Iterator<Item = Ipv4Addr> + '_ {
    service
        .status
        .iter()
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
}

fn requested_ip(service: &Service) -> Option<Ipv4Addr> {
    service
        .spec
        .as_ref()?
        .load_balancer_ip
        .as_deref()?
        .parse()
        .ok()
}

/// The changes that bring every service's pool ingress in line: services
/// already holding a pool address keep it (the first by key wins a clash),
/// then the rest get their requested or the lowest free address.
pub fn plan(pool: &Ipv4Net, services: &[(ObjectKey, &Service)]) -> Vec<Assignment> {
    let in_pool = |ip: &Ipv4Addr| pool.contains(ip);
    let mut taken: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut wanted: BTreeMap<&ObjectKey, Option<Ipv4Addr>> = BTreeMap::new();
    for (key, service) in services {
        let held = ingress_ips(service).find(in_pool);
        let keep = held.filter(|ip| is_load_balancer(service) && taken.insert(*ip));
        if is_load_balancer(service) || held.is_some() {
            wanted.insert(key, keep);
        }
    }
    // Ascending, and only ever consumed forward: each free address once.
    let mut free = pool.hosts();
    for (key, service) in services {
        if !is_load_balancer(service) || wanted.get(key).copied().flatten().is_some() {
            continue;
        }
        let ip = match requested_ip(service).filter(|ip| in_pool(ip) && !taken.contains(ip)) {
            Some(ip) => Some(ip),
            None => free.find(|ip| !taken.contains(ip)),
        };
        if ip.is_none() {
            tracing::warn!(service = %key, pool = %pool, "LoadBalancer IP pool exhausted");
        }
        if let Some(ip) = ip {
            taken.insert(ip);
        }
        wanted.insert(key, ip);
    }
    services
        .iter()
        .filter_map(|(key, service)| {
            let ip = *wanted.get(key)?;
            let held: Vec<Ipv4Addr> = ingress_ips(service).filter(in_pool).collect();
            (held != ip.into_iter().collect::<Vec<_>>()).then(|| Assignment {
                key: key.clone(),
                ip,
            })
        })
        .collect()
}

/// `service`'s status with its pool ingress replaced by `ip` (other ingress kept).
fn with_ingress(service: &Service, pool: &Ipv4Net, ip: Option<Ipv4Addr>) -> ServiceStatus {
    let mut status = service.status.clone().unwrap_or_default();
    let lb = status
        .load_balancer
        .get_or_insert_with(LoadBalancerStatus::default);
    let mut ingress: Vec<LoadBalancerIngress> = lb
        .ingress
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| {
            i.ip.as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .is_none_or(|ip| !pool.contains(&ip))
        })
        .collect();
    if let Some(ip) = ip {
        ingress.insert(
            0,
            LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ip_mode: Some("VIP".into()),
                ..Default::default()
            },
        );
    }
    lb.ingress = (!ingress.is_empty()).then_some(ingress);
    status
}

/// Applies [`plan`] to the store once.
fn assign_all(store: &Store, pool: &Ipv4Net) {
    let objects = store.list(Kind::Service, None);
    let services: Vec<(ObjectKey, &Service)> = objects
        .iter()
        .filter_map(|o| Some((o.key(), o.as_service()?)))
        .collect();
    for Assignment { key, ip } in plan(pool, &services) {
        let Some((_, service)) = services.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        let status = with_ingress(service, pool, ip);
        match store.update_status(&key, Status::Service(status)) {
            Ok(_) => tracing::info!(service = %key, ip = ?ip, "LoadBalancer ingress"),
            // Deleted meanwhile: nothing to assign.
            Err(error) => {
                tracing::debug!(service = %key, error = %error, "LoadBalancer ingress not written")
            }
        }
    }
}

/// Keeps LoadBalancer ingress assigned from `pool` as services change.
pub async fn run(store: Arc<Store>, pool: Ipv4Net) {
    'relist: loop {
        let revision = store.revision();
        assign_all(&store, &pool);
        let mut watcher = store.watch(revision);
        loop {
            let events = match watcher.next().await {
                Ok(events) => events,
                Err(WatchError::Compacted { .. }) => continue 'relist,
            };
            if events
                .iter()
                .any(|e| e.object.key().kind() == Kind::Service)
            {
                assign_all(&store, &pool);
            }
            // Our own status writes come back as events; the next pass finds
            // nothing to change, so this settles. Pace bursts a little.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, yaml_spec: &str, ingress: &[&str]) -> (ObjectKey, Service) {
        let status = if ingress.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = ingress.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
            format!(
                "status: {{loadBalancer: {{ingress: [{}]}}}}\n",
                list.join(", ")
            )
        };
        let svc: Service = serde_yaml_ng::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\nspec: {yaml_spec}\n{status}"
        ))
        .unwrap();
        (ObjectKey::namespaced(Kind::Service, "default", name), svc)
    }

    fn run_plan(pool: &str, services: &[(ObjectKey, Service)]) -> Vec<(String, Option<Ipv4Addr>)> {
        let refs: Vec<(ObjectKey, &Service)> =
            services.iter().map(|(k, s)| (k.clone(), s)).collect();
        plan(&pool.parse().unwrap(), &refs)
            .into_iter()
            .map(|a| (a.key.name().to_owned(), a.ip))
            .collect()
    }

    fn ip(s: &str) -> Option<Ipv4Addr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn load_balancers_get_the_lowest_free_address_and_keep_theirs() {
        let services = [
            service("a", "{type: LoadBalancer}", &["192.0.2.1"]),
            service("b", "{type: LoadBalancer}", &[]),
            service("c", "{type: ClusterIP}", &[]),
            service("d", "{type: LoadBalancer, loadBalancerIP: 192.0.2.6}", &[]),
        ];
        assert_eq!(
            run_plan("192.0.2.0/29", &services),
            vec![("b".into(), ip("192.0.2.2")), ("d".into(), ip("192.0.2.6"))]
        );
    }

    #[test]
    fn addresses_go_back_and_clashes_and_exhaustion_are_resolved() {
        let services = [
            // No longer a LoadBalancer: its pool address goes.
            service("a", "{type: ClusterIP}", &["192.0.2.1"]),
            // Two claim one address: the first by key keeps it.
            service("b", "{type: LoadBalancer}", &["192.0.2.2"]),
            service("c", "{type: LoadBalancer}", &["192.0.2.2"]),
            // Outside the pool: someone else's, left alone; and the pool
            // (a /30: two hosts) is exhausted for it and for e.
            service("d", "{type: LoadBalancer}", &["198.51.100.9"]),
            service("e", "{type: LoadBalancer}", &[]),
        ];
        assert_eq!(
            run_plan("192.0.2.0/30", &services),
            vec![("a".into(), None), ("c".into(), ip("192.0.2.1"))]
        );
    }

    #[test]
    fn ingress_outside_the_pool_is_kept_when_ours_is_set() {
        let (_, svc) = service("a", "{type: LoadBalancer}", &["198.51.100.9"]);
        let pool: Ipv4Net = "192.0.2.0/29".parse().unwrap();
        let status = with_ingress(&svc, &pool, ip("192.0.2.1"));
        let ips: Vec<_> = status
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()
            .into_iter()
            .map(|i| i.ip.unwrap())
            .collect();
        assert_eq!(ips, vec!["192.0.2.1", "198.51.100.9"]);
    }
}
