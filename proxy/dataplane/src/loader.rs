//! Loading the eBPF object, pinning its maps, attaching and detaching the XDP
//! program, forwarding eBPF log lines, and running the program on test input.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{ProgramError, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use aya_log::EbpfLogger;
use ipnet::Ipv4Net;
use vipr_common::{
    Counter, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKEND_STATS, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_FLOWS, DEFAULT_MAX_MAGLEV_ENTRIES, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOURCE_RANGES,
    DataplaneConfig, NEW_FLOW_PROGRAM, NEW_FLOW_PROGRAM_WITHOUT_EVENTS, NEW_FLOW_WITH_EVENTS,
    NEW_FLOW_WITHOUT_EVENTS, PASS_PROGRAM, XDP_PROGRAM, XDP_PROGRAM_WITHOUT_EVENTS,
    flow_table::TableShape, globals, map_names,
};

pub use aya::programs::XdpMode;

use crate::{
    DataplaneError, EBPF_OBJECT, cgroup,
    links::{self, Attachment},
    services::ServiceTable,
};

/// Maps that hold state worth keeping across an agent restart. The aya-log
/// ring buffer is deliberately absent: it belongs to one loaded program.
const PERSISTENT_MAPS: [&str; 17] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::CONNTRACK,
    map_names::SOURCE_RANGES,
    map_names::CONFIG,
    map_names::STATS,
    map_names::SOCK_REVNAT,
    map_names::BACKEND_STATS,
    map_names::SERVICE_DROPS,
    map_names::MAGLEV,
    map_names::MEMBERS,
    map_names::AFFINITY,
    map_names::ACTIVE_CONNECTIONS,
    map_names::BALANCE_TURNS,
    map_names::SOCK_CONNECTIONS,
    // Not state, but pinned so that an attached program keeps opening flows
    // while the agent restarts (an unpinned program array is emptied when
    // the process that made it exits), and so that programs of the old and
    // the new agent, which tail-call each other while links are taken
    // over, hand a new flow over through one and the same scratch value.
    // (An upgrade that changes `Opening`'s layout discards the pin: until
    // every link runs the new program, the old one's new flows find a
    // zeroed service in the new scratch value and are refused.)
    map_names::NEW_FLOW_PROGRAMS,
    map_names::OPENING,
];

/// SNAT source ports by default: the unprivileged ports below Linux's
/// default ephemeral range (32768-60999), so a SNAT'd flow never takes the
/// tuple of a node-local connection. A flow needs its own port per backend
/// address and port, so this is how many SNAT'd flows (externalTrafficPolicy
/// Cluster) one backend can have open per protocol: 31,744. The range above
/// the ephemeral one (61000-65535) held 4,536, which a NodePort under a
/// few hundred new UDP flows a second exhausts before the flows time out.
pub const DEFAULT_SNAT_PORTS: RangeInclusive<u16> = 1024..=32767;

/// Folder of the pin folder where `vipr_pass` attachments are pinned.
const PASS_LINK_DIR: &str = "pass-links";

/// Where [`Dataplane::attach_pass_as`] pins the attachment of `key` when
/// links are pinned under `pin_dir`: for tools that swap the program of
/// that link (`vipr bench` puts its counting sink on its backends' `eth0`).
pub fn pass_link_pin(pin_dir: &Path, key: &str) -> PathBuf {
    pin_dir.join(PASS_LINK_DIR).join(links::pin_name(key))
}

/// How to load the data plane.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// bpffs folder where the maps are pinned (one per node). A restarted
    /// agent given the same folder reuses the maps, so established flows keep
    /// their backends. `None` keeps the maps private to this process.
    pub pin_dir: Option<PathBuf>,
    /// Packets into this range that match no service are dropped.
    pub service_cidr: Option<Ipv4Net>,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_flows: u32,
    /// Capacity of the loadBalancerSourceRanges trie, all services together.
    pub max_source_ranges: u32,
    /// (frontend, backend) pairs with counters of their own; pairs beyond
    /// it are counted only in the node-wide totals.
    pub max_backend_stats: u32,
    /// Capacity of the Maglev map: the table slots of all maglev services.
    pub max_maglev_entries: u32,
    /// Capacity of the session affinity map (LRU: the oldest go first).
    pub max_affinities: u32,
    /// The node's address: the source given to clients of frontends with
    /// externalTrafficPolicy Cluster. `None`: the frontend's own address
    /// (right for NodePorts on the node address).
    pub node_addr: Option<Ipv4Addr>,
    /// Source given to hairpin flows (a pod reaching itself through a
    /// service), so its reply leaves the pod. Use an address no pod or node
    /// owns that routes to the node (e.g. a link-local one), or the node
    /// address. `None`: hairpin flows are not SNATed (and do not work).
    pub hairpin_addr: Option<Ipv4Addr>,
    /// Source ports for SNAT. Keep it out of the node's
    /// `net.ipv4.ip_local_port_range` (32768-60999 by default) so a
    /// translated flow never takes a tuple a local socket uses.
    pub snat_ports: RangeInclusive<u16>,
    /// Pin XDP links under `pin_dir/links` (and cgroup links, see
    /// [`Dataplane::attach_cgroup`], under `pin_dir/cgroup-links`), so the program stays attached
    /// when the data plane drops (an agent restart never leaves an interface
    /// untranslated) and a later load with the same `pin_dir` takes every
    /// pinned attachment over. Needs `pin_dir`; [`Dataplane::detach`]
    /// removes a pinned attachment for good.
    pub pin_links: bool,
    /// The forwarding fast path: translated packets whose route the FIB
    /// resolves to an interface given to [`Dataplane::allow_redirect`] leave
    /// from XDP (routed, TTL decremented, XDP_REDIRECT) instead of through
    /// the kernel's IP forwarding. Off: every translated packet is passed.
    pub xdp_redirect: bool,
    /// Most verbose eBPF log level that is emitted at all; anything above it
    /// costs one comparison in the kernel.
    pub ebpf_log_level: log::LevelFilter,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        DataplaneOptions {
            pin_dir: None,
            service_cidr: None,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_flows: DEFAULT_MAX_FLOWS,
            max_source_ranges: DEFAULT_MAX_SOURCE_RANGES,
            max_backend_stats: DEFAULT_MAX_BACKEND_STATS,
            max_maglev_entries: DEFAULT_MAX_MAGLEV_ENTRIES,
            max_affinities: DEFAULT_MAX_AFFINITY,
            node_addr: None,
            hairpin_addr: None,
            snat_ports: DEFAULT_SNAT_PORTS,
            pin_links: false,
            xdp_redirect: true,
            ebpf_log_level: log::max_level(),
        }
    }
}

/// The loaded data plane: the eBPF object, its links and the service table.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: HashMap<String, Attachment>,
    /// Where attachments are pinned, when links are pinned at all.
    link_dir: Option<PathBuf>,
    /// `vipr_pass` attachments by key (see [`Dataplane::attach_pass_as`]).
    attached_pass: HashMap<String, Attachment>,
    /// Where `vipr_pass` attachments are pinned, when links are pinned.
    pass_link_dir: Option<PathBuf>,
    /// Cgroups the socket-level programs are attached to.
    pub(crate) cgroups: HashMap<PathBuf, cgroup::CgroupAttachment>,
    /// Where cgroup attachments are pinned, when links are pinned at all.
    pub(crate) cgroup_link_dir: Option<PathBuf>,
    pub(crate) services: ServiceTable,
    pub(crate) max_services: u32,
    pub(crate) max_backends: u32,
    pub(crate) max_maglev_entries: u32,
    xdp_redirect: bool,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
}

impl Dataplane {
    /// Loads the embedded eBPF object into the kernel (the verifier runs
    /// here), reusing pinned maps when `pin_dir` holds them.
    pub fn load(options: &DataplaneOptions) -> Result<Self, DataplaneError> {
        let log_level = options.ebpf_log_level as u8;
        let pin_paths = pin_paths(options.pin_dir.as_deref())?;
        discard_incompatible_pins(&pin_paths, options);
        let flow_shape = TableShape {
            mask: TableShape::slots_for(options.max_flows) - 1,
            seed: pinned_flow_seed(&pin_paths).unwrap_or_else(fresh_seed),
        };
        let xdp_redirect = u32::from(options.xdp_redirect);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &log_level, true)
            .override_global(globals::FLOW_TABLE_MASK, &flow_shape.mask, true)
            .override_global(globals::FLOW_TABLE_SEED, &flow_shape.seed, true)
            .override_global(globals::XDP_REDIRECT, &xdp_redirect, true)
            .map_max_entries(map_names::SERVICES, options.max_services)
            .map_max_entries(map_names::BACKENDS, options.max_backends)
            .map_max_entries(
                map_names::CONNTRACK,
                TableShape::slots_for(options.max_flows),
            )
            .map_max_entries(map_names::SOURCE_RANGES, options.max_source_ranges)
            .map_max_entries(map_names::BACKEND_STATS, options.max_backend_stats)
            .map_max_entries(map_names::MAGLEV, options.max_maglev_entries)
            .map_max_entries(map_names::MEMBERS, options.max_backends)
            .map_max_entries(map_names::ACTIVE_CONNECTIONS, options.max_backends)
            .map_max_entries(map_names::BALANCE_TURNS, options.max_services)
            .map_max_entries(map_names::AFFINITY, options.max_affinities);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        // Only a program that logs at all has the log map; keep the logger
        // alive, or the map closes under the loaded program.
        let logger = EbpfLogger::init(&mut ebpf).ok();
        for name in [XDP_PROGRAM, PASS_PROGRAM] {
            let xdp = program(&mut ebpf, name)?;
            load_retrying_interrupted(|| xdp.load())
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        install_new_flow_program(&mut ebpf, NEW_FLOW_PROGRAM, NEW_FLOW_WITH_EVENTS)?;
        // Loaded (verified) now, attached only on request: a verifier
        // complaint surfaces at startup, not when the first cgroup is added.
        cgroup::load_programs(&mut ebpf)?;

        write_config(&mut ebpf, options, flow_shape)?;
        let services = ServiceTable::adopt(&ebpf, options.max_backend_stats)?;
        let link_dir = options
            .pin_dir
            .as_ref()
            .filter(|_| options.pin_links)
            .map(|dir| dir.join("links"));
        let attached = match &link_dir {
            Some(dir) => links::adopt(xdp_program(&mut ebpf)?, dir)?,
            None => HashMap::new(),
        };
        // Siblings of `links`: each folder holds one program's links.
        let pass_link_dir = options
            .pin_dir
            .as_ref()
            .filter(|_| options.pin_links)
            .map(|dir| dir.join(PASS_LINK_DIR));
        let attached_pass = match &pass_link_dir {
            Some(dir) => links::adopt(program(&mut ebpf, PASS_PROGRAM)?, dir)?,
            None => HashMap::new(),
        };
        let cgroup_link_dir = options
            .pin_dir
            .as_ref()
            .filter(|_| options.pin_links)
            .map(|dir| dir.join("cgroup-links"));
        let cgroups = match &cgroup_link_dir {
            Some(dir) => cgroup::adopt(&mut ebpf, dir)?,
            None => HashMap::new(),
        };
        Ok(Dataplane {
            ebpf,
            attached,
            link_dir,
            attached_pass,
            pass_link_dir,
            cgroups,
            cgroup_link_dir,
            services,
            max_services: options.max_services,
            max_backends: options.max_backends,
            max_maglev_entries: options.max_maglev_entries,
            xdp_redirect: options.xdp_redirect,
            logger,
        })
    }

    /// Attaches the XDP program to `interface` (in the calling thread's
    /// network namespace). Attaching where it already is (e.g. a pinned
    /// attachment taken over at load) is a no-op.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        if self.attached.contains_key(interface) {
            return Ok(());
        }
        let program = xdp_program(&mut self.ebpf)?;
        let id = program
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        let attachment = match &self.link_dir {
            Some(dir) => links::pin(program, id, dir, interface)?,
            None => Attachment::Owned(id),
        };
        self.attached.insert(interface.to_owned(), attachment);
        Ok(())
    }

    /// Attaches the pass-everything program `vipr_pass` to `interface`,
    /// kept until the data plane drops or [`Dataplane::detach`] is called.
    ///
    /// Needed on the pod side of a veth whose node side runs the translation
    /// in native mode: a frame the node side sends back with XDP_TX (the
    /// RST / ICMP refusing a service without endpoints) is only received
    /// when the peer has an XDP program (or GRO enabled); otherwise the
    /// kernel drops it.
    pub fn attach_pass(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        self.attach_pass_as(interface, interface, mode)
    }

    /// [`Dataplane::attach_pass`] recorded under `key` instead of the
    /// interface name, for interfaces in other namespaces that share a name
    /// (every pod's `eth0`); [`Dataplane::detach`] takes the key.
    pub fn attach_pass_as(
        &mut self,
        key: &str,
        interface: &str,
        mode: XdpMode,
    ) -> Result<(), DataplaneError> {
        if self.attached_pass.contains_key(key) {
            return Ok(());
        }
        let program = program(&mut self.ebpf, PASS_PROGRAM)?;
        let id = program
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        // Pinned like the translation's links: while the agent restarts, a
        // refusal sent back with XDP_TX must still be received.
        let attachment = match &self.pass_link_dir {
            Some(dir) => links::pin(program, id, dir, key)?,
            None => Attachment::Owned(id),
        };
        self.attached_pass.insert(key.to_owned(), attachment);
        Ok(())
    }

    /// Detaches the XDP program from `interface`.
    pub fn detach(&mut self, interface: &str) -> Result<(), DataplaneError> {
        if let Some(attachment) = self.attached_pass.remove(interface) {
            let program = program(&mut self.ebpf, PASS_PROGRAM)?;
            return links::release(program, PASS_PROGRAM, attachment, interface);
        }
        let attachment = self
            .attached
            .remove(interface)
            .ok_or_else(|| DataplaneError::NotAttached(interface.to_owned()))?;
        links::release(
            xdp_program(&mut self.ebpf)?,
            XDP_PROGRAM,
            attachment,
            interface,
        )
    }

    /// Whether the forwarding fast path is on ([`DataplaneOptions::xdp_redirect`]).
    pub fn xdp_redirect(&self) -> bool {
        self.xdp_redirect
    }

    /// Interfaces the program is attached to, sorted.
    pub fn attached_interfaces(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.attached.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Runs the XDP program on `packet` through BPF_PROG_TEST_RUN, `repeat`
    /// times; the (possibly rewritten) packet lands in `out`.
    pub fn test_run(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult, DataplaneError> {
        self.run_program(XDP_PROGRAM, packet, out, repeat)
    }

    /// [`Dataplane::test_run`] for the pass-everything program: the floor
    /// any per-packet cost is measured against.
    pub fn test_run_pass(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult, DataplaneError> {
        self.run_program(PASS_PROGRAM, packet, out, repeat)
    }

    /// [`Dataplane::test_run`] for the translation built without the
    /// monitor's event code (loaded on first use): what the idle event check
    /// costs is the difference.
    pub fn test_run_without_events(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult, DataplaneError> {
        let name = XDP_PROGRAM_WITHOUT_EVENTS;
        let bare = program(&mut self.ebpf, name)?;
        if bare.fd().is_err() {
            load_retrying_interrupted(|| bare.load())
                .map_err(|source| DataplaneError::Program { name, source })?;
            install_new_flow_program(
                &mut self.ebpf,
                NEW_FLOW_PROGRAM_WITHOUT_EVENTS,
                NEW_FLOW_WITHOUT_EVENTS,
            )?;
        }
        self.run_program(name, packet, out, repeat)
    }

    fn run_program(
        &mut self,
        name: &'static str,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult, DataplaneError> {
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(out),
            repeat,
            ..TestRunOptions::default()
        };
        program(&mut self.ebpf, name)?
            .test_run(opts)
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Forwards pending eBPF log lines to the `log` facade (and so to tracing).
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }

    /// Moves eBPF log forwarding onto a tokio task that wakes when lines
    /// arrive. Returns `None` when the object logs nothing or it already runs.
    #[cfg(feature = "tokio")]
    pub fn spawn_log_forwarder(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        use tokio::io::{Interest, unix::AsyncFd};
        let logger = self.logger.take()?;
        // SAFETY: the AsyncFd owns the logger, and so the ring buffer fd,
        // for as long as the registration lives.
        let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
        let mut logger = match registered {
            Ok(fd) => fd,
            Err(error) => {
                tracing::warn!(error = %error, "eBPF log lines will not be forwarded");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }))
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

/// Loads new-flow program `name` and puts it at `index` of
/// `NEW_FLOW_PROGRAMS`, where the translation tail-calls it (replacing the
/// one a pinned array still holds from an earlier agent).
fn install_new_flow_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    index: u32,
) -> Result<(), DataplaneError> {
    let new_flow = program(ebpf, name)?;
    load_retrying_interrupted(|| new_flow.load())
        .map_err(|source| DataplaneError::Program { name, source })?;
    let installing =
        |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::NewFlowProgram {
            name,
            index,
            source,
        };
    let fd = new_flow
        .fd()
        .map_err(|e| installing(e.into()))?
        .try_clone()
        .map_err(|e| installing(e.into()))?;
    let map_name = map_names::NEW_FLOW_PROGRAMS;
    let map = ebpf
        .map_mut(map_name)
        .ok_or(DataplaneError::MissingMap(map_name))?;
    let mut programs = ProgramArray::try_from(map).map_err(DataplaneError::map(map_name))?;
    programs
        .set(index, &fd, 0)
        .map_err(|e| installing(e.into()))
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    program(ebpf, XDP_PROGRAM)
}

/// Runs a program's `load` (the verifier), again when the verifier gave up
/// with EAGAIN: it stops as soon as the loading thread has a signal
/// pending, whatever the signal. Five attempts, as libbpf makes.
pub fn load_retrying_interrupted(
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn pin_paths(pin_dir: Option<&Path>) -> Result<Vec<(&'static str, PathBuf)>, DataplaneError> {
    let Some(dir) = pin_dir else {
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    for retired in map_names::RETIRED {
        let _ = std::fs::remove_file(dir.join(retired));
    }
    Ok(PERSISTENT_MAPS
        .iter()
        .map(|name| (*name, dir.join(name)))
        .collect())
}

/// `options` as the program reads them; `flow_shape` is the conntrack
/// table's (its seed kept from a pinned table's config, or fresh).
fn config(options: &DataplaneOptions, flow_shape: TableShape) -> DataplaneConfig {
    let be = |addr: Option<Ipv4Addr>| addr.map_or(0, |a| u32::from(a).to_be());
    let (cidr_addr, cidr_mask) = options.service_cidr.map_or((0, 0), |net: Ipv4Net| {
        (
            u32::from(net.network()).to_be(),
            u32::from(net.netmask()).to_be(),
        )
    });
    let ports = &options.snat_ports;
    // 65535 ports fit in u16 only when the range does not start at 0, which
    // port 0 rules out anyway.
    let port_min = (*ports.start()).max(1);
    let port_count = ports.end().saturating_sub(port_min).saturating_add(1);
    DataplaneConfig {
        service_cidr_addr: cidr_addr,
        service_cidr_mask: cidr_mask,
        node_addr: be(options.node_addr),
        hairpin_addr: be(options.hairpin_addr),
        snat_port_min: port_min,
        snat_port_count: if ports.is_empty() { 0 } else { port_count },
        _reserved: 0,
        flow_mask: flow_shape.mask,
        _pad: 0,
        flow_seed: flow_shape.seed,
    }
}

/// A random conntrack hash seed, never zero (zero marks "none yet").
fn fresh_seed() -> u64 {
    let mut seed = 0u64;
    // SAFETY: getrandom fills the 8 bytes it is given.
    let filled = unsafe { libc::getrandom((&raw mut seed).cast(), size_of::<u64>(), 0) };
    if filled != size_of::<u64>() as isize {
        // Only seed quality is at stake (which flows share a neighbourhood).
        seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
    }
    seed.max(1)
}

/// Key and value sizes this build's object gives each persistent map.
fn expected_layout(name: &str) -> Option<(usize, usize)> {
    use std::mem::size_of;
    use vipr_common::{
        AffinityKey, AffinityValue, Backend, BackendKey, CounterValue, Endpoint, FlowStats,
        MaglevKey, MemberKey, Opening, ServiceDropKey, ServiceKey, ServiceValue, SockRevNatKey,
        SockRevNatValue, SourceRangeKey, flow_table::FlowSlot,
    };
    Some(match name {
        map_names::SERVICES => (size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        map_names::BACKENDS => (size_of::<BackendKey>(), size_of::<Backend>()),
        map_names::CONNTRACK => (size_of::<u32>(), size_of::<FlowSlot>()),
        // LPM trie keys carry a 4-byte prefix length in front.
        map_names::SOURCE_RANGES => (4 + size_of::<SourceRangeKey>(), size_of::<u32>()),
        map_names::CONFIG => (size_of::<u32>(), size_of::<DataplaneConfig>()),
        map_names::STATS => (size_of::<u32>(), size_of::<CounterValue>()),
        map_names::SOCK_REVNAT => (size_of::<SockRevNatKey>(), size_of::<SockRevNatValue>()),
        map_names::BACKEND_STATS => (size_of::<u32>(), size_of::<FlowStats>()),
        map_names::SERVICE_DROPS => (size_of::<ServiceDropKey>(), size_of::<CounterValue>()),
        map_names::MAGLEV => (size_of::<MaglevKey>(), size_of::<Endpoint>()),
        map_names::MEMBERS => (size_of::<MemberKey>(), size_of::<u32>()),
        map_names::AFFINITY => (size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        map_names::ACTIVE_CONNECTIONS => (size_of::<Endpoint>(), size_of::<u32>()),
        map_names::BALANCE_TURNS => (size_of::<u32>(), size_of::<u32>()),
        map_names::SOCK_CONNECTIONS => (size_of::<u64>(), size_of::<Endpoint>()),
        map_names::NEW_FLOW_PROGRAMS => (size_of::<u32>(), size_of::<u32>()),
        // Per-CPU: the kernel reports the value size of one CPU.
        map_names::OPENING => (size_of::<u32>(), size_of::<Opening>()),
        _ => return None,
    })
}

/// Entries each sized map gets from `options`; `None` for fixed sizes.
fn expected_max_entries(name: &str, options: &DataplaneOptions) -> Option<u32> {
    match name {
        map_names::SERVICES => Some(options.max_services),
        map_names::BACKENDS => Some(options.max_backends),
        map_names::CONNTRACK => Some(TableShape::slots_for(options.max_flows)),
        map_names::SOURCE_RANGES => Some(options.max_source_ranges),
        map_names::STATS => Some(Counter::COUNT),
        map_names::BACKEND_STATS => Some(options.max_backend_stats),
        map_names::MAGLEV => Some(options.max_maglev_entries),
        map_names::MEMBERS | map_names::ACTIVE_CONNECTIONS => Some(options.max_backends),
        map_names::BALANCE_TURNS => Some(options.max_services),
        map_names::AFFINITY => Some(options.max_affinities),
        _ => None,
    }
}

/// Removes pinned maps left by a build with another layout, or sized
/// otherwise than `options` ask. aya would reuse them blindly, and the
/// program would then fail to load, read garbage, or keep the old size;
/// losing that state is the lesser harm (services are programmed again by
/// the caller; flows in a discarded conntrack reopen on their next packet).
fn discard_incompatible_pins(pin_paths: &[(&'static str, PathBuf)], options: &DataplaneOptions) {
    for (name, path) in pin_paths {
        let Ok(info) = aya::maps::MapInfo::from_pin(path) else {
            continue;
        };
        let Some((key, value)) = expected_layout(name) else {
            continue;
        };
        // STATS is per-CPU: the kernel reports the per-CPU value size. Its
        // length grows when counters are appended.
        let layout_differs = info.key_size() as usize != key || info.value_size() as usize != value;
        let resized =
            expected_max_entries(name, options).is_some_and(|max| info.max_entries() != max);
        if layout_differs || resized {
            tracing::warn!(
                map = name,
                path = %path.display(),
                pinned_entries = info.max_entries(),
                "pinned map has another layout or size (an older vipr, or new --max-* flags): discarding it and its state"
            );
            let _ = std::fs::remove_file(path);
        }
    }
    // The table's flows are placed by the seed in CONFIG: without it (no
    // pinned CONFIG, or one that cannot be read) they could be neither
    // found nor removed.
    if pinned_flow_seed(pin_paths).is_none()
        && let Some((_, table)) = pin_paths
            .iter()
            .find(|(n, path)| *n == map_names::CONNTRACK && path.exists())
    {
        tracing::warn!(path = %table.display(), "pinned conntrack without a readable config (its hash seed): discarding it");
        let _ = std::fs::remove_file(table);
    }
}

/// Writes `CONFIG`.
fn write_config(
    ebpf: &mut Ebpf,
    options: &DataplaneOptions,
    flow_shape: TableShape,
) -> Result<(), DataplaneError> {
    let map = ebpf
        .map_mut(map_names::CONFIG)
        .ok_or(DataplaneError::MissingMap(map_names::CONFIG))?;
    let mut array: Array<_, DataplaneConfig> =
        Array::try_from(map).map_err(DataplaneError::map(map_names::CONFIG))?;
    array
        .set(0, config(options, flow_shape), 0)
        .map_err(DataplaneError::map(map_names::CONFIG))
}

/// The conntrack seed a pinned `CONFIG` carries: the pinned table's flows
/// are placed by it, so the program must hash with it too.
fn pinned_flow_seed(pin_paths: &[(&'static str, PathBuf)]) -> Option<u64> {
    let (_, path) = pin_paths.iter().find(|(n, _)| *n == map_names::CONFIG)?;
    let data = aya::maps::MapData::from_pin(path).ok()?;
    let array: Array<_, DataplaneConfig> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    let seed = array.get(&0, 0).ok()?.flow_seed;
    (seed != 0).then_some(seed)
}
