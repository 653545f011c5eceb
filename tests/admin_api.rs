//! The admin API's clients, subscriptions, routes and retained endpoints, and the matching
//! `shardmq ctl` commands, against a real broker of two shards with real clients (rumqttc
//! 5.0 and 3.1.1, mosquitto_sub): listed with the right fields, filtered and bounded; a kick
//! ends a connection like any server-side close (DISCONNECT 0x98 for 5.0) and keeps a
//! persistent session; a retained deletion reaches every shard; bad parameters are 400,
//! unknown ids 404, a missing token 401.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use support::{ADMIN_TOKEN, Broker, http_get, http_raw, v4, v5};

const WAIT: Duration = Duration::from_secs(10);

/// `GET path` with the token: the status and the JSON body.
fn get(broker: &Broker, path: &str) -> (u16, Value) {
    let (status, body) = http_get(broker.admin_address(), path, Some(ADMIN_TOKEN));
    let value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
    (status, value)
}

/// `DELETE path` with the token and `Content-Type: application/json` unless `json` is false.
fn delete(broker: &Broker, path: &str, json: bool) -> (u16, Value) {
    let address = broker.admin_address();
    let content_type = if json {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let (status, body) = http_raw(
        address,
        &format!(
            "DELETE {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n{content_type}Connection: close\r\n\r\n"
        ),
    );
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn client_ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("a client list: {answer}"))
        .iter()
        .map(|client| client["client_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Polls `path` until `done` holds for its answer (connections and kicks land
/// asynchronously), for at most [`WAIT`].
fn wait_answer(broker: &Broker, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, answer) = get(broker, path);
        if status == 200 && done(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{path}: {status} {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn clients_are_listed_with_their_fields_filtered_and_bounded() {
    let broker = Broker::start(2);
    let before = unix_ms();
    let modern = v5(broker.port, "api-v5", |o| {
        o.set_credentials("alice", "secret");
    });
    modern.subscribe("api/+/state", QoS::AtLeastOnce);
    let _old = v4(broker.port, "api-v311", |o| {
        o.set_clean_session(false);
    });
    let mut mosquitto = Command::new("timeout")
        .args(["20", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
        .arg(broker.port.to_string())
        .args(["-V", "mqttv5", "-i", "mosq-api", "-t", "mosq/#", "-k", "45"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub is installed (the test command installs mosquitto-clients)");
    let all = wait_answer(&broker, "/api/v1/clients", |answer| {
        client_ids(answer).len() == 3
    });
    let after = unix_ms();
    assert_eq!(client_ids(&all), ["api-v311", "api-v5", "mosq-api"]);
    assert_eq!(all["truncated"], false);
    assert_eq!(
        all["scan_limited"], false,
        "three sessions are far below the budget"
    );
    assert_eq!(all["errors"], serde_json::json!([]));
    let client = |id: &str| {
        all["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client_id"] == id)
            .unwrap()
            .clone()
    };
    let v5_client = client("api-v5");
    assert_eq!(v5_client["protocol"], "5.0");
    assert_eq!(v5_client["username"], "alice");
    assert!(
        v5_client["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{v5_client}"
    );
    assert_eq!(v5_client["listener"], 0);
    assert_eq!(v5_client["keep_alive"], 30);
    assert_eq!(v5_client["clean_start"], true);
    assert_eq!(v5_client["session_expiry"], 0);
    assert_eq!(v5_client["subscriptions"], 1);
    assert_eq!(v5_client["queued"], 0);
    assert_eq!(v5_client["inflight"], 0);
    let since = v5_client["connected_since_ms"].as_u64().unwrap();
    // The shard's clock advances at its events: allow a second either side.
    assert!(
        since + 1_000 >= before && since <= after + 1_000,
        "{before} <= {since} <= {after}"
    );
    let v3_client = client("api-v311");
    assert_eq!(v3_client["protocol"], "3.1.1");
    assert_eq!(v3_client["clean_start"], false);
    assert_eq!(v3_client["username"], Value::Null);
    assert_eq!(client("mosq-api")["keep_alive"], 45);

    let ids = |path: &str| client_ids(&get(&broker, path).1);
    assert_eq!(
        ids("/api/v1/clients?client_id_prefix=api-"),
        ["api-v311", "api-v5"]
    );
    assert_eq!(ids("/api/v1/clients?username=alice"), ["api-v5"]);
    assert_eq!(ids("/api/v1/clients?address=127.0.0.1").len(), 3);
    assert!(ids("/api/v1/clients?address=10.9.9.9").is_empty());
    let (status, limited) = get(&broker, "/api/v1/clients?limit=2");
    assert_eq!(status, 200);
    assert_eq!(
        client_ids(&limited),
        ["api-v311", "api-v5"],
        "sorted, then cut"
    );
    assert_eq!(limited["truncated"], true);
    assert_eq!(limited["scan_limited"], false);
    // A node alone has no number: a node filter keeps nothing.
    assert!(ids("/api/v1/clients?node=1").is_empty());

    let (status, detail) = get(&broker, "/api/v1/clients/api-v5");
    assert_eq!(status, 200, "{detail}");
    assert_eq!(
        detail["subscription_list"],
        serde_json::json!([{
            "filter": "api/+/state",
            "qos": 1,
            "no_local": false,
            "retain_as_published": false,
            "retain_handling": 0,
        }])
    );
    let (status, subscriptions) = get(&broker, "/api/v1/subscriptions?filter_prefix=api/");
    assert_eq!(status, 200);
    assert_eq!(
        subscriptions["subscriptions"],
        serde_json::json!([{ "client_id": "api-v5", "node": null, "filter": "api/+/state", "qos": 1 }])
    );
    // mosquitto_sub subscribes after its CONNACK: wait for it.
    wait_answer(
        &broker,
        "/api/v1/subscriptions?client_id_prefix=mosq",
        |answer| answer["subscriptions"][0]["filter"] == "mosq/#",
    );
    let (status, routes) = get(&broker, "/api/v1/routes?filter_prefix=api/");
    assert_eq!(status, 200);
    assert_eq!(
        routes["routes"],
        serde_json::json!([{ "filter": "api/+/state", "nodes": [null] }])
    );
    assert_eq!(routes["truncated"], false);

    for (path, status) in [
        ("/api/v1/clients?limit=abc", 400),
        ("/api/v1/clients?limit=0", 400),
        ("/api/v1/clients?colour=red", 400),
        ("/api/v1/clients?node=x", 400),
        ("/api/v1/subscriptions?limit=1&limit=2", 400),
        ("/api/v1/clients/nobody", 404),
        ("/api/v1/retained?filter=a/%23/b", 400),
    ] {
        let (got, answer) = get(&broker, path);
        assert_eq!(got, status, "{path}: {answer}");
        assert!(answer["error"].is_string(), "{path}: {answer}");
    }
    for path in [
        "/api/v1/clients",
        "/api/v1/subscriptions",
        "/api/v1/routes",
        "/api/v1/retained",
    ] {
        let (status, _) = http_get(broker.admin_address(), path, None);
        assert_eq!(status, 401, "{path} without the token");
    }
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
}

#[test]
fn a_kick_disconnects_5_0_with_0x98_closes_3_1_1_and_keeps_a_persistent_session() {
    let broker = Broker::start(2);
    let modern = v5(broker.port, "kick-v5", |_| {});
    let old = v4(broker.port, "kick-v311", |_| {});
    let keeper = v5(broker.port, "kick-keeper", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(300));
    });
    keeper.subscribe("kept/#", QoS::AtLeastOnce);

    let (status, answer) = delete(&broker, "/api/v1/clients/kick-v5", false);
    assert_eq!(
        status, 415,
        "a state change needs Content-Type: application/json: {answer}"
    );
    let (status, answer) = delete(&broker, "/api/v1/clients/kick-v5", true);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, serde_json::json!({ "kicked": true, "node": null }));
    let ended = modern
        .ended
        .recv_timeout(WAIT)
        .expect("the 5.0 client is disconnected");
    assert!(
        format!("{ended:?}").contains("AdministrativeAction"),
        "DISCONNECT 0x98: {ended:?}"
    );
    let log = broker.log_text();
    let line = log
        .lines()
        .find(|line| line.contains("client kicked by the admin API"))
        .unwrap_or_else(|| panic!("the kick is logged:\n{log}"));
    assert!(line.contains(r#"asked_by="this node""#), "{line}");
    let (status, _) = get(&broker, "/api/v1/clients/kick-v5");
    assert_eq!(status, 404, "gone from the list");
    let (status, _) = delete(&broker, "/api/v1/clients/kick-v5", true);
    assert_eq!(status, 404);

    // An identifier with a slash and a space is one percent-encoded path segment.
    let odd = v5(broker.port, "odd/id 1", |_| {});
    let (status, detail) = get(&broker, "/api/v1/clients/odd%2Fid%201");
    assert_eq!(
        (status, &detail["client_id"]),
        (200, &Value::from("odd/id 1"))
    );
    let (status, _) = delete(&broker, "/api/v1/clients/odd%2Fid%201", true);
    assert_eq!(status, 200);
    odd.ended
        .recv_timeout(WAIT)
        .expect("odd/id 1 is disconnected");
    let (status, body) = http_raw(
        broker.admin_address(),
        &format!(
            "DELETE /api/v1/clients/kick-v311 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
            broker.admin_address()
        ),
    );
    assert_eq!(status, 401, "a kick needs the token: {body}");

    let (status, _) = delete(&broker, "/api/v1/clients/kick-v311", true);
    assert_eq!(status, 200);
    old.ended
        .recv_timeout(WAIT)
        .expect("the 3.1.1 client is closed");

    let (status, _) = delete(&broker, "/api/v1/clients/kick-keeper", true);
    assert_eq!(status, 200);
    keeper
        .ended
        .recv_timeout(WAIT)
        .expect("the keeper is disconnected");
    let (_, subscriptions) = get(
        &broker,
        "/api/v1/subscriptions?client_id_prefix=kick-keeper",
    );
    assert_eq!(
        subscriptions["subscriptions"][0]["filter"], "kept/#",
        "the offline session keeps its subscriptions"
    );
    let back = v5(broker.port, "kick-keeper", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(300));
    });
    assert!(back.connack.session_present, "the session stayed");
    assert!(
        broker.log_text().contains("client kicked by the admin API"),
        "{}",
        broker.log_text()
    );
}

#[test]
fn retained_messages_are_listed_read_and_deleted_on_every_shard() {
    let broker = Broker::start(2);
    let publisher = v5(broker.port, "ret-publisher", |_| {});
    for (topic, payload) in [
        ("ret/a", b"hello".to_vec()),
        ("ret/b", vec![0xff, 0x00]),
        ("other/c", b"three".to_vec()),
    ] {
        publisher
            .client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .unwrap();
    }
    let all = wait_answer(&broker, "/api/v1/retained", |answer| {
        answer["retained"]
            .as_array()
            .is_some_and(|list| list.len() == 3)
    });
    assert_eq!(
        all["retained"],
        serde_json::json!([
            { "topic": "other/c", "qos": 1, "bytes": 5 },
            { "topic": "ret/a", "qos": 1, "bytes": 5 },
            { "topic": "ret/b", "qos": 1, "bytes": 2 },
        ])
    );
    let (_, prefixed) = get(&broker, "/api/v1/retained?topic_prefix=ret/");
    assert_eq!(prefixed["retained"].as_array().unwrap().len(), 2);
    let (_, filtered) = get(&broker, "/api/v1/retained?filter=%2B/c");
    assert_eq!(filtered["retained"][0]["topic"], "other/c");
    let (_, limited) = get(&broker, "/api/v1/retained?limit=1");
    assert_eq!(limited["truncated"], true);
    assert_eq!(limited["scan_limited"], false);

    let (status, message) = get(&broker, "/api/v1/retained/ret%2Fa");
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["payload_text"], "hello");
    assert_eq!(message["payload_base64"], "aGVsbG8=");
    assert_eq!(message["payload_truncated"], false);
    let (status, same) = get(&broker, "/api/v1/retained/ret/a");
    assert_eq!(
        (status, &same),
        (200, &message),
        "a topic's slashes may stay unencoded"
    );
    let (_, binary) = get(&broker, "/api/v1/retained/ret/b");
    assert_eq!(binary["payload_text"], Value::Null);
    assert_eq!(binary["payload_base64"], "/wA=");

    let (status, answer) = delete(&broker, "/api/v1/retained/ret%2Fa", true);
    assert_eq!(
        (status, answer),
        (200, serde_json::json!({ "deleted": true }))
    );
    let (status, _) = get(&broker, "/api/v1/retained/ret%2Fa");
    assert_eq!(status, 404);
    let (status, _) = delete(&broker, "/api/v1/retained/ret%2Fa", true);
    assert_eq!(status, 404);
    // New subscribers whose sessions live on each of the two shards get only what is left.
    let owners: Vec<String> = (0..)
        .map(|n| format!("ret-late-{n}"))
        .scan([false, false], |seen, id| {
            let shard = usize::from(shardmq_shards::shard::owner_shard(&id, 2));
            let first = !seen[shard];
            seen[shard] = true;
            Some((first, id))
        })
        .filter_map(|(first, id)| first.then_some(id))
        .take(2)
        .collect();
    for id in owners {
        let late = v5(broker.port, &id, |_| {});
        late.subscribe("ret/#", QoS::AtMostOnce);
        let topics: Vec<String> = late
            .publishes(2, Duration::from_secs(2))
            .iter()
            .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
            .collect();
        assert_eq!(topics, ["ret/b"], "{id} gets no deleted message");
    }
}

/// `shardmq ctl --admin ... ARGS` with the token: whether it succeeded, and its stdout.
fn ctl_text(broker: &Broker, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .env("SHARDMQ_ADMIN_TOKEN", ADMIN_TOKEN)
        .args(["ctl", "--admin", &broker.admin_address().to_string()])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn ctl_prints_tables_for_people_and_json_for_scripts() {
    let broker = Broker::start(2);
    let client = v5(broker.port, "ctl-client", |_| {});
    client.subscribe("ctl/topic", QoS::AtLeastOnce);
    client
        .client
        .publish("ctl/topic", QoS::AtLeastOnce, true, "kept value")
        .unwrap();
    wait_answer(&broker, "/api/v1/retained", |answer| {
        answer["retained"]
            .as_array()
            .is_some_and(|list| !list.is_empty())
    });

    let (ok, text) = ctl_text(&broker, &["clients"]);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("CLIENT_ID   NODE"), "{text}");
    assert!(
        lines[1].starts_with("ctl-client  -"),
        "aligned under the header: {text}"
    );
    let column = lines[0].find("PROTO").unwrap();
    assert_eq!(&lines[1][column..column + 3], "5.0", "{text}");

    let json = broker
        .ctl(&["--json", "clients", "--client-id-prefix", "ctl-"])
        .unwrap();
    assert_eq!(json["clients"][0]["client_id"], "ctl-client");
    let json = broker
        .ctl(&["clients", "show", "ctl-client", "--json"])
        .unwrap();
    assert_eq!(json["subscription_list"][0]["filter"], "ctl/topic");
    let (ok, text) = ctl_text(&broker, &["clients", "show", "ctl-client"]);
    assert!(
        ok && text.contains("ctl/topic") && text.contains("FIELD"),
        "{text}"
    );

    let (ok, text) = ctl_text(&broker, &["subscriptions"]);
    assert!(
        ok && text.starts_with("CLIENT_ID") && text.contains("ctl/topic"),
        "{text}"
    );
    let (ok, text) = ctl_text(&broker, &["routes", "--filter-prefix", "ctl/"]);
    assert!(
        ok && text.lines().nth(1).unwrap().starts_with("ctl/topic"),
        "{text}"
    );
    let (ok, text) = ctl_text(&broker, &["nodes"]);
    assert!(
        ok && text.starts_with("NODE") && text.contains("standalone"),
        "{text}"
    );

    let (ok, text) = ctl_text(&broker, &["retained", "list"]);
    assert!(
        ok && text.contains("ctl/topic") && text.contains("10"),
        "{text}"
    );
    let (ok, text) = ctl_text(&broker, &["retained", "get", "ctl/topic"]);
    assert!(ok && text.contains("kept value"), "{text}");
    let json = broker
        .ctl(&["--json", "retained", "get", "ctl/topic"])
        .unwrap();
    assert_eq!(json["payload_text"], "kept value");
    let (ok, text) = ctl_text(&broker, &["retained", "delete", "ctl/topic"]);
    assert!(ok && text.contains("deleted ctl/topic"), "{text}");
    let (ok, text) = ctl_text(&broker, &["retained", "get", "ctl/topic"]);
    assert!(!ok && text.contains("404"), "{text}");

    let (ok, text) = ctl_text(&broker, &["clients", "kick", "ctl-client"]);
    assert!(ok && text.contains("kicked ctl-client"), "{text}");
    client.ended.recv_timeout(WAIT).expect("kicked");
    let (ok, text) = ctl_text(&broker, &["clients", "kick", "ctl-client"]);
    assert!(!ok && text.contains("404"), "{text}");
}

#[test]
fn in_a_cluster_routes_name_their_nodes_and_a_retained_deletion_reaches_every_member() {
    let cluster = support::TestCluster::start(1, 1);
    let (core, edge) = (&cluster.node(1).broker, &cluster.node(2).broker);
    let subscriber = v5(edge.port, "cl-subscriber", |_| {});
    subscriber.subscribe("cl/+/x", QoS::AtLeastOnce);
    cluster.wait_routes(1, 2, 1);
    let local = v5(core.port, "cl-local", |_| {});
    local.subscribe("cl/local", QoS::AtMostOnce);
    let routes = wait_answer(core, "/api/v1/routes?filter_prefix=cl/", |answer| {
        answer["routes"]
            .as_array()
            .is_some_and(|list| list.len() == 2)
    });
    assert_eq!(
        routes["routes"],
        serde_json::json!([
            { "filter": "cl/+/x", "nodes": [2] },
            { "filter": "cl/local", "nodes": [1] },
        ]),
        "the core's own route and the edge's"
    );
    let (_, clients) = get(core, "/api/v1/clients?client_id_prefix=cl-");
    assert_eq!(clients["clients"][0]["node"], 1, "{clients}");
    assert_eq!(
        get(core, "/api/v1/clients?node=1").1["clients"][0]["client_id"],
        "cl-local"
    );

    local
        .client
        .publish("cl/kept", QoS::AtLeastOnce, true, "value")
        .unwrap();
    let kept = |answer: &Value| {
        answer["retained"]
            .as_array()
            .is_some_and(|list| list.iter().any(|r| r["topic"] == "cl/kept"))
    };
    wait_answer(edge, "/api/v1/retained?topic_prefix=cl/", kept);
    let (status, answer) = delete(core, "/api/v1/retained/cl%2Fkept", true);
    assert_eq!(status, 200, "{answer}");
    wait_answer(edge, "/api/v1/retained?topic_prefix=cl/", |answer| {
        !kept(answer)
    });
    let late = v5(edge.port, "cl-late", |_| {});
    late.subscribe("cl/#", QoS::AtMostOnce);
    assert!(
        late.publishes(1, Duration::from_secs(1)).is_empty(),
        "no retained message on the other node either"
    );
}
