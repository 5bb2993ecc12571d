//! The Kafka record decoder fed Avro in the registry-less Confluent framing (a zero byte, a
//! 4-byte big-endian schema id, the datum): no panic, no unbounded allocation, a decoded event
//! satisfies the limits and survives JSON and Avro round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Keep the fuzzer on the Avro path: everything not starting with the magic byte is JSON.
    if data.first() != Some(&0) {
        return;
    }
    liverec_fuzz::decode_record(data);
});
