//! Fuzzes the MQTT decoder. The first byte chooses the connection's version and which side
//! sends; the rest is a byte stream decoded packet after packet. The decoder must never panic,
//! and every packet it accepts must encode to bytes that decode to the same packet.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shardmq_net::mqtt::{self, DecodeOptions, Packet, ProtocolVersion, Sender};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let version = match selector % 3 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let sender = if selector & 0x80 == 0 { Sender::Client } else { Sender::Server };
    let options = DecodeOptions {
        version,
        max_packet_size: 1 << 16,
        sender,
    };
    let mut stream = Bytes::copy_from_slice(stream);
    while let Ok(Some((packet, used))) = mqtt::decode(&stream, &options) {
        let version = match &packet {
            Packet::Connect(connect) => connect.protocol,
            _ => version,
        };
        let mut buf = BytesMut::new();
        mqtt::encode(&packet, version, &mut buf);
        assert_eq!(buf.len(), packet.encoded_len(version));
        let options = DecodeOptions { version, max_packet_size: mqtt::PACKET_SIZE_MAX, ..options };
        let (again, again_used) = mqtt::decode(&buf.freeze(), &options)
            .expect("a re-encoded packet decodes")
            .expect("a re-encoded packet is whole");
        assert_eq!(again, packet);
        assert_eq!(again_used, packet.encoded_len(version));
        stream = stream.slice(used..);
    }
});
