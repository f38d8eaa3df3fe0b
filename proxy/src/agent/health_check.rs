//! `healthCheckNodePort` for services with externalTrafficPolicy Local, as
//! kube-proxy serves it: an external load balancer asks each node
//! `GET /` on that port and sends traffic only to nodes answering 200 (with
//! local endpoints), never to those answering 503 (none).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
    task::JoinHandle,
};

use super::sync::ServiceName;

/// What each health check port reports: the service and its local endpoint count.
pub type HealthChecks = BTreeMap<u16, (ServiceName, usize)>;

/// Keeps one listener per wanted health check port on the node address.
pub fn spawn(node_ip: Ipv4Addr, mut wanted: watch::Receiver<HealthChecks>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut listeners: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
        loop {
            let current = wanted.borrow_and_update().clone();
            listeners.retain(|port, task| {
                let keep = current.contains_key(port);
                if !keep {
                    task.abort();
                }
                keep
            });
            for port in current.keys() {
                if !listeners.contains_key(port) {
                    let addr = SocketAddr::from((node_ip, *port));
                    listeners.insert(*port, tokio::spawn(serve(addr, *port, wanted.clone())));
                }
            }
            if wanted.changed().await.is_err() {
                return;
            }
        }
    })
}

async fn serve(addr: SocketAddr, port: u16, state: watch::Receiver<HealthChecks>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%addr, error = %error, "cannot serve healthCheckNodePort");
            return;
        }
    };
    let state = Arc::new(state);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let (status, body) = answer(&state.borrow(), port);
            let reason = if status == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// kube-proxy's answer: 200 with the count of local endpoints, 503 with none.
fn answer(checks: &HealthChecks, port: u16) -> (u16, String) {
    let Some(((namespace, name), local)) = checks.get(&port) else {
        return (503, "{}".into());
    };
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
    .to_string();
    (if *local > 0 { 200 } else { 503 }, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_200_with_local_endpoints_and_503_without() {
        let mut checks = HealthChecks::new();
        checks.insert(31000, (("default".into(), "web".into()), 2));
        checks.insert(31001, (("default".into(), "idle".into()), 0));
        let (status, body) = answer(&checks, 31000);
        assert_eq!(status, 200);
        assert!(body.contains("\"localEndpoints\":2"), "{body}");
        assert_eq!(answer(&checks, 31001).0, 503);
        assert_eq!(answer(&checks, 31002).0, 503);
    }
}
