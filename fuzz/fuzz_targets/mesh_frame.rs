//! Any bytes on a gossip connection: a frame or a `DecodeError`, never a panic; a frame that
//! decodes re-encodes to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_mesh::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }
});
