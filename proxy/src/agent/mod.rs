//! `vipr agent`: the composition root. It owns the desired state (the
//! store), runs the pods (the runtime), feeds the data plane and the DNS
//! server, and answers the CLI. Nothing else in vipr wires parts together.
//!
//! Threads and tasks:
//! - the reconciler thread follows the store's change feed: it starts and
//!   stops pods and programs services (one full sync, then increments);
//! - the deployments thread runs the Deployment controller on the same
//!   feed: it creates and removes pods (and ReplicaSets) through the store;
//! - a task copies pod status from the runtime into the store (which wakes
//!   the reconciler) and attaches XDP to each new pod's node-side veth;
//! - the API, metrics and DNS servers run as tasks.

mod api_handler;
mod deployments;
mod dns_snapshot;
mod frontends;
mod health_check;
mod lb_ipam;
mod lb_list;
mod memory;
mod monitor;
mod node;
mod pods;
mod reconciler;
mod service_list;
mod slice_index;
mod sync;
mod trace;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use vipr_dataplane::{Dataplane, DataplaneOptions, FlowExpirer, FlowTimeouts, XdpMode};
use vipr_dns::{DnsConfig, DnsServer, Upstreams};
use vipr_pod_runtime::{Runtime, RuntimeConfig};
use vipr_store::{ServiceNetwork, Store, StoreConfig};

use crate::{
    cli::{AgentArgs, Source},
    metrics::{self, Metrics},
};
use frontends::NodeAddresses;
use reconciler::{ComputedSlices, Reconciler};

/// Runs the agent until SIGINT/SIGTERM (or cleans up with `--cleanup`).
pub fn run(args: AgentArgs, api_socket: PathBuf) -> Result<ExitCode> {
    // The only source so far; the flag keeps DESIGN.md's contract.
    let Source::Local = args.source;
    check_address_ranges(&args)?;
    let node = node::NodeIdentity::resolve(&args)?;
    if args.cleanup {
        node::cleanup(&args, &node, &api_socket)?;
        return Ok(ExitCode::SUCCESS);
    }
    memory::limit_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, node, api_socket))?;
    Ok(ExitCode::SUCCESS)
}

/// Address ranges that must not overlap, named by their flags.
fn check_address_ranges(args: &AgentArgs) -> Result<()> {
    if let Some(pool) = args.lb_ip_pool {
        for (flag, net) in [
            ("--service-cidr", args.service_cidr),
            ("--pod-cidr", args.pod_cidr),
        ] {
            if pool.contains(&net.network()) || net.contains(&pool.network()) {
                anyhow::bail!("--lb-ip-pool {pool} overlaps {flag} {net}");
            }
        }
    }
    Ok(())
}

async fn serve(args: AgentArgs, node: node::NodeIdentity, api_socket: PathBuf) -> Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let metrics = Metrics::new()?;
    let store = Arc::new(open_store(&args)?);
    pods::ensure_dns_service(&store, args.cluster_dns)?;

    node::set_sysctls(&vipr_dataplane::NODE_SYSCTLS)?;
    let mut dataplane = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(node.pin_dir.clone()),
        service_cidr: Some(args.service_cidr),
        node_addr: node.node_ip,
        hairpin_addr: Some(node::HAIRPIN_ADDR),
        max_flows: args.max_flows,
        max_services: args.max_services,
        max_backends: args.max_backends,
        xdp_redirect: args.xdp_redirect,
        snat_ports: args.snat_ports.clone(),
        // The program stays attached while the agent restarts.
        pin_links: true,
        ..DataplaneOptions::default()
    })
    .context("loading the XDP data plane")?;
    dataplane.spawn_log_forwarder();
    // Node-local clients (and pods, whose cgroups live below) are
    // translated at connect()/sendmsg() time by the cgroup hooks.
    std::fs::create_dir_all(&args.cgroup_root)
        .with_context(|| format!("creating {}", args.cgroup_root.display()))?;
    dataplane
        .attach_cgroup(&args.cgroup_root)
        .with_context(|| format!("attaching socket hooks to {}", args.cgroup_root.display()))?;
    if let Some(uplink) = &args.uplink {
        dataplane
            .attach(uplink, XdpMode::Default)
            .with_context(|| format!("attaching XDP to the uplink {uplink}"))?;
        // Replies to outside clients leave from XDP too where that is safe:
        // a NIC transmits redirected frames itself; a veth uplink's peer
        // drops them unless it runs XDP (see --xdp-redirect-uplink).
        let redirect_uplink = args
            .xdp_redirect_uplink
            .unwrap_or_else(|| node::is_physical(uplink));
        if args.xdp_redirect && redirect_uplink {
            dataplane
                .allow_redirect(uplink)
                .with_context(|| format!("listing the uplink {uplink} for the XDP fast path"))?;
        }
    }
    let expirer = dataplane
        .flow_expirer()
        .context("opening conntrack for expiry")?;
    let dataplane = Arc::new(Mutex::new(dataplane));

    node::bind_cluster_dns(args.cluster_dns)?;
    let dns = Arc::new(
        DnsServer::start(dns_config(&args, &node), &Default::default())
            .await
            .context("starting the cluster DNS server")?,
    );

    let pod_runtime = Runtime::new(
        runtime_config(&args, &node)?,
        Arc::new(pods::StoreLookup(store.clone())),
    )
    .context("starting the pod runtime")?;

    let slices = ComputedSlices::default();
    let (health_checks, wanted_health_checks) = tokio::sync::watch::channel(Default::default());
    if let Some(node_ip) = node.node_ip {
        health_check::spawn(node_ip, wanted_health_checks);
    }
    let sync = sync::DataplaneSync::default();
    let intent = sync.intent();
    let mut reconciler = Reconciler {
        store: store.clone(),
        dataplane: dataplane.clone(),
        dns: Some(reconciler::DnsPublisher::start(
            store.clone(),
            slices.clone(),
            dns.clone(),
        )?),
        metrics: metrics.clone(),
        node: NodeAddresses {
            node_ip: node.node_ip,
            node_name: node.name.clone(),
            balancing: vipr_balancer::NodeDefaults {
                algorithm: args.lb_algorithm,
                maglev_seed: args.maglev_seed,
            },
        },
        cluster_dns: args.cluster_dns,
        slices: slices.clone(),
        sync,
        health_checks,
        slice_index: Default::default(),
        last_sync: std::time::SystemTime::now(),
    };
    let controller = pods::PodController::new(store.clone(), pod_runtime.clone());
    controller.adopt_existing();
    let reconcile_thread = std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || pods::run_loop(&mut reconciler, &controller))?;

    std::thread::Builder::new()
        .name("deployments".into())
        .spawn({
            let store = store.clone();
            move || deployments::run_loop(&store)
        })?;

    tokio::spawn(pods::follow_pod_status(
        store.clone(),
        pod_runtime.clone(),
        dataplane.clone(),
    ));
    tokio::spawn(export_datapath_counters(
        dataplane.clone(),
        intent.clone(),
        metrics.clone(),
    ));
    let monitor = monitor::MonitorHub::start(dataplane.clone(), intent.clone(), store.clone());
    tokio::spawn(recount_active_connections(dataplane.clone()));
    tokio::spawn(expire_idle_flows(expirer, metrics.clone()));
    if let Some(pool) = args.lb_ip_pool {
        tokio::spawn(lb_ipam::run(store.clone(), pool));
    }
    for addr in [args.metrics_addr, args.healthz_addr] {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = metrics::serve(addr, metrics).await {
                tracing::error!(error = %format!("{error:#}"), "metrics/healthz server stopped");
            }
        });
    }
    let handler = Arc::new(api_handler::AgentApi {
        store: store.clone(),
        runtime: pod_runtime.clone(),
        slices,
        dataplane: dataplane.clone(),
        intent,
        monitor,
    });
    let api = tokio::spawn({
        let api_socket = api_socket.clone();
        async move { crate::api::serve(&api_socket, handler).await }
    });
    tracing::info!(
        node = %node.name,
        node_ip = ?node.node_ip,
        socket = %api_socket.display(),
        dns = %dns.local_addr(),
        "vipr agent ready"
    );

    tokio::select! {
        result = api => result.context("API server task")?.context("API server")?,
        _ = shutdown_signal() => tracing::info!("shutting down; pods and pinned maps stay"),
    }
    if reconcile_thread.is_finished() {
        reconcile_thread
            .join()
            .map_err(|_| anyhow::anyhow!("reconciler panicked"))??;
    }
    // Pods keep running and maps stay pinned: a restarted agent adopts them.
    pod_runtime.detach();
    let _ = std::fs::remove_file(&api_socket);
    Ok(())
}

fn open_store(args: &AgentArgs) -> Result<Store> {
    let mut config = StoreConfig::new(args.state_dir.join("store"));
    config.service_network = ServiceNetwork {
        cidr: args.service_cidr.into(),
        ..ServiceNetwork::default()
    };
    Store::open(config).with_context(|| {
        format!(
            "opening the store under {}",
            args.state_dir.join("store").display()
        )
    })
}

/// Recursion (names outside the cluster) only for the pods, the node
/// itself and loopback: the server is no open resolver.
fn dns_config(args: &AgentArgs, node: &node::NodeIdentity) -> DnsConfig {
    let mut config = DnsConfig {
        zone: args.cluster_domain.clone(),
        // The cluster DNS address itself, made local by a route: replies then
        // leave from the address pods asked.
        listen: (args.cluster_dns, 53).into(),
        ..DnsConfig::default()
    };
    if !args.dns_upstream.is_empty() {
        config.upstreams = Upstreams::Static(args.dns_upstream.clone());
    }
    config.allowed_clients = vec![
        args.pod_cidr.into(),
        args.service_cidr.into(),
        "127.0.0.0/8".parse().expect("static CIDR"),
    ];
    if let Some(node_ip) = node.node_ip {
        config
            .allowed_clients
            .push(std::net::IpAddr::V4(node_ip).into());
    }
    config
}

fn runtime_config(args: &AgentArgs, node: &node::NodeIdentity) -> Result<RuntimeConfig> {
    let mut config = RuntimeConfig::new(args.state_dir.join("runtime"), args.pod_cidr);
    let exe = std::env::current_exe().context("locating the vipr binary")?;
    config.node_name = node.name.clone();
    config.node_ip = node.node_ip;
    config.cluster_dns = vec![args.cluster_dns.into()];
    config.cluster_domain = args.cluster_domain.clone();
    config.cgroup_root = Some(args.cgroup_root.clone());
    // Containers find vipr-netexec (and vipr) without a path.
    config.extra_path = exe.parent().map(PathBuf::from).into_iter().collect();
    config.shim_command = vec![exe.display().to_string(), crate::POD_SHIM_COMMAND.into()];
    Ok(config)
}

async fn export_datapath_counters(
    dataplane: Arc<Mutex<Dataplane>>,
    intent: sync::Intent,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let (counters, frontends) = {
            let dataplane = dataplane.lock().unwrap();
            (dataplane.counters(), dataplane.frontend_stats())
        };
        match counters {
            Ok(counters) => metrics.set_datapath(&counters),
            Err(error) => tracing::warn!(error = %error, "reading data plane counters"),
        }
        match frontends {
            Ok(frontends) => metrics.set_frontends(frontend_samples(&intent, &frontends)),
            Err(error) => tracing::warn!(error = %error, "reading per-service counters"),
        }
    }
}

/// Per-frontend counters labelled with the service that owns the frontend.
fn frontend_samples(
    intent: &sync::Intent,
    frontends: &[vipr_dataplane::FrontendStats],
) -> Vec<metrics::FrontendSample> {
    let intent = intent.read();
    frontends
        .iter()
        // Likewise a frontend's series appear with its first packet or drop.
        .filter(|stats| {
            stats.total.packets != 0 || stats.total.new_flows != 0 || !stats.drops.is_empty()
        })
        .filter_map(|stats| {
            let (namespace, service) = intent.owners.get(&stats.frontend)?.clone();
            Some(metrics::FrontendSample {
                namespace,
                service,
                frontend: stats.frontend.to_string(),
                packets: stats.total.packets,
                bytes: stats.total.bytes,
                new_flows: stats.total.new_flows,
                drops: stats.drops.iter().map(|(r, v)| (*r, v.packets)).collect(),
                // A series per backend only once it has seen traffic: at
                // 100,000 endpoints, idle ones would cost more memory than
                // the rest of the agent.
                backends: stats
                    .backends
                    .iter()
                    .filter(|b| b.stats.packets != 0 || b.stats.new_flows != 0)
                    .map(|b| {
                        let s = b.stats;
                        (b.backend.to_string(), s.packets, s.bytes, s.new_flows)
                    })
                    .collect(),
            })
        })
        .collect()
}

/// How often idle flows are looked for in conntrack.
const FLOW_EXPIRY_PERIOD: Duration = Duration::from_secs(10);

/// Removes idle flows from conntrack every period, on a blocking thread
/// with its own map handle (a pass over many flows takes syscalls per
/// flow and must not hold up service programming).
async fn expire_idle_flows(mut expirer: FlowExpirer, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(FLOW_EXPIRY_PERIOD);
    let timeouts = FlowTimeouts::default();
    loop {
        tick.tick().await;
        let pass = tokio::task::spawn_blocking(move || {
            let result = expirer.expire_idle(&timeouts);
            (expirer, result)
        })
        .await;
        let Ok((back, result)) = pass else {
            tracing::error!("conntrack expiry pass panicked; idle flows are no longer expired");
            return;
        };
        expirer = back;
        match result {
            Ok(expiry) => metrics.set_conntrack(&expiry),
            Err(error) => tracing::warn!(error = %error, "expiring idle flows"),
        }
    }
}

/// How often the active connection counts (`lc`, `sed`, `nq`) are set to
/// what conntrack holds, forgetting flows that left it without a close.
const ACTIVE_RECOUNT_PERIOD: Duration = Duration::from_secs(10);

async fn recount_active_connections(dataplane: Arc<Mutex<Dataplane>>) {
    let mut tick = tokio::time::interval(ACTIVE_RECOUNT_PERIOD);
    loop {
        tick.tick().await;
        let recounted = dataplane.lock().unwrap().recount_active_connections();
        if let Err(error) = recounted {
            tracing::warn!(error = %error, "recounting active connections");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
