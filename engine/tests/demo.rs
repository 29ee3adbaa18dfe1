//! `rvol demo` stops cleanly on Ctrl-C, which a terminal sends to its whole
//! foreground process group, the demo's children included.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn start_demo(dir: &std::path::Path, nbd: &str, admin: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let size = "64M";
    let child = Command::new(RVOL)
        .args([
            "demo",
            "--size",
            size,
            "--nbd-listen",
            nbd,
            "--admin-listen",
            admin,
        ])
        .args(["--no-ublk", "--dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        // Its own group, like a shell job in a terminal.
        .process_group(0)
        .spawn()
        .unwrap();
    let uri = format!("nbd://{nbd}");
    wait_until("the demo to serve", Duration::from_secs(60), || {
        run("nbdinfo", &["--size", &uri]).status.success()
    });
    child
}

/// Sends SIGINT to the demo's process group, as Ctrl-C does; returns how
/// long the demo took to exit, and its status.
fn ctrl_c(child: &mut Child) -> (Duration, std::process::ExitStatus) {
    let t = Instant::now();
    // SAFETY: kill(2) on the process group of a child we started.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGINT) };
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (t.elapsed(), s);
        }
        if t.elapsed() > Duration::from_secs(30) {
            // SAFETY: as above; leave no processes behind.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            panic!("the demo did not stop within 30 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_stops_the_engine_before_the_replicas_and_leaves_them_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, log) = (tmp.path().join("replicas"), tmp.path().join("demo.log"));
    let nbd = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let uri = format!("nbd://{nbd}");
    let mut demo = start_demo(&dir, &nbd, &admin, &log);
    // Laid out as on a node: its own replica in the engine's process.
    let addresses: Vec<String> = status(&admin)["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_string())
        .collect();
    assert!(addresses[0].starts_with("local:"), "{addresses:?}");
    assert!(!addresses[1..].iter().any(|a| a.starts_with("local:")));
    qemu_io(&uri, &["write -P 0xab 0 1M"]);
    let (took, exit) = ctrl_c(&mut demo);
    let messages = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "{exit}: {messages}");
    // Replicas stopped along with the engine leave its last flush nowhere
    // to go: it then holds I/O for a minute and exits with an error.
    assert!(took < Duration::from_secs(15), "took {took:?}: {messages}");
    assert!(!messages.contains("exited with"), "{messages}");
    assert!(
        messages.contains("replicas flushed and marked clean"),
        "{messages}"
    );

    // Clean replicas all come back fresh, with the data.
    let mut demo = start_demo(&dir, &nbd, &admin, &log);
    assert_eq!(modes(&admin), ["RW", "RW", "RW"]);
    qemu_io(&uri, &["read -P 0xab 0 1M"]);
    assert!(ctrl_c(&mut demo).1.success());
}
