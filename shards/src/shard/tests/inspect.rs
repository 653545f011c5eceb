//! The admin API's questions to a shard (`inspect.rs`): listings bounded by their limit,
//! a kick that ends a connection like any server-side close, and a retained deletion that
//! reaches every shard.

use super::*;
use crate::shard::inspect::{ClientFilter, Listing, PAYLOAD_BYTES_MAX, Query, Reply};

/// Asks `shard` and carries out what the answer changed (a kick's DISCONNECT, a deletion's
/// messages to the other shards).
fn ask(node: &mut Node, shard: usize, query: Query) -> Reply {
    let reply = node.shards[shard].inspect(query);
    node.run(shard, Input::Tick);
    reply
}

/// Connects `client_id` from `peer` on the shard that owns it (the harness opens handed-off
/// connections without a transport).
fn connect_from(node: &mut Node, id: ConnectionId, connect: Connect, peer: &str) -> usize {
    let shard = usize::from(owner_shard(&connect.client_id, node.shards.len() as u16));
    let transport = Transport {
        listener: 1,
        peer: Some(peer.parse().unwrap()),
        certificate_name: None,
    };
    node.connect_over(id, shard, connect, transport);
    node.take(id);
    shard
}

fn listed(node: &mut Node, filter: ClientFilter, limit: usize) -> (Vec<String>, bool) {
    let mut ids = Vec::new();
    let mut truncated = false;
    for shard in 0..node.shards.len() {
        let Reply::Clients(Listing {
            entries: clients,
            truncated: more,
            ..
        }) = ask(
            node,
            shard,
            Query::Clients {
                filter: filter.clone(),
                limit,
            },
        )
        else {
            panic!("a clients reply");
        };
        ids.extend(clients.into_iter().map(|c| c.client_id));
        truncated |= more;
    }
    ids.sort();
    (ids, truncated)
}

#[test]
fn clients_are_listed_with_their_fields_and_filtered() {
    let mut node = Node::new(2, Limits::default());
    let mut named = connect(V5, "sensor-1", true);
    named.username = Some(ByteString::from_static("alice"));
    named.keep_alive_seconds = 30;
    let shard = connect_from(&mut node, 1, named, "10.0.0.7:5000");
    connect_from(
        &mut node,
        2,
        connect(V311, "sensor-2", false),
        "10.0.0.8:5001",
    );
    connect_from(&mut node, 3, connect(V5, "other", true), "[::1]:5002");
    node.send(1, &subscribe(1, "a/#", QoS::AtLeastOnce));
    node.advance(1_500);

    let Reply::Clients(Listing {
        entries: clients,
        truncated,
        ..
    }) = ask(
        &mut node,
        shard,
        Query::Clients {
            filter: ClientFilter {
                username: Some("alice".into()),
                ..ClientFilter::default()
            },
            limit: 10,
        },
    )
    else {
        panic!("a clients reply");
    };
    assert!(!truncated);
    let [client] = clients.as_slice() else {
        panic!("one client named alice: {clients:?}");
    };
    assert_eq!(client.client_id, "sensor-1");
    assert_eq!(client.username.as_deref(), Some("alice"));
    assert_eq!(client.address, Some("10.0.0.7:5000".parse().unwrap()));
    assert_eq!(client.listener, 1);
    assert_eq!(client.protocol, "5.0");
    assert_eq!(
        client.connected_at_ms, 1_000,
        "the harness's clock at the CONNECT"
    );
    assert_eq!(client.keep_alive_seconds, 30);
    assert!(client.clean_start);
    assert_eq!(client.session_expiry_seconds, 0);
    assert_eq!(client.subscriptions, 1);

    let all = ClientFilter::default();
    assert_eq!(
        listed(&mut node, all.clone(), 10).0,
        ["other", "sensor-1", "sensor-2"]
    );
    let prefix = ClientFilter {
        client_id_prefix: Some("sensor-".into()),
        ..ClientFilter::default()
    };
    assert_eq!(listed(&mut node, prefix, 10).0, ["sensor-1", "sensor-2"]);
    let by_ip = |address: &str| ClientFilter {
        address: Some(address.into()),
        ..ClientFilter::default()
    };
    assert_eq!(listed(&mut node, by_ip("10.0.0.8"), 10).0, ["sensor-2"]);
    assert_eq!(listed(&mut node, by_ip("::1"), 10).0, ["other"]);
    assert_eq!(
        listed(&mut node, by_ip("10.0.0."), 10).0,
        ["sensor-1", "sensor-2"]
    );
    assert!(listed(&mut node, by_ip("10.0.0.9"), 10).0.is_empty());
    // A limit of 1 per shard: at least one shard holds two of the three.
    let (limited, truncated) = listed(&mut node, all, 1);
    assert!(truncated && limited.len() == 2, "{limited:?}");

    let Reply::Client(Some(detail)) = ask(
        &mut node,
        shard,
        Query::Client {
            client_id: "sensor-1".into(),
        },
    ) else {
        panic!("sensor-1 is connected");
    };
    assert_eq!(detail.subscriptions.len(), 1);
    assert_eq!(detail.subscriptions[0].filter, "a/#");
    assert_eq!(detail.subscriptions[0].options.qos, QoS::AtLeastOnce);
    let sensor_2 = usize::from(owner_shard("sensor-2", 2));
    let Reply::Client(Some(detail)) = ask(
        &mut node,
        sensor_2,
        Query::Client {
            client_id: "sensor-2".into(),
        },
    ) else {
        panic!("sensor-2 is connected");
    };
    assert_eq!(detail.client.protocol, "3.1.1");
    assert!(!detail.client.clean_start);
    assert_eq!(
        ask(
            &mut node,
            shard,
            Query::Client {
                client_id: "nobody".into()
            }
        ),
        Reply::Client(None)
    );
}

#[test]
fn a_kicked_client_is_disconnected_its_will_published_and_a_persistent_session_kept() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "watcher", true));
    node.send(1, &subscribe(1, "wills/#", QoS::AtMostOnce));
    node.take(1);
    let mut kicked = v5_persistent("kicked", 600);
    kicked.will = Some(Will {
        topic: ByteString::from_static("wills/kicked"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    node.connect(2, 0, kicked);
    node.connect(3, 0, connect(V311, "old", true));

    assert_eq!(
        ask(
            &mut node,
            0,
            Query::Kick {
                client_id: "kicked".into(),
                asked_by: None,
            }
        ),
        Reply::Kicked(true)
    );
    let packets = node.take(2);
    assert!(
        matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::ADMINISTRATIVE_ACTION),
        "{packets:?}"
    );
    assert!(node.closed.contains(&2));
    assert_eq!(payloads(&node.take(1)), [(&b"gone"[..], QoS::AtMostOnce)]);
    assert_eq!(
        node.shards[0].session_count(),
        3,
        "the persistent session stays"
    );
    assert_eq!(
        ask(
            &mut node,
            0,
            Query::Kick {
                client_id: "kicked".into(),
                asked_by: None,
            }
        ),
        Reply::Kicked(false),
        "no longer connected"
    );

    assert_eq!(
        ask(
            &mut node,
            0,
            Query::Kick {
                client_id: "old".into(),
                asked_by: Some(2),
            }
        ),
        Reply::Kicked(true)
    );
    assert!(node.take(3).is_empty(), "3.1.1 has no server DISCONNECT");
    assert!(node.closed.contains(&3));
    assert_eq!(node.shards[0].session_count(), 2, "a clean session ends");
    let back = node.connect(4, 0, v5_persistent("kicked", 600));
    assert!(back.session_present);
}

#[test]
fn subscriptions_and_routes_are_listed_by_prefix_within_the_limit() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "a-1", true));
    node.send(
        1,
        &subscribe_all(1, &["x/1", "x/2", "y/#"], QoS::AtLeastOnce),
    );
    node.connect(2, 0, connect(V5, "b-1", true));
    node.send(
        2,
        &subscribe_all(1, &["x/1", "$share/g/z/+"], QoS::AtMostOnce),
    );
    let subscriptions = |node: &mut Node, client: Option<&str>, filter: Option<&str>, limit| {
        let Reply::Subscriptions(Listing {
            entries: subscriptions,
            truncated,
            ..
        }) = ask(
            node,
            0,
            Query::Subscriptions {
                client_id_prefix: client.map(str::to_string),
                filter_prefix: filter.map(str::to_string),
                limit,
            },
        )
        else {
            panic!("a subscriptions reply");
        };
        let pairs: Vec<String> = subscriptions
            .iter()
            .map(|s| format!("{} {} {}", s.client_id, s.filter, s.options.qos as u8))
            .collect();
        (pairs, truncated)
    };
    let (mut all, truncated) = subscriptions(&mut node, None, None, 10);
    all.sort();
    assert!(!truncated);
    assert_eq!(
        all,
        [
            "a-1 x/1 1",
            "a-1 x/2 1",
            "a-1 y/# 1",
            "b-1 $share/g/z/+ 0",
            "b-1 x/1 0"
        ]
    );
    assert_eq!(
        subscriptions(&mut node, Some("b"), Some("x/"), 10).0,
        ["b-1 x/1 0"]
    );
    let (two, truncated) = subscriptions(&mut node, None, None, 2);
    assert!(truncated && two.len() == 2);

    let routes = |node: &mut Node, prefix: Option<&str>, limit| {
        let Reply::Routes { routes, truncated } = ask(
            node,
            0,
            Query::Routes {
                filter_prefix: prefix.map(str::to_string),
                limit,
            },
        ) else {
            panic!("a routes reply");
        };
        (
            routes
                .into_iter()
                .map(|r| (r.filter, r.nodes))
                .collect::<Vec<_>>(),
            truncated,
        )
    };
    let (all, truncated) = routes(&mut node, None, 10);
    assert!(!truncated);
    let filters: Vec<&str> = all.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(filters, ["$share/g/z/+", "x/1", "x/2", "y/#"]);
    assert!(all.iter().all(|(_, nodes)| nodes == &[0]));
    assert_eq!(routes(&mut node, Some("x/"), 1).0.len(), 1);
    assert!(routes(&mut node, Some("x/"), 1).1);
    assert_eq!(routes(&mut node, Some("$share/"), 10).0.len(), 1);
}

fn retained_publish(topic: &'static str, payload: &'static [u8]) -> Packet {
    let Packet::Publish(publish) = publish(topic, QoS::AtLeastOnce, 1, payload) else {
        unreachable!("publish builds a PUBLISH");
    };
    Packet::Publish(Publish {
        retain: true,
        ..publish
    })
}

#[test]
fn retained_messages_are_listed_read_and_deleted_on_every_shard() {
    let mut node = Node::new(2, Limits::default());
    node.connect(1, 0, connect(V5, "publisher", true));
    node.send(1, &retained_publish("r/a", b"one"));
    node.send(1, &retained_publish("r/b", &[0xff, 0xfe]));
    node.send(1, &retained_publish("s/c", b"three"));
    let list = |node: &mut Node, prefix: Option<&str>, filter: Option<&str>, limit| {
        let Reply::Retained(Listing {
            entries: retained,
            truncated,
            ..
        }) = ask(
            node,
            0,
            Query::Retained {
                topic_prefix: prefix.map(str::to_string),
                filter: filter.map(str::to_string),
                limit,
            },
        )
        else {
            panic!("a retained reply");
        };
        let topics: Vec<(String, usize)> = retained
            .into_iter()
            .map(|r| (r.topic, r.payload_bytes))
            .collect();
        (topics, truncated)
    };
    let (all, truncated) = list(&mut node, None, None, 10);
    assert!(!truncated);
    assert_eq!(
        all,
        [("r/a".into(), 3), ("r/b".into(), 2), ("s/c".into(), 5)]
    );
    assert_eq!(list(&mut node, Some("r/"), None, 10).0.len(), 2);
    assert_eq!(
        list(&mut node, None, Some("+/c"), 10).0,
        [("s/c".into(), 5)]
    );
    let (one, truncated) = list(&mut node, Some("r/"), None, 1);
    assert!(truncated && one.len() == 1);

    let Reply::RetainedMessage(Some(message)) = ask(
        &mut node,
        0,
        Query::RetainedGet {
            topic: "r/b".into(),
        },
    ) else {
        panic!("r/b is retained");
    };
    assert_eq!(&message.payload[..], &[0xff, 0xfe]);
    assert!(!message.payload_truncated);

    assert_eq!(
        ask(
            &mut node,
            0,
            Query::RetainedDelete {
                topic: "r/a".into()
            }
        ),
        Reply::RetainedDeleted(true)
    );
    for shard in &node.shards {
        assert!(
            shard.retained.get("r/a").is_none(),
            "every shard cleared it"
        );
        assert_eq!(shard.retained.len(), 2);
    }
    assert_eq!(
        ask(
            &mut node,
            0,
            Query::RetainedDelete {
                topic: "r/a".into()
            }
        ),
        Reply::RetainedDeleted(false)
    );
    assert_eq!(
        ask(
            &mut node,
            0,
            Query::RetainedGet {
                topic: "r/a".into()
            }
        ),
        Reply::RetainedMessage(None)
    );
    // A new subscriber on either shard gets only what is left.
    for (id, shard) in [(5, 0), (6, 1)] {
        node.connect(
            id,
            shard,
            connect(V5, if shard == 0 { "late-0" } else { "late-1" }, true),
        );
        node.send(id, &subscribe(1, "r/#", QoS::AtMostOnce));
        let packets = node.take(id);
        let topics: Vec<&str> = publishes_in(&packets)
            .iter()
            .map(|p| &p.topic[..])
            .collect();
        assert_eq!(topics, ["r/b"]);
    }
}

#[test]
fn a_large_retained_payload_is_cut_to_the_answer_bound() {
    let mut node = Node::new(1, Limits::default());
    node.connect(1, 0, connect(V5, "publisher", true));
    let big: &'static [u8] = Box::leak(vec![b'x'; PAYLOAD_BYTES_MAX + 10].into_boxed_slice());
    node.send(1, &retained_publish("big", big));
    let Reply::RetainedMessage(Some(message)) = ask(
        &mut node,
        0,
        Query::RetainedGet {
            topic: "big".into(),
        },
    ) else {
        panic!("big is retained");
    };
    assert_eq!(message.payload.len(), PAYLOAD_BYTES_MAX);
    assert_eq!(message.info.payload_bytes, PAYLOAD_BYTES_MAX + 10);
    assert!(message.payload_truncated);
}

/// A listing on one shard with a scan budget of `budget` entries examined.
fn scanned(node: &mut Node, query: Query, budget: usize) -> Listing<String> {
    match node.shards[0].inspect_within(query, budget) {
        Reply::Clients(listing) => Listing {
            entries: listing.entries.into_iter().map(|c| c.client_id).collect(),
            truncated: listing.truncated,
            scan_limited: listing.scan_limited,
        },
        Reply::Subscriptions(listing) => Listing {
            entries: (listing.entries.into_iter())
                .map(|s| format!("{} {}", s.client_id, s.filter))
                .collect(),
            truncated: listing.truncated,
            scan_limited: listing.scan_limited,
        },
        Reply::Retained(listing) => Listing {
            entries: listing.entries.into_iter().map(|r| r.topic).collect(),
            truncated: listing.truncated,
            scan_limited: listing.scan_limited,
        },
        other => panic!("a listing: {other:?}"),
    }
}

#[test]
fn listings_stop_at_their_scan_budget_and_keep_the_smallest_keys() {
    let mut node = Node::new(1, Limits::default());
    // Slot order d, b, e, a, c: not the order of the identifiers.
    for (id, client) in (1..).zip(["d", "b", "e", "a", "c"]) {
        node.connect(id, 0, connect(V5, client, true));
    }
    node.send(
        1,
        &subscribe_all(1, &["t/5", "t/3", "t/1", "t/4", "t/2"], QoS::AtMostOnce),
    );
    let clients = |username: Option<&str>, limit| Query::Clients {
        filter: ClientFilter {
            username: username.map(str::to_string),
            ..ClientFilter::default()
        },
        limit,
    };

    // A filter that matches nothing stops at the budget instead of walking every session.
    let nobody = scanned(&mut node, clients(Some("nobody"), 10), 3);
    assert!(nobody.entries.is_empty());
    assert!(nobody.scan_limited && nobody.truncated);
    let all = scanned(&mut node, clients(None, 10), 3);
    assert_eq!(all.entries, ["b", "d", "e"], "only the first three slots");
    assert!(all.scan_limited);
    let whole = scanned(&mut node, clients(Some("nobody"), 10), 100);
    assert!(!whole.scan_limited && !whole.truncated);

    // Past the limit, the smallest identifiers, not the first slots.
    let first = scanned(&mut node, clients(None, 2), 100);
    assert_eq!(first.entries, ["a", "b"]);
    assert!(first.truncated && !first.scan_limited);

    let subscriptions = |filter_prefix: &str, limit| Query::Subscriptions {
        client_id_prefix: None,
        filter_prefix: Some(filter_prefix.to_string()),
        limit,
    };
    // Session `d` and three of its five subscriptions fit a budget of four.
    let cut = scanned(&mut node, subscriptions("t/", 10), 4);
    assert_eq!(cut.entries.len(), 3, "{:?}", cut.entries);
    assert!(cut.scan_limited && cut.truncated);
    let none = scanned(&mut node, subscriptions("zzz", 10), 4);
    assert!(none.entries.is_empty() && none.scan_limited);
    let smallest = scanned(&mut node, subscriptions("t/", 2), 100);
    assert_eq!(smallest.entries, ["d t/1", "d t/2"]);
    assert!(smallest.truncated && !smallest.scan_limited);

    for topic in ["r/1", "r/2", "r/3", "r/4", "s/1"] {
        node.send(1, &retained_publish(topic, b"x"));
    }
    let retained = |filter: &str| Query::Retained {
        topic_prefix: None,
        filter: Some(filter.to_string()),
        limit: 10,
    };
    let wildcard = scanned(&mut node, retained("+/9"), 3);
    assert!(wildcard.entries.is_empty() && wildcard.scan_limited);
    let under = scanned(&mut node, retained("r/#"), 100);
    assert_eq!(under.entries, ["r/1", "r/2", "r/3", "r/4"]);
    assert!(!under.scan_limited && !under.truncated);
    let exact = scanned(&mut node, retained("s/1"), 1);
    assert_eq!(exact.entries, ["s/1"]);
    assert!(!exact.scan_limited);
}
