//! Any bytes as a token endpoint's answer: a token or a typed error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokenkeep_core::fuzzing::provider_response(data);
});
