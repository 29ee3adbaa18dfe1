//! `rvol demo`: a local replicated volume with nothing to set up.
//!
//! Creates 3 replicas under a temporary directory, laid out as on a node:
//! the first in the engine's own process (`local:DIR`, the fastest place
//! for a node's own replica), the others as `rvol replica` processes on
//! loopback TCP, standing in for other nodes. Starts an `rvol engine`
//! process serving NBD (and `/dev/ublkbN` where the kernel has ublk), prints
//! how to reach it, and on Ctrl-C (or SIGTERM, SIGHUP) stops the engine,
//! then the replica processes, each with SIGTERM, so everything is flushed
//! and marked clean.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep replicas here instead of a temporary directory (kept on exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    size: u64,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    #[arg(long, default_value = "127.0.0.1:9800")]
    admin_listen: String,
    /// Do not create a ublk device even where the kernel offers ublk.
    #[arg(long)]
    no_ublk: bool,
}

/// A child process that is stopped with SIGTERM when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, args: &[String]) -> anyhow::Result<(Proc, serde_json::Value)> {
        let exe = std::env::current_exe().context("finding the rvol binary")?;
        // A process group of its own: Ctrl-C in a terminal signals the
        // whole foreground group, and replicas that stopped along with the
        // engine would leave its last flush nowhere to go. The demo stops
        // its children itself, engine first.
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut proc = Proc {
            name: name.into(),
            child,
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) if v["event"] == "ready" => Ok((proc, v)),
            _ => {
                let status = proc.child.wait()?;
                bail!("{name} did not start ({status}); see its messages above")
            }
        }
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        match self.child.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("rvol demo: {} exited with {s}", self.name),
            Err(e) => eprintln!("rvol demo: waiting for {}: {e}", self.name),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let (_tmp, base) = match &args.dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempdir()?;
            let p = t.0.clone();
            (Some(t), p)
        }
    };
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..args.replicas {
        let dir = base.join(format!("replica-{i}"));
        if i == 0 {
            addrs.push(format!("local:{}", dir.display()));
            continue;
        }
        let (p, ready) = Proc::spawn(
            &format!("replica {i}"),
            &[
                "replica".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--size".into(),
                args.size.to_string(),
            ],
        )?;
        addrs.push(ready["listen"].as_str().unwrap_or_default().to_string());
        replicas.push(p);
    }
    let mut engine_args = vec![
        "engine".to_string(),
        "--name".into(),
        "demo".into(),
        "--size".into(),
        args.size.to_string(),
        "--nbd-listen".into(),
        args.nbd_listen.clone(),
        "--admin-listen".into(),
        args.admin_listen.clone(),
    ];
    for a in &addrs {
        engine_args.push("--replica".into());
        engine_args.push(a.clone());
    }
    let ublk = !args.no_ublk && std::path::Path::new("/dev/ublk-control").exists();
    if ublk {
        engine_args.extend(["--frontend".into(), "ublk".into()]);
    }
    let (mut engine, ready) = Proc::spawn("engine", &engine_args)?;
    match ready["device"].as_str() {
        Some(dev) => println!("\nrvol demo: block device {dev} (ublk)"),
        None if ublk => println!("\nrvol demo: ublk requested but no device reported"),
        None => {
            println!("\nrvol demo: this kernel has no ublk (modprobe ublk_drv); serving NBD only")
        }
    }
    let nbd = format!("nbd://{}", args.nbd_listen);
    println!(
        "\nrvol demo: volume \"demo\" ({} bytes), {} replicas under {} \
         (replica-0 in the engine's process)\n\
         \n  nbdinfo {nbd}\n  qemu-io -f raw {nbd} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'\n  \
         fio --name=demo --ioengine=nbd --uri={nbd} --rw=randwrite --bs=4k --iodepth=32 --size=256M --runtime=10 --time_based\n  \
         rvol volume status --admin {}\n\nPress Ctrl-C to stop.",
        args.size,
        args.replicas,
        base.display(),
        args.admin_listen
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The children no longer share the terminal's group: a closed terminal
    // must stop them through the demo too.
    let mut sighup = signal(SignalKind::hangup())?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
        _ = sighup.recv() => {}
    }
    println!("rvol demo: stopping");
    engine.stop();
    for mut r in replicas {
        r.stop();
    }
    Ok(0)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> anyhow::Result<TempDir> {
    let p = std::env::temp_dir().join(format!("rvol-demo-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(TempDir(p))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
