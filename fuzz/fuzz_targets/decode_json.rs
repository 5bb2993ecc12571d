//! The Kafka record decoder fed JSON (the same document `POST /v1/events` takes): no panic, a
//! decoded event satisfies the limits and survives JSON and Avro round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A leading zero byte is the Avro magic byte: that is the decode_avro target's ground.
    if data.first() == Some(&0) {
        return;
    }
    liverec_fuzz::decode_record(data);
});
