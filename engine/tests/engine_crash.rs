//! The engine dies; nothing acknowledged by a flush is lost, replicas end
//! identical, and only the regions that may differ are copied.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;

const SIZE: u64 = 1 << 30;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = SIZE / BLOCK;

/// The replicas' head files hold the same bytes at every block ever written.
fn assert_replicas_identical(rs: &[ReplicaProc], blocks: &BTreeSet<u64>, round: u32) {
    use std::os::unix::fs::FileExt;
    let files: Vec<std::fs::File> = rs
        .iter()
        .map(|r| std::fs::File::open(r.dir.join("volume-head-000.img")).unwrap())
        .collect();
    for &b in blocks {
        let mut first = vec![0u8; BLOCK as usize];
        files[0].read_exact_at(&mut first, b * BLOCK).unwrap();
        for (f, r) in files.iter().zip(rs).skip(1) {
            let mut other = vec![0u8; BLOCK as usize];
            f.read_exact_at(&mut other, b * BLOCK).unwrap();
            assert!(
                first == other,
                "round {round}: replica {} differs at block {b}",
                r.addr
            );
        }
    }
}

/// What a client knows of its writes across engine kills: block -> the id
/// of the write a flush covered, and the ids written to it since.
#[derive(Default)]
struct Written {
    durable: HashMap<u64, u64>,
    since_flush: HashMap<u64, Vec<u64>>,
    touched: BTreeSet<u64>,
    next_id: u64,
}

impl Written {
    /// Writes batches of 16 random blocks to `uri`, flushing every fourth
    /// batch, while a thread SIGKILLs `engine` after a random delay.
    fn until_killed(&mut self, engine: &mut Proc, uri: &str, rand: &mut impl FnMut() -> u64) {
        self.since_flush.clear();
        let mut acked = self.durable.clone();
        let pid = engine.child.id() as libc::pid_t;
        let delay = Duration::from_millis(40 + rand() % 300);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on the engine we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let mut c = RawNbd::open(uri);
        'writing: for batch in 1.. {
            let blocks: BTreeSet<u64> = (0..16).map(|_| rand() % BLOCKS).collect();
            let mut cookies = HashMap::new();
            for b in blocks {
                self.next_id += 1;
                let id = self.next_id;
                self.since_flush.entry(b).or_default().push(id);
                self.touched.insert(b);
                cookies.insert(id, b);
                if c.try_request(1, id, b * BLOCK, BLOCK as u32, &block_for(id, b))
                    .is_err()
                {
                    break 'writing;
                }
            }
            for _ in 0..cookies.len() {
                match c.try_reply(0) {
                    Ok((0, cookie, _)) => {
                        acked.insert(cookies[&cookie], cookie);
                    }
                    _ => break 'writing,
                }
            }
            if batch % 4 == 0 {
                let covered = acked.clone();
                if c.try_request(3, 0, 0, 0, &[]).is_err() {
                    break;
                }
                match c.try_reply(0) {
                    Ok((0, _, _)) => {
                        self.durable = covered;
                        self.since_flush.clear();
                    }
                    _ => break,
                }
            }
        }
        killer.join().unwrap();
        engine.kill9();
    }

    /// Every block ever written, and a sample of the rest, reads as the
    /// flushed write or one issued after that flush; what it reads is then
    /// what a later round must find.
    fn check(&mut self, uri: &str, rand: &mut impl FnMut() -> u64, round: u32) {
        let mut c = RawNbd::open(uri);
        let sample: BTreeSet<u64> = (0..256).map(|_| rand() % BLOCKS).collect();
        for &b in self.touched.union(&sample) {
            c.request(0, b, b * BLOCK, BLOCK as u32, &[]);
            let (err, _, data) = c.reply(BLOCK as usize);
            assert_eq!(err, 0);
            let got = id_of(&data, b);
            let flushed = self.durable.get(&b).copied();
            let later = self.since_flush.get(&b);
            let ok = got == flushed || later.is_some_and(|l| got.is_some_and(|g| l.contains(&g)));
            assert!(ok, "round {round}: block {b} holds {got:?}, flushed {flushed:?}, issued after {later:?}");
            match got {
                Some(g) => self.durable.insert(b, g),
                None => self.durable.remove(&b),
            };
        }
    }
}

#[test]
fn engine_sigkill_loses_no_flushed_write_and_reconciles_only_dirty_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "1G");
    let (mut engine, mut uri, _) = start_engine("crash", "1G", &addrs(&rs), &[]);
    let mut written = Written::default();
    let mut rand = xorshift(0xc0ffee_u64);
    let mut copied = Vec::new();
    for round in 1..=20 {
        written.until_killed(&mut engine, &uri, &mut rand);
        let admin;
        (engine, uri, admin) = start_engine("crash", "1G", &addrs(&rs), &[]);
        let s = status(&admin);
        assert_eq!(modes(&admin), ["RW", "RW", "RW"], "round {round}: {s}");
        let bytes = s["reconciled_bytes"].as_u64().unwrap();
        copied.push(bytes);
        assert!(
            bytes < SIZE / 20,
            "round {round}: reconciliation copied {bytes} of {SIZE} bytes"
        );
        assert_replicas_identical(&rs, &written.touched, round);
        written.check(&uri, &mut rand, round);
    }
    let total: u64 = copied.iter().sum();
    println!(
        "reconciliation over 20 engine kills: {total} bytes copied in all (max {} per round, volume {SIZE})",
        copied.iter().max().unwrap()
    );
    assert_eq!(engine.stop(), 0);
}

/// The same with one replica in the engine's process (`local:DIR`): the
/// kill takes that replica down too, and its files must hold everything a
/// flush acknowledged. Restarted uncleanly, it has lost its dirty map, so
/// it is rebuilt from the others; once the others are gone it serves
/// everything alone.
#[test]
fn engine_sigkill_with_a_replica_in_its_process_loses_no_flushed_write() {
    let tmp = tempfile::tempdir().unwrap();
    let rs: Vec<ReplicaProc> = (1..3)
        .map(|i| ReplicaProc::start(&tmp.path().join(format!("r{i}")), "1G", "127.0.0.1:0"))
        .collect();
    let local = format!("local:{}", tmp.path().join("r0").display());
    let replicas = [vec![local], addrs(&rs)].concat();
    let (mut engine, mut uri, mut admin) = start_engine("inproc", "1G", &replicas, &[]);
    let mut written = Written::default();
    let mut rand = xorshift(0x10ca1_u64);
    for round in 1..=6 {
        written.until_killed(&mut engine, &uri, &mut rand);
        (engine, uri, admin) = start_engine("inproc", "1G", &replicas, &[]);
        wait_until(
            "the local replica is rebuilt",
            Duration::from_secs(120),
            || modes(&admin) == ["RW", "RW", "RW"],
        );
        written.check(&uri, &mut rand, round);
    }
    for mut r in rs {
        r.proc.kill9();
    }
    wait_until(
        "the lost replicas are dropped",
        Duration::from_secs(30),
        || modes(&admin)[1..].iter().all(|m| m == "ERR"),
    );
    assert_eq!(modes(&admin)[0], "RW");
    written.check(&uri, &mut rand, 7);
    assert_eq!(engine.stop(), 0);
}

/// A volume whose only replica is in the engine's process.
#[test]
fn engine_sigkill_with_its_only_replica_in_its_process_loses_no_flushed_write() {
    let tmp = tempfile::tempdir().unwrap();
    let replicas = [format!("local:{}", tmp.path().join("r0").display())];
    let (mut engine, mut uri, _) = start_engine("inproc1", "1G", &replicas, &[]);
    let mut written = Written::default();
    let mut rand = xorshift(0x5010_u64);
    for round in 1..=6 {
        written.until_killed(&mut engine, &uri, &mut rand);
        (engine, uri, _) = start_engine("inproc1", "1G", &replicas, &[]);
        written.check(&uri, &mut rand, round);
    }
    assert_eq!(engine.stop(), 0);
}

#[test]
fn a_second_engine_fences_the_first() {
    if encryption_enabled() {
        eprintln!("not run encrypted: it reads the replicas' files for the plaintext written");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let (mut first, uri1, admin1) = start_engine("fence", "16M", &addrs(&rs), &[]);
    let mut c1 = RawNbd::open(&uri1);
    c1.request(1, 1, 0, 4096, &[0x11; 4096]);
    assert_eq!(c1.reply(0).0, 0);
    assert_eq!(status(&admin1)["generation"], 1);

    let (_second, uri2, admin2) = start_engine("fence", "16M", &addrs(&rs), &[]);
    assert_eq!(status(&admin2)["generation"], 2);
    // The first engine's next write is refused by every replica: it fails,
    // and the first engine stops serving and exits with the fenced code.
    c1.request(1, 2, 0, 4096, &[0x22; 4096]);
    let (err, _, _) = c1.try_reply(0).unwrap_or((5, 2, vec![]));
    assert_ne!(err, 0, "a fenced engine must not acknowledge writes");
    assert_eq!(first.wait_exit(Duration::from_secs(10)), 3);
    // Nothing of the first engine landed after the fence.
    let mut c2 = RawNbd::open(&uri2);
    c2.request(0, 3, 0, 4096, &[]);
    let (err, _, data) = c2.reply(4096);
    assert_eq!(err, 0);
    assert_eq!(data, vec![0x11; 4096]);
    for r in &rs {
        let head = std::fs::read(r.dir.join("volume-head-000.img")).unwrap();
        assert_eq!(&head[..4096], &[0x11; 4096][..], "replica {}", r.addr);
    }
}

/// An engine frozen while another takes its volume over, then thawed with
/// no client left, learns of the takeover without any request and exits
/// (found by the chaos soak: a taken-over engine still running 30 s after
/// it was thawed).
#[test]
fn an_idle_engine_taken_over_while_frozen_exits_once_thawed() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let (mut first, uri1, _) = start_engine("idle", "16M", &addrs(&rs), &[]);
    qemu_io(&uri1, &["write -P 0x11 0 64k"]);
    first.signal(libc::SIGSTOP);
    let (_second, uri2, admin2) = start_engine("idle", "16M", &addrs(&rs), &[]);
    assert_eq!(status(&admin2)["generation"], 2);
    first.signal(libc::SIGCONT);
    assert_exits_fenced(&mut first, "the thaw");
    qemu_io(&uri2, &["read -P 0x11 0 64k"]);
}

/// The same while the engine's background loop is held by a rebuild
/// waiting on a replica that stopped answering (found by the chaos soak,
/// seed 7: a taken-over engine still running 30 s after its thaw, its
/// rebuild hung). Nothing else of it talks to the replicas the new engine
/// took over, yet it must learn of the takeover and exit.
#[test]
fn an_engine_taken_over_while_its_rebuild_hangs_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "64M");
    let args = ["--replica-timeout", "2", "--rebuild-rate-mib", "1"];
    let (mut first, uri, admin) = start_engine("hung", "64M", &addrs(&rs), &args);
    rs[1].proc.kill9();
    qemu_io(&uri, &["write -P 0x11 0 32M", "flush"]);
    rs[1].restart("64M");
    wait_until("the rebuild to start", Duration::from_secs(20), || {
        !status(&admin)["rebuild"].is_null()
    });
    // The rebuild's source stops answering: the copy waits on it.
    rs[0].proc.signal(libc::SIGSTOP);
    let (_second, uri2, _) = start_engine("hung", "64M", &[rs[2].addr.clone()], &[]);
    assert_exits_fenced(&mut first, "the takeover");
    rs[0].proc.signal(libc::SIGCONT);
    qemu_io(&uri2, &["read -P 0x11 0 32M"]);
}

/// Waits (20 s at most) for `engine` to exit with the fenced code.
fn assert_exits_fenced(engine: &mut Proc, since: &str) {
    let started = std::time::Instant::now();
    assert_eq!(
        engine.wait_exit(Duration::from_secs(20)),
        3,
        "the fenced code"
    );
    println!("the engine exited {:?} after {since}", started.elapsed());
}

/// A replica an engine found stale at its start never serves as a source
/// later, even when it is the only replica the next engine reaches: that
/// engine refuses to start rather than serve the old data (found by the
/// chaos soak: durable writes read back older after two engine changes).
#[test]
fn a_replica_found_stale_is_never_a_source_even_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "16M");
    let (mut a, uri, _) = start_engine("alone", "16M", &addrs(&rs), &["--replica-timeout", "2"]);
    qemu_io(&uri, &["write -P 0x11 0 1M"]);
    // r1 misses a flushed write.
    rs[1].proc.kill9();
    qemu_io(&uri, &["write -P 0x22 0 1M"]);
    a.kill9();
    rs[1].restart("16M");
    // The next engine leaves r1 out as stale; it dies before rebuilding it.
    let (mut b, _, admin) = start_engine("alone", "16M", &addrs(&rs), &["--rebuild-rate-mib", "1"]);
    assert_eq!(modes(&admin)[1], "ERR", "{}", status(&admin));
    b.kill9();
    // Only r1 is reachable now.
    rs[0].proc.kill9();
    rs[2].proc.kill9();
    let args = engine_args_as_run(
        "alone",
        "16M",
        &addrs(&rs),
        &["--nbd-listen", "127.0.0.1:0"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = Proc::try_start(&args);
    assert!(
        refused.is_err(),
        "an engine served from the stale replica alone"
    );
    // With the others back, the flushed data is there.
    rs[0].restart("16M");
    rs[2].restart("16M");
    let (_c, uri, _) = start_engine("alone", "16M", &addrs(&rs), &[]);
    qemu_io(&uri, &["read -P 0x22 0 1M"]);
}

/// An engine with a flush waiting on a frozen replica (a flush may wait
/// --flush-timeout for a slow disk) is taken over. Once it learns it is
/// fenced it must exit at once, not wait out the flush while its clients
/// hang (found by the chaos soak: a fenced engine still running 30 s on).
#[test]
fn a_fenced_engine_exits_without_waiting_for_a_frozen_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let (mut first, uri1, _) = start_engine("frozen", "16M", &addrs(&rs), &[]);
    let mut c = RawNbd::open(&uri1);
    c.request(1, 1, 0, 4096, &[0x11; 4096]);
    assert_eq!(c.reply(0).0, 0);
    rs[2].proc.signal(libc::SIGSTOP);
    // The flush waits for the frozen replica.
    let flusher = std::thread::spawn(move || {
        let mut f = RawNbd::open(&uri1);
        f.request(3, 2, 0, 0, &[]);
        f.try_reply(0).map(|r| r.0)
    });
    std::thread::sleep(Duration::from_secs(1));
    let (_second, _, admin2) = start_engine("frozen", "16M", &addrs(&rs[..2]), &[]);
    assert_eq!(status(&admin2)["generation"], 2);
    // The first engine's next write meets the fence.
    c.request(1, 3, 0, 4096, &[0x22; 4096]);
    assert_ne!(c.try_reply(0).map(|r| r.0).unwrap_or(5), 0);
    assert_exits_fenced(&mut first, "the fence");
    assert_ne!(
        flusher.join().unwrap().unwrap_or(5),
        0,
        "the flush was not acknowledged"
    );
    rs[2].proc.signal(libc::SIGCONT);
}

/// After an unclean stop, a replica that stops answering while the next
/// engine copies the dirty regions to it is left out (and rebuilt when it
/// answers again); the engine does not hang in its start meanwhile
/// (found by the chaos soak: a start stuck on a replica behind a link
/// dropping its packets).
#[test]
fn a_replica_frozen_during_reconciliation_is_left_out_not_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = three_replicas(tmp.path(), "1G");
    let (mut first, uri, _) = start_engine("reconcile", "1G", &addrs(&rs), &[]);
    // Half a GiB written and never flushed (qemu-io would flush as it
    // closes): all of it is dirty.
    let mut c = RawNbd::open(&uri);
    for i in 0..128u64 {
        c.request(1, i, i << 22, 4 << 20, &vec![0x5c; 4 << 20]);
        assert_eq!(c.reply(0).0, 0);
    }
    first.kill9();
    let args = engine_args_as_run(
        "reconcile",
        "1G",
        &addrs(&rs),
        &["--nbd-listen", "127.0.0.1:0", "--replica-timeout", "2"],
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = tx.send(Proc::start(&args));
    });
    std::thread::sleep(Duration::from_millis(400));
    rs[2].proc.signal(libc::SIGSTOP);
    let second = rx.recv_timeout(Duration::from_secs(30));
    rs[2].proc.signal(libc::SIGCONT);
    let second = second.expect("the engine's start waited for the frozen replica");
    let admin = second.ready["admin"].as_str().unwrap().to_string();
    let uri = format!("nbd://{}", second.ready["nbd"][0].as_str().unwrap());
    let reconciled = second.ready["reconciled_bytes"].as_u64().unwrap();
    println!("reconciled {reconciled} bytes; the frozen replica was left out");
    assert!(reconciled > 0);
    wait_until(
        "the frozen replica to be rebuilt",
        Duration::from_secs(120),
        || modes(&admin) == ["RW", "RW", "RW"],
    );
    rs[0].proc.kill9();
    rs[1].proc.kill9();
    qemu_io(&uri, &["read -P 0x5c 0 512M"]);
}

/// The engine dies while sending barrier flush E: two replicas received it,
/// one did not. The flush named all three as in the set, so the next engine
/// reconciles the third instead of rebuilding it, and the data written
/// before E is on all three.
#[test]
fn a_replica_the_last_flush_never_reached_is_reconciled_not_rebuilt() {
    if encryption_enabled() {
        eprintln!("not run encrypted: it writes plaintext to the replicas as an engine would");
        return;
    }
    use bytes::Bytes;
    use rvol_replica::client::ReplicaClient;
    use rvol_replica::server::Endpoint;
    use rvol_replica::{Generation, Owner};
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let (mut engine, uri, _) = start_engine("vouch", "16M", &addrs(&rs), &[]);
    qemu_io(&uri, &["write -P 0x31 0 1M", "flush"]);
    engine.kill9();
    // Play the dying engine: a write tagged E to all three, then flush E
    // naming all three, sent to r1 and r2 only.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut clients = Vec::new();
        let mut ids = Vec::new();
        let mut epoch = 0;
        for r in &rs {
            let ep: Endpoint = r.addr.parse().unwrap();
            let links = tls::links("vouch");
            let volume = rvol_replica::volume_uuid("vouch");
            let info = ReplicaClient::probe(&ep, volume, &links).await.unwrap();
            let owner = Owner {
                generation: Generation(info.generation.0 + 10),
                engine_id: 77,
            };
            let (c, _) = ReplicaClient::connect(&ep, info.volume_uuid, owner, links)
                .await
                .unwrap();
            epoch = epoch.max(info.epoch_seen + 1);
            ids.push(info.replica_uuid);
            clients.push(c);
        }
        for c in &clients {
            c.write(1 << 20, Bytes::from(vec![0x32u8; 1 << 20]), false, epoch)
                .await
                .unwrap();
        }
        for c in &clients[1..] {
            c.flush_barrier(epoch, &ids).await.unwrap();
        }
    });
    drop(rt);
    let (_engine, uri, admin) = start_engine("vouch", "16M", &addrs(&rs), &[]);
    let s = status(&admin);
    assert_eq!(modes(&admin), ["RW", "RW", "RW"], "{s}");
    assert!(s["reconciled_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["rebuilt_bytes"], 0, "{s}");
    qemu_io(&uri, &["read -P 0x31 0 1M", "read -P 0x32 1M 1M"]);
    // r0 alone holds it too.
    for (i, r) in rs.iter().enumerate() {
        let head = std::fs::read(r.dir.join("volume-head-000.img")).unwrap();
        assert!(
            head[1 << 20..2 << 20].iter().all(|&b| b == 0x32),
            "replica {i}"
        );
    }
}

/// The engine dies while a new replica is being brought in: it had joined
/// in WO mode and received barrier flush E (a WO replica gets every write
/// and flush from the moment it joins) before its rebuild marked it as
/// being rebuilt. It holds none of the data below E, so the next engine
/// must not take it for a replica that completed E: it must rebuild it
/// from the replica that holds the data, and serve that data.
#[test]
fn a_replica_that_joined_for_a_rebuild_is_no_source_after_the_engine_dies() {
    if encryption_enabled() {
        eprintln!("not run encrypted: it writes plaintext to the replicas as an engine would");
        return;
    }
    use rvol_replica::client::ReplicaClient;
    use rvol_replica::server::Endpoint;
    use rvol_replica::{Generation, Owner};
    let tmp = tempfile::tempdir().unwrap();
    let rs = replicas_on_fixed_ports(tmp.path(), 2, "16M");
    let (mut engine, uri, _) = start_engine(
        "joiner",
        "16M",
        &rs[..1].iter().map(|r| r.addr.clone()).collect::<Vec<_>>(),
        &[],
    );
    qemu_io(&uri, &["write -P 0x41 0 4M", "flush"]);
    engine.kill9();
    // Play the dying engine: r1 has just joined in WO mode; barrier flush
    // E, naming the one RW replica r0, reaches both.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep0: Endpoint = rs[0].addr.parse().unwrap();
        let links = tls::links("joiner");
        let volume = rvol_replica::volume_uuid("joiner");
        let info = ReplicaClient::probe(&ep0, volume, &links).await.unwrap();
        let owner = Owner {
            generation: Generation(info.generation.0 + 10),
            engine_id: 78,
        };
        let epoch = info.epoch_seen + 1;
        for r in &rs {
            let ep: Endpoint = r.addr.parse().unwrap();
            let (c, _) = ReplicaClient::connect(&ep, info.volume_uuid, owner, links.clone())
                .await
                .unwrap();
            c.flush_barrier(epoch, &[info.replica_uuid]).await.unwrap();
        }
    });
    drop(rt);
    // The joiner first, so that it would be the first candidate source.
    let order = vec![rs[1].addr.clone(), rs[0].addr.clone()];
    let (_engine, uri, admin) = start_engine("joiner", "16M", &order, &[]);
    wait_until("the joiner to be rebuilt", Duration::from_secs(60), || {
        modes(&admin) == ["RW", "RW"]
    });
    // Reads alternate between the replicas: each serves the data.
    for _ in 0..4 {
        qemu_io(&uri, &["read -P 0x41 0 4M"]);
    }
    let s = status(&admin);
    assert_eq!(s["rebuilt_bytes"], 4 << 20, "{s}");
}
