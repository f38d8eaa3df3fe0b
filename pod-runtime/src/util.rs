//! Small helpers shared by the modules: atomic file writes, time stamps, names.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{IoContext, Result};

/// Write `bytes` to `path` via a temp file in the same folder and rename, so readers
/// (and a crash) see either the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        f.write_all(bytes)
            .ctx(|| format!("write {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("sync {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A stable 48-bit hash (SipHash with fixed keys) for deriving short names.
pub fn short_hash(s: &str) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    s.hash(&mut h);
    h.finish() & 0xffff_ffff_ffff
}

/// RFC 3339 time for k8s-openapi's `Time`.
/// Now, to the nanosecond (condition transitions: the agent measures its
/// network programming latency from a pod's Ready transition).
pub fn k8s_time_now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let ts = k8s_openapi::jiff::Timestamp::from_nanosecond(nanos)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts)
}

pub fn k8s_time(unix: i64) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let ts = k8s_openapi::jiff::Timestamp::from_second(unix)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts)
}
