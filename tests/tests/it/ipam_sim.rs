//! The daemon's IPAM rounds over the simulated mesh: a hundred nodes claiming in the same
//! instant end with distinct blocks in both families; two sides of a partition that hand the
//! same block to new nodes heal into one winner and one re-claim. No root needed.

use std::time::Duration;

use weft::control::blocks::BlockEvent;
use weft_ipam::{Pool, choose};
use weft_tests::ipam_sim::IpamSim;
use weft_tests::sim::{LIVENESS_TIMEOUT, one_earlier, sim_identity, test_config as config};

fn reclaims(sim: &IpamSim, i: usize) -> Vec<BlockEvent> {
    sim.nodes[i]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, BlockEvent::Reclaimed { .. }))
        .map(|(_, e)| e.clone())
        .collect()
}

#[test]
fn a_hundred_nodes_starting_in_the_same_instant_end_with_distinct_blocks_in_both_families() {
    let mut sim = IpamSim::new(
        100,
        config(),
        &["100.64.0.0/16", "fd00:64::/48"],
        one_earlier,
    );
    let took = sim
        .run_until(Duration::from_secs(180), IpamSim::settled)
        .expect("100 nodes did not settle on distinct blocks within 180 s of virtual time");
    let reclaimed: usize = (0..100).map(|i| reclaims(&sim, i).len()).sum();
    eprintln!("100 nodes settled in {took:?} of virtual time after {reclaimed} re-claims");
    // Every node claimed in both families, each exactly once at first.
    for i in 0..100 {
        let claimed = sim.nodes[i]
            .events
            .iter()
            .filter(|(_, e)| matches!(e, BlockEvent::Claimed { .. }))
            .count();
        assert_eq!(claimed, 2, "node {i}: {:?}", sim.nodes[i].events);
        assert!(
            !sim.nodes[i].events.iter().any(|(_, e)| matches!(
                e,
                BlockEvent::Failed(_) | BlockEvent::StaticConflict { .. }
            )),
            "node {i}: {:?}",
            sim.nodes[i].events
        );
    }
    // And it stays settled: nothing moves once the blocks are disjoint.
    let before = sim.held();
    let until = sim.sim.now + 2 * LIVENESS_TIMEOUT;
    sim.run_until(3 * LIVENESS_TIMEOUT, |s| s.sim.now >= until);
    assert_eq!(sim.held(), before, "blocks moved after settling");
    assert!(sim.settled());
}

#[test]
fn the_same_block_handed_out_on_both_sides_of_a_partition_heals_into_one_winner_and_one_reclaim() {
    let pool = "100.64.0.0/21";
    let mut sim = IpamSim::new(4, config(), &[pool], one_earlier);
    sim.run_until(Duration::from_secs(60), IpamSim::settled)
        .expect("4 nodes settle");
    let taken: Vec<_> = sim.held().into_iter().flat_map(|(_, b)| b).collect();
    // Two newcomers that, seeing the same four blocks taken, pick the same free block.
    let p = Pool::new(pool.parse().unwrap(), 24).unwrap();
    let pick = |ident: usize| choose(&p, &taken, &sim_identity(ident).id().0).unwrap();
    let (a, b) = (10..200)
        .flat_map(|a| (a + 1..200).map(move |b| (a, b)))
        .find(|(a, b)| pick(*a) == pick(*b))
        .expect("two of 190 identities pick the same of 4 free blocks");
    let contested = pick(a);

    sim.sim.partition(|i| usize::from(i >= 2));
    let na = sim.add(a, 0);
    let nb = sim.add(b, 2);
    let claimed = |s: &IpamSim, i: usize| s.nodes[i].blocks.held.len() == 1;
    sim.run_until(Duration::from_secs(30), |s| {
        claimed(s, na) && claimed(s, nb)
    })
    .expect("both newcomers claim during the partition");
    assert_eq!(sim.nodes[na].blocks.held[0].block, contested);
    assert_eq!(sim.nodes[nb].blocks.held[0].block, contested);
    // Long enough for each side to mark the other down.
    let until = sim.sim.now + LIVENESS_TIMEOUT + Duration::from_secs(5);
    sim.run_until(2 * LIVENESS_TIMEOUT, |s| s.sim.now >= until);
    assert!(reclaims(&sim, na).is_empty() && reclaims(&sim, nb).is_empty());

    sim.sim.heal();
    let took = sim
        .run_until(Duration::from_secs(120), IpamSim::settled)
        .expect("settles after the partition heals");
    eprintln!("re-settled {took:?} after the heal");
    let (ra, rb) = (reclaims(&sim, na), reclaims(&sim, nb));
    let (winner, loser, lost) = match (ra.as_slice(), rb.as_slice()) {
        ([], [l]) => (na, nb, l.clone()),
        ([l], []) => (nb, na, l.clone()),
        _ => panic!("expected exactly one re-claim, got {ra:?} and {rb:?}"),
    };
    assert_eq!(sim.nodes[winner].blocks.held[0].block, contested);
    assert_ne!(sim.nodes[loser].blocks.held[0].block, contested);
    let BlockEvent::Reclaimed {
        lost, winner: w, ..
    } = lost
    else {
        unreachable!()
    };
    assert_eq!(lost, contested);
    assert_eq!(w, sim.sim.node(winner).mesh.id().0);
    // No other node moved.
    for i in 0..4 {
        assert!(reclaims(&sim, i).is_empty(), "node {i} re-claimed");
    }
}

#[test]
fn a_dead_nodes_block_is_taken_only_after_the_expiry_and_a_full_pool_is_an_error_naming_it() {
    // Four blocks, four nodes: the pool is full.
    let pool = "100.64.0.0/22";
    let mut sim = IpamSim::new(4, config(), &[pool], one_earlier);
    sim.run_until(Duration::from_secs(60), IpamSim::settled)
        .expect("4 nodes settle");
    let expiry = Duration::from_secs(300);
    for n in &mut sim.nodes {
        n.blocks.expiry = expiry;
    }
    sim.expiry = expiry;
    let victim = 2;
    let dead_block = sim.nodes[victim].blocks.held[0].block;
    let killed = sim.sim.now;
    sim.sim.kill(victim);
    let newcomer = sim.add(50, 0);
    // Long past the liveness timeout, but before the expiry: nothing to claim.
    let until = killed + 2 * LIVENESS_TIMEOUT;
    sim.run_until(3 * LIVENESS_TIMEOUT, |s| s.sim.now >= until);
    assert!(sim.nodes[newcomer].blocks.held.is_empty());
    let failed = sim.nodes[newcomer]
        .events
        .iter()
        .find_map(|(_, e)| match e {
            BlockEvent::Failed(e) => Some(e.to_string()),
            _ => None,
        })
        .expect("the newcomer reports the full pool");
    assert!(failed.contains(pool), "{failed}");
    // After the expiry the dead node's block is free, and the newcomer takes it.
    let took = sim
        .run_until(expiry, |s| !s.nodes[newcomer].blocks.held.is_empty())
        .expect("the newcomer claims once the dead node's block expires");
    let claimed_at = sim.sim.now - killed;
    eprintln!("claimed {claimed_at:?} after the kill (expiry {expiry:?}, waited {took:?})");
    assert!(claimed_at >= expiry, "claimed after {claimed_at:?}");
    assert!(
        claimed_at <= expiry + LIVENESS_TIMEOUT,
        "claimed after {claimed_at:?}"
    );
    assert_eq!(sim.nodes[newcomer].blocks.held[0].block, dead_block);
    assert!(sim.settled());
}
