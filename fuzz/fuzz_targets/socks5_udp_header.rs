#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netbird_proxy::fuzzing::socks5_udp_header(data));
