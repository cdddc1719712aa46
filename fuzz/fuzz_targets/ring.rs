//! Fuzz target `ring`: see vfrelay's src/fuzzing/ring.rs for what it drives
//! and checks; tests/fuzz_regressions.rs replays its inputs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfrelay::fuzzing::ring(data));
