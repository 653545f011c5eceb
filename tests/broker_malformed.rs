//! The malformed-input corpus (`tests/corpus/malformed/`) replayed over real sockets: each bad
//! connection gets exactly the response its case names (a CONNACK or DISCONNECT with the
//! reason code, or nothing) and is closed, while a bystander client keeps receiving.

mod support;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::QoS;
use shardmq_net::mqtt::{self, DecodeOptions, Packet, ProtocolVersion, Sender};
use support::{Broker, raw, read_until_closed, v4, write_all};

struct Case {
    name: String,
    state: String,
    response: String,
    bytes: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/malformed");
    let mut cases: Vec<Case> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}: ")))
                    .unwrap()
                    .to_string()
            };
            Case {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                state: field("state"),
                response: field("response"),
                bytes: field("hex")
                    .split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).unwrap())
                    .collect(),
            }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// A valid CONNECT of `version` for the replay's preamble.
fn connect_bytes(version: ProtocolVersion, client_id: &str) -> Bytes {
    let connect = mqtt::Connect {
        protocol: version,
        clean_start: true,
        keep_alive_seconds: 30,
        properties: Default::default(),
        client_id: client_id.to_owned().into(),
        will: None,
        username: None,
        password: None,
    };
    let mut buf = BytesMut::new();
    mqtt::encode(&Packet::Connect(Box::new(connect)), version, &mut buf);
    buf.freeze()
}

/// What the broker sent, as the corpus writes responses.
fn describe(bytes: &[u8], version: ProtocolVersion) -> String {
    if bytes.is_empty() {
        return "close".into();
    }
    let options = DecodeOptions {
        version,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: Sender::Server,
    };
    match mqtt::decode(&Bytes::copy_from_slice(bytes), &options) {
        Ok(Some((Packet::ConnAck(connack), used))) if used == bytes.len() => {
            if version.is_v5() {
                format!("connack-v5 0x{:02X}", connack.reason.0)
            } else {
                format!(
                    "connack-v3 0x{:02X}",
                    connack.reason.to_connack_return_code()
                )
            }
        }
        Ok(Some((Packet::Disconnect(disconnect), used))) if used == bytes.len() => {
            format!("disconnect 0x{:02X}", disconnect.reason.0)
        }
        other => format!("unexpected bytes {bytes:02x?} ({other:?})"),
    }
}

#[test]
fn every_malformed_input_gets_its_response_and_only_its_connection_closes() {
    let mut broker = Broker::start(2);
    let bystander = v4(broker.port, "bystander", |_| {});
    bystander.subscribe("heartbeat", QoS::AtLeastOnce);
    let publisher = v4(broker.port, "heartbeat-publisher", |_| {});
    let cases = corpus();
    assert!(cases.len() >= 100);
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let mut stream = raw(broker.port);
        // The version the response is read in: the preamble's, or the one the case's CONNECT
        // is answered in.
        let version = match case.state.as_str() {
            "v5" => Some(ProtocolVersion::V5),
            "v3.1.1" => Some(ProtocolVersion::V3_1_1),
            "v3.1" => Some(ProtocolVersion::V3_1),
            _ => None,
        };
        if let Some(version) = version {
            let client_id = format!("case{index}");
            write_all(&mut stream, &connect_bytes(version, &client_id));
            let mut connack = [0u8; 64];
            use std::io::Read;
            let read = stream.read(&mut connack).unwrap_or(0);
            assert!(
                read >= 4 && connack[0] == 0x20,
                "{}: no CONNACK for the preamble",
                case.name
            );
        }
        write_all(&mut stream, &case.bytes);
        let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(3));
        let read_version = version.unwrap_or(if case.response.starts_with("connack-v5") {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V3_1_1
        });
        let got = describe(&response, read_version);
        if got != case.response || !closed {
            failures.push(format!(
                "{}: expected `{}`, got `{got}`, closed: {closed}",
                case.name, case.response
            ));
        }
        // The bystander still gets messages.
        publisher
            .client
            .publish("heartbeat", QoS::AtLeastOnce, false, format!("{index}"))
            .unwrap();
        let beat = bystander.publishes(1, Duration::from_secs(5));
        assert_eq!(
            beat.len(),
            1,
            "after {}: the bystander stopped receiving",
            case.name
        );
        assert_eq!(&beat[0].payload[..], format!("{index}").as_bytes());
    }
    assert!(broker.is_running(), "the broker died");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
