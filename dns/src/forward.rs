//! Forwarding of out-of-zone names to upstream resolvers, and a small cache of their
//! answers that respects record TTLs (and SOA minimums for negative answers).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Why one upstream exchange failed (logged; the client gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolvers configured")]
    NoUpstreams,
    #[error("upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream} timed out")]
    Timeout { upstream: SocketAddr },
    #[error("upstream {upstream} sent an undecodable response: {reason}")]
    Decode {
        upstream: SocketAddr,
        reason: String,
    },
    #[error("building upstream query: {0}")]
    Encode(String),
}

/// The parts of an upstream response we relay and cache.
#[derive(Clone, Debug)]
pub(crate) struct UpstreamAnswer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

type CacheKey = (Name, RecordType, DNSClass);

struct CacheEntry {
    answer: UpstreamAnswer,
    stored: Instant,
    expires: Instant,
}

pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    max_ttl: Duration,
    capacity: usize,
    cache: Mutex<HashMap<CacheKey, CacheEntry>>,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_ttl: Duration,
        capacity: usize,
    ) -> Self {
        Forwarder {
            upstreams,
            timeout,
            max_ttl,
            capacity,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A cached answer for `query`, with TTLs reduced by the time spent in the cache.
    pub fn cached(&self, query: &Query) -> Option<UpstreamAnswer> {
        let key = cache_key(query);
        let now = Instant::now();
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(&key).filter(|e| e.expires > now)?;
        let age = now.duration_since(entry.stored).as_secs() as u32;
        let mut answer = entry.answer.clone();
        for rec in answer
            .answers
            .iter_mut()
            .chain(&mut answer.authorities)
            .chain(&mut answer.additionals)
        {
            rec.ttl = rec.ttl.saturating_sub(age);
        }
        Some(answer)
    }

    /// Asks each upstream in turn until one answers; caches a cacheable answer.
    pub async fn resolve(&self, query: &Query) -> Result<UpstreamAnswer, ForwardError> {
        let mut last = ForwardError::NoUpstreams;
        for &upstream in &self.upstreams {
            match self.exchange(upstream, query).await {
                Ok(answer) => {
                    self.store(query, &answer);
                    return Ok(answer);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upstream failed, trying next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        query: &Query,
    ) -> Result<UpstreamAnswer, ForwardError> {
        let (id, bytes) = upstream_request(query)?;
        let attempt = async {
            let msg = exchange_udp(upstream, query, id, &bytes).await?;
            // A truncated answer is incomplete: get the whole one over TCP.
            if msg.metadata.truncation {
                exchange_tcp(upstream, query, id, &bytes).await
            } else {
                Ok(msg)
            }
        };
        let msg = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| ForwardError::Timeout { upstream })??;
        Ok(UpstreamAnswer {
            rcode: msg.metadata.response_code,
            answers: msg.answers,
            authorities: msg.authorities,
            additionals: msg.additionals,
        })
    }

    fn store(&self, query: &Query, answer: &UpstreamAnswer) {
        let Some(ttl) = cacheable_ttl(answer) else {
            return;
        };
        let ttl = Duration::from_secs(u64::from(ttl)).min(self.max_ttl);
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.capacity {
            make_room(&mut cache, self.capacity, now);
        }
        if self.capacity > 0 {
            let entry = CacheEntry {
                answer: answer.clone(),
                stored: now,
                expires: now + ttl,
            };
            cache.insert(cache_key(query), entry);
        }
    }
}

/// Drops expired entries, then arbitrary ones, down to 90% of capacity, so that a full
/// cache is cleaned once per many inserts rather than on every insert.
fn make_room(cache: &mut HashMap<CacheKey, CacheEntry>, capacity: usize, now: Instant) {
    cache.retain(|_, e| e.expires > now);
    let target = capacity - capacity / 10;
    let excess: Vec<CacheKey> = cache
        .keys()
        .take(cache.len().saturating_sub(target))
        .cloned()
        .collect();
    for key in excess {
        cache.remove(&key);
    }
}

fn cache_key(query: &Query) -> CacheKey {
    (
        query.name.to_lowercase(),
        query.query_type,
        query.query_class,
    )
}

/// How long an answer may be cached: the smallest answer TTL for a positive answer,
/// min(SOA TTL, SOA minimum) for NXDOMAIN/NODATA (RFC 2308); never for errors.
fn cacheable_ttl(answer: &UpstreamAnswer) -> Option<u32> {
    let ttl = match answer.rcode {
        ResponseCode::NoError if !answer.answers.is_empty() => {
            answer.answers.iter().map(|r| r.ttl).min()
        }
        ResponseCode::NoError | ResponseCode::NXDomain => {
            answer.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
        }
        _ => None,
    }?;
    (ttl > 0).then_some(ttl)
}

fn upstream_request(query: &Query) -> Result<(u16, Vec<u8>), ForwardError> {
    // Message::query() draws a random id: with a fresh random source port per query,
    // that is the usual defence against off-path spoofing.
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    let bytes = msg
        .to_vec()
        .map_err(|e| ForwardError::Encode(e.to_string()))?;
    Ok((msg.metadata.id, bytes))
}

async fn exchange_udp(
    upstream: SocketAddr,
    query: &Query,
    id: u16,
    request: &[u8],
) -> Result<Message, ForwardError> {
    let io = |source| ForwardError::Io { upstream, source };
    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    sock.connect(upstream).await.map_err(io)?;
    sock.send(request).await.map_err(io)?;
    let mut buf = vec![0u8; 65535];
    // Bounded by the caller's timeout; stray datagrams with another id are ignored.
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        if let Some(msg) = matching_response(&buf[..n], query, id) {
            return Ok(msg);
        }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &Query,
    id: u16,
    request: &[u8],
) -> Result<Message, ForwardError> {
    let io = |source| ForwardError::Io { upstream, source };
    let mut stream = TcpStream::connect(upstream).await.map_err(io)?;
    let mut framed = Vec::with_capacity(request.len() + 2);
    framed.extend_from_slice(&(request.len() as u16).to_be_bytes());
    framed.extend_from_slice(request);
    stream.write_all(&framed).await.map_err(io)?;
    let len = stream.read_u16().await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.map_err(io)?;
    matching_response(&buf, query, id).ok_or_else(|| ForwardError::Decode {
        upstream,
        reason: "id mismatch or malformed".into(),
    })
}

/// The upstream's reply to *our* question: same id, a response, same question (case
/// aside), so that a stray or spoofed datagram is not relayed or cached.
fn matching_response(bytes: &[u8], query: &Query, id: u16) -> Option<Message> {
    let msg = Message::from_vec(bytes).ok()?;
    let same_question = msg.queries.len() == 1
        && msg.queries[0].query_type == query.query_type
        && msg.queries[0].query_class == query.query_class
        && msg.queries[0].name.eq_ignore_root(&query.name);
    (msg.metadata.id == id && msg.metadata.message_type == MessageType::Response && same_question)
        .then_some(msg)
}
