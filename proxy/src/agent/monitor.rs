//! `vipr monitor`'s agent side: reads the data plane's event ring, turns
//! each event into a record naming the service and interface, and streams
//! it to every monitor whose filter matches. The data plane emits events
//! only while at least one monitor listens (the flags are the union of what
//! the listeners want), and the number of events lost to a full ring or a
//! slow client is streamed as a `lost` record, never dropped silently.
//! Reply events cover the flows opened while a monitor wants them (the data
//! plane marks those flows, so other replies cost nothing).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use vipr_dataplane::{
    Counter, Dataplane, Frontend, MonitorEvent, MonitorEvents, Port, Protocol, monitor_flags,
    vipr_common::FlowKey,
};
use vipr_store::{DEFAULT_NAMESPACE, Kind, ObjectKey, Store};

use super::sync::{Intent, ServiceName};
use crate::api::{MonitorFilter, Response};

/// Records queued per monitor before it counts as slow (and loses some).
const QUEUE: usize = 4096;

struct Listener {
    flags: u32,
    service: Option<ServiceName>,
    pod_ip: Option<Ipv4Addr>,
    answers: mpsc::Sender<Response>,
    /// Records this listener's queue had no room for, not yet reported.
    unsent: u64,
    /// The ring's lost count when last reported to this listener.
    ring_lost_seen: u64,
}

/// The monitors listening now, and the event ring they share.
#[derive(Clone)]
pub struct MonitorHub {
    listeners: Arc<Mutex<Vec<Listener>>>,
    dataplane: Arc<Mutex<Dataplane>>,
    intent: Intent,
    store: Arc<Store>,
}

impl MonitorHub {
    /// Starts reading the ring (when the data plane still has it to give).
    pub fn start(dataplane: Arc<Mutex<Dataplane>>, intent: Intent, store: Arc<Store>) -> Self {
        let hub = MonitorHub {
            listeners: Arc::default(),
            dataplane: dataplane.clone(),
            intent,
            store,
        };
        // No monitor survives an agent restart: start with events off.
        let events = {
            let mut dataplane = dataplane.lock().unwrap();
            if let Err(error) = dataplane.set_monitor_flags(0) {
                tracing::warn!(error = %error, "resetting the monitor flags");
            }
            dataplane.take_monitor_events()
        };
        match events {
            Some(events) => {
                tokio::spawn(hub.clone().read_ring(events));
                tokio::spawn(hub.clone().housekeeping());
            }
            None => tracing::warn!("the data plane has no event ring: vipr monitor shows nothing"),
        }
        hub
    }

    /// A new monitor: its stream of records.
    pub fn subscribe(&self, filter: &MonitorFilter) -> Result<mpsc::Receiver<Response>, String> {
        let namespace = filter.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
        let service = filter.service.as_deref().map(|s| match s.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (namespace.to_owned(), s.to_owned()),
        });
        if let Some((ns, name)) = &service {
            let key = ObjectKey::namespaced(Kind::Service, ns, name.clone());
            if self.store.get(&key).is_none() {
                return Err(format!("service {ns}/{name} not found"));
            }
        }
        let pod_ip = match &filter.pod {
            Some(pod) => Some(self.pod_ip(namespace, pod)?),
            None => None,
        };
        let mut flags = 0;
        for kind in &filter.types {
            flags |= match kind.as_str() {
                "translate" => monitor_flags::TRANSLATE,
                "drop" => monitor_flags::DROP,
                "reply" => monitor_flags::REPLY,
                other => {
                    return Err(format!(
                        "unknown monitor event type {other:?}: expected translate, drop or reply"
                    ));
                }
            };
        }
        if flags == 0 {
            flags = monitor_flags::TRANSLATE | monitor_flags::DROP;
        }
        let (answers, stream) = mpsc::channel(QUEUE);
        let ring_lost_seen = self.dataplane.lock().unwrap().monitor_lost().unwrap_or(0);
        let mut listeners = self.listeners.lock().unwrap();
        listeners.push(Listener {
            flags,
            service,
            pod_ip,
            answers,
            unsent: 0,
            ring_lost_seen,
        });
        self.update_flags(&listeners);
        Ok(stream)
    }

    fn pod_ip(&self, namespace: &str, pod: &str) -> Result<Ipv4Addr, String> {
        let key = ObjectKey::namespaced(Kind::Pod, namespace, pod.to_owned());
        let object = self
            .store
            .get(&key)
            .ok_or_else(|| format!("pod {namespace}/{pod} not found"))?;
        object
            .as_pod()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| format!("pod {namespace}/{pod} has no IP yet"))
    }

    /// Sets the data plane's flags to what the listeners want together.
    fn update_flags(&self, listeners: &[Listener]) {
        let flags = listeners.iter().fold(0, |acc, l| acc | l.flags);
        if let Err(error) = self.dataplane.lock().unwrap().set_monitor_flags(flags) {
            tracing::warn!(error = %error, "setting the monitor flags");
        }
    }

    async fn read_ring(self, events: MonitorEvents) {
        // SAFETY: the AsyncFd owns the ring, and so its fd, for as long as
        // the registration lives.
        let registered = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) };
        let mut ring = match registered {
            Ok(fd) => fd,
            Err(error) => {
                tracing::warn!(error = %error, "polling the monitor ring");
                return;
            }
        };
        let mut batch = Vec::new();
        while let Ok(mut guard) = ring.readable_mut().await {
            guard.get_inner_mut().drain(|event| batch.push(event));
            guard.clear_ready();
            if !batch.is_empty() {
                self.deliver(&batch);
                batch.clear();
            }
        }
    }

    fn deliver(&self, events: &[MonitorEvent]) {
        // Names first, then the listeners: never both locks at once (the
        // reconciler takes the intent while it holds the data plane, and
        // housekeeping the data plane while it holds the listeners).
        let records: Vec<(Record, Option<ServiceName>)> = {
            let intent = self.intent.read();
            events
                .iter()
                .filter_map(Record::of)
                .map(|record| {
                    let service = record.frontend.and_then(|f| intent.owners.get(&f).cloned());
                    (record, service)
                })
                .collect()
        };
        let mut listeners = self.listeners.lock().unwrap();
        for (record, service) in &records {
            let mut json = None;
            for listener in listeners.iter_mut() {
                if !record.wanted_by(listener, service.as_ref()) {
                    continue;
                }
                let value = json
                    .get_or_insert_with(|| record.to_json(service.as_ref()))
                    .clone();
                if listener.answers.try_send(Response::Data { value }).is_err() {
                    listener.unsent += 1;
                }
            }
        }
    }

    /// Once a second: forget monitors that left (turning events off when
    /// none is left) and tell the others what they lost.
    async fn housekeeping(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let ring_lost = self.dataplane.lock().unwrap().monitor_lost().unwrap_or(0);
            let mut listeners = self.listeners.lock().unwrap();
            let before = listeners.len();
            listeners.retain(|l| !l.answers.is_closed());
            if listeners.len() != before {
                self.update_flags(&listeners);
            }
            for listener in listeners.iter_mut() {
                let ring = ring_lost.saturating_sub(listener.ring_lost_seen);
                if ring == 0 && listener.unsent == 0 {
                    continue;
                }
                let value = json!({
                    "type": "lost",
                    "ring_full": ring,
                    "client_too_slow": listener.unsent,
                });
                if listener.answers.try_send(Response::Data { value }).is_ok() {
                    listener.ring_lost_seen = ring_lost;
                    listener.unsent = 0;
                }
            }
        }
    }
}

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

fn protocol_name(proto: u8) -> String {
    match Protocol::from_ip_proto(proto) {
        Some(p) => p.to_string(),
        None if proto == 1 => "ICMP".into(),
        None => format!("proto {proto}"),
    }
}

/// One event, decoded.
struct Record {
    kind: u32,
    counter: Counter,
    event: MonitorEvent,
    /// The frontend the packet was for (translations and drops) or came
    /// back from (replies).
    frontend: Option<Frontend>,
}

impl Record {
    fn of(event: &MonitorEvent) -> Option<Record> {
        let counter = Counter::from_index(event.counter)?;
        let kind = match counter {
            Counter::NewFlow | Counter::SockConnectTranslated | Counter::SockSendmsgTranslated => {
                monitor_flags::TRANSLATE
            }
            Counter::ReplyTranslated => monitor_flags::REPLY,
            _ => monitor_flags::DROP,
        };
        // A reply leaves with the frontend as its source.
        let side: &FlowKey = if kind == monitor_flags::REPLY {
            &event.after.reversed()
        } else {
            &event.before
        };
        let frontend = Protocol::from_ip_proto(side.proto).and_then(|protocol| {
            Some(Frontend {
                addr: Ipv4Addr::from(u32::from_be(side.dst_addr)),
                port: Port::new(u16::from_be(side.dst_port))?,
                protocol,
            })
        });
        Some(Record {
            kind,
            counter,
            event: *event,
            frontend,
        })
    }

    fn addresses(&self) -> BTreeSet<Ipv4Addr> {
        let e = &self.event;
        [
            e.before.src_addr,
            e.before.dst_addr,
            e.after.src_addr,
            e.after.dst_addr,
        ]
        .into_iter()
        .map(|a| Ipv4Addr::from(u32::from_be(a)))
        .collect()
    }

    fn wanted_by(&self, listener: &Listener, service: Option<&ServiceName>) -> bool {
        listener.flags & self.kind != 0
            && listener
                .service
                .as_ref()
                .is_none_or(|wanted| Some(wanted) == service)
            && listener
                .pod_ip
                .is_none_or(|ip| self.addresses().contains(&ip))
    }

    fn to_json(&self, service: Option<&ServiceName>) -> Value {
        let e = &self.event;
        let kind = match self.kind {
            monitor_flags::TRANSLATE => "translate",
            monitor_flags::REPLY => "reply",
            _ => "drop",
        };
        // Socket-level events (cgroup hooks) come before any packet: no
        // interface, and the client's address may not be bound yet.
        let socket = e.ifindex == 0;
        let mut value = json!({
            "type": kind,
            "timestamp_ns": e.timestamp_ns,
            "path": if socket { "socket" } else { "xdp" },
            "interface": if socket { "-".to_owned() } else { interface_name(e.ifindex) },
            "protocol": protocol_name(e.before.proto),
            "service": service.map(|(ns, name)| format!("{ns}/{name}")),
        });
        let before_src = if socket && e.before.src_addr == 0 {
            "unbound socket".to_owned()
        } else {
            sock(e.before.src_addr, e.before.src_port).to_string()
        };
        let before_dst = sock(e.before.dst_addr, e.before.dst_port).to_string();
        match kind {
            "translate" => {
                value["client"] = before_src.into();
                value["frontend"] = before_dst.into();
                value["backend"] = sock(e.after.dst_addr, e.after.dst_port).to_string().into();
                if !socket {
                    value["source_seen"] =
                        sock(e.after.src_addr, e.after.src_port).to_string().into();
                }
            }
            "reply" => {
                value["backend"] = before_src.into();
                value["frontend"] = sock(e.after.src_addr, e.after.src_port).to_string().into();
                value["client"] = sock(e.after.dst_addr, e.after.dst_port).to_string().into();
            }
            _ => {
                value["reason"] = self.counter.name().into();
                value["source"] = before_src.into();
                value["destination"] = before_dst.into();
            }
        }
        value
    }
}

fn interface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes as the call requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}
