//! Tests of the frame format: round trips whole and byte by byte, every damaged header and
//! body refused, the version window, the body limit at the header and at the encoder, and the
//! length bounds that producers cut by.

use bytes::BytesMut;
use rkyv::rancor;

use super::*;

fn sample() -> Vec<Body> {
    let route = Route {
        filter: "a/+/c".into(),
        group: Some("g".into()),
    };
    let message = WireMessage {
        topic: "a/b/c".into(),
        payload: vec![1, 2, 3],
        qos: 1,
        retain: false,
        expiry_ms: Some(5000),
        publisher: Some("client".into()),
        payload_format_indicator: Some(1),
        response_topic: Some("reply".into()),
        correlation_data: Some(vec![9]),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
    };
    vec![
        Body::Heartbeat { applied: 3 },
        Body::RouteDeltas {
            deltas: vec![RouteDelta {
                sequence: 7,
                route: route.clone(),
                added: true,
            }],
        },
        Body::LogEntries {
            epoch: 3,
            first: 10,
            entries: vec![
                LogEntry::Down(4),
                LogEntry::Replace {
                    origin: 2,
                    routes: vec![route],
                },
                LogEntry::Setting {
                    key: "forward_queue_max".into(),
                    value: "10".into(),
                },
            ],
        },
        Body::Raft {
            message: vec![8, 3, 16, 1],
        },
        Body::GroupState {
            initialized: false,
            id: 1 << 63 | 2,
            founders: vec![1 << 63 | 1, 1 << 63 | 2],
        },
        Body::NodeQuery {
            id: 7,
            query: br#"{"query":"summary"}"#.to_vec(),
        },
        Body::NodeAnswer {
            id: 7,
            answer: Ok(br#"{"node":3}"#.to_vec()),
        },
        Body::NodeAnswer {
            id: u64::MAX,
            answer: Err("down".into()),
        },
        Body::Forward {
            messages: vec![
                Forwarded {
                    sequence: 1,
                    item: Item::Publish {
                        message,
                        plain: true,
                        groups: vec![("g".into(), "a/#".into())],
                    },
                },
                Forwarded {
                    sequence: 2,
                    item: Item::Claim {
                        client_id: "c".into(),
                        shard: 1,
                        claim: 9,
                        clean_start: false,
                        after: Some(4),
                    },
                },
                Forwarded {
                    sequence: 3,
                    item: Item::Handover {
                        client_id: "c".into(),
                        shard: 1,
                        claim: 9,
                        session: Some(vec![1, 2, 3]),
                        completed: Some(8),
                    },
                },
            ],
        },
    ]
}

#[test]
fn entries_round_trip_and_garbage_is_refused() {
    let entries = vec![
        LogEntry::Down(4),
        LogEntry::Setting {
            key: "k".into(),
            value: "v".into(),
        },
    ];
    assert_eq!(decode_entries(&encode_entries(&entries)).unwrap(), entries);
    assert!(decode_entries(&[0xFF; 7]).is_err());
}

#[test]
fn frames_round_trip_whole_and_byte_by_byte() {
    let cluster = cluster_id("test");
    let mut stream = BytesMut::new();
    for body in sample() {
        encode(&body, cluster, 1 << 20, &mut stream).unwrap();
    }
    let mut whole = Decoder::new(cluster, 1 << 20);
    whole.extend(&stream);
    let mut decoded = Vec::new();
    while let Some(body) = whole.next_frame().unwrap() {
        decoded.push(body);
    }
    assert_eq!(decoded, sample());

    let mut trickle = Decoder::new(cluster, 1 << 20);
    let mut decoded = Vec::new();
    for byte in stream.iter() {
        trickle.extend(&[*byte]);
        while let Some(body) = trickle.next_frame().unwrap() {
            decoded.push(body);
        }
    }
    assert_eq!(decoded, sample());
    assert_eq!(trickle.peer_version, Some(PROTOCOL_VERSION));
}

#[test]
fn damaged_frames_are_refused() {
    let cluster = cluster_id("test");
    let mut frame = BytesMut::new();
    encode(
        &Body::Heartbeat { applied: 0 },
        cluster,
        1 << 20,
        &mut frame,
    )
    .unwrap();
    let refused = |bytes: &[u8], cluster: u64, max: usize| {
        let mut decoder = Decoder::new(cluster, max);
        decoder.extend(bytes);
        decoder.next_frame().unwrap_err()
    };
    assert_eq!(
        refused(b"\x10\x0c\x00\x04MQTT", cluster, 1024),
        FrameError::BadMagic
    );
    assert_eq!(
        refused(&frame, cluster_id("other"), 1024),
        FrameError::Cluster(cluster)
    );
    let mut bad = frame.to_vec();
    bad[5] ^= 1;
    assert_eq!(refused(&bad, cluster, 1024), FrameError::HeaderChecksum);
    let mut body_flip = BytesMut::new();
    encode(
        &Body::Refused { reason: "x".into() },
        cluster,
        1 << 20,
        &mut body_flip,
    )
    .unwrap();
    let last = body_flip.len() - 1;
    body_flip[last] ^= 0xFF;
    assert_eq!(refused(&body_flip, cluster, 1024), FrameError::BodyChecksum);
    let mut long = BytesMut::new();
    encode(
        &Body::Refused {
            reason: "y".repeat(100),
        },
        cluster,
        1 << 20,
        &mut long,
    )
    .unwrap();
    assert!(matches!(
        refused(&long, cluster, 16),
        FrameError::TooLong(_)
    ));
    // A version two steps away, with a correct header checksum.
    let mut far = frame.to_vec();
    far[4..6].copy_from_slice(&(PROTOCOL_VERSION + 2).to_le_bytes());
    let crc = crc32fast::hash(&far[0..24]);
    far[24..28].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        refused(&far, cluster, 1024),
        FrameError::Version(PROTOCOL_VERSION + 2)
    );
    // A body of garbage with correct checksums fails validation, not the process.
    let mut garbage = frame.to_vec();
    let junk = [0xFFu8; 24];
    garbage[16..20].copy_from_slice(&(junk.len() as u32).to_le_bytes());
    garbage[20..24].copy_from_slice(&crc32fast::hash(&junk).to_le_bytes());
    let crc = crc32fast::hash(&garbage[0..24]);
    garbage[24..28].copy_from_slice(&crc.to_le_bytes());
    garbage.truncate(HEADER_LEN);
    garbage.extend_from_slice(&junk);
    assert!(matches!(
        refused(&garbage, cluster, 1024),
        FrameError::Body(_)
    ));
}

#[test]
fn adjacent_versions_are_compatible() {
    assert!(version_compatible(PROTOCOL_VERSION));
    assert!(version_compatible(PROTOCOL_VERSION + 1));
    assert!(!version_compatible(PROTOCOL_VERSION + 2));
}

/// A header announcing a body above the limit is refused from the header alone: the
/// decoder does not wait for (and keep) the body.
#[test]
fn a_long_body_is_refused_at_its_header() {
    let cluster = cluster_id("test");
    let mut frame = BytesMut::new();
    encode(
        &Body::Refused {
            reason: "z".repeat(5000),
        },
        cluster,
        1 << 20,
        &mut frame,
    )
    .unwrap();
    let mut decoder = Decoder::new(cluster, handshake::HANDSHAKE_BODY_LEN_MAX);
    decoder.extend(&frame[..HEADER_LEN]);
    assert!(matches!(decoder.next_frame(), Err(FrameError::TooLong(_))));
    let mut raised = Decoder::new(cluster, handshake::HANDSHAKE_BODY_LEN_MAX);
    raised.set_body_len_max(1 << 20);
    raised.extend(&frame);
    assert!(matches!(
        raised.next_frame(),
        Ok(Some(Body::Refused { .. }))
    ));
}

/// A body above the limit is refused by the encoder, whole, so that no caller can emit a
/// frame its peer must refuse; at the limit it goes.
#[test]
fn the_encoder_refuses_a_body_above_the_limit() {
    let cluster = cluster_id("test");
    let body = Body::Refused {
        reason: "r".repeat(1000),
    };
    let mut sized = BytesMut::new();
    encode(&body, cluster, usize::MAX, &mut sized).unwrap();
    let body_len = sized.len() - HEADER_LEN;
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&body, cluster, body_len - 1, &mut out),
        Err(FrameError::TooLong(body_len))
    );
    assert!(out.is_empty(), "nothing written for a refused body");
    encode(&body, cluster, body_len, &mut out).unwrap();
    assert_eq!(out, sized);
}

/// The length bounds that producers cut by are upper bounds of what the items take in an
/// encoded body, for small and large items alike.
#[test]
fn length_bounds_hold_for_encoded_bodies() {
    let encoded_len = |body: &Body| rkyv::to_bytes::<rancor::Error>(body).unwrap().len();
    let messages = sample()
        .into_iter()
        .find_map(|body| match body {
            Body::Forward { messages } => Some(messages),
            _ => None,
        })
        .expect("the samples hold a Forward");
    for (count, payload_len) in [(1, 0), (3, 1), (17, 9), (5, 100_000)] {
        let mut items = Vec::new();
        for n in 0..count {
            let mut item = messages[0].clone();
            item.sequence = n;
            if let Item::Publish { message, .. } = &mut item.item {
                message.payload = vec![7; payload_len + n as usize];
            }
            items.push(item);
            items.extend(messages[1..].iter().cloned());
        }
        let bound: usize = items.iter().map(Forwarded::len_bound).sum();
        let body = Body::Forward { messages: items };
        assert!(encoded_len(&body) <= bound + 64, "{count} x {payload_len}");
    }
    let routes: Vec<Route> = (0..50)
        .map(|n| Route {
            filter: "f".repeat(n * 7),
            group: (n % 2 == 0).then(|| "g".repeat(n)),
        })
        .collect();
    let entries = vec![
        LogEntry::Replace {
            origin: 1,
            routes: routes.clone(),
        },
        LogEntry::Route {
            origin: 2,
            route: routes[9].clone(),
            added: true,
        },
        LogEntry::Setting {
            key: "k".repeat(30),
            value: "v".repeat(3),
        },
        LogEntry::Removed(3),
    ];
    let bound: usize = entries.iter().map(LogEntry::len_bound).sum();
    let body = Body::LogEntries {
        epoch: 1,
        first: 1,
        entries,
    };
    assert!(encoded_len(&body) <= bound + 64);
    let bound: usize = routes.iter().map(Route::len_bound).sum();
    let body = Body::RouteSync {
        sequence: 1,
        routes,
    };
    assert!(encoded_len(&body) <= bound + 64);
}

/// A node's answer is checked against the frame budget by its bound before it is sent: the
/// bound holds for small and large answers, and an answer within it always encodes under a
/// limit of twice the budget.
#[test]
fn node_answer_bounds_hold_and_an_answer_within_the_budget_encodes() {
    let cluster = cluster_id("test");
    for len in [0usize, 1, 15, 16, 17, 1000, 100_000] {
        for answer in [Ok(vec![b'x'; len]), Err("e".repeat(len))] {
            let bound = node_answer_len_bound(&answer);
            let body = Body::NodeAnswer { id: 1, answer };
            let encoded = rkyv::to_bytes::<rancor::Error>(&body).unwrap().len();
            assert!(encoded <= bound, "{len}: {encoded} > {bound}");
            let mut out = BytesMut::new();
            encode(&body, cluster, bound * FRAME_BUDGET_DIVISOR, &mut out).unwrap();
        }
    }
    // Above the limit the encoder refuses it whole (the node layer never gets there).
    let body = Body::NodeAnswer {
        id: 1,
        answer: Ok(vec![0; 5000]),
    };
    let mut out = BytesMut::new();
    assert!(matches!(
        encode(&body, cluster, 4096, &mut out),
        Err(FrameError::TooLong(_))
    ));
    assert!(out.is_empty());
}

/// Hostile bytes under the new kinds: a body of another kind than its header says, a body cut
/// short, and garbage with correct checksums are all refused as frame errors (the link ends),
/// never a panic.
#[test]
fn hostile_node_query_frames_are_refused_not_panicked_on() {
    let cluster = cluster_id("test");
    let refused = |bytes: &[u8]| {
        let mut decoder = Decoder::new(cluster, 1 << 20);
        decoder.extend(bytes);
        decoder.next_frame()
    };
    let rechecksum = |frame: &mut Vec<u8>| {
        let body = frame[HEADER_LEN..].to_vec();
        frame[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
        frame[20..24].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let crc = crc32fast::hash(&frame[0..24]);
        frame[24..28].copy_from_slice(&crc.to_le_bytes());
    };
    let mut query = BytesMut::new();
    encode(
        &Body::NodeQuery {
            id: 3,
            query: b"{}".to_vec(),
        },
        cluster,
        1 << 20,
        &mut query,
    )
    .unwrap();
    // The header names the answer kind for a query body.
    let mut wrong_kind = query.to_vec();
    wrong_kind[6] = 18;
    rechecksum(&mut wrong_kind);
    assert!(matches!(refused(&wrong_kind), Err(FrameError::Body(_))));
    // The body cut short by 8 bytes, checksums made right again.
    let mut short = query.to_vec();
    short.truncate(short.len() - 8);
    rechecksum(&mut short);
    assert!(matches!(refused(&short), Err(FrameError::Body(_))));
    // Garbage of every byte value under both kinds (and a kind no version has).
    for kind in [17u8, 18, 19, 255] {
        for fill in [0x00u8, 0x11, 0x7F, 0xFF] {
            let mut garbage = query[..HEADER_LEN].to_vec();
            garbage[6] = kind;
            garbage.extend_from_slice(&[fill; 48]);
            rechecksum(&mut garbage);
            assert!(refused(&garbage).is_err(), "kind {kind} fill {fill:#x}");
        }
    }
    // An answer whose length field claims more than the body holds.
    let mut answer = BytesMut::new();
    encode(
        &Body::NodeAnswer {
            id: 3,
            answer: Ok(vec![b'a'; 64]),
        },
        cluster,
        1 << 20,
        &mut answer,
    )
    .unwrap();
    let mut lying = answer.to_vec();
    let at = lying
        .windows(4)
        .rposition(|w| w == 64u32.to_le_bytes())
        .expect("the answer's length is in its body");
    lying[at..at + 4].copy_from_slice(&100_000u32.to_le_bytes());
    rechecksum(&mut lying);
    assert!(matches!(refused(&lying), Err(FrameError::Body(_))));
}

/// Version 2 added kinds 17 and 18, version 3 the replication items, version 4 `Disown`; a
/// version 3 peer stays in the window (rolling upgrade), and the node layer sends what is new
/// only to peers of the version that has it.
#[test]
fn the_previous_version_stays_compatible() {
    assert_eq!(FENCE_VERSION, PROTOCOL_VERSION);
    assert_eq!(REPLICATION_VERSION, PROTOCOL_VERSION - 1);
    assert!(version_compatible(PROTOCOL_VERSION - 1));
    assert!(!version_compatible(PROTOCOL_VERSION - 2));
}

/// The replication records travel as `Bytes` (shared by the forward queues, not copied)
/// but are archived exactly as the `Vec<u8>` of version 3 was, so the wire is unchanged; a
/// `Replicate` item and the version it needs survive a frame round trip.
#[test]
fn replication_records_as_bytes_keep_the_wire_format_of_a_vec() {
    #[derive(rkyv::Archive, rkyv::Serialize)]
    struct AsVec {
        reset: bool,
        records: Vec<u8>,
    }
    #[derive(rkyv::Archive, rkyv::Serialize)]
    struct AsBytes {
        reset: bool,
        #[rkyv(with = BytesAsVec)]
        records: bytes::Bytes,
    }
    let records = b"framed records, as in the durable log".to_vec();
    let old = rkyv::to_bytes::<rancor::Error>(&AsVec {
        reset: true,
        records: records.clone(),
    })
    .unwrap();
    let new = rkyv::to_bytes::<rancor::Error>(&AsBytes {
        reset: true,
        records: bytes::Bytes::from(records.clone()),
    })
    .unwrap();
    assert_eq!(old.as_slice(), new.as_slice());

    let item = Item::Replicate {
        reset: false,
        records: bytes::Bytes::from(records),
    };
    assert_eq!(item.version_min(), REPLICATION_VERSION);
    let body = Body::Forward {
        messages: vec![Forwarded { sequence: 7, item }],
    };
    let mut out = BytesMut::new();
    encode(&body, 9, 1 << 20, &mut out).unwrap();
    let mut decoder = Decoder::new(9, 1 << 20);
    decoder.extend(&out);
    assert_eq!(decoder.next_frame().unwrap(), Some(body));
}

#[test]
fn cutting_by_length_keeps_order_and_fits_the_budget() {
    let runs = cut_by_len([3usize, 4, 2, 9, 1, 1, 5], |&n| n, 6);
    assert_eq!(runs, [vec![3], vec![4, 2], vec![9], vec![1, 1], vec![5]]);
    assert!(cut_by_len(Vec::<usize>::new(), |&n| n, 6).is_empty());
}
