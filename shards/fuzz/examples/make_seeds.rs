//! Writes the seed snapshots of the `snapshot` fuzz target into `seeds/` beside this crate:
//! real snapshots in the format `shardmq_shards::snapshot::encode` writes, small enough to
//! commit, covering each record kind, every subscription option, in-flight messages in both
//! states, queued messages, message properties and expiry, and a cut tail.
//!
//!     cd shards/fuzz && cargo run --example make_seeds
//!
//! Run it again whenever the snapshot format changes.

use bytes::Bytes;
use bytestring::ByteString;
use shardmq_net::mqtt::{
    ProtocolVersion, PublishProperties, QoS, RetainHandling, SubscriptionOptions,
};
use shardmq_shards::Message;
use shardmq_shards::snapshot::{self, Record, SavedDelivery, SavedInflight, SavedSession};

const NOW_MS: u64 = 1_000_000;

fn message(topic: &'static str, payload: &'static [u8], qos: QoS) -> Message {
    Message {
        topic: ByteString::from_static(topic),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: PublishProperties::default(),
        expires_at_ms: None,
        publisher: None,
    }
}

fn delivery(topic: &'static str, payload: &'static [u8], identifiers: Vec<u32>) -> SavedDelivery {
    SavedDelivery {
        message: message(topic, payload, QoS::AtLeastOnce),
        subscription_identifiers: identifiers,
    }
}

fn session(client_id: &'static str, version: ProtocolVersion) -> SavedSession {
    SavedSession {
        client_id: ByteString::from_static(client_id),
        version,
        expiry_seconds: 3600,
        subscriptions: Vec::new(),
        inflight: Vec::new(),
        queue: Vec::new(),
    }
}

fn main() {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    std::fs::create_dir_all(&directory).unwrap();

    let mut full = session("keeper", ProtocolVersion::V5);
    full.subscriptions = vec![
        (
            ByteString::from_static("sensors/+/temperature"),
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::SendIfNew,
            },
            Some(7),
        ),
        (
            ByteString::from_static("$share/group/jobs/#"),
            SubscriptionOptions::new(QoS::AtLeastOnce),
            None,
        ),
        (
            ByteString::from_static("#"),
            SubscriptionOptions {
                retain_handling: RetainHandling::DoNotSend,
                ..SubscriptionOptions::new(QoS::AtMostOnce)
            },
            Some(268_435_455),
        ),
    ];
    full.inflight = vec![
        SavedInflight {
            packet_id: 1,
            released: false,
            delivery: delivery("sensors/a/temperature", b"21.5", vec![7]),
        },
        SavedInflight {
            packet_id: 65_535,
            released: true,
            delivery: delivery("jobs/x", b"", Vec::new()),
        },
    ];
    let mut with_properties = message("sensors/b/temperature", b"{\"c\": 19}", QoS::ExactlyOnce);
    with_properties.properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some(ByteString::from_static("application/json")),
        response_topic: Some(ByteString::from_static("reply/keeper")),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![(ByteString::from_static("k"), ByteString::from_static("v"))],
        ..PublishProperties::default()
    };
    with_properties.expires_at_ms = Some(NOW_MS + 60_000);
    full.queue = vec![
        SavedDelivery {
            message: with_properties,
            subscription_identifiers: vec![7, 9],
        },
        delivery("jobs/y", b"queued", Vec::new()),
    ];

    let mut v3 = session("old-client", ProtocolVersion::V3_1_1);
    v3.expiry_seconds = u32::MAX;
    v3.subscriptions = vec![(
        ByteString::from_static("a/b"),
        SubscriptionOptions::new(QoS::AtLeastOnce),
        None,
    )];
    let v31 = session("ancient", ProtocolVersion::V3_1);

    let retained = Record::Retained(Message {
        retain: true,
        ..message("status/broker", b"up", QoS::AtLeastOnce)
    });

    let seeds: Vec<(&str, Vec<Record>)> = vec![
        ("empty", Vec::new()),
        ("retained", vec![retained.clone()]),
        ("sessions", vec![Record::Session(v3), Record::Session(v31)]),
        ("full", vec![Record::Session(full), retained]),
    ];
    for (name, records) in seeds {
        let bytes = snapshot::encode(&records, NOW_MS);
        std::fs::write(directory.join(format!("{name}.snapshot")), &bytes).unwrap();
        if name == "full" {
            // A torn write: the last record cut in the middle.
            let cut = &bytes[..bytes.len() - 5];
            std::fs::write(directory.join("full-torn.snapshot"), cut).unwrap();
        }
    }
}
