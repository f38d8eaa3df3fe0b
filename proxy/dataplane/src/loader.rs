//! Loading the eBPF object, pinning its maps, attaching and detaching the XDP
//! program, forwarding eBPF log lines, and running the program on test input.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{TestRun, TestRunOptions, TestRunResult, Xdp, xdp::XdpLinkId},
};
use aya_log::EbpfLogger;
use ipnet::Ipv4Net;
use vipr_common::{
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES, DataplaneConfig, XDP_PROGRAM,
    map_names,
};

pub use aya::programs::XdpMode;

use crate::{DataplaneError, EBPF_OBJECT, services::ServiceTable};

/// Maps that hold state worth keeping across an agent restart. The aya-log
/// ring buffer is deliberately absent: it belongs to one loaded program.
const PERSISTENT_MAPS: [&str; 6] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::FLOWS,
    map_names::REVERSE_FLOWS,
    map_names::CONFIG,
    map_names::STATS,
];

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
            ebpf_log_level: log::max_level(),
        }
    }
}

/// The loaded data plane: the eBPF object, its links and the service table.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: HashMap<String, XdpLinkId>,
    pub(crate) services: ServiceTable,
    pub(crate) max_services: u32,
    pub(crate) max_backends: u32,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
}

impl Dataplane {
    /// Loads the embedded eBPF object into the kernel (the verifier runs
    /// here), reusing pinned maps when `pin_dir` holds them.
    pub fn load(options: &DataplaneOptions) -> Result<Self, DataplaneError> {
        let log_level = options.ebpf_log_level as u8;
        let pin_paths = pin_paths(options.pin_dir.as_deref())?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &log_level, true)
            .map_max_entries(map_names::SERVICES, options.max_services)
            .map_max_entries(map_names::BACKENDS, options.max_backends)
            .map_max_entries(map_names::FLOWS, options.max_flows)
            .map_max_entries(map_names::REVERSE_FLOWS, options.max_flows);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        // Only a program that logs at all has the log map; keep the logger
        // alive, or the map closes under the loaded program.
        let logger = EbpfLogger::init(&mut ebpf).ok();
        xdp_program(&mut ebpf)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: XDP_PROGRAM,
                source,
            })?;

        write_config(&mut ebpf, options.service_cidr)?;
        let services = ServiceTable::adopt(&ebpf)?;
        Ok(Dataplane {
            ebpf,
            attached: HashMap::new(),
            services,
            max_services: options.max_services,
            max_backends: options.max_backends,
            logger,
        })
    }

    /// Attaches the XDP program to `interface` (in the calling thread's
    /// network namespace).
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let link = xdp_program(&mut self.ebpf)?
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        self.attached.insert(interface.to_owned(), link);
        Ok(())
    }

    /// Detaches the XDP program from `interface`.
    pub fn detach(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let link = self
            .attached
            .remove(interface)
            .ok_or_else(|| DataplaneError::NotAttached(interface.to_owned()))?;
        xdp_program(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| DataplaneError::Program {
                name: XDP_PROGRAM,
                source,
            })
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
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(out),
            repeat,
            ..TestRunOptions::default()
        };
        xdp_program(&mut self.ebpf)?
            .test_run(opts)
            .map_err(|source| DataplaneError::Program {
                name: XDP_PROGRAM,
                source,
            })
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

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or(DataplaneError::MissingProgram(XDP_PROGRAM))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name: XDP_PROGRAM,
            source,
        })
}

fn pin_paths(pin_dir: Option<&Path>) -> Result<Vec<(&'static str, PathBuf)>, DataplaneError> {
    let Some(dir) = pin_dir else {
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    Ok(PERSISTENT_MAPS
        .iter()
        .map(|name| (*name, dir.join(name)))
        .collect())
}

fn write_config(ebpf: &mut Ebpf, service_cidr: Option<Ipv4Net>) -> Result<(), DataplaneError> {
    let config = match service_cidr {
        Some(net) => DataplaneConfig {
            service_cidr_addr: u32::from(net.network()).to_be(),
            service_cidr_mask: u32::from(net.netmask()).to_be(),
        },
        None => DataplaneConfig::default(),
    };
    let map = ebpf
        .map_mut(map_names::CONFIG)
        .ok_or(DataplaneError::MissingMap(map_names::CONFIG))?;
    let mut array: Array<_, DataplaneConfig> =
        Array::try_from(map).map_err(DataplaneError::map(map_names::CONFIG))?;
    array
        .set(0, config, 0)
        .map_err(DataplaneError::map(map_names::CONFIG))
}
