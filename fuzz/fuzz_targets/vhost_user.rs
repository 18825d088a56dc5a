#![no_main]
// The body is rsd::fuzzing::vhost_user, which tests/fuzz_replay.rs also runs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rsd::fuzzing::vhost_user(data));
