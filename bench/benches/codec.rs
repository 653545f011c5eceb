//! Codec microbenchmark: decode and encode of PUBLISH (16 B, 256 B, 4 KiB payloads, 3.1.1 and
//! 5.0) and of a 5.0 CONNECT with properties, in time per packet.
//!
//! Run: `cargo bench -p shardmq-bench --bench codec`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shardmq_bench::samples;
use shardmq_net::mqtt::{self, DecodeOptions, Packet, ProtocolVersion, Sender};

fn encoded(packet: &Packet, version: ProtocolVersion) -> Bytes {
    let mut buf = BytesMut::new();
    mqtt::encode(packet, version, &mut buf);
    buf.freeze()
}

fn bench_packet(c: &mut Criterion, name: &str, packet: &Packet, version: ProtocolVersion) {
    let bytes = encoded(packet, version);
    let options = DecodeOptions {
        version,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: Sender::Client,
    };
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode", |b| {
        b.iter(|| mqtt::decode(black_box(&bytes), &options).unwrap().unwrap())
    });
    let mut buf = BytesMut::with_capacity(bytes.len() * 2);
    group.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            mqtt::encode(black_box(packet), version, &mut buf);
        })
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let tag = if version.is_v5() { "v5" } else { "v311" };
        for size in samples::PAYLOAD_SIZES {
            bench_packet(
                c,
                &format!("publish_{tag}_{size}B"),
                &samples::publish(size, version),
                version,
            );
        }
    }
    bench_packet(
        c,
        "connect_v5_properties",
        &samples::connect_v5(),
        ProtocolVersion::V5,
    );
}

criterion_group!(benches, codec);
criterion_main!(benches);
