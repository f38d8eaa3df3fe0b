//! The rules kube-proxy writes, as text for `iptables-restore` and `nft -f`:
//! the layouts of its iptables mode (KUBE-SERVICES -> KUBE-SVC-* ->
//! KUBE-SEP-* with `statistic random`, NodePorts in KUBE-NODEPORTS behind
//! the last KUBE-SERVICES rule) and of its nftables mode (a verdict map from
//! address, protocol and port to a per-service chain, `numgen random` over
//! per-endpoint chains). Masquerading for traffic from outside the pod
//! network is kept, as kube-proxy writes it: it is part of the cost.

use std::{fmt::Write, net::Ipv4Addr};

/// The pod network: traffic from outside it is masqueraded.
pub const POD_CIDR: &str = "10.244.0.0/16";

/// One service port as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct KubeService {
    /// `namespace/name:port`, kube-proxy's service port name.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// kube-proxy's chain names: a prefix and 16 base32 characters of a hash
/// (kube-proxy hashes with SHA-256; any stable hash gives the same shape).
fn chain_name(prefix: &str, seed: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    let mut name = String::with_capacity(prefix.len() + 16);
    name.push_str(prefix);
    for round in 0..2u8 {
        for b in seed.bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut bits = h;
        for _ in 0..8 {
            name.push(char::from(ALPHABET[(bits & 31) as usize]));
            bits >>= 5;
        }
    }
    name
}

impl KubeService {
    fn svc_chain(&self) -> String {
        chain_name("KUBE-SVC-", &format!("{}{}", self.name, self.protocol))
    }

    fn ext_chain(&self) -> String {
        chain_name("KUBE-EXT-", &format!("{}{}", self.name, self.protocol))
    }

    fn sep_chain(&self, (addr, port): (Ipv4Addr, u16)) -> String {
        chain_name(
            "KUBE-SEP-",
            &format!("{}{}{addr}:{port}", self.name, self.protocol),
        )
    }

    /// nftables chain names, as kube-proxy's nftables mode spells them.
    fn nft_service_chain(&self) -> String {
        format!("service-{}", self.nft_id())
    }

    fn nft_endpoint_chain(&self, (addr, port): (Ipv4Addr, u16)) -> String {
        format!("endpoint-{}-{addr}-{port}", self.nft_id())
    }

    fn nft_id(&self) -> String {
        let hash = chain_name("", &format!("{}{}", self.name, self.protocol));
        let readable: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{}-{readable}-{}", &hash[..8], self.protocol)
    }
}

/// The `iptables-restore` input of kube-proxy's full sync: every KUBE-*
/// chain declared (so flushed) and filled again, plus the jumps from the
/// built-in chains.
pub fn iptables_full(services: &[KubeService]) -> String {
    let mut out = String::with_capacity(services.len() * 1_500);
    out.push_str(
        "*filter\n\
         :KUBE-FORWARD - [0:0]\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
    for service in services {
        declare_service_chains(&mut out, service);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    kube_services_rules(&mut out, services);
    for service in services {
        service_rules(&mut out, service);
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy 1.28+'s partial sync after `changed`'s endpoints changed
/// from `before`: KUBE-SERVICES re-written whole, the changed service's
/// chains re-filled, endpoint chains that went away deleted.
pub fn iptables_partial(services: &[KubeService], changed: usize, before: &KubeService) -> String {
    let service = &services[changed];
    let stale: Vec<String> = before
        .endpoints
        .iter()
        .filter(|ep| !service.endpoints.contains(ep))
        .map(|ep| before.sep_chain(*ep))
        .collect();
    let mut out = String::with_capacity(services.len() * 200);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
    declare_service_chains(&mut out, service);
    for chain in &stale {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    kube_services_rules(&mut out, services);
    service_rules(&mut out, service);
    for chain in &stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn declare_service_chains(out: &mut String, service: &KubeService) {
    let _ = writeln!(out, ":{} - [0:0]", service.svc_chain());
    if service.node_port.is_some() {
        let _ = writeln!(out, ":{} - [0:0]", service.ext_chain());
    }
    for ep in &service.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", service.sep_chain(*ep));
    }
}

/// KUBE-SERVICES (one rule per service, NodePorts last) and KUBE-NODEPORTS.
fn kube_services_rules(out: &mut String, services: &[KubeService]) {
    for s in services {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            s.name,
            s.cluster_ip,
            s.port,
            s.svc_chain(),
            p = s.protocol
        );
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for s in services {
        if let Some(node_port) = s.node_port {
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -m comment --comment {} -m {p} -p {p} --dport {node_port} -j {}",
                s.name,
                s.ext_chain(),
                p = s.protocol
            );
        }
    }
}

/// A service's KUBE-SVC, KUBE-EXT and KUBE-SEP rules.
fn service_rules(out: &mut String, s: &KubeService) {
    let svc = s.svc_chain();
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {POD_CIDR} -j KUBE-MARK-MASQ",
        s.name,
        s.cluster_ip,
        s.port,
        p = s.protocol
    );
    for (k, ep) in s.endpoints.iter().enumerate() {
        let remaining = s.endpoints.len() - k;
        let probability = if remaining > 1 {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / remaining as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "-A {svc} -m comment --comment \"{} -> {}:{}\"{probability} -j {}",
            s.name,
            ep.0,
            ep.1,
            s.sep_chain(*ep)
        );
    }
    if s.node_port.is_some() {
        let ext = s.ext_chain();
        let _ = writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
            s.name
        );
        let _ = writeln!(out, "-A {ext} -j {svc}");
    }
    for ep in &s.endpoints {
        let sep = s.sep_chain(*ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {} -s {}/32 -j KUBE-MARK-MASQ",
            s.name, ep.0
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {} -m {p} -p {p} -j DNAT --to-destination {}:{}",
            s.name,
            ep.0,
            ep.1,
            p = s.protocol
        );
    }
}

/// The nftables table kube-proxy's nftables mode owns.
pub const NFT_TABLE: &str = "kube-proxy";

/// The whole `ip kube-proxy` table as `nft -f` input (kube-proxy's nftables
/// mode writes it in one transaction on a full sync).
pub fn nftables_full(services: &[KubeService]) -> String {
    let mut out = String::with_capacity(services.len() * 900);
    let _ = writeln!(out, "add table ip {NFT_TABLE}\nflush table ip {NFT_TABLE}");
    let _ = writeln!(
        out,
        "table ip {NFT_TABLE} {{\n\
         \tmap service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tmap service-nodeports {{ type inet_proto . inet_service : verdict; }}\n\
         \tchain mark-for-masquerade {{ meta mark set meta mark | 0x4000; }}\n\
         \tchain masquerading {{ type nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & 0x4000 == 0 return\n\
         \t\tmeta mark set meta mark ^ 0x4000\n\
         \t\tmasquerade fully-random\n\
         \t}}\n\
         \tchain services {{\n\
         \t\tip daddr . meta l4proto . th dport vmap @service-ips\n\
         \t\tfib daddr type local meta l4proto . th dport vmap @service-nodeports\n\
         \t}}\n\
         \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}\n\
         }}"
    );
    for s in services {
        nft_service(&mut out, s);
    }
    out
}

/// One service's chains and map elements, as `add` commands.
fn nft_service(out: &mut String, s: &KubeService) {
    for ep in &s.endpoints {
        nft_endpoint(out, s, *ep);
    }
    let chain = s.nft_service_chain();
    let _ = writeln!(out, "add chain ip {NFT_TABLE} {chain}");
    nft_service_rules(out, s);
    let _ = writeln!(
        out,
        "add element ip {NFT_TABLE} service-ips {{ {} . {} . {} : goto {chain} }}",
        s.cluster_ip, s.protocol, s.port
    );
    if let Some(node_port) = s.node_port {
        let _ = writeln!(
            out,
            "add element ip {NFT_TABLE} service-nodeports {{ {} . {node_port} : goto {chain} }}",
            s.protocol
        );
    }
}

fn nft_service_rules(out: &mut String, s: &KubeService) {
    let chain = s.nft_service_chain();
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {chain} ip saddr != {POD_CIDR} jump mark-for-masquerade"
    );
    let targets: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(k, ep)| format!("{k} : goto {}", s.nft_endpoint_chain(*ep)))
        .collect();
    if !targets.is_empty() {
        let _ = writeln!(
            out,
            "add rule ip {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
            targets.len(),
            targets.join(", ")
        );
    }
}

fn nft_endpoint(out: &mut String, s: &KubeService, ep: (Ipv4Addr, u16)) {
    let chain = s.nft_endpoint_chain(ep);
    let _ = writeln!(out, "add chain ip {NFT_TABLE} {chain}");
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {chain} ip saddr {} jump mark-for-masquerade",
        ep.0
    );
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {chain} meta l4proto {} dnat to {}:{}",
        s.protocol, ep.0, ep.1
    );
}

/// kube-proxy's nftables incremental sync after one service's endpoints
/// changed from `before`: new endpoint chains added, the service chain
/// flushed and refilled, gone endpoint chains deleted.
pub fn nftables_change(s: &KubeService, before: &KubeService) -> String {
    let mut out = String::new();
    for ep in s
        .endpoints
        .iter()
        .filter(|ep| !before.endpoints.contains(ep))
    {
        nft_endpoint(&mut out, s, *ep);
    }
    let _ = writeln!(out, "flush chain ip {NFT_TABLE} {}", s.nft_service_chain());
    nft_service_rules(&mut out, s);
    for ep in before
        .endpoints
        .iter()
        .filter(|ep| !s.endpoints.contains(ep))
    {
        let chain = before.nft_endpoint_chain(*ep);
        let _ = writeln!(out, "flush chain ip {NFT_TABLE} {chain}");
        let _ = writeln!(out, "delete chain ip {NFT_TABLE} {chain}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(endpoints: usize) -> KubeService {
        KubeService {
            name: "default/web:http".into(),
            cluster_ip: Ipv4Addr::new(10, 200, 0, 1),
            port: 80,
            protocol: "tcp",
            node_port: Some(30080),
            endpoints: (0..endpoints)
                .map(|i| (Ipv4Addr::new(10, 244, 0, 10 + i as u8), 8080))
                .collect(),
        }
    }

    #[test]
    fn iptables_layout_is_kube_proxys() {
        let rules = iptables_full(&[service(2)]);
        assert!(rules.contains("-A KUBE-SERVICES -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.200.0.1/32 --dport 80 -j KUBE-SVC-"));
        assert!(
            rules.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-")
        );
        assert!(rules.contains("-j DNAT --to-destination 10.244.0.11:8080"));
        assert!(rules.contains("--dport 30080 -j KUBE-EXT-"));
        // The NodePort jump is the last rule of KUBE-SERVICES.
        let last = rules.lines().rfind(|l| l.starts_with("-A KUBE-SERVICES"));
        assert!(last.unwrap().ends_with("-j KUBE-NODEPORTS"));
    }

    #[test]
    fn partial_sync_deletes_gone_endpoint_chains() {
        let before = service(3);
        let after = service(2);
        let rules = iptables_partial(std::slice::from_ref(&after), 0, &before);
        let gone = before.sep_chain(before.endpoints[2]);
        assert!(rules.contains(&format!(":{gone} - [0:0]")));
        assert!(rules.contains(&format!("-X {gone}")));
    }

    #[test]
    fn nftables_change_touches_one_service() {
        let before = service(2);
        let after = service(3);
        let change = nftables_change(&after, &before);
        assert!(change.contains("numgen random mod 3 vmap"));
        assert_eq!(change.matches("add chain").count(), 1, "{change}");
    }
}
