//! Replays the malformed-input corpus (`tests/corpus/malformed/`, written by
//! `tools/gen_malformed_corpus.py`) through the decoder: every case must fail with the rule,
//! reason code and peer response its file names, and feeding its bytes one at a time must never
//! produce a different error first.

use std::path::PathBuf;

use bytes::Bytes;
use shardmq_net::mqtt::{self, DecodeOptions, ErrorResponse, ProtocolVersion, ReasonCode, Sender};

#[derive(Debug)]
struct Case {
    name: String,
    connected: Option<ProtocolVersion>,
    rule: String,
    reason: ReasonCode,
    response: ErrorResponse,
    max_packet_size: u32,
    bytes: Bytes,
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/malformed")
}

fn parse_byte(text: &str) -> u8 {
    u8::from_str_radix(text.trim_start_matches("0x"), 16).expect("hex byte")
}

fn parse_case(name: String, text: &str) -> Case {
    let field = |key: &str| -> Option<&str> {
        text.lines().find_map(|line| {
            line.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(": "))
        })
    };
    let required = |key: &str| field(key).unwrap_or_else(|| panic!("{name}: no `{key}`"));
    let connected = match required("state") {
        "connect" => None,
        "v3.1" => Some(ProtocolVersion::V3_1),
        "v3.1.1" => Some(ProtocolVersion::V3_1_1),
        "v5" => Some(ProtocolVersion::V5),
        other => panic!("{name}: unknown state {other}"),
    };
    let response = match required("response").split_once(' ') {
        None if required("response") == "close" => ErrorResponse::Close,
        Some(("connack-v5", code)) => ErrorResponse::ConnackV5(ReasonCode(parse_byte(code))),
        Some(("connack-v3", code)) => ErrorResponse::ConnackV3(parse_byte(code)),
        Some(("disconnect", code)) => ErrorResponse::Disconnect(ReasonCode(parse_byte(code))),
        _ => panic!("{name}: unknown response"),
    };
    let bytes: Vec<u8> = required("hex").split_whitespace().map(parse_byte).collect();
    Case {
        connected,
        rule: required("rule").to_string(),
        reason: ReasonCode(parse_byte(required("reason"))),
        response,
        max_packet_size: field("max_packet_size").map_or(mqtt::PACKET_SIZE_MAX, |size| {
            size.parse().expect("max_packet_size")
        }),
        bytes: Bytes::from(bytes),
        name,
    }
}

fn load_corpus() -> Vec<Case> {
    let mut cases: Vec<Case> = std::fs::read_dir(corpus_dir())
        .expect("the malformed corpus directory")
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            parse_case(name, &std::fs::read_to_string(&path).expect("corpus file"))
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

#[test]
fn every_malformed_input_is_refused_with_its_rule_reason_and_response() {
    let cases = load_corpus();
    assert!(cases.len() >= 100, "corpus shrank to {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let options = DecodeOptions {
            version: case.connected.unwrap_or(ProtocolVersion::V5),
            max_packet_size: case.max_packet_size,
            sender: Sender::Client,
        };
        // Incremental: each prefix either needs more bytes or fails with the final error.
        let mut outcome = None;
        for end in 1..=case.bytes.len() {
            match mqtt::decode(&case.bytes.slice(..end), &options) {
                Ok(None) => continue,
                Ok(Some((packet, _))) => {
                    outcome = Some(Err(format!("decoded {packet:?} from {end} bytes")));
                    break;
                }
                Err(error) => {
                    outcome = Some(Ok(error));
                    break;
                }
            }
        }
        let error = match outcome {
            Some(Ok(error)) => error,
            Some(Err(message)) => {
                failures.push(format!("{}: {message}", case.name));
                continue;
            }
            None => {
                failures.push(format!("{}: still needs more bytes", case.name));
                continue;
            }
        };
        let response = error.response(case.connected);
        if error.rule != case.rule || error.reason != case.reason || response != case.response {
            failures.push(format!(
                "{}: expected [{}] {} {:?}, got {error} {response:?}",
                case.name, case.rule, case.reason, case.response
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
