//! Records in: what would be applied is decided from the decoded record first (newer than the
//! one held, not forgotten, room for a new member), and only that is signature-checked. Of a
//! frame's records of one signer only the newest is considered (the others are stale), and
//! the first record whose signature fails ends the frame: a frame costs at most one check per
//! signer in it, and a frame of forged records costs one.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, warn};

use super::{ConnId, Event, Forgotten, Known, Membership, Transmit};
use crate::record::{NodeId, SignedRecord, UnverifiedRecord, VerifyError};
use crate::stats::Rejected;
use crate::wire::Frame;

impl Membership {
    /// A `Records` frame: applies what is newer (the newest of each signer in it), and pushes
    /// what was applied to every other connection. A record whose signature fails ends the
    /// frame: the sender relayed a forgery, so the rest is not worth a check.
    pub(super) fn handle_records(
        &mut self,
        now: Instant,
        conn: ConnId,
        records: Vec<Result<UnverifiedRecord, VerifyError>>,
    ) {
        let mut newest: Vec<UnverifiedRecord> = Vec::with_capacity(records.len());
        let mut slot: HashMap<NodeId, usize> = HashMap::with_capacity(records.len());
        for r in records {
            match r {
                Ok(u) => match slot.entry(u.signer()) {
                    Entry::Vacant(v) => {
                        v.insert(newest.len());
                        newest.push(u);
                    }
                    Entry::Occupied(o) => {
                        // Another of its signer's records in the same frame: the older of the
                        // two is stale.
                        self.drops.count(Rejected::Stale);
                        let held = &mut newest[*o.get()];
                        if u.record().version > held.record().version {
                            *held = u;
                        }
                    }
                },
                Err(e) => {
                    debug!(?conn, error = %e, "record refused");
                    self.drops.count(refusal(&e));
                }
            }
        }
        let mut forward = Vec::new();
        for u in newest {
            match self.accept(now, u) {
                Ok(Some(s)) => forward.push(Ok(s.into())),
                Ok(None) => {}
                Err(Forged) => {
                    debug!(
                        ?conn,
                        "a record failed its signature check: rest of the frame dropped"
                    );
                    break;
                }
            }
        }
        if !forward.is_empty() {
            self.refresh_holds();
            self.holds_dirty = false;
            let frame = Frame::Records(forward).encode();
            let others: Vec<ConnId> = self.conns.keys().copied().filter(|c| *c != conn).collect();
            for c in others {
                self.out.push_back(Transmit {
                    conn: c,
                    frame: frame.clone(),
                });
            }
        }
    }

    /// Applies a record that is newer than the one held and verifies; returns it to pass on,
    /// or [`Forged`] when its signature fails.
    fn accept(
        &mut self,
        now: Instant,
        u: UnverifiedRecord,
    ) -> Result<Option<Arc<SignedRecord>>, Forged> {
        let id = u.signer();
        if id == self.me {
            return self.own_record_back(now, u).map(|()| None);
        }
        let version = u.record().version;
        match self.known.get(&id) {
            Some(k) if k.signed.record.version >= version => {
                self.drops.count(Rejected::Stale);
                return Ok(None);
            }
            Some(_) => {}
            None => {
                if let Some(f) = self.forgotten.get(&id.short())
                    && f.id == id
                    && f.version >= version
                {
                    self.drops.count(Rejected::Forgotten);
                    return Ok(None);
                }
                if self.known.len() >= self.config.max_members {
                    self.drops.count(Rejected::MemberLimit);
                    if !self.full_reported {
                        self.full_reported = true;
                        warn!(
                            limit = self.config.max_members,
                            refused = %id,
                            "mesh.max_members reached: records of further nodes are refused"
                        );
                    }
                    return Ok(None);
                }
            }
        }
        let s = self.verified(u).ok_or(Forged)?;
        let left = s.record.left;
        let old = self.known.get(&id).map(|k| k.signed.clone());
        if let Some(old) = &old {
            self.tally_addresses(&old.record, false);
        }
        self.tally_addresses(&s.record, true);
        self.suspects.remove(&id);
        self.lost.remove(&id);
        self.holds_dirty = true;
        if let Some(k) = self.known.get_mut(&id) {
            let was = k.alive();
            // A new version is a new heartbeat space: its beats count from zero.
            if !super::clash::same_addresses(&k.signed.record, &s.record) {
                k.addressed_since = now;
            }
            k.signed = s.clone();
            k.heartbeat = 0;
            k.beat = None;
            k.suspicion = None;
            k.heard_at = now;
            k.live = !left;
            if left {
                self.events.push_back(Event::Left(id));
            } else {
                self.events.push_back(Event::Updated(id));
                if !was && k.alive() {
                    self.events.push_back(Event::Up(id));
                }
            }
        } else {
            self.forgotten.remove(&id.short());
            self.by_short.insert(id.short(), id);
            self.known.insert(
                id,
                Known {
                    signed: s.clone(),
                    heartbeat: 0,
                    beat: None,
                    suspicion: None,
                    heard_at: now,
                    addressed_since: now,
                    live: !left,
                    held: None,
                },
            );
            self.events.push_back(if left {
                Event::Left(id)
            } else {
                Event::Joined(id)
            });
        }
        self.note_liveness(id);
        Ok(Some(s))
    }

    /// Checks a record's signature, counting the check and a failure.
    pub(super) fn verified(&mut self, u: UnverifiedRecord) -> Option<Arc<SignedRecord>> {
        self.drops.verifications += 1;
        match u.verify_shared() {
            Ok(s) => Some(s),
            Err(e) => {
                debug!(error = %e, "record refused");
                self.drops.count(refusal(&e));
                None
            }
        }
    }

    /// Forgets members down or departed for longer than the horizon, and the memory of those
    /// forgotten a horizon ago.
    pub(super) fn forget(&mut self, now: Instant) {
        let horizon = self.config.tombstone_horizon;
        let gone: Vec<_> = self
            .known
            .iter()
            .filter(|(_, k)| !k.live && now.saturating_duration_since(k.heard_at) > horizon)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(k) = self.known.remove(&id) {
                debug!(node = %id, name = %k.signed.record.name, "member forgotten");
                self.tally_addresses(&k.signed.record, false);
                self.suspects.remove(&id);
                self.lost.remove(&id);
                self.down.remove(&id);
                self.holds_dirty = true;
                self.by_short.remove(&id.short());
                self.rumours.remove(&id.short());
                self.forgotten.insert(
                    id.short(),
                    Forgotten {
                        id,
                        version: k.signed.record.version,
                        at: now,
                    },
                );
            }
        }
        self.forgotten
            .retain(|_, f| now.saturating_duration_since(f.at) <= horizon);
        if self.known.len() < self.config.max_members {
            self.full_reported = false;
        }
    }
}

/// A record whose signature failed its check (already counted).
pub(super) struct Forged;

/// The counter for a record refused before or at its signature check.
fn refusal(e: &VerifyError) -> Rejected {
    match e {
        VerifyError::BadSigner | VerifyError::BadSignature => Rejected::BadSignature,
        VerifyError::UnboundKey => Rejected::UnboundKey,
        VerifyError::Body(_) => Rejected::Malformed,
    }
}
