//! Any bytes on a gossip connection: a frame or a `DecodeError`, never a panic; a frame that
//! decodes re-encodes (without the records that failed verification) to bytes that decode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_mesh::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let frame = match frame {
            Frame::Records(rs) => Frame::Records(rs.into_iter().filter(Result::is_ok).collect()),
            other => other,
        };
        assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }
});
