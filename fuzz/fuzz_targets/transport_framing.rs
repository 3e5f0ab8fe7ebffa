//! The gossip transport's framing after the handshake, as a connection's reader meets it: a
//! stream of length-prefixed Noise messages, each plaintext a last-piece flag and a piece. The
//! input decides, message by message, whether the sender sends the next frame (in one piece or
//! several), garbage between the pieces of a frame, a message of garbage, or raw bytes that break
//! the framing (the stream may end in the middle of a message).
//!
//! Whatever the stream: nothing panics, the reader ends on a broken stream instead of looping,
//! and every frame it returns is a contiguous part of one the sender meant (a message that does
//! not decrypt drops the frame begun; a frame over the limit is dropped whole).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_mesh::driver::transport::{
    MAX_MESSAGE, MAX_PIECE, PATTERN, PROLOGUE, Received, SecureReader,
};

/// The frame limit the reader is given: below the largest frames made here, so the oversize
/// path runs too.
const LIMIT: usize = 50_000;

/// An established session, made in memory: (sender, receiver).
fn session() -> (snow::TransportState, snow::TransportState) {
    let secret = [7u8; 32];
    let builder = || {
        snow::Builder::new(PATTERN.parse().expect("pattern"))
            .prologue(PROLOGUE)
            .psk(0, &secret)
    };
    let mut i = builder().build_initiator().expect("initiator");
    let mut r = builder().build_responder().expect("responder");
    let (mut m, mut p) = ([0u8; 256], [0u8; 256]);
    let n = i.write_message(&[], &mut m).expect("message 1");
    r.read_message(&m[..n], &mut p).expect("message 1");
    let n = r.write_message(&[], &mut m).expect("message 2");
    i.read_message(&m[..n], &mut p).expect("message 2");
    (
        i.into_transport_mode().expect("initiator transport"),
        r.into_transport_mode().expect("responder transport"),
    )
}

fn message(wire: &mut Vec<u8>, body: &[u8]) {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    wire.extend_from_slice(&len.to_be_bytes());
    wire.extend_from_slice(&body[..usize::from(len)]);
}

fn contains(whole: &[u8], part: &[u8]) -> bool {
    part.is_empty() || whole.windows(part.len()).any(|w| w == part)
}

fuzz_target!(|data: &[u8]| {
    let (mut sender, receiver) = session();
    let mut wire = Vec::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut input = data;
    let mut take = |n: usize| -> Vec<u8> {
        let n = n.min(input.len());
        let (head, rest) = input.split_at(n);
        input = rest;
        head.to_vec()
    };
    let mut ct = vec![0u8; MAX_MESSAGE];
    for _ in 0..64 {
        let op = take(1);
        let Some(&op) = op.first() else { break };
        match op % 4 {
            0 | 1 => {
                // A frame: unique bytes, up to 76,500 of them (two pieces above MAX_PIECE, or
                // in pieces as small as the input asks).
                let size = usize::from(take(1).first().copied().unwrap_or(0)) * 300;
                let piece = usize::from(take(1).first().copied().unwrap_or(0)).max(1) * 257;
                let id = frames.len() as u32;
                let frame: Vec<u8> = (0..size)
                    .map(|i| (id.wrapping_mul(131).wrapping_add(i as u32 / 7)) as u8)
                    .collect();
                let pieces: Vec<&[u8]> = if frame.is_empty() {
                    vec![&[]]
                } else {
                    frame.chunks(piece.min(MAX_PIECE)).collect()
                };
                for (k, p) in pieces.iter().enumerate() {
                    let mut plain = vec![u8::from(k + 1 == pieces.len())];
                    plain.extend_from_slice(p);
                    let n = sender.write_message(&plain, &mut ct).expect("encrypt");
                    message(&mut wire, &ct[..n]);
                    if op % 4 == 1 && k == 0 {
                        // Garbage between the pieces: this frame must not come out whole.
                        message(&mut wire, &[0xee; 40]);
                    }
                }
                frames.push(frame);
            }
            2 => {
                let n = usize::from(take(1).first().copied().unwrap_or(0));
                let garbage = take(n);
                message(&mut wire, &garbage);
            }
            _ => {
                let n = usize::from(take(1).first().copied().unwrap_or(0));
                wire.extend_from_slice(&take(n));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut reader = SecureReader::from_parts(&wire[..], receiver);
        // Each call consumes at least one message, so this ends well within the bound.
        for _ in 0..100_000 {
            match reader.recv(LIMIT).await {
                Ok(Received::Frame(f)) => {
                    assert!(f.len() <= LIMIT, "a frame of {} bytes over the limit", f.len());
                    assert!(
                        frames.iter().any(|x| contains(x, &f)),
                        "a frame of {} bytes the sender never meant",
                        f.len()
                    );
                }
                Ok(Received::Dropped) => {}
                Err(_) => return,
            }
        }
        panic!("the reader never reached the end of a finite stream");
    });
});
