//! Answers the CLI's requests from the store and the runtime.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use vipr_dataplane::Dataplane;
use vipr_pod_runtime::{PodKey, Runtime};
use vipr_store::{DEFAULT_NAMESPACE, Kind, ObjectKey, Store, parse_manifests};

use super::{
    lb_list, monitor::MonitorHub, reconciler::ComputedSlices, service_list, sync::Intent, trace,
};
use crate::api::{Handler, Request, Response};

/// How long `vipr exec` may run before it is killed.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct AgentApi {
    pub store: Arc<Store>,
    pub runtime: Runtime,
    pub slices: ComputedSlices,
    pub dataplane: Arc<Mutex<Dataplane>>,
    /// What the reconciler has programmed.
    pub intent: Intent,
    pub monitor: MonitorHub,
}

impl Handler for AgentApi {
    fn stream(&self, request: &Request) -> Option<Result<mpsc::Receiver<Response>, String>> {
        match request {
            Request::Monitor(filter) => Some(self.monitor.subscribe(filter)),
            _ => None,
        }
    }

    async fn handle(&self, request: Request) -> Response {
        let api = self.clone();
        // Store writes fsync and exec blocks: keep them off the async workers.
        match tokio::task::spawn_blocking(move || api.answer(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(message)) => Response::Error { message },
            Err(error) => Response::Error {
                message: format!("internal error: {error}"),
            },
        }
    }
}

type Answer = Result<Response, String>;

/// A manifest this large leaves megabytes of parse garbage behind (YAML
/// events and JSON values), which glibc would otherwise keep resident.
const TRIM_AFTER_MANIFEST_BYTES: usize = 1 << 20;

impl AgentApi {
    fn answer(&self, request: Request) -> Answer {
        match request {
            Request::Apply { manifests } => self.apply(manifests),
            Request::DeleteManifests { manifests } => self.delete_manifests(&manifests),
            Request::Delete {
                kind,
                namespace,
                name,
            } => {
                let key = object_key(&kind, namespace.as_deref(), &name)?;
                self.delete(&[key])
            }
            Request::Get {
                kind,
                namespace,
                all_namespaces,
                name,
            } => self.get(&kind, namespace.as_deref(), all_namespaces, name.as_deref()),
            Request::Logs {
                namespace,
                pod,
                container,
            } => self.logs(&pod_key(namespace.as_deref(), &pod), container.as_deref()),
            Request::Exec {
                namespace,
                pod,
                container,
                command,
            } => self.exec(
                &pod_key(namespace.as_deref(), &pod),
                container.as_deref(),
                &command,
            ),
            Request::Describe {
                kind,
                namespace,
                name,
            } => self.describe(&kind, namespace.as_deref(), &name),
            Request::EditDeployment {
                namespace,
                name,
                edit,
            } => super::deployments::edit(
                &self.store,
                namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
                &name,
                edit,
            )
            .map(|lines| Response::Done { lines }),
            Request::ServiceList => self.service_list(),
            Request::LbList { raw } => self.lb_list(raw),
            Request::Trace { src, dst, protocol } => self.trace(&src, &dst, protocol.as_deref()),
            Request::Monitor(_) => Err("monitor is a streaming request".into()),
        }
    }

    // The data plane is locked before the intent is read: the reconciler
    // takes them in that order.
    fn service_list(&self) -> Answer {
        let dataplane = self.dataplane.lock().unwrap();
        let stats = dataplane.frontend_stats().map_err(|e| e.to_string())?;
        drop(dataplane);
        let value =
            service_list::service_list(&self.store, &self.slices, &self.intent.read(), &stats);
        Ok(Response::Data { value })
    }

    fn lb_list(&self, raw: bool) -> Answer {
        let dataplane = self.dataplane.lock().unwrap();
        let dump = dataplane.dump_maps().map_err(|e| e.to_string())?;
        drop(dataplane);
        let value = lb_list::lb_list(&dump, &self.intent.read(), raw);
        Ok(Response::Data { value })
    }

    fn trace(&self, src: &str, dst: &str, protocol: Option<&str>) -> Answer {
        let packet = trace::TracedPacket::parse(src, dst, protocol)?;
        let pods = self.runtime.list();
        let mut dataplane = self.dataplane.lock().unwrap();
        let intent = self.intent.read();
        let context = trace::TraceContext {
            intent: &intent,
            pods: &pods,
        };
        let value = trace::trace(&mut dataplane, &context, &packet)?;
        Ok(Response::Data { value })
    }

    fn apply(&self, manifests: String) -> Answer {
        let size = manifests.len();
        let objects = parse_manifests(&manifests).map_err(|e| e.to_string());
        // The text is not needed once parsed: free it before the objects
        // are stored, not after.
        drop(manifests);
        let applied =
            objects.and_then(|objects| self.store.apply(objects).map_err(|e| e.to_string()));
        if size >= TRIM_AFTER_MANIFEST_BYTES {
            super::memory::release_freed();
        }
        let applied = applied?;
        let lines = applied
            .iter()
            .map(|a| format!("{}/{} {}", a.key.kind().singular(), a.key.name(), a.outcome))
            .collect();
        Ok(Response::Done { lines })
    }

    fn delete_manifests(&self, manifests: &str) -> Answer {
        let keys: Vec<ObjectKey> = parse_manifests(manifests)
            .map_err(|e| e.to_string())?
            .iter()
            .map(ObjectKey::of)
            .collect();
        self.delete(&keys)
    }

    /// Pods terminate gracefully (they leave the endpoints first, then the
    /// runtime stops them and removes the object); everything else goes at
    /// once, with its dependents.
    fn delete(&self, keys: &[ObjectKey]) -> Answer {
        let mut lines = Vec::new();
        let mut others = Vec::new();
        for key in keys {
            if key.kind() != Kind::Pod {
                others.push(key.clone());
                continue;
            }
            super::pods::terminate(&self.store, key).map_err(|e| e.to_string())?;
            lines.push(format!("pod/{} deleted", key.name()));
        }
        if !others.is_empty() {
            let deleted = self
                .store
                .delete_many(&others, false)
                .map_err(|e| e.to_string())?;
            for key in deleted.iter().filter(|k| others.contains(k)) {
                lines.push(format!("{}/{} deleted", key.kind().singular(), key.name()));
            }
        }
        Ok(Response::Done { lines })
    }

    fn get(&self, kind: &str, namespace: Option<&str>, all: bool, name: Option<&str>) -> Answer {
        let kind = parse_kind(kind)?;
        let namespace = match (all, kind.is_namespaced()) {
            (true, _) | (_, false) => None,
            (false, true) => Some(namespace.unwrap_or(DEFAULT_NAMESPACE)),
        };
        if let Some(name) = name {
            let key = object_key_of(kind, namespace, name);
            let object = self
                .store
                .get(&key)
                .ok_or_else(|| format!("{key} not found"))?;
            return Ok(Response::Data {
                value: object.to_json_value(),
            });
        }
        let mut items: Vec<Value> = self
            .store
            .list(kind, namespace)
            .iter()
            .map(|o| o.to_json_value())
            .collect();
        if kind == Kind::EndpointSlice {
            let computed = self.slices.read().unwrap();
            for ((ns, _), slices) in computed.iter() {
                if namespace.is_none_or(|wanted| wanted == ns) {
                    items.extend(slices.iter().filter_map(|s| serde_json::to_value(s).ok()));
                }
            }
        }
        Ok(Response::Data {
            value: json!({"apiVersion": "v1", "kind": "List", "items": items}),
        })
    }

    fn describe(&self, kind: &str, namespace: Option<&str>, name: &str) -> Answer {
        let kind = parse_kind(kind)?;
        let key = object_key_of(kind, namespace.or(Some(DEFAULT_NAMESPACE)), name);
        let object = self
            .store
            .get(&key)
            .ok_or_else(|| format!("{key} not found"))?;
        let events = if kind == Kind::Pod {
            let pod = pod_key(key.namespace(), name);
            self.runtime
                .events(&pod)
                .into_iter()
                .map(|e| {
                    json!({"type": e.type_, "reason": e.reason, "message": e.message,
                       "count": e.count, "firstSeen": e.first_seen, "lastSeen": e.last_seen})
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::Data {
            value: json!({"object": object.to_json_value(), "events": events}),
        })
    }

    fn logs(&self, pod: &PodKey, container: Option<&str>) -> Answer {
        let info = self
            .runtime
            .pod(pod)
            .ok_or_else(|| format!("pod {} not found", pod))?;
        let container = match container {
            Some(c) => c.to_owned(),
            None => only_container(&info.pod, pod)?,
        };
        let path = self
            .runtime
            .log_path(pod, &container)
            .ok_or_else(|| format!("container {container} not found in pod {pod}"))?;
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        Ok(Response::Done {
            lines: text.lines().map(str::to_owned).collect(),
        })
    }

    fn exec(&self, pod: &PodKey, container: Option<&str>, command: &[String]) -> Answer {
        if command.is_empty() {
            return Err("exec needs a command after --".into());
        }
        let output = self
            .runtime
            .exec(pod, container, command, EXEC_TIMEOUT)
            .map_err(|e| format!("exec in pod {pod}: {e}"))?;
        Ok(Response::Exec {
            code: output.code,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

fn parse_kind(kind: &str) -> Result<Kind, String> {
    Kind::from_cli_name(kind)
        .ok_or_else(|| format!("the server doesn't have a resource type \"{kind}\""))
}

fn object_key(kind: &str, namespace: Option<&str>, name: &str) -> Result<ObjectKey, String> {
    Ok(object_key_of(
        parse_kind(kind)?,
        namespace.or(Some(DEFAULT_NAMESPACE)),
        name,
    ))
}

fn object_key_of(kind: Kind, namespace: Option<&str>, name: &str) -> ObjectKey {
    let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
    ObjectKey::new(kind, kind.is_namespaced().then_some(namespace), name)
}

fn pod_key(namespace: Option<&str>, name: &str) -> PodKey {
    PodKey::new(namespace.unwrap_or(DEFAULT_NAMESPACE), name)
}

fn only_container(pod: &k8s_openapi::api::core::v1::Pod, key: &PodKey) -> Result<String, String> {
    let containers: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| c.name.as_str())
        .collect();
    match containers.as_slice() {
        [one] => Ok((*one).to_owned()),
        _ => Err(format!(
            "a container name must be specified for pod {key}, choose one of: [{}]",
            containers.join(" ")
        )),
    }
}
