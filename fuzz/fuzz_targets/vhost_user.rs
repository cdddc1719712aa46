//! Fuzz target `vhost_user`: see vfrelay's src/fuzzing/vhost_user.rs for what it drives
//! and checks; tests/fuzz_regressions.rs replays its inputs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfrelay::fuzzing::vhost_user(data));
