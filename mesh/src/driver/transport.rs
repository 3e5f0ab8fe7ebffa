//! A gossip connection: TCP, a Noise `NNpsk0` handshake keyed by the cluster secret (only
//! holders of the secret complete it; both directions are encrypted and authenticated), then
//! length-delimited encrypted messages. A gossip frame travels in one or more messages, each
//! plaintext a flag (1 on the frame's last piece) and a piece of the frame.
//!
//! ```text
//! message   = len:u16 noise_ciphertext[len]
//! plaintext = last:u8 piece
//! ```
//!
//! A message that fails to decrypt is dropped and counted; the connection stays (a failed
//! decryption does not advance the receive nonce). A connection that cannot complete the
//! handshake within [`HANDSHAKE_TIMEOUT`] is closed.
//!
//! Before the handshake completes a connection costs a few hundred bytes: handshake messages
//! longer than [`HANDSHAKE_MESSAGE`] end it, and the 64 KiB message buffer is allocated after.
//! The Noise handshake alone proves the responder to the initiator (message 2 mixes the secret
//! and both ephemeral keys), but not the other way: anyone can replay a captured message 1. So
//! the responder counts a connection only once the initiator's first message (its Hello)
//! decrypts, within the same deadline ([`TransportError::Unconfirmed`] otherwise): a round trip
//! proves the secret both ways.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use snow::{HandshakeState, TransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The Noise protocol of gossip connections.
pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake, so keys of another protocol or version never match.
pub const PROLOGUE: &[u8] = b"weft mesh v1";
/// How long a new connection may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest Noise message.
pub const MAX_MESSAGE: usize = 65_535;
/// The largest handshake message accepted (`NNpsk0`'s two are 48 bytes each).
pub const HANDSHAKE_MESSAGE: usize = 256;
/// The largest piece of a frame one message carries.
pub const MAX_PIECE: usize = MAX_MESSAGE - 16 - 1;

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not hold the cluster secret, or sent garbage during the handshake.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The handshake did not complete in time.
    #[error("handshake timed out")]
    Timeout,
    /// The handshake completed but the initiator sent no message that decrypts in time: it does
    /// not hold the secret (a replayed message 1).
    #[error(
        "the peer completed the handshake but never proved the cluster secret (a replayed first message?)"
    )]
    Unconfirmed,
}

fn noise_err(e: snow::Error) -> TransportError {
    TransportError::Handshake(e.to_string())
}

fn builder(secret: &[u8; 32]) -> Result<snow::Builder<'_>, TransportError> {
    let params = PATTERN.parse().map_err(noise_err)?;
    Ok(snow::Builder::new(params).prologue(PROLOGUE).psk(0, secret))
}

async fn read_message<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let len = usize::from(r.read_u16().await?);
    r.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

async fn write_message(w: &mut OwnedWriteHalf, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message too long"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await
}

/// The encrypted halves of an established connection.
#[derive(Debug)]
pub struct Secured {
    /// Reads messages.
    pub reader: SecureReader,
    /// Writes messages.
    pub writer: SecureWriter,
    /// The initiator's first frame, which proved it holds the secret (responders only).
    pub first: Option<Vec<u8>>,
}

/// The receiving half (over a TCP read half; any byte stream for fuzzing).
#[derive(Debug)]
pub struct SecureReader<R = OwnedReadHalf> {
    half: R,
    state: Arc<Mutex<TransportState>>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> SecureReader<R> {
    /// A reader of `half` whose messages `state` decrypts (for the transport fuzz target: a
    /// session established in memory, then any bytes).
    #[doc(hidden)]
    pub fn from_parts(half: R, state: TransportState) -> Self {
        Self {
            half,
            state: Arc::new(Mutex::new(state)),
            buf: vec![0u8; MAX_MESSAGE],
        }
    }
}

/// The sending half.
#[derive(Debug)]
pub struct SecureWriter {
    half: OwnedWriteHalf,
    state: Arc<Mutex<TransportState>>,
}

/// Runs the handshake on `stream` as initiator (dialled) or responder (accepted). A responder
/// also waits for the initiator's first frame (it must decrypt) and returns it in
/// [`Secured::first`]; frames above `max_frame` do not count.
pub async fn secure(
    stream: TcpStream,
    secret: &[u8; 32],
    initiator: bool,
    max_frame: usize,
) -> Result<Secured, TransportError> {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let b = builder(secret)?;
    let mut hs: HandshakeState = if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .map_err(noise_err)?;
    #[expect(
        clippy::disallowed_methods,
        reason = "the driver is where the clock is read"
    )]
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let handshake = async {
        let mut buf = [0u8; HANDSHAKE_MESSAGE];
        let mut payload = [0u8; HANDSHAKE_MESSAGE];
        while !hs.is_handshake_finished() {
            if hs.is_my_turn() {
                let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
                write_message(&mut w, &buf[..n]).await?;
            } else {
                let len = usize::from(r.read_u16().await?);
                if len > HANDSHAKE_MESSAGE {
                    return Err(TransportError::Handshake(format!(
                        "a {len}-byte handshake message (at most {HANDSHAKE_MESSAGE})"
                    )));
                }
                r.read_exact(&mut buf[..len]).await?;
                hs.read_message(&buf[..len], &mut payload)
                    .map_err(noise_err)?;
            }
        }
        Ok::<_, TransportError>(())
    };
    tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| TransportError::Timeout)??;
    let state = Arc::new(Mutex::new(hs.into_transport_mode().map_err(noise_err)?));
    let mut reader = SecureReader {
        half: r,
        state: state.clone(),
        buf: vec![0u8; MAX_MESSAGE],
    };
    let first = if initiator {
        None
    } else {
        match tokio::time::timeout_at(deadline, reader.recv(max_frame)).await {
            Ok(Ok(Received::Frame(f))) => Some(f),
            Ok(Ok(Received::Dropped)) | Err(_) => return Err(TransportError::Unconfirmed),
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok(Secured {
        reader,
        writer: SecureWriter { half: w, state },
        first,
    })
}

/// What the reader got.
#[derive(Debug)]
pub enum Received {
    /// A whole frame.
    Frame(Vec<u8>),
    /// A message that did not decrypt, or a frame over the size limit (dropped; the connection
    /// continues).
    Dropped,
}

impl<R: AsyncRead + Unpin> SecureReader<R> {
    /// The next frame (or a dropped message).
    pub async fn recv(&mut self, max_frame: usize) -> Result<Received, TransportError> {
        let mut frame = Vec::new();
        let mut oversize = false;
        loop {
            let n = read_message(&mut self.half, &mut self.buf).await?;
            let mut out = vec![0u8; n];
            let result = self
                .state
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?
                .read_message(&self.buf[..n], &mut out);
            let Ok(len) = result else {
                return Ok(Received::Dropped);
            };
            let Some((&last, piece)) = out[..len].split_first() else {
                return Ok(Received::Dropped);
            };
            if frame.len() + piece.len() > max_frame {
                oversize = true;
                frame.clear();
            } else if !oversize {
                frame.extend_from_slice(piece);
            }
            if last == 1 {
                return Ok(if oversize {
                    Received::Dropped
                } else {
                    Received::Frame(frame)
                });
            }
        }
    }
}

impl SecureWriter {
    /// Encrypts and sends one frame, in as many messages as it takes.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let mut pieces = frame.chunks(MAX_PIECE).peekable();
        let mut plain = Vec::with_capacity(MAX_PIECE + 1);
        let mut buf = vec![0u8; MAX_MESSAGE];
        // An empty frame is one empty final piece.
        let mut first = true;
        while first || pieces.peek().is_some() {
            first = false;
            let piece = pieces.next().unwrap_or(&[]);
            plain.clear();
            plain.push(u8::from(pieces.peek().is_none()));
            plain.extend_from_slice(piece);
            let n = self
                .state
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?
                .write_message(&plain, &mut buf)
                .map_err(noise_err)?;
            write_message(&mut self.half, &buf[..n]).await?;
        }
        Ok(())
    }

    /// Closes the sending direction.
    pub async fn shutdown(&mut self) {
        let _ = self.half.shutdown().await;
    }
}
