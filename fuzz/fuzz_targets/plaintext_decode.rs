//! The plaintext header decoder: never panics, and what it accepts re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_router::plaintext;

fuzz_target!(|data: &[u8]| {
    if let Ok(inner) = plaintext::decode(data) {
        let mut out = vec![0; data.len()];
        let n = plaintext::encode(inner, &mut out).expect("fits");
        assert_eq!(&out[..n], data);
    }
});
