//! IP address management for the node's pod CIDR. Owns `<state_dir>/ipam.json`:
//! which address belongs to which pod (by uid). Every change is written atomically
//! (temp file + rename) before it is used, so an agent crash never hands out an
//! address twice and a restarted agent sees exactly the allocations of running pods.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct IpamFile {
    cidr: String,
    /// address -> owner (pod uid)
    allocated: BTreeMap<Ipv4Addr, String>,
}

/// Allocator over one IPv4 CIDR. Not internally locked: the runtime holds it in a mutex.
#[derive(Debug)]
pub struct Ipam {
    net: Ipv4Net,
    path: Option<PathBuf>,
    state: IpamFile,
}

impl Ipam {
    /// An allocator that is not persisted (unit tests).
    pub fn in_memory(net: Ipv4Net) -> Self {
        Ipam {
            net,
            path: None,
            state: IpamFile {
                cidr: net.to_string(),
                allocated: BTreeMap::new(),
            },
        }
    }

    /// Load `path` (or start empty). Allocations outside `net` (the CIDR changed) are
    /// kept so they are never reissued, but they do not block the new range.
    pub fn open(net: Ipv4Net, path: &Path) -> Result<Self> {
        let state = match std::fs::read(path) {
            Ok(bytes) => {
                let mut s: IpamFile = serde_json::from_slice(&bytes).map_err(|e| Error::State {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                s.cidr = net.to_string();
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IpamFile {
                cidr: net.to_string(),
                allocated: BTreeMap::new(),
            },
            Err(e) => return Err(e).ctx(|| format!("read {}", path.display())),
        };
        Ok(Ipam {
            net,
            path: Some(path.to_path_buf()),
            state,
        })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.net
    }

    fn persist(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&self.state).expect("ipam state serializes");
        crate::util::write_atomic(path, &bytes)
    }

    /// Address already held by `owner`, if any (idempotent re-allocation after a crash).
    pub fn lookup(&self, owner: &str) -> Option<Ipv4Addr> {
        self.state
            .allocated
            .iter()
            .find(|(_, o)| o.as_str() == owner)
            .map(|(a, _)| *a)
    }

    /// Allocate the lowest free host address for `owner` (the same one if it has one).
    /// The network and broadcast addresses are never handed out.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr> {
        if let Some(a) = self.lookup(owner) {
            return Ok(a);
        }
        let found = self
            .net
            .hosts()
            .find(|a| !self.state.allocated.contains_key(a));
        let Some(addr) = found else {
            return Err(Error::Ipam(format!("pod CIDR {} is exhausted", self.net)));
        };
        self.state.allocated.insert(addr, owner.to_string());
        if let Err(e) = self.persist() {
            self.state.allocated.remove(&addr);
            return Err(e);
        }
        Ok(addr)
    }

    /// Release everything held by `owner`. Releasing nothing is not an error.
    pub fn release(&mut self, owner: &str) -> Result<()> {
        let before = self.state.allocated.len();
        self.state.allocated.retain(|_, o| o != owner);
        if self.state.allocated.len() != before {
            self.persist()?;
        }
        Ok(())
    }

    pub fn allocated(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.state.allocated.iter().map(|(a, o)| (*a, o.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_never_twice_and_releases() {
        let mut ipam = Ipam::in_memory("10.1.0.0/30".parse().unwrap());
        let a = ipam.allocate("p1").unwrap();
        let b = ipam.allocate("p2").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(b, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(ipam.allocate("p1").unwrap(), a, "idempotent per owner");
        assert!(
            matches!(ipam.allocate("p3"), Err(Error::Ipam(_))),
            "/30 has 2 hosts"
        );
        ipam.release("p1").unwrap();
        assert_eq!(ipam.allocate("p3").unwrap(), a);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = std::env::temp_dir().join(format!("vipr-ipam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ipam.json");
        let net: Ipv4Net = "10.9.0.0/24".parse().unwrap();
        {
            let mut i = Ipam::open(net, &path).unwrap();
            i.allocate("a").unwrap();
            i.allocate("b").unwrap();
        }
        let mut i = Ipam::open(net, &path).unwrap();
        assert_eq!(i.lookup("b"), Some(Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(i.allocate("c").unwrap(), Ipv4Addr::new(10, 9, 0, 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
