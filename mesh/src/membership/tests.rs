#![allow(
    clippy::disallowed_methods,
    reason = "a test starts its virtual clock from a real instant"
)]

use super::*;
use crate::record::tests::record;
use crate::stats::Rejected;

/// A `Records` frame of `rs`.
fn records(rs: &[&SignedRecord]) -> Vec<u8> {
    Frame::Records(rs.iter().map(|r| Ok((*r).clone().into())).collect()).encode()
}

fn node(seed: u8) -> Membership {
    let id = Identity::from_wireguard_key(&[seed; 32]);
    Membership::new(
        Instant::now(),
        id,
        record(&format!("n{seed}"), 1),
        MeshConfig::default(),
        1,
    )
}

/// Connects `conn` to `b` and says hello on it as the node of key `[key; 32]`.
fn connect_as(b: &mut Membership, now: Instant, conn: ConnId, key: u8) {
    b.handle_connected(now, conn);
    let hello = Frame::Hello {
        node: Identity::from_wireguard_key(&[key; 32]).id(),
        mesh_port: 6783,
    };
    b.handle_frame(now, conn, &hello.encode());
}

/// b with one connection that has said hello as node 9.
fn greeted() -> (Membership, ConnId, Instant) {
    let mut b = node(2);
    let now = Instant::now();
    let conn = ConnId(1);
    connect_as(&mut b, now, conn, 9);
    while b.poll_transmit().is_some() {}
    (b, conn, now)
}

#[test]
fn forged_records_are_refused_and_counted() {
    let (mut b, conn, now) = greeted();
    let c = Identity::from_wireguard_key(&[3; 32]);
    let d = Identity::from_wireguard_key(&[4; 32]);
    // c signs a record and presents it as d's.
    let mut forged = c.sign(&record("d", 5));
    forged.signer = d.id();
    let mut w = crate::wire::Writer::default();
    w.u8(2);
    w.u16(1);
    forged.encode(&mut w);
    b.handle_frame(now, conn, &w.into_bytes());
    assert_eq!(b.drops().unauthenticated, 1);
    // Bound to c's WireGuard key, it is refused before any signature check.
    assert_eq!(b.drops().rejected.get(Rejected::UnboundKey), 1);
    assert_eq!(b.drops().verifications, 0);
    assert!(b.members().is_empty());
    assert_eq!(b.poll_transmit(), None, "nothing forwarded");
}

#[test]
fn an_older_version_never_replaces_a_newer_one() {
    let (mut b, conn, now) = greeted();
    let c = Identity::from_wireguard_key(&[3; 32]);
    let v2 = c.sign(&record("c-new", 2));
    let v1 = c.sign(&record("c-old", 1));
    b.handle_frame(now, conn, &records(&[&v2]));
    b.handle_frame(now, conn, &records(&[&v1]));
    b.handle_frame(now, conn, &records(&[&v1]));
    let m = b.members();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].record.name, "c-new");
    assert_eq!(b.drops().stale, 2);
    assert_eq!(b.poll_event(), Some(Event::Joined(c.id())));
    assert_eq!(b.poll_event(), None);
}

#[test]
fn garbage_and_frames_before_hello_are_counted_and_the_link_stays() {
    let mut b = node(2);
    let now = Instant::now();
    b.handle_connected(now, ConnId(1));
    b.handle_frame(now, ConnId(1), &Frame::Beats(vec![]).encode());
    assert_eq!(b.drops().unexpected, 1);
    for junk in [
        &b""[..],
        b"\x02\x00\x05",
        b"GET / HTTP/1.1",
        &[3, 7, 0, 0, 0, 0],
    ] {
        b.handle_frame(now, ConnId(1), junk);
    }
    assert_eq!(b.drops().malformed, 4);
    assert_eq!(b.connections(), 1);
}

#[test]
fn its_own_current_record_coming_back_changes_nothing() {
    let (mut b, conn, now) = greeted();
    let current = b.own.clone();
    for _ in 0..3 {
        b.handle_frame(now, conn, &records(&[&current]));
    }
    assert_eq!(b.record().version, current.record.version, "no new version");
    assert_eq!(b.poll_transmit(), None, "nothing pushed");
}

#[test]
fn a_restarted_node_outdoes_the_records_of_its_earlier_life() {
    let (mut b, conn, now) = greeted();
    // Someone still holds b's record from a life with a higher version.
    let b_id = Identity::from_wireguard_key(&[2; 32]);
    let old = b_id.sign(&record("n2", 40));
    b.handle_frame(now, conn, &records(&[&old]));
    assert_eq!(b.record().version, 41);
    let Some(t) = b.poll_transmit() else {
        panic!("the new record is pushed")
    };
    let Ok(Frame::Records(rs)) = Frame::decode(&t.frame) else {
        panic!("records")
    };
    assert_eq!(rs[0].as_ref().map(|r| r.record().version), Ok(41));
}

#[test]
fn mesh_address_follows_the_region() {
    let me = record("a", 1);
    let mut peer = record("b", 1);
    peer.private_address = Some("198.18.1.1".parse().unwrap());
    peer.public_address = Some("198.19.0.1".parse().unwrap());
    assert_eq!(
        mesh_address(&me, &peer),
        Some("198.18.1.1:6783".parse().unwrap())
    );
    peer.region = Some("us-east".into());
    assert_eq!(
        mesh_address(&me, &peer),
        Some("198.19.0.1:6783".parse().unwrap())
    );
    peer.public_address = None;
    assert_eq!(
        mesh_address(&me, &peer),
        Some("198.18.1.1:6783".parse().unwrap())
    );
}

/// Everything `m` wants dialled now.
fn dials(m: &mut Membership) -> Vec<SocketAddr> {
    std::iter::from_fn(|| m.poll_dial()).collect()
}

#[test]
fn a_thousand_bootstrap_addresses_are_dialled_a_few_at_a_time_never_all_at_once() {
    let mut a = node(1);
    let cap = MeshConfig::default().max_connections;
    let many: Vec<SocketAddr> = (0..1000u32)
        .map(|i| SocketAddr::from(([198, 18, (i / 250) as u8, (i % 250 + 1) as u8], 6783)))
        .collect();
    a.join(&many);
    let first = dials(&mut a);
    assert!(
        !first.is_empty() && first.len() <= cap,
        "join dialled {} of 1000 addresses (at most {cap} wanted)",
        first.len()
    );
    assert!(first.iter().all(|d| many.contains(d)), "{first:?}");
    // With no connection, each dial round tries a few more, still bounded, and over rounds
    // not always the same ones.
    let mut now = Instant::now();
    let mut tried: BTreeSet<SocketAddr> = first.into_iter().collect();
    for round in 0..20 {
        now += MeshConfig::default().dial_interval * 2;
        a.handle_timeout(now);
        let d = dials(&mut a);
        assert!(d.len() <= cap + 1, "round {round} dialled {}", d.len());
        tried.extend(d);
    }
    assert!(tried.len() > cap, "only {tried:?} were ever tried");
    // One address: dialled at once, as before.
    let mut b = node(2);
    b.join(&many[..1]);
    assert_eq!(dials(&mut b), many[..1].to_vec());
}

/// Rule: a suspicion counts only with a beat its subject signed: one forged (signed by the
/// sender, or with a raised counter) is refused and counted, passed on to nobody, and the
/// member stays alive past the suspicion timeout; a genuine one takes it down unless refuted.
#[test]
fn a_suspicion_with_a_forged_beat_is_refused_and_a_genuine_one_unrefuted_takes_the_member_down() {
    let (mut b, conn, now) = greeted();
    let c = Identity::from_wireguard_key(&[3; 32]);
    let liar = Identity::from_wireguard_key(&[9; 32]);
    b.handle_frame(now, conn, &records(&[&c.sign(&record("c", 4))]));
    while b.poll_transmit().is_some() {}
    let genuine = Beat::sign(&c, 4, 7);
    let forged = [
        Beat {
            node: c.id().short(),
            ..Beat::sign(&liar, 4, 7)
        },
        Beat {
            heartbeat: 8,
            ..genuine
        },
    ];
    for f in forged {
        b.handle_frame(
            now,
            conn,
            &Frame::Rumours(vec![Rumour::Suspect(f)]).encode(),
        );
    }
    assert_eq!(b.drops().rejected.get(Rejected::BadBeat), 2);
    assert_eq!(b.poll_transmit(), None, "nothing passed on");
    let later = now + MeshConfig::default().liveness_timeout;
    b.handle_timeout(later);
    assert!(b.members()[0].alive, "a forged suspicion took it down");
    // The genuine one, unrefuted for a third of the timeout: down.
    b.handle_frame(
        later,
        conn,
        &Frame::Rumours(vec![Rumour::Suspect(genuine)]).encode(),
    );
    assert_eq!(b.members()[0].heartbeat, 7);
    let after = later + MeshConfig::default().liveness_timeout / 3 + Duration::from_secs(2);
    b.handle_timeout(after);
    assert!(
        !b.members()[0].alive,
        "an unrefuted suspicion left it alive"
    );
    assert!(std::iter::from_fn(|| b.poll_event()).any(|e| e == Event::Down(c.id())));
    // Its refutation, a newer beat it signed, brings it back.
    b.handle_frame(
        after,
        conn,
        &Frame::Rumours(vec![Rumour::Alive(Beat::sign(&c, 4, 8))]).encode(),
    );
    assert!(b.members()[0].alive);
}

#[test]
fn an_observed_endpoint_is_heard_only_with_its_members_signature_for_this_node() {
    let (mut b, conn, now) = greeted();
    let me = Identity::from_wireguard_key(&[2; 32]).id();
    let nine = Identity::from_wireguard_key(&[9; 32]);
    let liar = Identity::from_wireguard_key(&[3; 32]);
    let at: SocketAddr = "198.19.0.101:51820".parse().unwrap();
    let mut t = now;
    let mut send = |b: &mut Membership, o: crate::Observation| {
        t += OBSERVED_MIN_GAP;
        b.handle_frame(t, conn, &Frame::Observed(o).encode());
    };
    // Not yet a member: not heard.
    send(&mut b, crate::Observation::sign(&nine, &me, at, 1));
    assert_eq!(b.drops().rejected.get(Rejected::Unproven), 1);
    b.handle_frame(now, conn, &records(&[&nine.sign(&record("n9", 1))]));
    b.handle_frame(now, conn, &records(&[&liar.sign(&record("liar", 1))]));
    while b.poll_event().is_some() {}
    // A member saying hello as node 9 and relaying its beat (what any member can do) still
    // cannot sign as node 9: its report in 9's name is refused.
    let mut forged = crate::Observation::sign(&liar, &me, at, 2);
    forged.by = nine.id();
    send(&mut b, forged);
    // Node 9's genuine report for another node is no report for this one.
    let other = Identity::from_wireguard_key(&[4; 32]).id();
    send(&mut b, crate::Observation::sign(&nine, &other, at, 3));
    assert_eq!(b.drops().rejected.get(Rejected::BadSignature), 2);
    assert_eq!(b.poll_event(), None);
    send(&mut b, crate::Observation::sign(&nine, &me, at, 4));
    assert_eq!(
        b.poll_event(),
        Some(Event::Observed {
            by: nine.id(),
            endpoint: at,
            at_ms: 4
        })
    );
    // A flood on one connection costs one check per OBSERVED_MIN_GAP; the rest is counted.
    let before = b.drops().verifications;
    for n in 0..100 {
        b.handle_frame(
            t,
            conn,
            &Frame::Observed(crate::Observation::sign(&nine, &me, at, 10 + n)).encode(),
        );
    }
    assert_eq!(b.poll_event(), None);
    assert_eq!(b.drops().rejected.get(Rejected::TooSoon), 100);
    assert_eq!(b.drops().verifications, before);
    // b tells node 9 only once 9 proved itself on the connection (a beat it signed came on
    // it), and signs the report for node 9.
    assert!(!b.tell_observed(nine.id(), at, 98));
    b.handle_frame(
        t,
        conn,
        &Frame::SignedBeats(vec![Beat::sign(&nine, 1, 1)]).encode(),
    );
    while b.poll_transmit().is_some() {}
    assert!(b.tell_observed(nine.id(), at, 99));
    let sent = b.poll_transmit().expect("a frame");
    assert_eq!(sent.conn, conn);
    let Ok(Frame::Observed(o)) = Frame::decode(&sent.frame) else {
        panic!("an observation");
    };
    assert_eq!((o.by, o.endpoint, o.at_ms), (me, at, 99));
    assert!(o.verify(&nine.id()).is_ok());
    assert!(!b.tell_observed(other, at, 100), "no connection to it");
}

/// Everything `m` sends now.
fn sent(m: &mut Membership) -> Vec<Transmit> {
    std::iter::from_fn(|| m.poll_transmit()).collect()
}

/// The records and the bytes of every `Records` frame in `out`.
fn records_in(out: &[Transmit]) -> (usize, usize) {
    out.iter()
        .filter_map(|t| match Frame::decode(&t.frame) {
            Ok(Frame::Records(rs)) => Some((rs.len(), t.frame.len())),
            _ => None,
        })
        .fold((0, 0), |(n, b), (rn, rb)| (n + rn, b + rb))
}

/// `who`'s record and newest beat come on a new connection `conn` after its hello: the peer
/// has proved who it is there.
fn prove(m: &mut Membership, now: Instant, conn: ConnId, who: &Identity) {
    m.handle_connected(now, conn);
    let hello = Frame::Hello {
        node: who.id(),
        mesh_port: 6783,
    };
    m.handle_frame(now, conn, &hello.encode());
    let name = format!("p{}", who.id().short().0);
    m.handle_frame(now, conn, &records(&[&who.sign(&record(&name, 1))]));
    let beat = Frame::SignedBeats(vec![Beat::sign(who, 1, 1)]);
    m.handle_frame(now, conn, &beat.encode());
    while m.poll_transmit().is_some() {}
}

/// Rule: a digest is answered for each member it names at most once, however often it names
/// it: the answer to a member named a thousand times is the answer to it named once.
#[test]
fn a_digest_naming_one_member_many_times_is_answered_as_if_it_named_it_once() {
    let c = Identity::from_wireguard_key(&[3; 32]);
    let rc = c.sign(&record("c", 4));
    let entry = Entry {
        node: c.id().short(),
        version: 0,
        heartbeat: 0,
    };
    let answer = |n: usize| {
        let (mut b, conn, now) = greeted();
        b.handle_frame(now, conn, &records(&[&rc]));
        while b.poll_transmit().is_some() {}
        let digest = Frame::Digest {
            reply: false,
            entries: vec![entry; n],
        };
        b.handle_frame(now, conn, &digest.encode());
        let out = sent(&mut b);
        (
            records_in(&out),
            out.iter().map(|t| t.frame.len()).sum::<usize>(),
        )
    };
    let once = answer(1);
    assert_eq!(once.0.0, 2, "c's record and b's own");
    assert_eq!(answer(1000), once);
}

/// Rule: one connection gets at most one digest answer per gossip interval; digests it sends
/// sooner (an empty one asks for the whole state) are read but not answered.
#[test]
fn empty_digests_on_one_connection_get_one_full_answer_per_gossip_interval() {
    let (mut b, conn, now) = greeted();
    let c = Identity::from_wireguard_key(&[3; 32]);
    b.handle_frame(now, conn, &records(&[&c.sign(&record("c", 4))]));
    while b.poll_transmit().is_some() {}
    let empty = |reply| {
        Frame::Digest {
            reply,
            entries: vec![],
        }
        .encode()
    };
    b.handle_frame(now, conn, &empty(true));
    let first = sent(&mut b);
    assert_eq!(
        records_in(&first).0,
        2,
        "the whole state: c's record and b's own"
    );
    let interval = MeshConfig::default().gossip_interval;
    let mut more = Vec::new();
    for k in 0..100u32 {
        b.handle_frame(now + interval * k / 100, conn, &empty(k % 2 == 0));
        more.extend(sent(&mut b));
    }
    assert_eq!(
        more.iter().map(|t| t.frame.len()).sum::<usize>(),
        0,
        "{} more frames within the interval",
        more.len()
    );
    // A gossip interval later, it is answered again.
    b.handle_frame(now + interval, conn, &empty(false));
    assert_eq!(records_in(&sent(&mut b)).0, 2);
}

/// Rule: of the records of one signer in a frame only the newest is checked, and the first
/// record whose signature fails ends the frame: a frame of forged records costs one check.
#[test]
fn a_frame_of_a_thousand_forged_newer_records_of_one_member_costs_one_signature_check() {
    let (mut b, conn, now) = greeted();
    let c = Identity::from_wireguard_key(&[3; 32]);
    b.handle_frame(now, conn, &records(&[&c.sign(&record("c", 1))]));
    while b.poll_transmit().is_some() {}
    while b.poll_event().is_some() {}
    let forged: Vec<SignedRecord> = (2..1002)
        .map(|v| {
            let mut s = c.sign(&record("c", v));
            s.signature[0] ^= 1;
            s
        })
        .collect();
    let before = b.drops().verifications;
    b.handle_frame(now, conn, &records(&forged.iter().collect::<Vec<_>>()));
    assert_eq!(b.drops().verifications - before, 1);
    assert_eq!(b.members()[0].record.version, 1);
    assert_eq!(b.poll_event(), None);
    assert_eq!(b.poll_transmit(), None, "nothing forwarded");
    // After a forged record, the rest of the frame is not checked, valid or not.
    let d = Identity::from_wireguard_key(&[4; 32]);
    let before = b.drops().verifications;
    b.handle_frame(
        now,
        conn,
        &records(&[&forged[0], &d.sign(&record("d", 1)), &forged[1]]),
    );
    assert_eq!(b.drops().verifications - before, 1);
    assert_eq!(b.members().len(), 1, "d was not applied");
}

/// Rule: a member's many versions of its own record in one frame cost one check, and only
/// the newest is applied (one event) and forwarded.
#[test]
fn a_frame_of_a_thousand_valid_versions_of_one_member_applies_and_forwards_only_the_newest() {
    let (mut b, conn, now) = greeted();
    let other = ConnId(2);
    connect_as(&mut b, now, other, 8);
    while b.poll_transmit().is_some() {}
    let c = Identity::from_wireguard_key(&[3; 32]);
    let versions: Vec<SignedRecord> = (1..=1000).map(|v| c.sign(&record("c", v))).collect();
    let before = b.drops().verifications;
    b.handle_frame(now, conn, &records(&versions.iter().collect::<Vec<_>>()));
    assert_eq!(b.drops().verifications - before, 1);
    assert_eq!(b.members()[0].record.version, 1000);
    let events: Vec<Event> = std::iter::from_fn(|| b.poll_event()).collect();
    assert_eq!(events, vec![Event::Joined(c.id())]);
    let out = sent(&mut b);
    assert_eq!(out.len(), 1, "one frame forwarded");
    assert_eq!(out[0].conn, other);
    let Ok(Frame::Records(rs)) = Frame::decode(&out[0].frame) else {
        panic!("records")
    };
    let forwarded: Vec<u64> = rs
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|r| r.record().version))
        .collect();
    assert_eq!(forwarded, vec![1000]);
}

/// From the review: connections that never said who they are must not stop a node dialling
/// the members it knows.
#[test]
fn connections_that_never_proved_who_they_are_do_not_stop_a_node_dialling() {
    let (mut b, conn, mut now) = greeted();
    for i in 0..10u8 {
        let m = Identity::from_wireguard_key(&[10 + i; 32]);
        b.handle_frame(
            now,
            conn,
            &records(&[&m.sign(&record(&format!("m{i}"), 1))]),
        );
    }
    for c in 100..=103 {
        b.handle_connected(now, ConnId(c));
    }
    b.handle_disconnected(conn);
    while b.poll_transmit().is_some() {}
    let _ = dials(&mut b);
    let mut dialled = Vec::new();
    for _ in 0..20 {
        now += MeshConfig::default().dial_interval;
        b.handle_timeout(now);
        dialled.extend(dials(&mut b));
    }
    assert!(
        !dialled.is_empty(),
        "no dial with only unproven connections"
    );
}

/// Rule: beyond twice `max_connections`, a node closes first an unproven connection that
/// has had a dial interval to prove itself (the oldest), then a third connection of one
/// node, and keeps its proven peers.
#[test]
fn a_full_node_closes_stale_unproven_and_duplicate_connections_before_proven_ones() {
    let mut b = node(2);
    let now = Instant::now();
    let cap = 2 * MeshConfig::default().max_connections;
    let peers: Vec<Identity> = (0..4u8)
        .map(|i| Identity::from_wireguard_key(&[20 + i; 32]))
        .collect();
    for (i, p) in peers.iter().enumerate() {
        prove(&mut b, now, ConnId(10 + i as u64), p);
    }
    for c in 0..(cap as u64 - 4) {
        b.handle_connected(now, ConnId(100 + c));
    }
    while b.poll_transmit().is_some() {}
    assert_eq!(b.connections(), cap);
    assert_eq!(b.poll_close(), None);
    // A newcomer after the unproven had their chance: the oldest unproven goes, not a peer.
    let later = now + MeshConfig::default().dial_interval * 2;
    b.handle_connected(later, ConnId(200));
    assert_eq!(b.poll_close(), Some(ConnId(100)));
    assert_eq!(b.poll_close(), None);
    assert_eq!(b.connections(), cap);
    assert!(
        sent(&mut b).iter().any(|t| t.conn == ConnId(200)),
        "greeted"
    );
    // One node proving itself on a third connection: that one is closed.
    prove(&mut b, later, ConnId(300), &peers[0]);
    prove(&mut b, later, ConnId(301), &peers[0]);
    let closed: Vec<ConnId> = std::iter::from_fn(|| b.poll_close()).collect();
    assert!(closed.contains(&ConnId(301)), "{closed:?}");
    assert!(
        (10..14).all(|c| !closed.contains(&ConnId(c))),
        "a proven peer was closed: {closed:?}"
    );
}

/// Rule: the connection cap holds at once, not at the next dial tick: a flood of
/// connections costs at most twice `max_connections` of them, and the refused ones are
/// never greeted.
#[test]
fn a_thousand_connections_at_once_leave_at_most_twice_max_connections() {
    let (mut b, _, now) = greeted();
    let cap = 2 * MeshConfig::default().max_connections;
    let mut transmits = 0;
    for c in 0..1000 {
        b.handle_connected(now, ConnId(1000 + c));
        transmits += sent(&mut b).len();
    }
    assert!(b.connections() <= cap, "{} connections", b.connections());
    assert!(transmits <= 3 * cap, "{transmits} transmits");
}

/// Rule: a node full of proven peers still lets a newcomer in while it holds more proven
/// peers than it dials: the newest of them is closed (it knows the mesh and dials
/// elsewhere), so a node that joins through this one alone is greeted and learns the mesh.
#[test]
fn a_newcomer_to_a_node_full_of_proven_peers_takes_the_newest_spare_slot() {
    let mut b = node(2);
    let mut now = Instant::now();
    let cap = 2 * MeshConfig::default().max_connections;
    for i in 0..cap as u8 {
        now += Duration::from_millis(10);
        prove(
            &mut b,
            now,
            ConnId(10 + u64::from(i)),
            &Identity::from_wireguard_key(&[30 + i; 32]),
        );
    }
    assert_eq!(b.connections(), cap);
    assert_eq!(b.poll_close(), None);
    b.handle_connected(now, ConnId(100));
    assert_eq!(
        b.poll_close(),
        Some(ConnId(10 + cap as u64 - 1)),
        "the newest proven"
    );
    assert!(
        sent(&mut b).iter().any(|t| t.conn == ConnId(100)),
        "greeted"
    );
    assert_eq!(b.connections(), cap);
}
