//! The Kafka event codec (`liverec::bus::codec`): events encoded and decoded per second, JSON and
//! Avro, on a typical event (ids of realistic length, a `rec_id`, device, country and two context
//! attributes).
//!
//! - `encode_json`: a validated event to its JSON wire form (what the server produces to Kafka
//!   for a `POST /v1/events`);
//! - `decode_json`: a JSON record to a validated event (what the Kafka consumer does per record);
//! - `encode_avro`: the wire event to an Avro record in the registry-less Confluent framing,
//!   schema 2 (what a Rust producer does);
//! - `decode_avro_v2` / `decode_avro_v1`: a record written with the newest schema, and one
//!   written with the old schema and resolved to the newest (schema evolution on the read path).
//!
//! Each iteration handles one event; criterion reports `elements/s`, i.e. events/s on one core.
//! Run: `cargo bench --bench codec`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use liverec::bus::codec::{decode, encode_avro, encode_json, to_wire};
use liverec::config::Config;
use liverec::event::{ContextIn, Device, EventIn, EventType};

const NOW: i64 = 1_700_000_000_000;

fn event() -> EventIn {
    let mut context = ContextIn { device: Some(Device::Mobile), country: Some("fr".into()), ..ContextIn::default() };
    context.attributes.insert("page".into(), "home".into());
    context.attributes.insert("ab".into(), "b".into());
    EventIn {
        value: Some(42.0),
        timestamp: Some(NOW - 5_000),
        event_id: Some("0190b2f4-6c1e-7a3b-9d2e-5f8a1c3b7e90".into()),
        rec_id: Some("0190b2f4-61aa-7c00-8e11-0a9b8c7d6e5f".into()),
        context: Some(context),
        ..EventIn::new("user-0012345", "item-0042", EventType::Click)
    }
}

fn bench_codec(c: &mut Criterion) {
    let limits = Config::default().events.limits();
    let wire = event();
    let validated = wire.clone().validate(&limits, NOW).expect("a valid event");
    let json = encode_json(&validated);
    let avro_v2 = encode_avro(&to_wire(&validated), 2, Some("session-77")).expect("v2 encodes");
    let avro_v1 = encode_avro(&to_wire(&validated), 1, None).expect("v1 encodes");

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_json", |b| b.iter(|| black_box(encode_json(black_box(&validated)))));
    group.bench_function("decode_json", |b| {
        b.iter(|| black_box(decode(black_box(&json), &limits, NOW).expect("decodes")))
    });
    group.bench_function("encode_avro", |b| {
        b.iter(|| black_box(encode_avro(black_box(&wire), 2, Some("session-77")).expect("encodes")))
    });
    group.bench_function("decode_avro_v2", |b| {
        b.iter(|| black_box(decode(black_box(&avro_v2), &limits, NOW).expect("decodes")))
    });
    group.bench_function("decode_avro_v1", |b| {
        b.iter(|| black_box(decode(black_box(&avro_v1), &limits, NOW).expect("decodes")))
    });
    group.finish();
    eprintln!(
        "record sizes: JSON {} bytes, Avro v2 {} bytes, Avro v1 {} bytes",
        json.len(),
        avro_v2.len(),
        avro_v1.len()
    );
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
