//! The in-memory zone: a [`ZoneIndex`] built from a [`ClusterSnapshot`] and the
//! record logic of the Kubernetes DNS-Based Service Discovery spec 1.1.0 on top of it.
//!
//! Building happens off the hot path (in [`crate::DnsHandle::update`]); the index is
//! then immutable and shared behind an `Arc`, so lookups take no locks. It stores
//! only what answering needs (no `Name`s per endpoint: record names are built on the
//! rare queries that need them), which keeps 100k endpoints in a few MiB.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::error::DnsError;
use crate::snapshot::{ClusterSnapshot, Endpoint, Protocol, Service, ServiceKind};

/// Version of the Kubernetes DNS schema served at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// What an in-zone lookup produced: the sections of the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneAnswer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// Counts of what an index holds, returned by [`ZoneIndex::build`] callers for logging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexSummary {
    pub services: usize,
    /// Endpoints published in DNS (ready, or any with publishNotReadyAddresses).
    pub endpoints: usize,
    pub pods: usize,
    /// Objects skipped because a name is not a valid DNS label.
    pub skipped: usize,
}

/// An immutable, query-ready view of one snapshot.
pub struct ZoneIndex {
    zone: Name,
    zone_labels: Vec<Box<[u8]>>,
    ttl: u32,
    soa: Record,
    ns: Record,
    namespaces: HashMap<Box<str>, NamespaceEntry>,
    services: Vec<ServiceEntry>,
    /// IP -> the service (and endpoint) it names, for PTR. First writer wins; cluster
    /// IPs are inserted before endpoints so a VIP always names its service.
    reverse: HashMap<IpAddr, ReverseRef>,
    summary: IndexSummary,
}

#[derive(Default)]
struct NamespaceEntry {
    services: HashMap<Box<str>, u32>,
    /// Pod IPs in this namespace: `a-b-c-d.<ns>.pod` answers only for these.
    pods: HashSet<IpAddr>,
}

struct ServiceEntry {
    name: Box<str>,
    namespace: Box<str>,
    kind: Kind,
    ports: Box<[PortEntry]>,
    /// Published endpoints, sorted by IP so dashed-IP names are a binary search.
    endpoints: Box<[EndpointEntry]>,
    /// Endpoint hostname -> indexes into `endpoints`.
    by_hostname: HashMap<Box<str>, Vec<u32>>,
    /// `<hostname>.<subdomain>` pods whose subdomain names this (headless) service.
    pod_hosts: HashMap<Box<str>, Vec<IpAddr>>,
}

enum Kind {
    ClusterIp(Box<[IpAddr]>),
    Headless,
    ExternalName(Name),
}

struct PortEntry {
    /// `_name`, lowercased: compared directly with the query label.
    label: Box<str>,
    protocol: Protocol,
    port: u16,
}

struct EndpointEntry {
    ip: IpAddr,
    hostname: Option<Box<str>>,
}

#[derive(Clone, Copy)]
struct ReverseRef {
    service: u32,
    /// `u32::MAX` for the service's cluster IP.
    endpoint: u32,
}

const CLUSTER_IP_REF: u32 = u32::MAX;

impl ZoneIndex {
    /// Builds the index. Fails only on an invalid zone; objects with names that are
    /// not valid DNS labels are skipped and counted in [`ZoneIndex::summary`].
    pub fn build(zone: &str, ttl: u32, snapshot: &ClusterSnapshot) -> Result<Self, DnsError> {
        let zone = parse_zone(zone)?;
        let mut index = Self::empty(zone, ttl);
        for ns in &snapshot.namespaces {
            index.namespace_mut(ns);
        }
        for svc in &snapshot.services {
            index.add_service(svc);
        }
        index.add_reverse_entries();
        for pod in &snapshot.pods {
            index.add_pod(pod);
        }
        Ok(index)
    }

    /// Counts of what was indexed.
    pub fn summary(&self) -> IndexSummary {
        self.summary
    }

    /// The zone apex, lowercase and fully qualified.
    pub fn zone(&self) -> &Name {
        &self.zone
    }

    fn empty(zone: Name, ttl: u32) -> Self {
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let soa = soa_record(&zone, ttl, serial);
        let ns = Record::from_rdata(zone.clone(), ttl, RData::NS(NS(nameserver_name(&zone))));
        let zone_labels = zone.iter().map(Box::from).collect();
        ZoneIndex {
            zone,
            zone_labels,
            ttl,
            soa,
            ns,
            namespaces: HashMap::new(),
            services: Vec::new(),
            reverse: HashMap::new(),
            summary: IndexSummary::default(),
        }
    }

    fn namespace_mut(&mut self, ns: &str) -> &mut NamespaceEntry {
        let key = ns.to_ascii_lowercase();
        self.namespaces.entry(key.into_boxed_str()).or_default()
    }

    fn add_service(&mut self, svc: &Service) {
        let Some(entry) = ServiceEntry::build(svc) else {
            tracing::warn!(service = %svc.name, namespace = %svc.namespace, "service name is not a DNS label; skipped");
            self.summary.skipped += 1;
            return;
        };
        let id = self.services.len() as u32;
        self.summary.services += 1;
        self.summary.endpoints += entry.endpoints.len();
        let name = entry.name.clone();
        self.namespace_mut(&svc.namespace).services.insert(name, id);
        self.services.push(entry);
    }

    /// PTR targets: all cluster IPs first, then endpoints, so that a VIP shared with an
    /// endpoint (unusual) names the service.
    fn add_reverse_entries(&mut self) {
        for (id, svc) in self.services.iter().enumerate() {
            if let Kind::ClusterIp(ips) = &svc.kind {
                for ip in ips.iter() {
                    let r = ReverseRef {
                        service: id as u32,
                        endpoint: CLUSTER_IP_REF,
                    };
                    self.reverse.entry(*ip).or_insert(r);
                }
            }
        }
        for (id, svc) in self.services.iter().enumerate() {
            for (ep, entry) in svc.endpoints.iter().enumerate() {
                let r = ReverseRef {
                    service: id as u32,
                    endpoint: ep as u32,
                };
                self.reverse.entry(entry.ip).or_insert(r);
            }
        }
    }

    fn add_pod(&mut self, pod: &crate::snapshot::Pod) {
        self.summary.pods += 1;
        let ns_key = pod.namespace.to_ascii_lowercase();
        self.namespace_mut(&ns_key).pods.insert(pod.ip);
        let (Some(host), Some(sub)) = (&pod.hostname, &pod.subdomain) else {
            return;
        };
        let Some(&id) = self.namespaces[ns_key.as_str()]
            .services
            .get(sub.to_ascii_lowercase().as_str())
        else {
            return;
        };
        let svc = &mut self.services[id as usize];
        if matches!(svc.kind, Kind::Headless) && is_label(host) {
            let ips = svc
                .pod_hosts
                .entry(host.to_ascii_lowercase().into())
                .or_default();
            ips.push(pod.ip);
        }
    }

    /// Answers `qname`/`qtype` if `qname` is ours: in the zone, or a reverse name of an
    /// IP we know. `None` means "not ours": forward it.
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Option<ZoneAnswer> {
        if let Some(relative) = self.relative_labels(qname) {
            return Some(self.lookup_in_zone(qname, &relative, qtype));
        }
        if qtype == RecordType::PTR {
            return self.lookup_reverse(qname);
        }
        None
    }

    /// The labels of `qname` below the zone apex, closest to the apex first, lowercased;
    /// `None` when `qname` is outside the zone.
    fn relative_labels<'a>(&self, qname: &'a Name) -> Option<Vec<Cow<'a, str>>> {
        let labels: Vec<&[u8]> = qname.iter().collect();
        let below = labels.len().checked_sub(self.zone_labels.len())?;
        let in_zone = labels[below..]
            .iter()
            .zip(&self.zone_labels)
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
        if !in_zone {
            return None;
        }
        Some(
            labels[..below]
                .iter()
                .rev()
                .map(|l| lower_label(l))
                .collect(),
        )
    }

    fn lookup_in_zone(&self, qname: &Name, rel: &[Cow<'_, str>], qtype: RecordType) -> ZoneAnswer {
        let r: Vec<&str> = rel.iter().map(|c| c.as_ref()).collect();
        match r.as_slice() {
            [] => self.apex(qtype),
            ["dns-version"] => self.dns_version(qname, qtype),
            ["svc"] | ["pod"] => self.nodata(),
            ["svc", ns] | ["pod", ns] => self.namespace_node(ns),
            ["svc", ns, svc] => self.with_service(ns, svc, |s| self.service(qname, s, qtype)),
            ["svc", ns, svc, label] => {
                self.with_service(ns, svc, |s| self.service_child(qname, s, label, qtype))
            }
            ["svc", ns, svc, proto, port] => {
                self.with_service(ns, svc, |s| self.srv_for_port(qname, s, proto, port, qtype))
            }
            ["pod", ns, dashed] => self.pod(qname, ns, dashed, qtype),
            _ => self.nxdomain(),
        }
    }

    fn apex(&self, qtype: RecordType) -> ZoneAnswer {
        let answers = match qtype {
            RecordType::SOA => vec![self.soa.clone()],
            RecordType::NS => vec![self.ns.clone()],
            RecordType::ANY => vec![self.soa.clone(), self.ns.clone()],
            _ => return self.nodata(),
        };
        self.answer(answers, Vec::new())
    }

    fn dns_version(&self, qname: &Name, qtype: RecordType) -> ZoneAnswer {
        if !matches!(qtype, RecordType::TXT | RecordType::ANY) {
            return self.nodata();
        }
        let txt = TXT::new(vec![SCHEMA_VERSION.to_string()]);
        self.answer(vec![self.record(qname, RData::TXT(txt))], Vec::new())
    }

    fn namespace_node(&self, ns: &str) -> ZoneAnswer {
        if self.namespaces.contains_key(ns) {
            self.nodata()
        } else {
            self.nxdomain()
        }
    }

    fn with_service(
        &self,
        ns: &str,
        svc: &str,
        f: impl FnOnce(&ServiceEntry) -> ZoneAnswer,
    ) -> ZoneAnswer {
        match self.namespaces.get(ns).and_then(|n| n.services.get(svc)) {
            Some(&id) => f(&self.services[id as usize]),
            None => self.nxdomain(),
        }
    }

    /// `<svc>.<ns>.svc.<zone>`.
    fn service(&self, qname: &Name, svc: &ServiceEntry, qtype: RecordType) -> ZoneAnswer {
        match &svc.kind {
            Kind::ExternalName(target) => self.answer(
                vec![self.record(qname, RData::CNAME(CNAME(target.clone())))],
                Vec::new(),
            ),
            Kind::ClusterIp(ips) => {
                if qtype == RecordType::SRV {
                    return self.srv_records(qname, svc, svc.ports.iter());
                }
                self.address_answer(qname, ips.iter().copied(), qtype)
            }
            Kind::Headless if svc.endpoints.is_empty() => self.nxdomain(),
            Kind::Headless => {
                if qtype == RecordType::SRV {
                    return self.srv_records(qname, svc, svc.ports.iter());
                }
                self.address_answer(qname, svc.endpoints.iter().map(|e| e.ip), qtype)
            }
        }
    }

    /// `<label>.<svc>.<ns>.svc.<zone>`: an endpoint (by hostname or dashed IP), a pod
    /// by hostname+subdomain, or the `_proto` empty non-terminal of SRV names.
    fn service_child(
        &self,
        qname: &Name,
        svc: &ServiceEntry,
        label: &str,
        qtype: RecordType,
    ) -> ZoneAnswer {
        if label.starts_with('_') {
            let exists = svc.ports.iter().any(|p| p.protocol.label() == label);
            return if exists {
                self.nodata()
            } else {
                self.nxdomain()
            };
        }
        let ips = svc.endpoint_ips(label);
        if ips.is_empty() {
            return self.nxdomain();
        }
        self.address_answer(qname, ips.into_iter(), qtype)
    }

    /// `_<port>._<proto>.<svc>.<ns>.svc.<zone>`.
    fn srv_for_port(
        &self,
        qname: &Name,
        svc: &ServiceEntry,
        proto: &str,
        port: &str,
        qtype: RecordType,
    ) -> ZoneAnswer {
        let mut ports = svc
            .ports
            .iter()
            .filter(|p| p.protocol.label() == proto && &*p.label == port)
            .peekable();
        if ports.peek().is_none() || matches!(svc.kind, Kind::ExternalName(_)) {
            return self.nxdomain();
        }
        if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
            return self.nodata();
        }
        self.srv_records(qname, svc, ports)
    }

    /// One SRV per (target, port): the service name for a ClusterIP service, each
    /// endpoint for a headless one; targets' addresses go in the additional section.
    fn srv_records<'p>(
        &self,
        qname: &Name,
        svc: &ServiceEntry,
        ports: impl Iterator<Item = &'p PortEntry>,
    ) -> ZoneAnswer {
        let targets = self.srv_targets(svc);
        let ports: Vec<&PortEntry> = ports.collect();
        if ports.is_empty() || targets.is_empty() {
            return self.nodata();
        }
        let weight = (100 / (targets.len() * ports.len())).max(1) as u16;
        let mut answers = Vec::with_capacity(targets.len() * ports.len());
        let mut additionals = Vec::new();
        for (target, ips) in &targets {
            for port in &ports {
                let srv = SRV::new(0, weight, port.port, target.clone());
                answers.push(self.record(qname, RData::SRV(srv)));
            }
            additionals.extend(ips.iter().map(|ip| self.address_record(target, *ip)));
        }
        let mut ans = self.answer(answers, Vec::new());
        ans.additionals = additionals;
        ans
    }

    fn srv_targets(&self, svc: &ServiceEntry) -> Vec<(Name, Vec<IpAddr>)> {
        let service_name = self.service_name(svc);
        match &svc.kind {
            Kind::ClusterIp(ips) => vec![(service_name, ips.to_vec())],
            Kind::Headless => svc
                .endpoints
                .iter()
                .filter_map(|ep| {
                    let label = ep.label();
                    Some((
                        service_name.prepend_label(label.as_bytes()).ok()?,
                        vec![ep.ip],
                    ))
                })
                .collect(),
            Kind::ExternalName(_) => Vec::new(),
        }
    }

    /// `a-b-c-d.<ns>.pod.<zone>`, only for pods that exist in `ns` ("pods verified").
    fn pod(&self, qname: &Name, ns: &str, dashed: &str, qtype: RecordType) -> ZoneAnswer {
        let ip = parse_dashed_ip(dashed);
        let exists = ip.is_some_and(|ip| {
            self.namespaces
                .get(ns)
                .is_some_and(|n| n.pods.contains(&ip))
        });
        match ip {
            Some(ip) if exists => self.address_answer(qname, std::iter::once(ip), qtype),
            _ => self.nxdomain(),
        }
    }

    fn lookup_reverse(&self, qname: &Name) -> Option<ZoneAnswer> {
        let net = qname.parse_arpa_name().ok()?;
        if net.prefix_len() != net.max_prefix_len() {
            return None;
        }
        let r = self.reverse.get(&net.addr())?;
        let svc = &self.services[r.service as usize];
        let target = match svc.endpoints.get(r.endpoint as usize) {
            Some(ep) => self
                .service_name(svc)
                .prepend_label(ep.label().as_bytes())
                .ok()?,
            None => self.service_name(svc),
        };
        Some(self.answer(
            vec![self.record(qname, RData::PTR(PTR(target)))],
            Vec::new(),
        ))
    }

    /// A/AAAA (or both for ANY) from `ips`; NODATA when the family has none.
    fn address_answer(
        &self,
        qname: &Name,
        ips: impl Iterator<Item = IpAddr>,
        qtype: RecordType,
    ) -> ZoneAnswer {
        let answers: Vec<Record> = ips
            .filter(|ip| match qtype {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .map(|ip| self.address_record(qname, ip))
            .collect();
        if answers.is_empty() {
            return self.nodata();
        }
        self.answer(answers, Vec::new())
    }

    fn address_record(&self, name: &Name, ip: IpAddr) -> Record {
        match ip {
            IpAddr::V4(v4) => self.record(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.record(name, RData::AAAA(AAAA(v6))),
        }
    }

    fn service_name(&self, svc: &ServiceEntry) -> Name {
        let rel = Name::from_labels([svc.name.as_bytes(), svc.namespace.as_bytes(), b"svc"])
            .expect("labels validated at build");
        rel.append_domain(&self.zone)
            .expect("validated zone + 3 labels fits")
    }

    fn record(&self, name: &Name, data: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, data)
    }

    fn answer(&self, answers: Vec<Record>, authorities: Vec<Record>) -> ZoneAnswer {
        ZoneAnswer {
            rcode: ResponseCode::NoError,
            answers,
            authorities,
            additionals: Vec::new(),
        }
    }

    fn nodata(&self) -> ZoneAnswer {
        self.answer(Vec::new(), vec![self.soa.clone()])
    }

    fn nxdomain(&self) -> ZoneAnswer {
        ZoneAnswer {
            rcode: ResponseCode::NXDomain,
            ..self.nodata()
        }
    }
}

impl ServiceEntry {
    /// `None` when the service's name or namespace is not a DNS label.
    fn build(svc: &Service) -> Option<Self> {
        if !is_label(&svc.name) || !is_label(&svc.namespace) {
            return None;
        }
        let kind = match &svc.kind {
            ServiceKind::ClusterIp { ips } => Kind::ClusterIp(ips.clone().into_boxed_slice()),
            ServiceKind::Headless => Kind::Headless,
            ServiceKind::ExternalName { external_name } => {
                Kind::ExternalName(parse_external_name(external_name)?)
            }
        };
        let ports = svc
            .ports
            .iter()
            .filter(|p| !p.name.is_empty() && is_label(&p.name))
            .map(|p| PortEntry {
                label: format!("_{}", p.name.to_ascii_lowercase()).into_boxed_str(),
                protocol: p.protocol,
                port: p.port,
            })
            .collect();
        let endpoints = published_endpoints(svc);
        let by_hostname = hostname_index(&endpoints);
        Some(ServiceEntry {
            name: svc.name.to_ascii_lowercase().into(),
            namespace: svc.namespace.to_ascii_lowercase().into(),
            kind,
            ports,
            endpoints,
            by_hostname,
            pod_hosts: HashMap::new(),
        })
    }

    /// Addresses named `<label>.<svc>`: endpoints by hostname, endpoints by dashed IP,
    /// then pods by hostname+subdomain.
    fn endpoint_ips(&self, label: &str) -> Vec<IpAddr> {
        if let Some(idx) = self.by_hostname.get(label) {
            return idx.iter().map(|&i| self.endpoints[i as usize].ip).collect();
        }
        if let Some(ip) = parse_dashed_ip(label)
            && let Ok(i) = self.endpoints.binary_search_by(|e| e.ip.cmp(&ip))
            && self.endpoints[i].hostname.is_none()
        {
            return vec![ip];
        }
        self.pod_hosts.get(label).cloned().unwrap_or_default()
    }
}

impl EndpointEntry {
    /// The endpoint's DNS label: its hostname, else its dashed IP (as CoreDNS does).
    fn label(&self) -> Cow<'_, str> {
        match &self.hostname {
            Some(h) => Cow::Borrowed(h),
            None => Cow::Owned(dashed_ip(self.ip)),
        }
    }
}

/// Ready endpoints, or all of them with publishNotReadyAddresses; sorted and deduplicated
/// by IP (one address may appear in several EndpointSlices).
fn published_endpoints(svc: &Service) -> Box<[EndpointEntry]> {
    let mut eps: Vec<EndpointEntry> = svc
        .endpoints
        .iter()
        .filter(|e| e.ready || svc.publish_not_ready_addresses)
        .map(|e: &Endpoint| EndpointEntry {
            ip: e.ip,
            hostname: e
                .hostname
                .as_deref()
                .filter(|h| is_label(h))
                .map(|h| h.to_ascii_lowercase().into_boxed_str()),
        })
        .collect();
    eps.sort_by_key(|e| e.ip);
    eps.dedup_by(|a, b| a.ip == b.ip);
    eps.into_boxed_slice()
}

fn hostname_index(endpoints: &[EndpointEntry]) -> HashMap<Box<str>, Vec<u32>> {
    let mut map: HashMap<Box<str>, Vec<u32>> = HashMap::new();
    for (i, ep) in endpoints.iter().enumerate() {
        if let Some(h) = &ep.hostname {
            map.entry(h.clone()).or_default().push(i as u32);
        }
    }
    map
}

fn parse_zone(zone: &str) -> Result<Name, DnsError> {
    let err = |reason: String| DnsError::InvalidZone {
        zone: zone.to_string(),
        reason,
    };
    let trimmed = zone.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(err("empty zone".into()));
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| err(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

fn parse_external_name(s: &str) -> Option<Name> {
    let mut name = Name::from_ascii(s.trim_end_matches('.')).ok()?;
    name.set_fqdn(true);
    Some(name)
}

fn soa_record(zone: &Name, ttl: u32, serial: u32) -> Record {
    let rname = Name::from_labels([b"hostmaster" as &[u8]])
        .and_then(|n| n.append_domain(zone))
        .expect("hostmaster label fits");
    // Refresh/retry/expire as CoreDNS's kubernetes plugin; minimum = TTL, so negative
    // answers are cached no longer than positive ones.
    let soa = SOA::new(nameserver_name(zone), rname, serial, 7200, 1800, 86400, ttl);
    Record::from_rdata(zone.clone(), ttl, RData::SOA(soa))
}

fn nameserver_name(zone: &Name) -> Name {
    Name::from_labels([b"ns" as &[u8], b"dns"])
        .and_then(|n| n.append_domain(zone))
        .expect("ns.dns label fits")
}

/// A label for a lookup key: borrowed when already lowercase (the common case).
fn lower_label(label: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(label) {
        Ok(s) if !s.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(s),
        Ok(s) => Cow::Owned(s.to_ascii_lowercase()),
        // Not UTF-8: cannot match any key; keep it unmatched but harmless.
        Err(_) => Cow::Borrowed("\u{0}"),
    }
}

/// RFC 1123 label: what Kubernetes allows for names that become DNS labels.
fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `10.0.0.1` -> `10-0-0-1`; `fd00::1` -> `fd00--1`.
pub fn dashed_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

fn parse_dashed_ip(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashed_ips_round_trip() {
        for s in ["10.0.0.1", "fd00::1:1", "::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(parse_dashed_ip(&dashed_ip(ip)), Some(ip), "{s}");
        }
        assert_eq!(dashed_ip("10.0.0.1".parse().unwrap()), "10-0-0-1");
        assert_eq!(parse_dashed_ip("db-0"), None);
    }

    #[test]
    fn invalid_names_are_skipped_not_fatal() {
        let svc = |name: &str| Service {
            name: name.into(),
            namespace: "default".into(),
            kind: ServiceKind::Headless,
            ports: vec![],
            endpoints: vec![],
            publish_not_ready_addresses: false,
        };
        let snap = ClusterSnapshot {
            services: vec![svc("ok"), svc("bad.name"), svc(&"x".repeat(64))],
            ..ClusterSnapshot::default()
        };
        let index = ZoneIndex::build("cluster.local.", 5, &snap).unwrap();
        assert_eq!(index.summary().services, 1);
        assert_eq!(index.summary().skipped, 2);
    }

    #[test]
    fn invalid_zone_is_an_error() {
        assert!(ZoneIndex::build("", 5, &ClusterSnapshot::default()).is_err());
        assert!(ZoneIndex::build("a..b", 5, &ClusterSnapshot::default()).is_err());
    }

    #[test]
    fn names_outside_the_zone_are_not_ours() {
        let index = ZoneIndex::build("cluster.local", 5, &ClusterSnapshot::default()).unwrap();
        let name = Name::from_ascii("example.com.").unwrap();
        assert!(index.lookup(&name, RecordType::A).is_none());
        let unknown_ptr = Name::from_ascii("1.0.0.127.in-addr.arpa.").unwrap();
        assert!(
            index.lookup(&unknown_ptr, RecordType::PTR).is_none(),
            "forwarded"
        );
    }
}
