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

/// b with one connection that has said hello as node 9.
fn greeted() -> (Membership, ConnId, Instant) {
    let mut b = node(2);
    let now = Instant::now();
    let conn = ConnId(1);
    b.handle_connected(now, conn);
    let hello = Frame::Hello {
        node: Identity::from_wireguard_key(&[9; 32]).id(),
        mesh_port: 6783,
    };
    b.handle_frame(now, conn, &hello.encode());
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
