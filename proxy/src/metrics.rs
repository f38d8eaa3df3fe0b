//! Prometheus metrics (kube-proxy's names where they exist, vipr's own for
//! the data plane) and the `/healthz` and `/metrics` HTTP endpoints.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A sync that has waited longer than this makes /healthz fail, as in
/// kube-proxy (which uses 2x its sync period).
const HEALTHY_SYNC_LAG: Duration = Duration::from_secs(60);

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub programming_duration: Histogram,
    pub service_changes: IntCounter,
    pub endpoint_changes: IntCounter,
    datapath_packets: IntCounterVec,
    datapath_bytes: IntCounterVec,
    services: Arc<ServiceCollector>,
    conntrack_flows: IntGauge,
    conntrack_capacity: IntGauge,
    conntrack_expired: IntCounter,
    health: Mutex<Health>,
}

/// One frontend's counters with the service it belongs to.
#[derive(Clone, Debug, Default)]
pub struct FrontendSample {
    pub namespace: String,
    pub service: String,
    /// `VIP:port/PROTO`.
    pub frontend: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets dropped or refused, by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// Per backend (`IP:port`): packets, bytes, new flows.
    pub backends: Vec<(String, u64, u64, u64)>,
}

/// Per-service and per-backend counters, exported from the latest snapshot
/// as it is: series of removed services vanish instead of lingering.
struct ServiceCollector {
    descs: Vec<prometheus::core::Desc>,
    snapshot: Mutex<Vec<FrontendSample>>,
}

const FRONTEND_LABELS: [&str; 3] = ["namespace", "service", "frontend"];

fn frontend_vecs() -> prometheus::Result<[IntCounterVec; 7]> {
    let frontend =
        |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &FRONTEND_LABELS);
    let with = |name: &str, help: &str, extra: &str| {
        let mut labels = FRONTEND_LABELS.to_vec();
        labels.push(extra);
        IntCounterVec::new(Opts::new(name, help), &labels)
    };
    Ok([
        frontend(
            "vipr_service_packets_total",
            "Packets of translated flows per service frontend, both directions",
        )?,
        frontend(
            "vipr_service_bytes_total",
            "Bytes of translated flows per service frontend, both directions",
        )?,
        frontend(
            "vipr_service_new_flows_total",
            "Flows opened per service frontend",
        )?,
        with(
            "vipr_service_drops_total",
            "Packets to a service frontend dropped or refused, by reason",
            "reason",
        )?,
        with(
            "vipr_backend_packets_total",
            "Packets per service frontend and backend",
            "backend",
        )?,
        with(
            "vipr_backend_bytes_total",
            "Bytes per service frontend and backend",
            "backend",
        )?,
        with(
            "vipr_backend_new_flows_total",
            "Flows opened per service frontend and backend",
            "backend",
        )?,
    ])
}

impl ServiceCollector {
    fn new() -> prometheus::Result<Self> {
        use prometheus::core::Collector;
        let descs = frontend_vecs()?
            .iter()
            .flat_map(|v| v.desc().into_iter().cloned())
            .collect();
        Ok(ServiceCollector {
            descs,
            snapshot: Mutex::new(Vec::new()),
        })
    }
}

impl prometheus::core::Collector for ServiceCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Ok(vecs) = frontend_vecs() else {
            return Vec::new();
        };
        let [
            packets,
            bytes,
            new_flows,
            drops,
            b_packets,
            b_bytes,
            b_new_flows,
        ] = &vecs;
        for sample in self.snapshot.lock().unwrap().iter() {
            let labels = [
                sample.namespace.as_str(),
                sample.service.as_str(),
                sample.frontend.as_str(),
            ];
            packets.with_label_values(&labels).inc_by(sample.packets);
            bytes.with_label_values(&labels).inc_by(sample.bytes);
            new_flows
                .with_label_values(&labels)
                .inc_by(sample.new_flows);
            for (reason, count) in &sample.drops {
                let [ns, svc, fe] = labels;
                drops
                    .with_label_values(&[ns, svc, fe, reason])
                    .inc_by(*count);
            }
            for (backend, p, b, n) in &sample.backends {
                let [ns, svc, fe] = labels;
                let labels = [ns, svc, fe, backend.as_str()];
                b_packets.with_label_values(&labels).inc_by(*p);
                b_bytes.with_label_values(&labels).inc_by(*b);
                b_new_flows.with_label_values(&labels).inc_by(*n);
            }
        }
        vecs.iter().flat_map(|v| v.collect()).collect()
    }
}

#[derive(Default)]
struct Health {
    last_sync: Option<SystemTime>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<SystemTime>,
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>> {
        let registry = Registry::new();
        let buckets = prometheus::exponential_buckets(0.0001, 2.0, 18)?;
        let sync_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "Time to apply one change to the data plane's maps",
            )
            .buckets(buckets.clone()),
        )?;
        let programming_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kubeproxy_network_programming_duration_seconds",
                "Time from an object change to the data plane serving it",
            )
            .buckets(buckets),
        )?;
        let service_changes = IntCounter::new(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Service changes seen",
        )?;
        let endpoint_changes = IntCounter::new(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Endpoint changes seen",
        )?;
        let datapath_packets = IntCounterVec::new(
            Opts::new(
                "vipr_datapath_packets_total",
                "Packets by data plane outcome",
            ),
            &["outcome"],
        )?;
        let datapath_bytes = IntCounterVec::new(
            Opts::new("vipr_datapath_bytes_total", "Bytes by data plane outcome"),
            &["outcome"],
        )?;
        let services = Arc::new(ServiceCollector::new()?);
        registry.register(Box::new(SharedCollector(services.clone())))?;
        let conntrack_flows = IntGauge::new(
            "vipr_conntrack_flows",
            "Flows in conntrack at the last expiry pass",
        )?;
        let conntrack_capacity = IntGauge::new(
            "vipr_conntrack_capacity_flows",
            "Flows conntrack holds at most (--max-flows); when full, new flows are dropped as drop_flow_map_full",
        )?;
        let conntrack_expired = IntCounter::new(
            "vipr_conntrack_expired_flows_total",
            "Idle flows removed from conntrack",
        )?;
        for collector in [
            Box::new(sync_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(programming_duration.clone()),
            Box::new(service_changes.clone()),
            Box::new(endpoint_changes.clone()),
            Box::new(datapath_packets.clone()),
            Box::new(datapath_bytes.clone()),
            Box::new(conntrack_flows.clone()),
            Box::new(conntrack_capacity.clone()),
            Box::new(conntrack_expired.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Arc::new(Metrics {
            registry,
            sync_duration,
            programming_duration,
            service_changes,
            endpoint_changes,
            datapath_packets,
            datapath_bytes,
            services,
            conntrack_flows,
            conntrack_capacity,
            conntrack_expired,
            health: Mutex::new(Health::default()),
        }))
    }

    /// Records that a change arrived and is not programmed yet.
    pub fn change_pending(&self) {
        let mut health = self.health.lock().unwrap();
        health.pending_since.get_or_insert_with(SystemTime::now);
    }

    /// Records a completed sync: everything pending is programmed.
    pub fn synced(&self) {
        let mut health = self.health.lock().unwrap();
        health.last_sync = Some(SystemTime::now());
        health.pending_since = None;
    }

    /// Sets the data plane counters (monotonic totals read from BPF maps).
    pub fn set_datapath(&self, counters: &vipr_dataplane::Counters) {
        for (counter, value) in counters.iter() {
            set_counter(&self.datapath_packets, counter.name(), value.packets);
            set_counter(&self.datapath_bytes, counter.name(), value.bytes);
        }
    }

    /// Replaces the per-service counters with a fresh reading.
    pub fn set_frontends(&self, samples: Vec<FrontendSample>) {
        *self.services.snapshot.lock().unwrap() = samples;
    }

    /// Records one conntrack expiry pass.
    pub fn set_conntrack(&self, expiry: &vipr_dataplane::Expiry) {
        self.conntrack_flows.set(expiry.flows as i64);
        self.conntrack_capacity.set(i64::from(expiry.capacity));
        self.conntrack_expired.inc_by(expiry.expired as u64);
    }

    fn healthz(&self) -> (u16, String) {
        let health = self.health.lock().unwrap();
        let now = SystemTime::now();
        let stale = health
            .pending_since
            .is_some_and(|since| now.duration_since(since).unwrap_or_default() > HEALTHY_SYNC_LAG);
        let body = format!(
            "{{\"lastUpdated\": \"{}\", \"currentTime\": \"{}\"}}",
            health.last_sync.map(unix_seconds).unwrap_or_default(),
            unix_seconds(now)
        );
        (if stale { 503 } else { 200 }, body)
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Registers a collector the metrics also keep a handle on.
struct SharedCollector(Arc<ServiceCollector>);

impl prometheus::core::Collector for SharedCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

fn set_counter(vec: &IntCounterVec, label: &str, total: u64) {
    let counter = vec.with_label_values(&[label]);
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Serves `/metrics` and `/healthz` on `addr` (both paths on both listeners,
/// as kube-proxy's ports do not mind either).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &metrics).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let (status, content_type, body) = match request.parse(&buf[..n]) {
        Ok(_) => match (request.method, request.path) {
            (Some("GET"), Some("/healthz")) => {
                let (status, body) = metrics.healthz();
                (status, "application/json", body)
            }
            (Some("GET"), Some("/metrics")) => (200, "text/plain; version=0.0.4", metrics.render()),
            _ => (404, "text/plain", "not found\n".to_owned()),
        },
        Err(_) => (400, "text/plain", "bad request\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(())
}
