//! `cargo +nightly fuzz run parse_connect` (from `fuzz/`): the CONNECT parser must never panic,
//! and whatever it accepts must be consistent with the bytes it was given, in every prefix
//! split (bytes arrive in pieces on a real socket).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqlb_mqtt::parse_connect;

fuzz_target!(|data: &[u8]| {
    let whole = parse_connect(data);
    if let Ok(Some(c)) = &whole {
        // A complete answer from a prefix must not change when more bytes arrive.
        assert!(c.packet_len >= 2);
        assert!(c.client_id.len() <= data.len());
    }
    for cut in 0..data.len().min(64) {
        match parse_connect(&data[..cut]) {
            // Incomplete or already decided: a shorter prefix never contradicts the whole.
            Ok(None) => {}
            Ok(Some(c)) => assert_eq!(Ok(Some(c)), whole),
            Err(e) => assert_eq!(Err(e), whole),
        }
    }
});
