//! The session state machine against a real broker (memory store), driven by a list of
//! operations over up to four connections, or, for inputs that start with `RAW:`, by a plain
//! MQTT byte stream (what the committed seeds are). See `herald_fuzz::session`.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use herald_fuzz::session;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(raw) = data.strip_prefix(b"RAW:") {
        session::run_raw(raw);
    } else if let Ok(input) = session::Input::arbitrary_take_rest(Unstructured::new(data)) {
        session::run(&input);
    }
});
