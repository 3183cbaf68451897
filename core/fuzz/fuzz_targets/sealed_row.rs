//! Tampered, moved and relabelled sealed rows: only the intact row opens.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokenkeep_core::fuzzing::sealed_row(data);
});
