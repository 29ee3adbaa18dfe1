use proptest::prelude::*;

use super::*;
use crate::model::{Disk, PortRange, PROTOCOL};

const GIB: u64 = 1 << 30;

fn view(name: &str, zone: Option<&str>, free_gib: u64) -> NodeView {
    NodeView {
        node: Node {
            protocol: PROTOCOL,
            name: NodeName::new(name).unwrap(),
            address: format!("{name}:7000"),
            advertise: "10.0.0.1".into(),
            ports: PortRange {
                first: 10100,
                last: 10199,
            },
            zone: zone.map(str::to_string),
            labels: BTreeMap::new(),
            disks: vec![Disk {
                path: "/d".into(),
                capacity_bytes: 100 * GIB,
                free_bytes: free_gib * GIB,
            }],
            lease: 1,
        },
        alive: true,
        cordoned: false,
        scheduled: BTreeMap::new(),
    }
}

fn request(count: usize, size_gib: u64) -> Request {
    Request {
        count,
        size: size_gib * GIB,
        zones: ZoneAntiAffinity::Soft,
        selector: BTreeMap::new(),
        holding: vec![],
        prefer: None,
    }
}

fn names(p: &[Placed]) -> Vec<&str> {
    p.iter().map(|p| p.node.as_str()).collect()
}

#[test]
fn replicas_land_on_distinct_nodes_spread_over_zones_most_room_first() {
    let mut nodes = vec![
        view("a", Some("z1"), 90),
        view("b", Some("z1"), 90),
        view("c", Some("z2"), 90),
        view("d", Some("z3"), 90),
    ];
    nodes[1].scheduled.insert("/d".into(), 10 * GIB); // b: less room than a
    let got = place(&nodes, &request(3, 10), Policy::default()).unwrap();
    // One per zone (soft anti-affinity still spreads first), a over b.
    assert_eq!(names(&got), ["a", "c", "d"]);
    // A fourth replica goes to the zone already used, since soft.
    let got = place(&nodes, &request(4, 10), Policy::default()).unwrap();
    assert_eq!(names(&got), ["a", "c", "d", "b"]);
}

#[test]
fn hard_anti_affinity_refuses_a_second_replica_in_a_zone_and_says_so() {
    let nodes = vec![
        view("a", Some("z1"), 90),
        view("b", Some("z1"), 90),
        view("c", Some("z2"), 90),
    ];
    let mut req = request(3, 10);
    req.zones = ZoneAntiAffinity::Hard;
    let err = place(&nodes, &req, Policy::default()).unwrap_err();
    assert_eq!((err.asked, err.fit), (3, 2));
    assert!(
        err.why[&NodeName::new("b").unwrap()].contains("shares zone z1"),
        "{err}"
    );
}

#[test]
fn each_refused_node_is_explained() {
    let mut nodes = vec![
        view("ok1", None, 90),
        view("dead", None, 90),
        view("cordoned", None, 90),
        view("unlabelled", None, 90),
        view("full", None, 90),
        view("nearly-full", None, 5),
        view("holder", None, 90),
    ];
    nodes[1].alive = false;
    nodes[2].cordoned = true;
    for n in &mut nodes {
        if n.node.name.as_str() != "unlabelled" {
            n.node.labels.insert("ssd".into(), "true".into());
        }
    }
    nodes[4].scheduled.insert("/d".into(), 95 * GIB);
    let mut req = request(3, 10);
    req.selector.insert("ssd".into(), "true".into());
    req.holding.push(NodeName::new("holder").unwrap());
    let err = place(&nodes, &req, Policy::default()).unwrap_err();
    assert_eq!((err.asked, err.fit), (3, 1));
    let why = |n: &str| err.why[&NodeName::new(n).unwrap()].clone();
    assert_eq!(why("dead"), "is not alive");
    assert_eq!(why("cordoned"), "is cordoned");
    assert_eq!(why("unlabelled"), "does not match ssd=true");
    assert!(
        why("full").contains("5.0 GiB schedulable on /d for a 10.0 GiB replica"),
        "{}",
        why("full")
    );
    assert!(
        why("nearly-full").contains("under the 10 % kept free"),
        "{}",
        why("nearly-full")
    );
    assert_eq!(why("holder"), "already holds a replica of this volume");
    assert!(!err.why.contains_key(&NodeName::new("ok1").unwrap()));
    assert!(
        err.to_string()
            .starts_with("3 replica(s) asked, 1 node(s) fit: "),
        "{err}"
    );
}

#[test]
fn data_locality_prefers_the_attached_node_and_overprovisioning_is_honoured() {
    let nodes = vec![view("a", None, 90), view("b", None, 50)];
    let mut req = request(1, 10);
    req.prefer = Some(NodeName::new("b").unwrap());
    assert_eq!(
        names(&place(&nodes, &req, Policy::default()).unwrap()),
        ["b"]
    );
    // 150 GiB on a 100 GiB disk fits only with 200 % overprovisioning.
    let big = request(1, 150);
    assert!(place(&nodes, &big, Policy::default()).is_err());
    let policy = Policy {
        overprovisioning: 2.0,
        ..Policy::default()
    };
    assert_eq!(names(&place(&nodes, &big, policy).unwrap()), ["a"]);
}

proptest! {
    /// Whatever the cluster, a placement puts the replicas on distinct,
    /// eligible nodes with room, in distinct zones under hard
    /// anti-affinity; and it fails only when no other choice existed
    /// (checked by counting the nodes that could take a replica).
    #[test]
    fn any_placement_keeps_every_rule(
        spec in prop::collection::vec((0u8..4, any::<bool>(), any::<bool>(), 0u64..100, 0u64..100), 0..9),
        count in 1usize..5,
        size in 1u64..40,
        hard in any::<bool>(),
    ) {
        let nodes: Vec<NodeView> = spec.iter().enumerate().map(|(i, (zone, alive, cordoned, free, sched))| {
            let mut v = view(&format!("n{i}"), Some(&format!("z{zone}")), *free);
            v.alive = *alive;
            v.cordoned = *cordoned;
            v.scheduled.insert("/d".into(), sched * GIB);
            v
        }).collect();
        let mut req = request(count, size);
        if hard { req.zones = ZoneAntiAffinity::Hard; }
        let policy = Policy::default();
        let usable: Vec<&NodeView> = nodes.iter().filter(|v| v.alive && !v.cordoned && best_disk(v, req.size, policy).is_ok()).collect();
        let possible = if hard {
            usable.iter().map(|v| zone_of(v)).collect::<BTreeSet<_>>().len()
        } else {
            usable.len()
        };
        match place(&nodes, &req, policy) {
            Ok(placed) => {
                prop_assert_eq!(placed.len(), count);
                let distinct: BTreeSet<_> = placed.iter().map(|p| p.node.clone()).collect();
                prop_assert_eq!(distinct.len(), count);
                for p in &placed {
                    let v = nodes.iter().find(|v| v.node.name == p.node).unwrap();
                    prop_assert!(usable.iter().any(|u| u.node.name == v.node.name));
                }
                if hard {
                    let zones: BTreeSet<_> = placed.iter().map(|p| zone_of(nodes.iter().find(|v| v.node.name == p.node).unwrap())).collect();
                    prop_assert_eq!(zones.len(), count);
                }
            }
            Err(e) => {
                prop_assert!(possible < count, "refused with {} possible: {}", possible, e);
                prop_assert_eq!(e.fit, possible);
            }
        }
    }
}
