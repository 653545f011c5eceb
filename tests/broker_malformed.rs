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

/// Connects a 3.1.1 client `client_id` over a raw socket and checks that its session's shard
/// answers: a CONNACK that accepts, then a PINGRESP to a PINGREQ.
fn shard_serves(port: u16, client_id: &str) -> Result<(), String> {
    use std::io::Read;
    let mut stream = raw(port);
    write_all(
        &mut stream,
        &connect_bytes(ProtocolVersion::V3_1_1, client_id),
    );
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .map_err(|error| format!("{client_id}: no CONNACK ({error})"))?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(format!("{client_id}: CONNACK {connack:02x?}"));
    }
    write_all(&mut stream, &[0xC0, 0x00]);
    let mut pingresp = [0u8; 2];
    stream
        .read_exact(&mut pingresp)
        .map_err(|error| format!("{client_id}: no PINGRESP ({error})"))?;
    if pingresp != [0xD0, 0x00] {
        return Err(format!("{client_id}: PINGRESP {pingresp:02x?}"));
    }
    Ok(())
}

/// A 5.0 PUBLISH whose topic is as long as a UTF-8 string may be (65,535 bytes) and has far
/// more levels than `topic_levels_max` allows. The shard refuses it with a DISCONNECT whose
/// reason string quotes the topic; that string must be cut to fit its field (it once tripped
/// an assertion in the encoder and killed the shard thread). Afterwards every shard, the
/// attacker's included, still serves clients.
#[test]
fn a_maximal_topic_over_the_level_limit_gets_a_disconnect_and_every_shard_lives_on() {
    const SHARDS: u16 = 2;
    let mut broker = Broker::start(SHARDS);
    let attacker_id = "long-topic-attacker";
    let mut stream = raw(broker.port);
    write_all(
        &mut stream,
        &connect_bytes(ProtocolVersion::V5, attacker_id),
    );
    let mut connack = [0u8; 64];
    use std::io::Read;
    let read = stream.read(&mut connack).unwrap_or(0);
    assert!(
        read >= 4 && connack[0] == 0x20 && connack[3] == 0x00,
        "CONNACK success"
    );

    // "a/a/.../a": 32,768 levels in 65,535 bytes.
    let topic = "a/".repeat(32_767) + "a";
    assert_eq!(topic.len(), 65_535);
    let mut body = Vec::with_capacity(topic.len() + 16);
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(0x00); // no properties
    body.extend_from_slice(b"payload");
    let mut publish = BytesMut::new();
    publish.extend_from_slice(&[0x30]);
    let mut length = body.len();
    loop {
        let byte = (length % 128) as u8;
        length /= 128;
        if length == 0 {
            publish.extend_from_slice(&[byte]);
            break;
        }
        publish.extend_from_slice(&[byte | 0x80]);
    }
    publish.extend_from_slice(&body);
    write_all(&mut stream, &publish);

    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
    assert!(
        closed,
        "the connection was not closed; broker log:\n{}",
        broker.log_text()
    );
    let options = DecodeOptions {
        version: ProtocolVersion::V5,
        max_packet_size: mqtt::PACKET_SIZE_MAX,
        sender: Sender::Server,
    };
    match mqtt::decode(&Bytes::from(response.clone()), &options) {
        Ok(Some((Packet::Disconnect(disconnect), used))) => {
            assert_eq!(used, response.len(), "bytes after the DISCONNECT");
            assert_eq!(disconnect.reason, mqtt::ReasonCode::TOPIC_NAME_INVALID);
            if let Some(why) = &disconnect.properties.reason_string {
                assert!(why.len() <= 65_535, "reason string of {} bytes", why.len());
            }
        }
        other => panic!(
            "expected a DISCONNECT 0x90, got {} bytes: {other:?}",
            response.len()
        ),
    }

    // One client per shard, chosen by the session placement rule, so that the attacker's
    // shard is among them.
    let mut failures = Vec::new();
    for shard in 0..SHARDS {
        let client_id = (0..)
            .map(|n| format!("after-attack-{n}"))
            .find(|id| shardmq_shards::owner_shard(id, SHARDS) == shard)
            .unwrap();
        if let Err(error) = shard_serves(broker.port, &client_id) {
            failures.push(format!("shard {shard}: {error}"));
        }
    }
    assert!(
        broker.is_running(),
        "the broker died:\n{}",
        broker.log_text()
    );
    assert!(
        failures.is_empty(),
        "{}\nbroker log:\n{}",
        failures.join("\n"),
        broker.log_text()
    );
}
