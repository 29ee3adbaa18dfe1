//! A snapshot that fails half way (a full disk) must leave no name behind
//! that aliases the head, and a layer created later under a name that a
//! stray holds must get files of its own. The chaos soak found a rebuild
//! that broke both: a failed cut left `volume-snap-X.img` hard-linked to
//! the head; a later rebuild created layer X by truncating that link,
//! which emptied (and then overwrote) the layer the old head had become,
//! and the rebuilt replica came back RW holding old data.

use rvol_replica::meta::LayerMeta;
use rvol_replica::{Replica, BLOCK_SIZE};

const SIZE: u64 = 16 << 20;

fn meta(parent: Option<&str>) -> LayerMeta {
    LayerMeta {
        parent: parent.map(String::from),
        created: 0,
        user_created: false,
        removed: false,
        labels: Default::default(),
    }
}

#[test]
fn a_new_layer_never_writes_through_a_stray_link_into_another() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::create(dir.path(), SIZE).unwrap();
    r.write(0, &[7u8; BLOCK_SIZE as usize], 0).unwrap();
    // What a cut that failed after linking left: the name `x` linked to
    // the head's data and checksums.
    let head = r.info().chain.last().unwrap().name.clone();
    let p = dir.path();
    std::fs::hard_link(p.join(&head), p.join("volume-snap-x.img")).unwrap();
    std::fs::hard_link(
        p.join(format!("{head}.crc")),
        p.join("volume-snap-x.img.crc"),
    )
    .unwrap();
    // The head becomes snapshot `d`, which holds block 0.
    r.snapshot("d", false, Default::default()).unwrap();
    // A rebuild takes a chain where `x` comes below `d`.
    let chain = [
        ("volume-snap-x.img".to_string(), meta(None)),
        (
            "volume-snap-d.img".to_string(),
            meta(Some("volume-snap-x.img")),
        ),
    ];
    r.prepare_rebuild(&chain).unwrap();
    assert_eq!(
        r.read_layer("volume-snap-d.img", 0, BLOCK_SIZE).unwrap(),
        vec![7u8; BLOCK_SIZE as usize],
        "creating layer x emptied layer d"
    );
    r.write_layer("volume-snap-x.img", BLOCK_SIZE, &[9u8; BLOCK_SIZE as usize])
        .unwrap();
    assert_eq!(
        r.read_layer("volume-snap-d.img", BLOCK_SIZE, BLOCK_SIZE)
            .unwrap(),
        vec![0u8; BLOCK_SIZE as usize],
        "a write to layer x landed in layer d"
    );
}

#[test]
fn a_snapshot_that_fails_leaves_no_name_linked_to_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::create(dir.path(), SIZE).unwrap();
    r.write(0, &[7u8; BLOCK_SIZE as usize], 0).unwrap();
    // The snapshot's metadata cannot be written (a directory holds its
    // name), as on a full disk.
    std::fs::create_dir(dir.path().join("volume-snap-s.img.meta")).unwrap();
    assert!(r.snapshot("s", true, Default::default()).is_err());
    for f in ["volume-snap-s.img", "volume-snap-s.img.crc"] {
        assert!(!dir.path().join(f).exists(), "{f} was left behind");
    }
    assert_eq!(r.info().chain.len(), 1);
    assert_eq!(
        r.read(0, BLOCK_SIZE).unwrap(),
        vec![7u8; BLOCK_SIZE as usize]
    );
}

/// A replica with snapshot `a` (block 0 = 7) below a head that holds
/// block 0 = 8; returns it with its chain's names.
fn replica_with_a_snapshot(dir: &std::path::Path) -> (Replica, Vec<String>) {
    let r = Replica::create(dir, SIZE).unwrap();
    r.write(0, &[7u8; BLOCK_SIZE as usize], 0).unwrap();
    r.snapshot("a", true, Default::default()).unwrap();
    r.write(0, &[8u8; BLOCK_SIZE as usize], 0).unwrap();
    let names = chain(&r);
    (r, names)
}

fn chain(r: &Replica) -> Vec<String> {
    r.info().chain.into_iter().map(|l| l.name).collect()
}

/// After a chain change failed, `r` still has the chain `names` and takes
/// writes into its head, not into snapshot `a`; so does the replica
/// reopened from disk once `blocker` (what made the change fail) is gone.
fn assert_unchanged(r: Replica, dir: &std::path::Path, names: &[String], blocker: &str) {
    let block = |b: u8| vec![b; BLOCK_SIZE as usize];
    assert_eq!(chain(&r), names, "the chain in memory");
    r.write(BLOCK_SIZE, &block(9), 0).unwrap();
    let check = |r: &Replica| {
        assert_eq!(chain(r), names);
        assert_eq!(r.read(0, BLOCK_SIZE).unwrap(), block(8));
        assert_eq!(r.read(BLOCK_SIZE, BLOCK_SIZE).unwrap(), block(9));
        let a = "volume-snap-a.img";
        assert_eq!(r.read_layer(a, 0, BLOCK_SIZE).unwrap(), block(7));
        assert_eq!(r.read_layer(a, BLOCK_SIZE, BLOCK_SIZE).unwrap(), block(0));
    };
    check(&r);
    drop(r);
    std::fs::remove_dir(dir.join(blocker)).unwrap();
    check(&Replica::open(dir).unwrap());
}

/// A chain change that fails half way (a full disk) leaves the replica
/// with the chain it had, in memory and on disk. The chaos soak found a
/// failed rebuild preparation that left no layer at all in memory: every
/// later request panicked, and an expansion then recorded a size that no
/// layer file had, so the replica no longer opened.
#[test]
fn a_rebuild_preparation_that_fails_half_way_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (r, names) = replica_with_a_snapshot(dir.path());
    // The second layer's metadata cannot be written.
    let blocker = "volume-snap-y.img.meta";
    std::fs::create_dir(dir.path().join(blocker)).unwrap();
    let chain = [
        ("volume-snap-x.img".to_string(), meta(None)),
        (
            "volume-snap-y.img".to_string(),
            meta(Some("volume-snap-x.img")),
        ),
    ];
    assert!(r.prepare_rebuild(&chain).is_err());
    assert_unchanged(r, dir.path(), &names, blocker);
    assert!(!dir.path().join("volume-snap-x.img").exists());
}

/// The same for a snapshot whose new head's checksums cannot be created
/// (the last step before the chain is switched).
#[test]
fn a_snapshot_that_fails_at_its_new_head_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (r, names) = replica_with_a_snapshot(dir.path());
    let blocker = "volume-head-002.img.crc";
    std::fs::create_dir(dir.path().join(blocker)).unwrap();
    assert!(r.snapshot("b", true, Default::default()).is_err());
    assert_unchanged(r, dir.path(), &names, blocker);
}

/// The same for a revert.
#[test]
fn a_revert_that_fails_at_its_new_head_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (r, names) = replica_with_a_snapshot(dir.path());
    let blocker = "volume-head-002.img.crc";
    std::fs::create_dir(dir.path().join(blocker)).unwrap();
    assert!(r.revert("a").is_err());
    assert_unchanged(r, dir.path(), &names, blocker);
}
