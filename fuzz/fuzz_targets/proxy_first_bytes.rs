#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netbird_proxy::fuzzing::proxy_first_bytes(data));
