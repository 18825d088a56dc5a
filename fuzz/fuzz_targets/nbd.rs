#![no_main]
// The body is rsd::fuzzing::nbd, which tests/fuzz_replay.rs also runs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rsd::fuzzing::nbd(data));
