//! Any config text: a typed config or an error naming where, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = weft_config::Config::parse(text, std::path::Path::new("fuzz.yaml"), "host") {
            let _ = e.to_string();
        }
    }
});
