//! Service address allocation: ClusterIPs from the service CIDR and node ports (also
//! health-check node ports) from the node-port range, with clash detection.
//!
//! The allocator is derived state: it is rebuilt from the stored services when the
//! store opens, so it is never persisted on its own and cannot drift from the objects.
//! Changes made while staging a batch go through an [`AllocTxn`], which undoes them
//! unless the batch commits: a rejected apply never leaks an allocation.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;
use rand::Rng;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

use crate::object::ObjectKey;
use crate::validation::{FieldError, duplicate, forbidden, immutable, invalid};

/// Where service addresses come from (the agent's `--service-cidr` and node-port range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNetwork {
    pub cidr: IpNet,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for ServiceNetwork {
    /// Kubernetes' defaults: 10.96.0.0/12 and 30000-32767.
    fn default() -> Self {
        ServiceNetwork {
            cidr: "10.96.0.0/12".parse().expect("valid default CIDR"),
            node_ports: 30000..=32767,
        }
    }
}

/// Large IPv6 CIDRs would make offsets astronomically large; Kubernetes caps service
/// ranges similarly (/108 for IPv6), so we only ever hand out the first 2^20 addresses.
const MAX_SEARCHED_ADDRESSES: u128 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Allocator {
    net: ServiceNetwork,
    ips: HashMap<IpAddr, ObjectKey>,
    ports: HashMap<u16, ObjectKey>,
}

/// What to undo if a staged batch is abandoned.
#[derive(Debug)]
enum Undo {
    Claimed(Resource),
    Released(Resource, ObjectKey),
}

#[derive(Debug, Clone, Copy)]
enum Resource {
    Ip(IpAddr),
    Port(u16),
}

impl Allocator {
    pub(crate) fn new(net: ServiceNetwork) -> Allocator {
        Allocator {
            net,
            ips: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    pub(crate) fn network(&self) -> &ServiceNetwork {
        &self.net
    }

    /// Number of addresses in the CIDR we allocate from (offsets 1..size-1: the network
    /// and broadcast addresses are never handed out).
    fn size(&self) -> u128 {
        let bits = u32::from(self.net.cidr.max_prefix_len() - self.net.cidr.prefix_len());
        if bits >= 20 {
            MAX_SEARCHED_ADDRESSES.min(1u128 << bits.min(127))
        } else {
            1u128 << bits
        }
    }

    fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        if !self.net.cidr.contains(&ip) {
            return None;
        }
        let offset = to_u128(ip) - to_u128(self.net.cidr.network());
        (offset >= 1 && offset < self.size().saturating_sub(1).max(1)).then_some(offset)
    }

    fn ip_at(&self, offset: u128) -> IpAddr {
        from_u128(
            self.net.cidr.network(),
            to_u128(self.net.cidr.network()) + offset,
        )
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(like: IpAddr, v: u128) -> IpAddr {
    match like {
        // Offsets stay inside an IPv4 CIDR, so the value fits in 32 bits.
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(v)),
    }
}

/// A staged set of allocation changes; dropped without [`AllocTxn::commit`] it rolls
/// every change back.
pub(crate) struct AllocTxn<'a> {
    alloc: &'a mut Allocator,
    undo: Vec<Undo>,
}

impl<'a> AllocTxn<'a> {
    pub(crate) fn new(alloc: &'a mut Allocator) -> AllocTxn<'a> {
        AllocTxn {
            alloc,
            undo: Vec::new(),
        }
    }

    pub(crate) fn commit(mut self) {
        self.undo.clear();
    }

    pub(crate) fn network(&self) -> &ServiceNetwork {
        &self.alloc.net
    }

    /// Claims a specific ClusterIP for `owner`; claiming one it already owns is a no-op.
    pub(crate) fn claim_ip(&mut self, owner: &ObjectKey, ip: IpAddr) -> Result<(), String> {
        if self.alloc.offset_of(ip).is_none() {
            return Err(format!(
                "provided IP is not in the valid range. The range of valid IPs is {}",
                self.alloc.net.cidr
            ));
        }
        match self.alloc.ips.get(&ip) {
            Some(o) if o == owner => Ok(()),
            Some(o) => Err(format!("provided IP is already allocated (to {o})")),
            None => {
                self.alloc.ips.insert(ip, owner.clone());
                self.undo.push(Undo::Claimed(Resource::Ip(ip)));
                Ok(())
            }
        }
    }

    /// Picks a free ClusterIP. Like Kubernetes, dynamic allocation prefers the upper part
    /// of the range and leaves the low band to explicit requests (e.g. the DNS service's
    /// well-known 10.96.0.10), so applying services before the DNS service cannot steal
    /// its address.
    pub(crate) fn allocate_ip(&mut self, owner: &ObjectKey) -> Result<IpAddr, String> {
        let size = self.alloc.size();
        let last = size.saturating_sub(2).max(1); // highest usable offset
        let band = (size / 16).clamp(16, 256).min(last);
        let ranges = [(band + 1, last), (1, band.min(last))];
        for (lo, hi) in ranges.into_iter().filter(|(lo, hi)| lo <= hi) {
            if let Some(ip) = self.probe(lo, hi) {
                self.claim_ip(owner, ip)?;
                return Ok(ip);
            }
        }
        Err(format!("no free ClusterIP left in {}", self.alloc.net.cidr))
    }

    /// Random start then a linear scan: O(1) expected while the range is sparse.
    fn probe(&self, lo: u128, hi: u128) -> Option<IpAddr> {
        let span = hi - lo + 1;
        let start = rand::rng().random_range(0..span);
        (0..span)
            .map(|i| self.alloc.ip_at(lo + (start + i) % span))
            .find(|ip| !self.alloc.ips.contains_key(ip))
    }

    pub(crate) fn release_ip(&mut self, owner: &ObjectKey, ip: IpAddr) {
        if self.alloc.ips.get(&ip) == Some(owner) {
            self.alloc.ips.remove(&ip);
            self.undo
                .push(Undo::Released(Resource::Ip(ip), owner.clone()));
        }
    }

    /// Claims a specific node port for `owner` (a service may use one port number for
    /// several of its own ports, e.g. TCP and UDP 53).
    pub(crate) fn claim_port(&mut self, owner: &ObjectKey, port: u16) -> Result<(), String> {
        if !self.alloc.net.node_ports.contains(&port) {
            let r = &self.alloc.net.node_ports;
            return Err(format!(
                "provided port is not in the valid range. The range of valid ports is {}-{}",
                r.start(),
                r.end()
            ));
        }
        match self.alloc.ports.get(&port) {
            Some(o) if o == owner => Ok(()),
            Some(o) => Err(format!("provided port is already allocated (to {o})")),
            None => {
                self.alloc.ports.insert(port, owner.clone());
                self.undo.push(Undo::Claimed(Resource::Port(port)));
                Ok(())
            }
        }
    }

    pub(crate) fn allocate_port(&mut self, owner: &ObjectKey) -> Result<u16, String> {
        let (lo, hi) = (
            *self.alloc.net.node_ports.start(),
            *self.alloc.net.node_ports.end(),
        );
        let span = u32::from(hi - lo) + 1;
        let start = rand::rng().random_range(0..span);
        let free = (0..span)
            .map(|i| lo + ((start + i) % span) as u16)
            .find(|p| !self.alloc.ports.contains_key(p))
            .ok_or_else(|| format!("no free node port left in {lo}-{hi}"))?;
        self.claim_port(owner, free)?;
        Ok(free)
    }

    pub(crate) fn release_port(&mut self, owner: &ObjectKey, port: u16) {
        if self.alloc.ports.get(&port) == Some(owner) {
            self.alloc.ports.remove(&port);
            self.undo
                .push(Undo::Released(Resource::Port(port), owner.clone()));
        }
    }

    #[cfg(test)]
    pub(crate) fn port_owner(&self, port: u16) -> Option<&ObjectKey> {
        self.alloc.ports.get(&port)
    }
}

impl Drop for AllocTxn<'_> {
    fn drop(&mut self) {
        for undo in self.undo.drain(..).rev() {
            match undo {
                Undo::Claimed(Resource::Ip(ip)) => {
                    self.alloc.ips.remove(&ip);
                }
                Undo::Claimed(Resource::Port(p)) => {
                    self.alloc.ports.remove(&p);
                }
                Undo::Released(Resource::Ip(ip), owner) => {
                    self.alloc.ips.insert(ip, owner);
                }
                Undo::Released(Resource::Port(p), owner) => {
                    self.alloc.ports.insert(p, owner);
                }
            }
        }
    }
}

/// What a service holds in the allocator.
#[derive(Debug, Default, PartialEq, Eq)]
struct Holdings {
    ip: Option<IpAddr>,
    node_ports: Vec<u16>,
    health_check_port: Option<u16>,
}

fn holdings(spec: &ServiceSpec) -> Holdings {
    let ip = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok());
    let node_ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
        .filter(|n| *n != 0)
        .collect();
    let health_check_port = spec
        .health_check_node_port
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0);
    Holdings {
        ip,
        node_ports,
        health_check_port,
    }
}

/// Records a stored service's addresses when the store opens. A clash means the state
/// dir was edited by hand; the first owner keeps the address and we log the loser.
pub(crate) fn restore_service(alloc: &mut Allocator, key: &ObjectKey, spec: &ServiceSpec) {
    let h = holdings(spec);
    let mut txn = AllocTxn::new(alloc);
    let claimed =
        h.ip.map_or(Ok(()), |ip| txn.claim_ip(key, ip))
            .and_then(|()| {
                h.node_ports
                    .iter()
                    .chain(&h.health_check_port)
                    .try_for_each(|p| txn.claim_port(key, *p))
            });
    match claimed {
        Ok(()) => txn.commit(),
        Err(e) => {
            tracing::warn!(service = %key, error = %e, "stored service address clashes; not reserved")
        }
    }
}

/// Releases everything a deleted service held.
pub(crate) fn release_service(txn: &mut AllocTxn<'_>, key: &ObjectKey, spec: &ServiceSpec) {
    let h = holdings(spec);
    if let Some(ip) = h.ip {
        txn.release_ip(key, ip);
    }
    for p in h.node_ports.iter().chain(&h.health_check_port) {
        txn.release_port(key, *p);
    }
}

/// Assigns a created or updated service's ClusterIP, node ports and health-check node
/// port. Values the manifest omits are carried over from `old` (re-applying a manifest
/// without `clusterIP` is not a change), explicit ones are honoured if free, a
/// different ClusterIP than the stored one is an immutable-field error.
pub(crate) fn assign_service(
    txn: &mut AllocTxn<'_>,
    key: &ObjectKey,
    old: Option<&ServiceSpec>,
    new: &mut ServiceSpec,
) -> Result<(), FieldError> {
    let before = old.map(holdings).unwrap_or_default();
    assign_cluster_ip(txn, key, old, new)?;
    assign_node_ports(txn, key, old, new)?;
    assign_health_check_port(txn, key, old, new)?;
    // Release what the old version held and the new one no longer does.
    let after = holdings(new);
    if let Some(ip) = before.ip.filter(|ip| after.ip != Some(*ip)) {
        txn.release_ip(key, ip);
    }
    let kept: Vec<u16> = after
        .node_ports
        .iter()
        .chain(&after.health_check_port)
        .copied()
        .collect();
    for p in before
        .node_ports
        .iter()
        .chain(&before.health_check_port)
        .filter(|p| !kept.contains(p))
    {
        txn.release_port(key, *p);
    }
    Ok(())
}

fn assign_cluster_ip(
    txn: &mut AllocTxn<'_>,
    key: &ObjectKey,
    old: Option<&ServiceSpec>,
    new: &mut ServiceSpec,
) -> Result<(), FieldError> {
    if new.type_.as_deref() == Some("ExternalName") {
        // Switching to ExternalName drops the ClusterIP, as in Kubernetes.
        new.cluster_ip = None;
        new.cluster_ips = None;
        new.ip_families = None;
        new.ip_family_policy = None;
        return Ok(());
    }
    let stored = old
        .filter(|o| o.type_.as_deref() != Some("ExternalName"))
        .and_then(|o| o.cluster_ip.clone())
        .filter(|ip| !ip.is_empty());
    let requested = new.cluster_ip.clone().filter(|ip| !ip.is_empty());
    let ip_text = match (stored, requested) {
        (Some(s), Some(r)) if s != r => return Err(immutable("spec.clusterIP")),
        (Some(s), _) => s,
        (None, Some(r)) => r,
        (None, None) => String::new(),
    };
    let ip = if ip_text == "None" {
        None
    } else if ip_text.is_empty() {
        Some(txn.allocate_ip(key).map_err(|e| FieldError {
            field: "spec.clusterIP".into(),
            message: e,
        })?)
    } else {
        let ip: IpAddr = ip_text
            .parse()
            .map_err(|_| invalid("spec.clusterIP", &ip_text, "must be a valid IP address"))?;
        txn.claim_ip(key, ip)
            .map_err(|e| invalid("spec.clusterIP", &ip_text, e))?;
        Some(ip)
    };
    let family = match ip
        .map(|ip| ip.is_ipv4())
        .unwrap_or(txn.network().cidr.network().is_ipv4())
    {
        true => "IPv4",
        false => "IPv6",
    };
    let text = ip.map_or_else(|| "None".to_owned(), |ip| ip.to_string());
    new.cluster_ip = Some(text.clone());
    new.cluster_ips = Some(vec![text]);
    new.ip_families = Some(vec![family.to_owned()]);
    new.ip_family_policy
        .get_or_insert_with(|| "SingleStack".into());
    Ok(())
}

fn wants_node_ports(spec: &ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

/// The stored node port of the port with the same number and protocol (how Kubernetes
/// matches ports across an update).
fn stored_node_port(old: Option<&ServiceSpec>, port: &ServicePort) -> Option<i32> {
    old.filter(|o| wants_node_ports(o))?
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == port.port && p.protocol == port.protocol)
        .and_then(|p| p.node_port)
        .filter(|n| *n != 0)
}

fn assign_node_ports(
    txn: &mut AllocTxn<'_>,
    key: &ObjectKey,
    old: Option<&ServiceSpec>,
    new: &mut ServiceSpec,
) -> Result<(), FieldError> {
    let wanted = wants_node_ports(new);
    let kind = new.type_.clone().unwrap_or_default();
    let mut used: Vec<(u16, String)> = Vec::new();
    for (i, port) in new.ports.iter_mut().flatten().enumerate() {
        let field = format!("spec.ports[{i}].nodePort");
        let requested = port.node_port.filter(|n| *n != 0);
        if !wanted {
            if let Some(n) = requested {
                return Err(forbidden(
                    field,
                    format!("may not be used when `type` is '{kind}' ({n})"),
                ));
            }
            continue;
        }
        let number = match requested.or_else(|| stored_node_port(old, port)) {
            Some(n) => {
                let n = u16::try_from(n)
                    .map_err(|_| invalid(&field, n, "must be between 1 and 65535, inclusive"))?;
                txn.claim_port(key, n).map_err(|e| invalid(&field, n, e))?;
                n
            }
            None => txn.allocate_port(key).map_err(|e| FieldError {
                field: field.clone(),
                message: e,
            })?,
        };
        let protocol = port.protocol.clone().unwrap_or_default();
        if used.contains(&(number, protocol.clone())) {
            return Err(duplicate(field, format!("{number}/{protocol}")));
        }
        used.push((number, protocol));
        port.node_port = Some(i32::from(number));
    }
    Ok(())
}

fn assign_health_check_port(
    txn: &mut AllocTxn<'_>,
    key: &ObjectKey,
    old: Option<&ServiceSpec>,
    new: &mut ServiceSpec,
) -> Result<(), FieldError> {
    let field = "spec.healthCheckNodePort";
    let needed = new.type_.as_deref() == Some("LoadBalancer")
        && new.external_traffic_policy.as_deref() == Some("Local");
    let requested = new.health_check_node_port.filter(|n| *n != 0);
    if !needed {
        if let Some(n) = requested {
            return Err(invalid(
                field,
                n,
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            ));
        }
        return Ok(());
    }
    let stored = old
        .and_then(|o| o.health_check_node_port)
        .filter(|n| *n != 0);
    let number = match (stored, requested) {
        (Some(s), Some(r)) if s != r => return Err(immutable(field)),
        (Some(n), _) | (None, Some(n)) => {
            let n = u16::try_from(n)
                .map_err(|_| invalid(field, n, "must be between 1 and 65535, inclusive"))?;
            // Its own node ports are taken by this very service: still a clash.
            if new
                .ports
                .iter()
                .flatten()
                .any(|p| p.node_port == Some(i32::from(n)))
            {
                return Err(invalid(
                    field,
                    n,
                    "collides with a node port of this service",
                ));
            }
            txn.claim_port(key, n).map_err(|e| invalid(field, n, e))?;
            n
        }
        (None, None) => txn.allocate_port(key).map_err(|e| FieldError {
            field: field.into(),
            message: e,
        })?,
    };
    new.health_check_node_port = Some(i32::from(number));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::Kind;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::Service, None, name)
    }

    fn small() -> Allocator {
        Allocator::new(ServiceNetwork {
            cidr: "10.0.0.0/28".parse().unwrap(),
            node_ports: 30000..=30002,
        })
    }

    #[test]
    fn explicit_ips_are_honoured_and_clashes_rejected() {
        let mut a = small();
        let mut t = AllocTxn::new(&mut a);
        let ip: IpAddr = "10.0.0.10".parse().unwrap();
        t.claim_ip(&key("a"), ip).unwrap();
        t.claim_ip(&key("a"), ip).unwrap();
        assert!(
            t.claim_ip(&key("b"), ip)
                .unwrap_err()
                .contains("already allocated (to service/default/a)")
        );
        assert!(
            t.claim_ip(&key("b"), "10.0.1.1".parse().unwrap())
                .unwrap_err()
                .contains("not in the valid range")
        );
        assert!(
            t.claim_ip(&key("b"), "10.0.0.0".parse().unwrap()).is_err(),
            "network address"
        );
        assert!(
            t.claim_ip(&key("b"), "10.0.0.15".parse().unwrap()).is_err(),
            "broadcast address"
        );
    }

    #[test]
    fn allocation_exhausts_cleanly_and_rolls_back() {
        let mut a = small();
        {
            let mut t = AllocTxn::new(&mut a);
            let ips: Vec<IpAddr> = (0..14)
                .map(|i| t.allocate_ip(&key(&format!("s{i}"))).unwrap())
                .collect();
            assert_eq!(
                ips.iter().collect::<std::collections::HashSet<_>>().len(),
                14
            );
            assert!(t.allocate_ip(&key("x")).is_err());
            // dropped without commit
        }
        assert!(a.ips.is_empty());
        let mut t = AllocTxn::new(&mut a);
        for _ in 0..3 {
            t.allocate_port(&key("np")).map(|_| ()).unwrap_or(());
        }
        let p = t.allocate_port(&key("p1"));
        assert!(p.is_ok() || p.unwrap_err().contains("no free node port"));
        t.commit();
    }

    #[test]
    fn dynamic_allocation_avoids_the_low_band() {
        let mut a = Allocator::new(ServiceNetwork::default());
        let mut t = AllocTxn::new(&mut a);
        for i in 0..200 {
            let ip = t.allocate_ip(&key(&format!("s{i}"))).unwrap();
            let IpAddr::V4(v4) = ip else { panic!() };
            assert!(
                u32::from(v4) - u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) > 256,
                "{ip}"
            );
        }
        t.commit();
    }

    #[test]
    fn node_ports_clash_and_release() {
        let mut a = small();
        let mut t = AllocTxn::new(&mut a);
        t.claim_port(&key("a"), 30001).unwrap();
        assert!(
            t.claim_port(&key("b"), 30001)
                .unwrap_err()
                .contains("already allocated")
        );
        assert!(
            t.claim_port(&key("b"), 80)
                .unwrap_err()
                .contains("30000-30002")
        );
        t.release_port(&key("a"), 30001);
        t.claim_port(&key("b"), 30001).unwrap();
        assert_eq!(t.port_owner(30001), Some(&key("b")));
        t.commit();
    }
}
