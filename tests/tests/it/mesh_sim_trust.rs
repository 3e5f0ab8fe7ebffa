//! The mesh's trust rules over the simulated network: what a dishonest member, a second daemon
//! with the same key, a churned mesh and a replayed state can and cannot change. No root
//! needed. Constants are restated here, not imported from the crate.

use std::time::Duration;

use weft_mesh::{Beat, Entry, Event, Frame, MeshConfig, Rejected, Rumour};
use weft_tests::sim::{
    GOSSIP_INTERVAL, LIVENESS_TIMEOUT, Sim, one_earlier, sim_identity, sim_record,
    test_config as config,
};

/// Whether every live node except `skip` holds node `i` alive (`alive`) or not alive.
fn held_everywhere(sim: &Sim, i: &weft_mesh::NodeId, alive: bool, skip: &[usize]) -> bool {
    sim.live()
        .into_iter()
        .filter(|j| !skip.contains(j))
        .all(|j| {
            sim.node(j)
                .mesh
                .members()
                .iter()
                .any(|m| m.id == *i && m.alive == alive)
        })
}

/// The sum over live nodes of the refusals for `reason`.
fn rejected(sim: &Sim, reason: Rejected) -> u64 {
    sim.live()
        .into_iter()
        .map(|j| sim.node(j).mesh.drops().rejected.get(reason))
        .sum()
}

/// Rule: heartbeats count only when signed by the node they speak for. One member's forged
/// beats (unsigned with `u32::MAX`, or signed by the wrong key) neither mark a live node down
/// nor keep a dead one alive, and every node that receives them counts them.
#[test]
fn a_forged_beat_from_a_member_neither_marks_a_live_node_down_nor_keeps_a_dead_one_alive() {
    let mut sim = Sim::new(50, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    let (liar, victim, dead) = (5, 12, 30);
    let victim_id = sim.node(victim).mesh.id();
    let dead_id = sim.node(dead).mesh.id();
    let dead_version = sim.node(dead).mesh.record().version;
    let dead_heartbeat = sim.node(dead).mesh.heartbeat();
    sim.kill(dead);
    let killed = sim.now;
    let until = sim.now + 3 * LIVENESS_TIMEOUT;
    let mut forged = 0u32;
    for _ in 0..100_000 {
        if sim.now >= until {
            break;
        }
        // Every round the liar claims the victim's counter is at its maximum and the dead
        // node's keeps growing, unsigned and with a signature of its own.
        forged += 1;
        let victim_version = sim.node(victim).mesh.record().version;
        let unsigned = Frame::Beats(vec![
            Entry {
                node: victim_id.short(),
                version: victim_version,
                heartbeat: u32::MAX,
            },
            Entry {
                node: dead_id.short(),
                version: dead_version,
                heartbeat: 1000 + forged,
            },
        ]);
        let liar_beat = Beat::sign(&sim_identity(liar), dead_version, 1000 + forged);
        let badly_signed = Frame::SignedBeats(vec![
            Beat {
                node: victim_id.short(),
                version: victim_version,
                ..Beat::sign(&sim_identity(liar), victim_version, u32::MAX)
            },
            Beat {
                node: dead_id.short(),
                ..liar_beat
            },
        ]);
        sim.send_raw(liar, &unsigned.encode());
        sim.send_raw(liar, &badly_signed.encode());
        let next = sim.now + GOSSIP_INTERVAL;
        while sim.now < next {
            sim.step();
            assert!(
                held_everywhere(&sim, &victim_id, true, &[victim]),
                "the victim went down somewhere {:?} after the forgeries began",
                sim.now - killed
            );
        }
    }
    // The dead node went down everywhere as if no one had lied: no node took a beat above the
    // last one the dead node itself signed, each last heard it alive before it died, and each
    // went down within two liveness timeouts of the kill.
    let bound = 2 * LIVENESS_TIMEOUT;
    for j in sim.live() {
        let down = sim
            .node(j)
            .events
            .iter()
            .find(|(_, e)| *e == Event::Down(dead_id));
        let (t, _) = down.unwrap_or_else(|| panic!("node {j} kept the dead node alive"));
        let seen = sim
            .node(j)
            .mesh
            .members()
            .into_iter()
            .find(|m| m.id == dead_id)
            .unwrap_or_else(|| panic!("node {j} forgot the dead node"));
        assert!(
            seen.heartbeat <= dead_heartbeat,
            "node {j} took a forged beat: {} > {dead_heartbeat}",
            seen.heartbeat
        );
        let heard = seen.last_heard - sim.start;
        assert!(
            heard <= killed - sim.start,
            "node {j} last heard the dead node {heard:?}, the kill was at {:?}",
            killed - sim.start
        );
        assert!(
            *t <= killed - sim.start + bound,
            "node {j} took {t:?}, the kill was at {:?}",
            killed - sim.start
        );
    }
    assert!(held_everywhere(&sim, &dead_id, false, &[]));
    // Counted where they arrived: the liar's neighbours, once per frame or beat.
    assert!(rejected(&sim, Rejected::UnsignedBeat) >= u64::from(forged));
    assert!(rejected(&sim, Rejected::BadBeat) >= u64::from(forged));
    eprintln!(
        "{forged} rounds of forged beats: {} unsigned and {} badly signed refused",
        rejected(&sim, Rejected::UnsignedBeat),
        rejected(&sim, Rejected::BadBeat)
    );
}

/// Rule: two daemons with one key (a cloned VM image) stop outbidding each other after a
/// bounded number of bids, both report the clash naming both addresses, and the others stop
/// seeing the record change.
#[test]
fn two_daemons_with_one_key_stop_outbidding_within_a_bound_and_both_report_the_clash() {
    let mut sim = Sim::new(20, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    let original = 7;
    let id = sim.node(original).mesh.id();
    let v0 = sim.node(original).mesh.record().version;
    // The clone: same key and name, its own addresses (those of a node 100), started later
    // (so its wall-clock version is higher).
    let mut r = sim_record(100, v0 + 1);
    r.name = "n7".into();
    let clone = sim.add(r, sim_identity(original), Some(0));
    let clashes = |s: &Sim, i: usize| {
        s.node(i)
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::IdentityClash(c) => Some(*c),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let took = sim
        .run_until(Duration::from_secs(30), |s| {
            !clashes(s, original).is_empty() && !clashes(s, clone).is_empty()
        })
        .expect("both daemons report the clash within 30 s");
    eprintln!("the clash was found on both daemons {took:?} after the clone started");
    let ours = |i: usize| {
        let r = sim.node(i).mesh.record();
        (r.private_address, r.public_address)
    };
    let c = clashes(&sim, original)[0];
    assert_eq!((c.our_private, c.our_public), ours(original));
    assert_eq!((c.their_private, c.their_public), ours(clone));
    let c = clashes(&sim, clone)[0];
    assert_eq!((c.our_private, c.our_public), ours(clone));
    assert_eq!((c.their_private, c.their_public), ours(original));
    assert_eq!(sim.node(clone).mesh.identity_clash(), Some(c));
    // Bounded: a few bids each (4 before stopping, restated), not one per round trip.
    sim.run_for(2 * GOSSIP_INTERVAL);
    let versions = |s: &Sim| {
        (
            s.node(original).mesh.record().version,
            s.node(clone).mesh.record().version,
        )
    };
    let settled = versions(&sim);
    assert!(
        settled.0.max(settled.1) <= v0 + 2 * 4 + 2,
        "versions {settled:?} from {v0}"
    );
    // And it stays settled: no more versions, no more updates of that node anywhere.
    let mark: Vec<usize> = (0..sim.nodes.len())
        .map(|j| sim.nodes[j].as_ref().map_or(0, |n| n.events.len()))
        .collect();
    sim.run_for(2 * LIVENESS_TIMEOUT);
    assert_eq!(versions(&sim), settled, "the bidding went on");
    for j in sim.live() {
        let late = &sim.node(j).events[mark[j]..];
        assert!(
            !late.iter().any(|(_, e)| *e == Event::Updated(id)),
            "node {j} still sees the record flip"
        );
    }
    assert!(rejected(&sim, Rejected::IdentityClash) > 0);
}

/// Rule: a member cannot publish another node's WireGuard key (its record does not verify) or
/// take another node's address (it is held down while the established owner lives); the
/// owner stays alive, so routed, everywhere.
#[test]
fn a_member_cannot_take_another_nodes_key_or_address_and_the_owner_stays_routed() {
    let mut sim = Sim::new(20, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    let (thief, victim) = (4, 9);
    let thief_id = sim.node(thief).mesh.id();
    let victim_id = sim.node(victim).mesh.id();
    let victim_key = sim_identity(victim).wireguard_key();
    // 1. A record of its own that names the victim's WireGuard key.
    let mut r = sim.node(thief).mesh.record().clone();
    r.version += 1;
    r.wireguard_key = victim_key;
    let forged = sim_identity(thief).sign_unbound(r);
    sim.send_raw(thief, &Frame::Records(vec![Ok(forged.into())]).encode());
    sim.run_for(5 * GOSSIP_INTERVAL);
    assert!(
        rejected(&sim, Rejected::UnboundKey) > 0,
        "refused and counted"
    );
    for j in sim.live().into_iter().filter(|j| *j != thief) {
        for m in sim.node(j).mesh.members() {
            if m.id == thief_id {
                assert_ne!(m.record.wireguard_key, victim_key, "node {j}");
            }
        }
    }
    // 2. Its own record, honestly signed, advertising the victim's addresses.
    let mut r = sim.node(thief).mesh.record().clone();
    let v = sim.node(victim).mesh.record().clone();
    r.private_address = v.private_address;
    r.public_address = v.public_address;
    r.region = v.region.clone();
    sim.node_mut(thief).mesh.update(r);
    sim.drain_all();
    let took = sim
        .run_until(Duration::from_secs(10), |s| {
            held_everywhere(s, &thief_id, false, &[thief])
        })
        .expect("the impostor is held down everywhere");
    eprintln!("impostor held down everywhere {took:?} after it took the address");
    // Through two liveness timeouts: the owner alive everywhere, the impostor nowhere.
    let until = sim.now + 2 * LIVENESS_TIMEOUT;
    while sim.now < until {
        sim.step();
        assert!(held_everywhere(&sim, &victim_id, true, &[victim, thief]));
        assert!(held_everywhere(&sim, &thief_id, false, &[thief]));
    }
    for j in sim.live().into_iter().filter(|j| *j != thief) {
        let clashes = sim.node(j).mesh.address_clashes();
        assert_eq!(clashes.len(), 1, "node {j}: {clashes:?}");
        assert_eq!(clashes[0].member, thief_id);
        assert_eq!(clashes[0].owner, victim_id);
    }
    assert!(rejected(&sim, Rejected::AddressInUse) > 0);
    // Once it gives the address back, it is alive again.
    let mut r = sim.node(thief).mesh.record().clone();
    let own = sim_record(thief, 0);
    r.private_address = own.private_address;
    r.public_address = own.public_address;
    r.region = own.region;
    sim.node_mut(thief).mesh.update(r);
    sim.drain_all();
    sim.run_until(Duration::from_secs(10), |s| {
        held_everywhere(s, &thief_id, true, &[thief])
    })
    .expect("released everywhere");
}

/// Rule: dead and departed members are forgotten after the tombstone horizon everywhere, the
/// others' copies do not bring them back, and a node that returns with a new record is
/// learned again.
#[test]
fn tombstones_are_forgotten_after_the_horizon_everywhere_and_stay_forgotten() {
    let horizon = Duration::from_secs(600);
    let cfg = MeshConfig {
        tombstone_horizon: horizon,
        ..config()
    };
    let mut sim = Sim::new(30, cfg, one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    let (left, killed) = (9, 17);
    let left_id = sim.node(left).mesh.id();
    let killed_id = sim.node(killed).mesh.id();
    let killed_version = sim.node(killed).mesh.record().version;
    sim.node_mut(left).mesh.leave();
    sim.drain_all();
    sim.run_for(5 * GOSSIP_INTERVAL);
    sim.kill(left);
    sim.kill(killed);
    let holds = |s: &Sim, id: &weft_mesh::NodeId| {
        s.live()
            .into_iter()
            .filter(|j| s.node(*j).mesh.members().iter().any(|m| m.id == *id))
            .count()
    };
    assert_eq!(holds(&sim, &left_id), 28, "the tombstone is everywhere");
    sim.run_for(horizon - Duration::from_secs(60));
    assert_eq!(holds(&sim, &left_id), 28, "kept until the horizon");
    let took = sim
        .run_until(horizon, |s| {
            holds(s, &left_id) == 0 && holds(s, &killed_id) == 0
        })
        .expect("forgotten everywhere after the horizon");
    eprintln!("forgotten everywhere {took:?} before the horizon ran out a second time");
    let mark: Vec<usize> = (0..sim.nodes.len())
        .map(|j| sim.nodes[j].as_ref().map_or(0, |n| n.events.len()))
        .collect();
    sim.run_for(horizon + LIVENESS_TIMEOUT);
    assert_eq!(holds(&sim, &left_id), 0, "a tombstone came back");
    assert_eq!(holds(&sim, &killed_id), 0, "a dead node came back");
    for j in sim.live() {
        assert!(
            sim.node(j).events[mark[j]..]
                .iter()
                .all(|(_, e)| !matches!(e, Event::Joined(x) | Event::Left(x) if *x == left_id || *x == killed_id)),
            "node {j}"
        );
    }
    // A new life is a newer record: learned again.
    sim.restart(killed, sim_record(killed, killed_version + 1000), 0);
    sim.run_until(Duration::from_secs(10), |s| s.alive_everywhere(killed))
        .expect("the returning node is learned again");
}

/// Rule: the number of members is capped; records of further identities are refused and
/// counted (without two full nodes offering each other the rest in a loop), and the members
/// held keep gossiping.
#[test]
fn members_beyond_the_cap_are_refused_and_counted() {
    let cap = 15;
    let cfg = MeshConfig {
        max_members: cap,
        ..config()
    };
    let mut sim = Sim::new(25, cfg, one_earlier);
    sim.run_for(Duration::from_secs(60));
    for j in sim.live() {
        let n = sim.node(j).mesh.members().len();
        assert!(n <= cap, "node {j} holds {n} members");
        // Refused once per anti-entropy exchange at most (24 others, a digest every 10 s to
        // and from up to 8 connections), not in a loop between two full nodes.
        let refused = sim.node(j).mesh.drops().rejected.get(Rejected::MemberLimit);
        assert!(
            refused <= 2000,
            "node {j} refused {refused} records in a minute"
        );
    }
    assert!(
        rejected(&sim, Rejected::MemberLimit) > 0,
        "nothing was refused"
    );
    sim.run_for(2 * LIVENESS_TIMEOUT);
    for j in sim.live() {
        let alive = sim
            .node(j)
            .mesh
            .members()
            .iter()
            .filter(|m| m.alive)
            .count();
        assert_eq!(alive, cap, "node {j}: its members stay alive");
    }
}

/// Rule: staleness is checked before the signature: a member replaying the whole state costs
/// its neighbours no signature check, and in steady state each node checks each new beat once,
/// however many connections bring it.
#[test]
fn a_replayed_state_costs_no_signature_check_and_each_beat_is_checked_once() {
    let n = 40;
    let mut sim = Sim::new(n, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    sim.run_for(LIVENESS_TIMEOUT);
    let replayer = 3;
    let verified = |s: &Sim| -> Vec<u64> {
        (0..n)
            .map(|j| {
                s.nodes[j]
                    .as_ref()
                    .map_or(0, |x| x.mesh.drops().verifications)
            })
            .collect()
    };
    let stale = |s: &Sim| -> u64 { s.live().iter().map(|j| s.node(*j).mesh.drops().stale).sum() };
    // The replay: every record the replayer holds, signed by their origins, all at once.
    let mut all = Vec::new();
    for j in sim.live().into_iter().filter(|j| *j != replayer) {
        all.push(Ok(sim_identity(j).sign(sim.node(j).mesh.record()).into()));
    }
    let before = verified(&sim);
    let stale_before = stale(&sim);
    sim.send_raw(replayer, &Frame::Records(all).encode());
    // Deliver it: step to one latency later (a timer that falls due first is handled on the
    // way; the slack below allows for its beats).
    let deliver = sim.now + sim.latency;
    for _ in 0..1000 {
        if sim.now >= deliver {
            break;
        }
        sim.step_until(Some(deliver));
    }
    assert!(
        stale(&sim) - stale_before >= (n as u64 - 2),
        "the replay arrived as stale: {} stale over {} links",
        stale(&sim) - stale_before,
        sim.node(replayer).mesh.connections()
    );
    let after = verified(&sim);
    let replay_cost: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    // Only whatever else fell due in that instant (a beat or two) may have been checked.
    assert!(
        replay_cost <= 2 * n as u64,
        "the replay cost {replay_cost} checks"
    );
    // Steady state: over three liveness timeouts a node sees each other node beat nine
    // times (every third of the timeout, restated); one check per new beat, plus slack.
    let before = verified(&sim);
    sim.run_for(3 * LIVENESS_TIMEOUT);
    let after = verified(&sim);
    for j in sim.live() {
        let checks = after[j] - before[j];
        assert!(
            checks <= (n as u64 - 1) * 10,
            "node {j} checked {checks} signatures for {} beats",
            (n - 1) * 9
        );
    }
    eprintln!(
        "steady state: {} checks per node over 90 s for {} members",
        (after.iter().sum::<u64>() - before.iter().sum::<u64>()) / n as u64,
        n - 1
    );
}

/// The nodes that reported `id` down, and when.
fn downs_of(sim: &Sim, id: &weft_mesh::NodeId) -> Vec<(usize, Duration)> {
    let mut v = Vec::new();
    for j in sim.live() {
        for (t, e) in &sim.node(j).events {
            if *e == Event::Down(*id) {
                v.push((j, *t));
            }
        }
    }
    v
}

/// `n` nodes, converged and then a hundred seconds into steady state.
fn steady_mesh(n: usize) -> Sim {
    let mut sim = Sim::new(n, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    sim.run_for(Duration::from_secs(100));
    sim
}

/// A member not linked to `victim`, and its neighbours that are not the victim's either.
fn liar_and_targets(sim: &Sim, n: usize, victim: usize) -> (usize, Vec<usize>) {
    let liar = (0..n)
        .find(|l| *l != victim && !sim.connected(*l, victim))
        .expect("a node not linked to the victim");
    let theirs = sim.neighbours(victim);
    let targets: Vec<usize> = sim
        .neighbours(liar)
        .into_iter()
        .filter(|t| *t != victim && !theirs.contains(t))
        .collect();
    assert!(!targets.is_empty(), "the liar has no target");
    (liar, targets)
}

/// Rule (found by review): a member cannot smother a suspicion so that it never reaches the
/// member it names. One frame `[Alive(B[n-1]), Suspect(B[n]), Suspect(B[n-1])]` once made each
/// receiver take the suspicion and then replace its own queued `Suspect` with an `Alive`
/// "answer" built from the suspicion's own beat: the victim never heard it, never refuted, and
/// every receiver marked a live node down.
#[test]
fn a_suspicion_cannot_be_smothered_before_it_reaches_the_member_it_names() {
    let n = 60;
    let mut sim = steady_mesh(n);
    let victim = 41;
    let id = sim.node(victim).mesh.id();
    let (liar, targets) = liar_and_targets(&sim, n, victim);
    let version = sim.node(victim).mesh.record().version;
    let h = sim.node(victim).mesh.heartbeat();
    // Two beats the victim signed (the liar, as any neighbour of it, holds them).
    let b = |h| Beat::sign(&sim_identity(victim), version, h);
    let frame = Frame::Rumours(vec![
        Rumour::Alive(b(h - 1)),
        Rumour::Suspect(b(h)),
        Rumour::Suspect(b(h - 1)),
    ])
    .encode();
    for t in &targets {
        sim.send_raw_to(liar, *t, &frame);
    }
    sim.run_for(LIVENESS_TIMEOUT);
    let downs = downs_of(&sim, &id);
    assert!(
        downs.is_empty(),
        "a live node was marked down by one frame: {downs:?}"
    );
}

/// Rule (found by review): a member cannot keep a dead node alive by replaying the dead node's
/// own last beat just before the watchers' suspicion arrives. That made every node hold the beat
/// as heard lately, take the suspicion as premature, drop it for good, and keep the dead node
/// alive until the stale backstop (3 announce intervals).
#[test]
fn replaying_a_dead_nodes_last_beat_does_not_keep_it_alive() {
    let n = 60;
    let mut sim = steady_mesh(n);
    let (liar, dead) = (5, 30);
    let id = sim.node(dead).mesh.id();
    let version = sim.node(dead).mesh.record().version;
    // Killed right after a beat, once its neighbours have it.
    let h0 = sim.node(dead).mesh.heartbeat();
    sim.run_until(Duration::from_secs(20), |s| {
        s.node(dead).mesh.heartbeat() > h0
    })
    .expect("a beat");
    let h = sim.node(dead).mesh.heartbeat();
    let last_beat = sim.now;
    sim.run_for(Duration::from_secs(1));
    sim.kill(dead);
    let killed = sim.now;
    // 20 s after that beat, the liar spreads it as alive (the dead node did sign it).
    sim.run_for(Duration::from_secs(20) - (sim.now - last_beat));
    let beat = Beat::sign(&sim_identity(dead), version, h);
    sim.send_raw(liar, &Frame::Rumours(vec![Rumour::Alive(beat)]).encode());
    sim.run_until(3 * LIVENESS_TIMEOUT, |s| {
        held_everywhere(s, &id, false, &[])
    })
    .unwrap_or_else(|| {
        let alive = sim
            .live()
            .into_iter()
            .filter(|j| {
                sim.node(*j)
                    .mesh
                    .members()
                    .iter()
                    .any(|m| m.id == id && m.alive)
            })
            .count();
        panic!("{alive} nodes hold the dead node alive three liveness timeouts after the replay")
    });
    assert!(
        sim.now - killed <= 2 * LIVENESS_TIMEOUT,
        "down everywhere only {:?} after the kill",
        sim.now - killed
    );
}

/// Rule (found by review): the unauthenticated `Hello` does not make its receiver a watcher of
/// the node it names. A member once sent `Hello` naming a live node on its links, closed them,
/// and each receiver, having "lost" that node with no beat of its current version to carry,
/// suspected it locally (nothing to spread, nothing to refute) and marked it down.
#[test]
fn a_spoofed_hello_and_a_close_do_not_take_a_live_node_down() {
    let n = 60;
    let mut sim = steady_mesh(n);
    let victim = 41;
    let id = sim.node(victim).mesh.id();
    // The victim's periodic record refresh: non-neighbours hold no beat of the new version.
    let r = sim.node(victim).mesh.record().clone();
    sim.node_mut(victim).mesh.update(r);
    sim.drain_all();
    sim.run_for(Duration::from_secs(35));
    let (liar, targets) = liar_and_targets(&sim, n, victim);
    let hello = Frame::Hello {
        node: id,
        mesh_port: sim.node(victim).mesh.record().mesh_port,
    }
    .encode();
    for t in &targets {
        sim.send_raw_to(liar, *t, &hello);
    }
    sim.run_for(sim.latency * 2);
    for t in &targets {
        sim.close(liar, *t);
    }
    sim.run_for(2 * LIVENESS_TIMEOUT);
    let downs = downs_of(&sim, &id);
    assert!(downs.is_empty(), "a live node was marked down: {downs:?}");
}

/// Rule (found by review): one frame full of forged beats costs its receiver one signature
/// check, not one per beat: the rest of a frame is dropped at the first beat that fails.
#[test]
fn a_frame_of_forged_suspicions_costs_one_signature_check() {
    let mut sim = Sim::new(10, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    let (liar, victim) = (1, 5);
    let target = sim.neighbours(liar)[0];
    let id = sim.node(victim).mesh.id();
    let held = sim
        .node(target)
        .mesh
        .members()
        .into_iter()
        .find(|m| m.id == id)
        .expect("known");
    let forged = Beat {
        signature: [7; 64],
        ..Beat::sign(
            &sim_identity(victim),
            held.record.version,
            held.heartbeat + 1,
        )
    };
    let count = 40_000;
    for frame in [
        Frame::Rumours(vec![Rumour::Suspect(forged); count]),
        Frame::Rumours(vec![Rumour::Alive(forged); count]),
        Frame::SignedBeats(vec![forged; count]),
    ] {
        let before = sim.node(target).mesh.drops().verifications;
        sim.send_raw_to(liar, target, &frame.encode());
        let deliver = sim.now + sim.latency;
        while sim.now < deliver {
            sim.step_until(Some(deliver));
        }
        let checks = sim.node(target).mesh.drops().verifications - before;
        // One for the forged beat, and whatever genuine beats fell due meanwhile.
        assert!(checks <= 5, "{checks} signature checks for one frame");
    }
    assert!(rejected(&sim, Rejected::BadBeat) >= 3);
}

/// A record that does not decode to itself byte for byte (a certificate with NAT mappings but
/// no home relays yet reads back with an empty list) is still this node's own when it comes
/// back: the node does not outbid itself, and no one sees an identity clash.
#[test]
fn a_certified_record_coming_back_is_not_taken_for_another_daemons() {
    let mut sim = Sim::new(5, config(), one_earlier);
    sim.run_until(Duration::from_secs(60), Sim::converged)
        .expect("converges");
    let me = 2;
    let mut r = sim.node(me).mesh.record().clone();
    let ca = weft_mesh::AuthorityKey::from_seed(&[42; 32]);
    let block = "100.64.2.0/24".parse().expect("block");
    let cert = ca
        .issue(r.wireguard_key, vec![block], 1, u64::MAX)
        .expect("certificate");
    r.certificate = Some(Box::new(cert));
    r.observed = vec!["198.19.0.102:40000".parse().expect("endpoint")];
    r.homes = None;
    sim.node_mut(me).mesh.update(r);
    let v = sim.node(me).mesh.record().version;
    // Our own current record comes back from a neighbour, as a relayed copy would.
    let own = sim_identity(me).sign(sim.node(me).mesh.record());
    let frame = Frame::Records(vec![Ok(own.into())]).encode();
    let from = *sim.neighbours(me).first().expect("a neighbour");
    sim.send_raw_to(from, me, &frame);
    sim.run_for(2 * LIVENESS_TIMEOUT);
    assert_eq!(
        sim.node(me).mesh.record().version,
        v,
        "the node outbid itself"
    );
    assert_eq!(sim.node(me).mesh.identity_clash(), None);
    for j in sim.live() {
        assert!(
            !sim.node(j)
                .events
                .iter()
                .any(|(_, e)| matches!(e, Event::IdentityClash(_))),
            "node {j} saw a clash"
        );
    }
    assert_eq!(rejected(&sim, Rejected::IdentityClash), 0);
}
