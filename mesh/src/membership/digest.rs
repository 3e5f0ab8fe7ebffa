//! Anti-entropy: a digest names every member held with its version and heartbeat; the answer
//! carries whatever the other side lacks (records, then signed beats), cut into frames of at
//! most [`FRAME_BUDGET`] bytes so that a full-state answer to a new node always decodes.
//!
//! A digest costs its sender 20 bytes a member, or nothing (an empty one asks for every
//! record), and its answer can be the whole state, so answers are bounded: each member is
//! answered at most once per digest however often it is named, and each connection gets at
//! most one answer (records, beats and a digest back) per gossip interval. A digest sooner on
//! the same connection is read (it can still show this node caught up) but not answered, and
//! no frame is encoded for it. Honest peers send one digest on connecting, one in answer, and one
//! every `digest_every` rounds, so what goes unanswered is a repeat of what was just answered,
//! and the next periodic digest repairs anything else.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tracing::trace;

use super::{ConnId, Membership, Transmit};
use crate::beat::{Beat, Rumour};
use crate::record::SignedRecord;
use crate::wire::{Entry, Frame};

/// The most record or beat bytes one frame of an answer carries: far under the 4 MiB frame
/// limit, so a frame never stops decoding however large the mesh.
pub(crate) const FRAME_BUDGET: usize = 256 << 10;
/// The most members a node holds whatever its configuration: a digest of them (20 bytes
/// each) stays one frame under the frame limit.
pub const MAX_MEMBERS_LIMIT: usize = 100_000;
/// Bytes of one signed beat on the wire.
const BEAT_BYTES: usize = 84;
/// The most records one `Records` frame can count.
const MAX_RECORDS: usize = u16::MAX as usize;

/// `items` as frames of at most [`FRAME_BUDGET`] item bytes and `max_count` items each.
fn chunks<T>(
    items: Vec<T>,
    size: impl Fn(&T) -> usize,
    max_count: usize,
    make: impl Fn(Vec<T>) -> Frame,
) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut part = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        if !part.is_empty() && (bytes + n > FRAME_BUDGET || part.len() >= max_count) {
            frames.push(make(std::mem::take(&mut part)).encode());
            bytes = 0;
        }
        bytes += n;
        part.push(item);
    }
    if !part.is_empty() {
        frames.push(make(part).encode());
    }
    frames
}

/// Records as `Records` frames of bounded size.
pub(super) fn record_frames(records: Vec<Arc<SignedRecord>>) -> Vec<Vec<u8>> {
    chunks(
        records,
        |r| 32 + 2 + r.body.len() + 64,
        MAX_RECORDS,
        |part| Frame::Records(part.into_iter().map(|s| Ok(s.into())).collect()),
    )
}

/// Rumours as `Rumours` frames of bounded size.
pub(super) fn rumour_frames(rumours: Vec<Rumour>) -> Vec<Vec<u8>> {
    if rumours.is_empty() {
        return Vec::new();
    }
    chunks(rumours, |_| BEAT_BYTES + 1, usize::MAX, Frame::Rumours)
}

/// Beats as `SignedBeats` frames of bounded size.
pub(super) fn beat_frames(beats: Vec<Beat>) -> Vec<Vec<u8>> {
    chunks(beats, |_| BEAT_BYTES, usize::MAX, Frame::SignedBeats)
}

impl Membership {
    /// Answers a digest with what the sender lacks, and with our own digest when asked or when
    /// the sender holds something we lack. Nothing in a digest changes liveness: its
    /// heartbeats are the sender's word, not the members'. Only this node's own heartbeat is
    /// compared (its newest beat goes back when the sender's is older). At most one answer per
    /// gossip interval on a connection, each member in it at most once (see the module doc).
    pub(super) fn handle_digest(
        &mut self,
        now: Instant,
        conn: ConnId,
        reply: bool,
        entries: &[Entry],
    ) {
        let interval = self.config.gossip_interval;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let answer = c
            .answered_at
            .is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if answer {
            c.answered_at = Some(now);
        } else {
            trace!(
                ?conn,
                "digest within a gossip interval of the last answered: not answered"
            );
        }
        let mut records = Vec::new();
        let mut beats = Vec::new();
        let mut seen = HashSet::with_capacity(entries.len());
        let mut they_know_more = false;
        let me = self.me.short();
        for e in entries {
            // Each member once, however often the digest names it.
            if !seen.insert(e.node) {
                continue;
            }
            if e.node == me {
                if e.version < self.own.record.version {
                    records.push(Arc::new(self.own.clone()));
                    beats.push(self.own_beat);
                } else if e.version == self.own.record.version && e.heartbeat < self.heartbeat {
                    beats.push(self.own_beat);
                }
                // A version above ours is an earlier life's record: it arrives with their
                // answer, and `own_record_back` outdoes it.
                they_know_more |= e.version > self.own.record.version;
                continue;
            }
            match self.by_short.get(&e.node).and_then(|id| self.known.get(id)) {
                Some(k) if k.signed.record.version > e.version => {
                    records.push(k.signed.clone());
                    beats.extend(k.beat);
                }
                Some(k) if k.signed.record.version < e.version => they_know_more = true,
                // Heartbeats of others are not compared: beats travel to neighbours and as
                // rumours, and two nodes' counters of a member they do not watch differ
                // without either lacking anything.
                Some(_) => {}
                None => {
                    let forgotten = self
                        .forgotten
                        .get(&e.node)
                        .is_some_and(|f| f.version >= e.version);
                    // Unless we are full: then their answer would only be refused, again
                    // and again.
                    let full = self.known.len() >= self.config.max_members;
                    they_know_more |= !forgotten && !full;
                }
            }
        }
        self.synced |= !they_know_more;
        if !answer {
            return;
        }
        if !seen.contains(&me) {
            records.push(Arc::new(self.own.clone()));
            beats.push(self.own_beat);
        }
        for (id, k) in &self.known {
            if !seen.contains(&id.short()) {
                records.push(k.signed.clone());
                beats.extend(k.beat);
            }
        }
        for frame in record_frames(records).into_iter().chain(beat_frames(beats)) {
            self.out.push_back(Transmit { conn, frame });
        }
        // Our digest back only when asked, or when they hold something we lack.
        if reply || they_know_more {
            self.send_digest(conn, false);
        }
    }

    pub(super) fn send_digest(&mut self, conn: ConnId, reply: bool) {
        let mut entries = Vec::with_capacity(self.known.len() + 1);
        entries.push(self.own_entry());
        for (id, k) in &self.known {
            entries.push(Entry {
                node: id.short(),
                version: k.signed.record.version,
                heartbeat: k.heartbeat,
            });
        }
        self.out.push_back(Transmit {
            conn,
            frame: Frame::Digest { reply, entries }.encode(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Identity;
    use crate::record::tests::record;

    #[test]
    fn a_full_state_answer_of_thousands_of_records_comes_in_frames_that_all_decode() {
        let records: Vec<SignedRecord> = (0..5000u32)
            .map(|i| {
                let mut k = [0; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                let mut r = record(&format!("node-with-a-long-name-{i:0>200}"), 1);
                r.pod_cidrs = (0..32)
                    .map(|j| format!("100.{}.{j}.0/24", 64 + i % 64).parse().unwrap())
                    .collect();
                r.claimed_at = vec![1; 32];
                Identity::from_wireguard_key(&k).sign(&r)
            })
            .collect();
        let total: usize = records.iter().map(|r| r.body.len() + 98).sum();
        assert!(
            total > 4 << 20,
            "the state ({total} bytes) exceeds one frame"
        );
        let frames = record_frames(records.into_iter().map(Arc::new).collect());
        let mut n = 0;
        for f in &frames {
            assert!(f.len() <= FRAME_BUDGET + 1024, "frame of {} bytes", f.len());
            let Ok(Frame::Records(rs)) = Frame::decode(f) else {
                panic!("a frame does not decode")
            };
            n += rs.iter().filter(|r| r.is_ok()).count();
        }
        assert_eq!(n, 5000);
        assert!(frames.len() >= total / FRAME_BUDGET);
    }
}
