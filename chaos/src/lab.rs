//! The soak's machines: each node is a network namespace with one veth
//! into a bridge in a hub namespace; the soak itself (its clients) is on
//! the bridge too, from the root namespace. Replica nodes keep their data
//! on a file system of their own (ext4 on a loop device) that can be
//! filled. Faults act on the hub's end of a node's link (down, throttled)
//! or inside the node (iptables drops, one way or both). Everything is
//! removed on drop, mounts and namespaces included.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: String,
    hub_end: String,
    /// Where its replica directories live (replica nodes).
    pub disk: Option<PathBuf>,
}

pub struct Lab {
    hub: String,
    root_end: String,
    pub nodes: Vec<Node>,
    images: Vec<PathBuf>,
    disk_bytes: u64,
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    sh("ip", args).map(drop)
}

impl Lab {
    /// Nodes `names` on 10.214.N.0/24 (N from the pid); those in
    /// `with_disks` get a file system of `disk_mib` MiB under `work`.
    pub fn new(work: &Path, names: &[&str], with_disks: &[&str], disk_mib: u64) -> Result<Lab> {
        let tag = std::process::id() % 100_000;
        let net = 1 + std::process::id() % 250;
        let hub = format!("rvch{tag}");
        let mut lab = Lab {
            hub: hub.clone(),
            root_end: format!("rvc{tag}r"),
            nodes: Vec::new(),
            images: Vec::new(),
            disk_bytes: disk_mib << 20,
        };
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        let peer = format!("rvc{tag}h");
        ip(&[
            "link",
            "add",
            &lab.root_end,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &hub])?;
        ip(&["-n", &hub, "link", "set", &peer, "master", "br0"])?;
        ip(&["-n", &hub, "link", "set", &peer, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.214.{net}.2/24"),
            "dev",
            &lab.root_end,
        ])?;
        ip(&["link", "set", &lab.root_end, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("rvc{tag}{name}");
            let hub_end = format!("c{tag}h{i}");
            let host_end = format!("c{tag}n{i}");
            let addr = format!("10.214.{net}.{}", i + 10);
            ip(&["netns", "add", &ns])?;
            lab.nodes.push(Node {
                name: name.to_string(),
                ns: ns.clone(),
                ip: addr.clone(),
                hub_end: hub_end.clone(),
                disk: None,
            });
            ip(&[
                "link", "add", &hub_end, "type", "veth", "peer", "name", &host_end,
            ])?;
            ip(&["link", "set", &hub_end, "netns", &hub])?;
            ip(&["link", "set", &host_end, "netns", &ns])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &host_end,
            ])?;
            ip(&["-n", &ns, "link", "set", &host_end, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            if with_disks.contains(name) {
                let image = work.join(format!("{name}.img"));
                let mnt = work.join(format!("{name}-disk"));
                std::fs::File::create(&image)?.set_len(disk_mib << 20)?;
                lab.images.push(image.clone());
                std::fs::create_dir_all(&mnt)?;
                sh("mkfs.ext4", &["-q", "-m", "0", "-F", path(&image)?])?;
                sh("mount", &["-o", "loop", path(&image)?, path(&mnt)?])?;
                lab.nodes[i].disk = Some(mnt);
            }
        }
        Ok(lab)
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node the soak made")
    }

    /// Cuts (`false`) or restores (`true`) a node's link.
    pub fn link(&self, node: &str, up: bool) -> Result<()> {
        let dev = &self.node(node).hub_end;
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            dev,
            if up { "up" } else { "down" },
        ])
    }

    /// Limits what reaches `node` to `kbit` kbit/s (`tc tbf`: a congested
    /// link, with queueing delay; this kernel has no netem); 0 lifts it.
    pub fn throttle(&self, node: &str, kbit: u32) -> Result<()> {
        let dev = &self.node(node).hub_end;
        if kbit == 0 {
            return sh("tc", &["-n", &self.hub, "qdisc", "del", "dev", dev, "root"]).map(drop);
        }
        let rate = format!("{kbit}kbit");
        let args = [
            "-n", &self.hub, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
        ];
        let queue = ["burst", "8kb", "latency", "2s"];
        let all: Vec<&str> = args
            .into_iter()
            .chain([rate.as_str()])
            .chain(queue)
            .collect();
        sh("tc", &all).map(drop)
    }

    /// Drops `percent` % of the packets entering (`inbound`) or leaving a
    /// node; 0 lifts every drop.
    pub fn loss(&self, node: &str, inbound: bool, percent: u32) -> Result<()> {
        let ns = &self.node(node).ns;
        if percent == 0 {
            return sh("ip", &["netns", "exec", ns, "iptables", "-F"]).map(drop);
        }
        let chain = if inbound { "INPUT" } else { "OUTPUT" };
        let p = format!("{:.2}", f64::from(percent) / 100.0);
        let rule = [
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
            "-j",
            "DROP",
        ];
        let args: Vec<&str> = ["netns", "exec", ns, "iptables", "-A", chain]
            .into_iter()
            .chain(rule)
            .collect();
        sh("ip", &args).map(drop)
    }

    /// Fills a replica node's file system (`true`) or frees what it
    /// filled (`false`).
    pub fn fill(&self, node: &str, full: bool) -> Result<()> {
        let disk = self
            .node(node)
            .disk
            .as_ref()
            .context("a node without a disk")?;
        let filler = disk.join("filler");
        // Only ever the node's own small file system: were it unmounted,
        // the directory would be on the machine's disk, which must not be
        // filled.
        if full && total_bytes(disk)? > self.disk_bytes + self.disk_bytes / 4 {
            bail!(
                "{} is not the node's own file system; not filling it",
                disk.display()
            );
        }
        if !full {
            return match std::fs::remove_file(&filler) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        }
        let f = std::fs::File::create(&filler)?;
        use std::os::fd::AsRawFd;
        let mut len = free_bytes(disk)?;
        // Allocation needs metadata too: step down until it fits.
        while len > 0 {
            // SAFETY: a valid descriptor; fallocate has no other precondition.
            if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) } == 0 {
                break;
            }
            len = len.saturating_sub(1 << 20);
        }
        Ok(())
    }
}

fn statvfs(dir: &Path) -> Result<libc::statvfs> {
    let c = std::ffi::CString::new(path(dir)?)?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(s)
}

pub fn free_bytes(dir: &Path) -> Result<u64> {
    let s = statvfs(dir)?;
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

fn total_bytes(dir: &Path) -> Result<u64> {
    let s = statvfs(dir)?;
    Ok(s.f_blocks as u64 * s.f_frsize as u64)
}

pub fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a path that is not UTF-8")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &self.nodes {
            if let Some(d) = &n.disk {
                let _ = Command::new("umount").arg("-l").arg(d).status();
            }
            let _ = Command::new("ip").args(["netns", "del", &n.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_end])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .status();
        for i in &self.images {
            let _ = std::fs::remove_file(i);
        }
    }
}
