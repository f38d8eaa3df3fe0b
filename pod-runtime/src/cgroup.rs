//! Pod cgroups under the runtime's `cgroup_root`: `<root>/pod-<uid>/<container>`.
//!
//! Processes always join the v2 folder when `cgroup_root` is on cgroup2 (the agent
//! attaches its cgroup BPF hooks there). Limits go to v2 when the root has the memory
//! controller; on a hybrid host whose v2 tree has no controllers (like this one:
//! `/sys/fs/cgroup/unified` with controllers bound to v1) they go to the v1
//! `memory`, `cpu` and `pids` hierarchies at the same relative path.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const V1_CTRLS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    /// true: root is cgroup2 with the memory controller available.
    v2_limits: bool,
    /// true: root is on a cgroup2 mount (processes join it even without controllers).
    v2: bool,
    /// (controller, folder that mirrors `root`) for v1 limits.
    v1: Vec<(String, PathBuf)>,
}

fn fs_type(p: &Path) -> Option<(String, PathBuf)> {
    // Longest cgroup mount point that contains p.
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup2" || f[2] == "cgroup"))
                .then(|| (f[2].to_string(), PathBuf::from(f[1])))
        })
        .filter(|(_, mp)| p.starts_with(mp))
        .max_by_key(|(_, mp)| mp.as_os_str().len())
}

impl Cgroups {
    /// Inspect `root` (created if missing). A root on neither cgroup fs still works:
    /// no process placement, no limits.
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).ctx(|| format!("mkdir {}", root.display()))?;
        let mut cg = Cgroups {
            root: root.to_path_buf(),
            v2_limits: false,
            v2: false,
            v1: vec![],
        };
        let Some((fstype, mountpoint)) = fs_type(root) else {
            return Ok(cg);
        };
        let rel = root
            .strip_prefix(&mountpoint)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        if fstype == "cgroup2" {
            cg.v2 = true;
            let ctrls =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            cg.v2_limits = ctrls.split_whitespace().any(|c| c == "memory");
            if cg.v2_limits {
                // Children only get controllers the parent delegates.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids");
                return Ok(cg);
            }
        }
        let base = mountpoint.parent().unwrap_or(Path::new("/sys/fs/cgroup"));
        for c in V1_CTRLS {
            let m = base.join(c);
            if m.join("cgroup.procs").exists() {
                cg.v1.push((c.to_string(), m.join(&rel)));
            }
        }
        Ok(cg)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folders of every hierarchy that mirror `root` (for test cleanup).
    pub fn all_roots(&self) -> Vec<PathBuf> {
        let mut v = vec![self.root.clone()];
        v.extend(self.v1.iter().map(|(_, p)| p.clone()));
        v
    }

    fn rel(pod_uid: &str, ctr: &str) -> PathBuf {
        PathBuf::from(format!("pod-{pod_uid}")).join(ctr)
    }

    /// Create a container's folders and write its limits; returns the folders the
    /// container process must join.
    pub fn create(&self, pod_uid: &str, ctr: &str, limits: &Limits) -> Result<Vec<PathBuf>> {
        let rel = Self::rel(pod_uid, ctr);
        let mut join = vec![];
        if self.v2 {
            let d = self.root.join(&rel);
            if self.v2_limits {
                let pod = self.root.join(format!("pod-{pod_uid}"));
                std::fs::create_dir_all(&pod).ctx(|| format!("mkdir {}", pod.display()))?;
                let _ = std::fs::write(pod.join("cgroup.subtree_control"), "+memory +cpu +pids");
            }
            std::fs::create_dir_all(&d).ctx(|| format!("mkdir {}", d.display()))?;
            if self.v2_limits {
                if let Some(m) = limits.memory_bytes {
                    write(&d, "memory.max", &m.to_string())?;
                    let _ = std::fs::write(d.join("memory.swap.max"), "0");
                }
                if let Some(c) = limits.cpu_millis {
                    write(&d, "cpu.max", &format!("{} 100000", (c * 100).max(1000)))?;
                }
            }
            join.push(d);
        }
        for (ctrl, base) in &self.v1 {
            let d = base.join(&rel);
            std::fs::create_dir_all(&d).ctx(|| format!("mkdir {}", d.display()))?;
            match ctrl.as_str() {
                "memory" => {
                    if let Some(m) = limits.memory_bytes {
                        write(&d, "memory.limit_in_bytes", &m.to_string())?;
                        let _ =
                            std::fs::write(d.join("memory.memsw.limit_in_bytes"), m.to_string());
                    }
                }
                "cpu" => {
                    if let Some(c) = limits.cpu_millis {
                        write(&d, "cpu.cfs_period_us", "100000")?;
                        write(&d, "cpu.cfs_quota_us", &(c * 100).max(1000).to_string())?;
                    }
                }
                _ => {}
            }
            join.push(d);
        }
        Ok(join)
    }

    /// Existing folders of a container in every hierarchy (for exec to join).
    pub fn dirs(&self, pod_uid: &str, ctr: &str) -> Vec<PathBuf> {
        let rel = Self::rel(pod_uid, ctr);
        let mut v = vec![];
        if self.v2 {
            v.push(self.root.join(&rel));
        }
        v.extend(self.v1.iter().map(|(_, b)| b.join(&rel)));
        v.retain(|d| d.is_dir());
        v
    }

    /// Number of OOM kills recorded for the container's cgroup (v2 memory.events or
    /// v1 memory.oom_control); compared before/after an exit to say "OOMKilled".
    pub fn oom_kills(&self, pod_uid: &str, ctr: &str) -> u64 {
        let rel = Self::rel(pod_uid, ctr);
        let mut files = vec![];
        if self.v2_limits {
            files.push(self.root.join(&rel).join("memory.events"));
        }
        for (c, base) in &self.v1 {
            if c == "memory" {
                files.push(base.join(&rel).join("memory.oom_control"));
            }
        }
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.strip_prefix("oom_kill "))
                    .filter_map(|v| v.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Remove the pod's folders in every hierarchy (they must be empty of processes).
    pub fn remove_pod(&self, pod_uid: &str) {
        for base in self.all_roots() {
            remove_tree(&base.join(format!("pod-{pod_uid}")));
        }
    }
}

fn write(dir: &Path, file: &str, v: &str) -> Result<()> {
    let p = dir.join(file);
    std::fs::write(&p, v).ctx(|| format!("write {v} to {}", p.display()))
}

/// rmdir a cgroup folder and its sub-folders, deepest first (cgroup files cannot be
/// unlinked; rmdir of an empty cgroup folder removes them).
pub fn remove_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}
