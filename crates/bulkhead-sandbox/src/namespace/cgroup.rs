//! Per-operation cgroups on cgroup v1 (one folder per controller) or v2
//! (one folder): memory with no swap, pids, CPU quota; afterwards, whether
//! the OOM killer or the pids limit struck.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::Limits;

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug)]
pub(crate) enum Cgroup {
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
    V2 {
        path: PathBuf,
    },
}

/// What the limits did to the operation.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Strikes {
    pub oom_kills: u64,
    pub pids_refusals: u64,
}

pub(crate) fn version() -> Option<u8> {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        Some(2)
    } else if Path::new(ROOT)
        .join("memory/memory.limit_in_bytes")
        .exists()
        && Path::new(ROOT).join("pids").is_dir()
    {
        Some(1)
    } else {
        None
    }
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                (name == key).then(|| value.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

/// Removes the cgroups in `group` whose server is gone: named
/// `<server pid>-<n>` (see the run ids of `run_helper`), with no process of
/// that pid left. A program still in one outlived its server (a SIGKILL);
/// it is killed first, as the server would have at its timeout. Returns how
/// many were removed. Cgroups of live servers are never touched.
pub(crate) fn remove_orphans(group: &str) -> usize {
    let group = group.trim_matches('/');
    let parents: Vec<PathBuf> = match version() {
        Some(1) => ["memory", "pids", "cpu"]
            .iter()
            .map(|controller| Path::new(ROOT).join(controller).join(group))
            .collect(),
        Some(2) => vec![Path::new(ROOT).join(group)],
        _ => return 0,
    };
    let mut removed = 0;
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(server) = name
                .split_once('-')
                .and_then(|(pid, n)| n.parse::<u64>().ok().and(pid.parse::<u32>().ok()))
            else {
                continue;
            };
            if Path::new("/proc").join(server.to_string()).exists() {
                continue;
            }
            let path = entry.path();
            if let Some(orphan) = Cgroup::existing(group, &name) {
                orphan.remove();
            }
            if !path.exists() {
                removed += 1;
            }
        }
    }
    removed
}

impl Cgroup {
    /// Creates the operation's cgroup, `name` in `group`, with its limits
    /// set. Root makes `group` if needed; anyone else can only use a group
    /// made and delegated to them, so it is not made for them (the error
    /// names the group rather than a parent they were never meant to
    /// write).
    pub(crate) fn create(group: &str, name: &str, limits: &Limits) -> io::Result<Cgroup> {
        let group = group.trim_matches('/');
        let root = nix::unistd::geteuid().is_root();
        let make_group = |path: &Path| {
            let made = if root {
                fs::create_dir_all(path)
            } else if path.is_dir() {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::NotFound))
            };
            made.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: {}", path.display(), io::Error::from(e.kind())),
                )
            })
        };
        let make = |path: &Path| {
            fs::create_dir(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            })
        };
        let memory = limits.memory_bytes.to_string();
        let quota = ((limits.cpus * 100_000.0).round() as u64).max(1_000);
        match version() {
            Some(1) => {
                let dir =
                    |controller: &str| Path::new(ROOT).join(controller).join(group).join(name);
                let cgroup = Cgroup::V1 {
                    memory: dir("memory"),
                    pids: dir("pids"),
                    cpu: dir("cpu"),
                };
                let Cgroup::V1 {
                    memory: m,
                    pids: p,
                    cpu: c,
                } = &cgroup
                else {
                    unreachable!()
                };
                for path in [m, p, c] {
                    make_group(path.parent().expect("a parent"))?;
                    make(path)?;
                }
                // Swappiness first: it cannot change once tasks are in.
                let _ = write(&m.join("memory.swappiness"), "0");
                write(&m.join("memory.limit_in_bytes"), &memory)?;
                let memsw = m.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &memory)?;
                }
                write(&p.join("pids.max"), &limits.pids.to_string())?;
                write(&c.join("cpu.cfs_period_us"), "100000")?;
                write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                Ok(cgroup)
            }
            Some(2) => {
                let parent = Path::new(ROOT).join(group);
                make_group(&parent)?;
                // Controllers must be enabled for the children of `parent`
                // (a delegated group's owner may do it for its own).
                if root {
                    let _ = write(
                        &Path::new(ROOT).join("cgroup.subtree_control"),
                        "+memory +pids +cpu",
                    );
                }
                write(&parent.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                let path = parent.join(name);
                make(&path)?;
                write(&path.join("memory.max"), &memory)?;
                let _ = write(&path.join("memory.swap.max"), "0");
                write(&path.join("pids.max"), &limits.pids.to_string())?;
                write(&path.join("cpu.max"), &format!("{quota} 100000"))?;
                Ok(Cgroup::V2 { path })
            }
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no usable cgroup hierarchy under /sys/fs/cgroup (need memory, pids and cpu controllers)",
            )),
        }
    }

    /// The cgroup `name` in `group` as [`Cgroup::create`] made it, for
    /// removing it when its helper could not.
    pub(crate) fn existing(group: &str, name: &str) -> Option<Cgroup> {
        let group = group.trim_matches('/');
        match version() {
            Some(1) => {
                let dir =
                    |controller: &str| Path::new(ROOT).join(controller).join(group).join(name);
                Some(Cgroup::V1 {
                    memory: dir("memory"),
                    pids: dir("pids"),
                    cpu: dir("cpu"),
                })
            }
            Some(2) => Some(Cgroup::V2 {
                path: Path::new(ROOT).join(group).join(name),
            }),
            _ => None,
        }
    }

    fn dirs(&self) -> Vec<&Path> {
        match self {
            Cgroup::V1 { memory, pids, cpu } => vec![memory, pids, cpu],
            Cgroup::V2 { path } => vec![path],
        }
    }

    pub(crate) fn add(&self, pid: i32) -> io::Result<()> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes still in the cgroup.
    pub(crate) fn pids(&self) -> Vec<i32> {
        let dir = match self {
            Cgroup::V1 { pids, .. } => pids,
            Cgroup::V2 { path } => path,
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs everything in the cgroup.
    pub(crate) fn kill_all(&self) {
        if let Cgroup::V2 { path } = self {
            let _ = write(&path.join("cgroup.kill"), "1");
        }
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    pub(crate) fn strikes(&self) -> Strikes {
        match self {
            Cgroup::V1 { memory, pids, .. } => Strikes {
                oom_kills: counter(&memory.join("memory.oom_control"), "oom_kill"),
                pids_refusals: counter(&pids.join("pids.events"), "max"),
            },
            Cgroup::V2 { path } => Strikes {
                oom_kills: counter(&path.join("memory.events"), "oom_kill"),
                pids_refusals: counter(&path.join("pids.events"), "max"),
            },
        }
    }

    pub(crate) fn remove(&self) {
        self.kill_all();
        for dir in self.dirs() {
            for _ in 0..50 {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        }
    }
}
