//! Liveness at a bounded cost per node: beats go to a node's own connections, and only changes
//! (suspicions, refutations, members seen alive again) and each member's rare announce spread
//! through the mesh.
//!
//! Who decides that a member is down: nobody alone. A watcher (a peer connected to it, or one
//! whose connection to it broke) that hears no newer beat for the liveness timeout spreads a
//! suspicion carrying the newest beat of the member it holds, signed by the member; a node
//! takes it only when that beat is not older than its own and it has not heard that beat
//! lately, and marks the member down only if no newer beat, which only the member can sign,
//! arrives within the suspicion timeout. The member refutes a suspicion it hears with a new
//! beat, spread everywhere. A suspicion carrying the member's last beat also ends any replay of
//! older beats a member could have saved up.

use std::time::{Duration, Instant};

use tracing::debug;

use super::{CONNECTIONS_PER_NODE, ConnId, Event, Membership, STALE_ANNOUNCES, Transmit};
use crate::beat::{Beat, Rumour};
use crate::record::NodeId;
use crate::stats::Rejected;
use crate::wire::Frame;

/// Digest bytes a node aims to send per second: in a large mesh a full digest goes out less
/// often than every `digest_every` rounds, so that anti-entropy costs no more than this.
pub const DIGEST_BYTES_PER_SEC: usize = 2048;
/// Bytes of one digest entry.
const ENTRY_BYTES: usize = 20;
/// Announce bytes a node aims to send per second: every member's announce crosses every
/// connection about once, so in a large mesh each announces less often than
/// `announce_interval`.
pub const ANNOUNCE_BYTES_PER_SEC: usize = 4096;
/// Bytes of one rumour on the wire.
const RUMOUR_BYTES: usize = 85;

impl Membership {
    /// How long a suspicion waits for a refutation.
    fn suspicion_timeout(&self) -> Duration {
        self.config.liveness_timeout / 3
    }

    /// Rounds between digests: `digest_every`, or more when a digest of every member would
    /// cost more than [`DIGEST_BYTES_PER_SEC`].
    pub(super) fn digest_every(&self) -> u32 {
        let bytes = (self.known.len() + 1) * ENTRY_BYTES;
        let secs = bytes as f64 / DIGEST_BYTES_PER_SEC as f64;
        let rounds = (secs / self.config.gossip_interval.as_secs_f64().max(0.001)).ceil();
        (rounds.min(f64::from(u32::MAX)) as u32)
            .max(self.config.digest_every)
            .max(1)
    }

    /// How often members announce: `announce_interval`, or less often in a mesh so large
    /// that every member's announce crossing each of a node's connections would cost more than
    /// [`ANNOUNCE_BYTES_PER_SEC`]. Worked out from the member count alone, so that nodes of one
    /// mesh agree closely.
    pub(super) fn announce_interval(&self) -> Duration {
        let links = 2 * self.config.max_connections.max(1) - 1;
        let bytes = (self.known.len() + 1) * RUMOUR_BYTES * links;
        let secs = bytes as f64 / ANNOUNCE_BYTES_PER_SEC as f64;
        self.config
            .announce_interval
            .max(Duration::from_secs_f64(secs.min(1e9)))
    }

    /// Signs this node's next beat: sent to its connections, or spread through the mesh when
    /// its announce is due.
    pub(super) fn beat(&mut self, now: Instant) {
        self.heartbeat = self.heartbeat.wrapping_add(1);
        self.own_beat = Beat::sign(&self.identity, self.own.record.version, self.heartbeat);
        if now >= self.next_announce {
            self.next_announce = now + self.announce_interval();
            self.spread_own(now);
            return;
        }
        let frame = Frame::SignedBeats(vec![self.own_beat]).encode();
        for conn in self.ready() {
            self.out.push_back(Transmit {
                conn,
                frame: frame.clone(),
            });
        }
    }

    fn spread_own(&mut self, now: Instant) {
        self.spread_heartbeat = Some((self.heartbeat, now));
        self.spread(Rumour::Alive(self.own_beat), None);
    }

    /// Queues a rumour for every connection but the one it came from (sent at the next
    /// [`Membership::poll_transmit`]).
    /// An `Alive` never replaces a queued `Suspect` of the same life unless it is newer (a
    /// refutation): the suspicion must still reach the member, which alone can refute it.
    pub(super) fn spread(&mut self, r: Rumour, from: Option<ConnId>) {
        if let Some((Rumour::Suspect(s), _)) = self.rumours.get(&r.beat().node)
            && let Rumour::Alive(a) = r
            && a.version == s.version
            && a.heartbeat <= s.heartbeat
        {
            return;
        }
        self.rumours.insert(r.beat().node, (r, from));
    }

    /// `b` arrived on `conn`, from `peer` as its `Hello` said: if it is the peer's own beat,
    /// held here (so it verified), the connection is a watch of the peer (it is proven). A
    /// peer proving itself on more than [`CONNECTIONS_PER_NODE`] connections has this one
    /// closed.
    pub(super) fn watch_through(&mut self, conn: ConnId, peer: Option<NodeId>, b: &Beat) {
        if let Some(p) = peer
            && b.node == p.short()
            && self.known.get(&p).is_some_and(|k| k.beat == Some(*b))
            && let Some(c) = self.conns.get_mut(&conn)
            && !c.watch
        {
            c.watch = true;
            let held = self
                .conns
                .values()
                .filter(|c| c.proven() == Some(p))
                .count();
            if held > CONNECTIONS_PER_NODE {
                debug!(node = %p, ?conn, "a further connection of one node: closed");
                self.close(conn);
            }
        }
    }

    /// Turns the queued rumours into frames.
    pub(super) fn flush_rumours(&mut self) {
        let rumours = std::mem::take(&mut self.rumours);
        let ready = self.ready();
        for conn in ready {
            let batch: Vec<Rumour> = rumours
                .values()
                .filter(|(_, from)| *from != Some(conn))
                .map(|(r, _)| *r)
                .collect();
            for frame in super::digest::rumour_frames(batch) {
                self.out.push_back(Transmit { conn, frame });
            }
        }
    }

    /// A beat of a member, straight from a connection (`rumour` false) or spread as alive. One
    /// of its current version that is newer than the one held (checked before its signature)
    /// means the member is alive. It is passed on when it came as a rumour, and when it ends a
    /// suspicion or a down here. False when its signature fails.
    pub(super) fn heard(&mut self, now: Instant, from: ConnId, b: Beat, rumour: bool) -> bool {
        let Some(id) = self.by_short.get(&b.node).copied() else {
            return true;
        };
        let Some(k) = self.known.get_mut(&id) else {
            return true;
        };
        if k.signed.record.version != b.version || b.heartbeat <= k.heartbeat {
            return true;
        }
        self.drops.verifications += 1;
        if let Err(e) = b.verify(&id) {
            debug!(node = %id, error = %e, "beat refused");
            self.drops.count(Rejected::BadBeat);
            return false;
        }
        let (was_live, was_alive) = (k.live, k.alive());
        k.heartbeat = b.heartbeat;
        k.beat = Some(b);
        k.heard_at = now;
        k.live = !k.signed.record.left;
        let up = !was_alive && k.alive();
        let changed = was_live != k.live;
        self.note_liveness(id);
        let suspected = self.suspects.remove(&id).is_some();
        if changed {
            self.holds_dirty = true;
        }
        if up {
            debug!(node = %id, "member alive again");
            self.events.push_back(Event::Up(id));
        }
        if rumour || suspected || !was_live {
            self.spread(Rumour::Alive(b), Some(from));
        }
        true
    }

    /// A suspicion of a member (or of this node: then it is refuted). False when its
    /// signature fails.
    pub(super) fn suspicion(&mut self, now: Instant, from: ConnId, b: Beat) -> bool {
        if b.node == self.me.short() {
            return self.suspected_here(now, b);
        }
        let Some(id) = self.by_short.get(&b.node).copied() else {
            return true;
        };
        let half = self.config.liveness_timeout / 2;
        let suspected = self.suspects.contains_key(&id);
        let Some(k) = self.known.get_mut(&id) else {
            return true;
        };
        if k.signed.record.version != b.version || !k.live {
            return true;
        }
        if k.suspicion
            .is_some_and(|(h, at)| h == b.heartbeat && now.saturating_duration_since(at) < half)
        {
            return true;
        }
        let recent = now.saturating_duration_since(k.heard_at) < half;
        if b.heartbeat < k.heartbeat {
            // The sender lacks a newer beat we heard alive lately (not one a suspicion
            // brought): that refutes the suspicion.
            if recent
                && !suspected
                && let Some(newer) = k.beat
            {
                k.suspicion = Some((b.heartbeat, now));
                self.spread(Rumour::Alive(newer), None);
            }
            return true;
        }
        let held = k.beat.is_some_and(|x| x == b);
        if !held {
            self.drops.verifications += 1;
            if let Err(e) = b.verify(&id) {
                debug!(node = %id, error = %e, "suspicion refused");
                self.drops.count(Rejected::BadBeat);
                return false;
            }
            k.heartbeat = b.heartbeat;
            k.beat = Some(b);
        }
        k.suspicion = Some((b.heartbeat, now));
        // Passed on either way, so that it reaches the member, which alone can refute it. If
        // this node heard that very beat lately, the sender's silence may be its own, so the
        // wait starts only half a timeout after that hearing; it is never dropped, or a member
        // replaying a dead node's last beat would keep it alive.
        if !suspected {
            let since = if held && recent {
                k.heard_at + half
            } else {
                now
            };
            debug!(node = %id, name = %k.signed.record.name, heartbeat = b.heartbeat, "member suspected by another");
            self.suspects.insert(id, since);
        }
        self.spread(Rumour::Suspect(b), Some(from));
        true
    }

    /// Someone suspects this node: a new beat, spread everywhere, refutes it. Only a suspicion
    /// carrying a beat this node signed counts, and one that only repeats the beat of the last
    /// refutation is answered at most once per half liveness timeout.
    /// A repeat inside the window is answered when the window ends, so that a node that missed
    /// the refutation and takes the repeat still hears one in time.
    fn suspected_here(&mut self, now: Instant, b: Beat) -> bool {
        if b.version != self.own.record.version {
            return true;
        }
        let window = self.config.liveness_timeout / 2;
        let later = match self.spread_heartbeat {
            Some((h, at)) if b.heartbeat <= h && now.saturating_duration_since(at) < window => {
                Some(at + window)
            }
            _ => None,
        };
        if later.is_some() && self.refute_at.is_some() {
            return true;
        }
        self.drops.verifications += 1;
        if b.verify(&self.me).is_err() {
            self.drops.count(Rejected::BadBeat);
            return false;
        }
        if later.is_some() {
            self.refute_at = later;
            return true;
        }
        debug!(
            heartbeat = b.heartbeat,
            "suspected by a neighbour: refuting"
        );
        self.refute(now);
        true
    }

    /// A new beat, spread everywhere.
    fn refute(&mut self, now: Instant) {
        self.refute_at = None;
        self.heartbeat = self.heartbeat.wrapping_add(1);
        self.own_beat = Beat::sign(&self.identity, self.own.record.version, self.heartbeat);
        self.spread_own(now);
    }

    /// Raises a suspicion of its own: this node watched `id` and heard nothing newer.
    fn suspect(&mut self, now: Instant, id: NodeId) {
        let Some(k) = self.known.get_mut(&id) else {
            return;
        };
        // Never without a beat to carry: a suspicion the member cannot hear cannot be refuted.
        let Some(b) = k.beat else {
            return;
        };
        debug!(node = %id, name = %k.signed.record.name, heartbeat = k.heartbeat, "member suspected: no beat for the liveness timeout");
        k.suspicion = Some((b.heartbeat, now));
        self.suspects.insert(id, now);
        self.spread(Rumour::Suspect(b), None);
    }

    /// Marks `id` down.
    fn down(&mut self, id: NodeId, why: &'static str) {
        self.lost.remove(&id);
        self.suspects.remove(&id);
        let Some(k) = self.known.get_mut(&id) else {
            return;
        };
        if !k.live {
            return;
        }
        let was = k.alive();
        k.live = false;
        if was {
            debug!(node = %id, name = %k.signed.record.name, why, "member down");
            self.events.push_back(Event::Down(id));
        }
        self.holds_dirty = true;
        self.note_liveness(id);
    }

    /// Each round: suspicions that ran out, and watched members silent for the timeout.
    pub(super) fn check_liveness(&mut self, now: Instant) {
        if self.refute_at.is_some_and(|t| now >= t) {
            self.refute(now);
        }
        let timeout = self.config.liveness_timeout;
        let wait = self.suspicion_timeout();
        let expired: Vec<NodeId> = self
            .suspects
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) > wait)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.down(id, "suspicion not refuted");
        }
        let mut silent = Vec::new();
        for c in self.conns.values() {
            let (Some(id), true) = (c.peer, c.watch) else {
                continue;
            };
            if let Some(k) = self.known.get(&id)
                && k.live
                && !self.suspects.contains_key(&id)
                && now.saturating_duration_since(k.heard_at.max(c.since)) > timeout
            {
                silent.push(id);
            }
        }
        // A lost watch ends only in a suspicion (refuted at once if the member is alive) or when
        // the member is watched again, down, or in a new life: a newer beat relayed by someone
        // else proves only that the member was alive when it signed it.
        let mut settled = Vec::new();
        for (id, version) in &self.lost {
            let watched = self.conns.values().any(|c| c.peer == Some(*id) && c.watch);
            match self.known.get(id) {
                Some(k)
                    if k.live
                        && k.signed.record.version == *version
                        && !watched
                        && !self.suspects.contains_key(id) =>
                {
                    if now.saturating_duration_since(k.heard_at) > timeout {
                        silent.push(*id);
                        settled.push(*id);
                    }
                }
                _ => settled.push(*id),
            }
        }
        for id in settled {
            self.lost.remove(&id);
        }
        silent.sort();
        silent.dedup();
        for id in silent {
            self.suspect(now, id);
        }
    }

    /// Every few rounds: members not heard alive at all for [`STALE_ANNOUNCES`] announce
    /// intervals are down (the backstop for a member that died unwatched).
    pub(super) fn sweep(&mut self, now: Instant) {
        let stale = self.announce_interval() * STALE_ANNOUNCES;
        let gone: Vec<NodeId> = self
            .known
            .iter()
            .filter(|(_, k)| k.live && now.saturating_duration_since(k.heard_at) > stale)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.down(id, "not heard for the stale horizon");
        }
    }
}
