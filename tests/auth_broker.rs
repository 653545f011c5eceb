//! Authentication and authorization against a real broker process: a password file written
//! by the real `mosquitto_passwd` (Debian's mosquitto package, installed by the test command)
//! used by mosquitto_pub/sub, paho-mqtt and rumqttc in 3.1.1 and 5.0; wrong passwords,
//! unknown users, anonymous clients and expired JWTs refused with their codes; ACL refusals
//! of SUBSCRIBE and PUBLISH; a reload through the admin API and SIGHUP that new connections
//! see while an open one stays.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{Broker, admin_post};

const TIMEOUT: Duration = Duration::from_secs(5);
const JWT_SECRET: &str = "a-test-jwt-secret-of-more-than-32-bytes";

const ACL: &str = "\
user alice
topic readwrite public/#
topic read sensors/#
user bob
topic readwrite #
user svc
topic readwrite svc/#
";

/// A directory with the password file (alice/secret and bob/hunter2, by mosquitto_passwd),
/// the ACL file and the JWT secret.
struct Files {
    directory: PathBuf,
}

impl Files {
    fn new(name: &str) -> Self {
        let directory =
            std::env::temp_dir().join(format!("shardmq-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        let files = Self { directory };
        files.passwd(&["-c", "-b", "alice", "secret"]);
        files.passwd(&["-b", "bob", "hunter2"]);
        std::fs::write(files.path("acl"), ACL).unwrap();
        std::fs::write(files.path("jwt.key"), format!("{JWT_SECRET}\n")).unwrap();
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.join(name)
    }

    /// `mosquitto_passwd ARGS` on the password file (the file goes before the user).
    fn passwd(&self, args: &[&str]) {
        let file = self.path("passwords");
        let (flags, rest) = args.split_at(args.len() - if args.contains(&"-D") { 1 } else { 2 });
        let status = Command::new("mosquitto_passwd")
            .args(flags)
            .arg(&file)
            .args(rest)
            .stdin(Stdio::null())
            .status()
            .expect("mosquitto_passwd is installed (the test command installs mosquitto)");
        assert!(status.success(), "mosquitto_passwd {args:?}");
    }

    fn config(&self) -> String {
        format!(
            "[auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\njwt_algorithm = \"HS256\"\njwt_key_file = \"{}\"\n",
            self.path("passwords").display(),
            self.path("acl").display(),
            self.path("jwt.key").display()
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn token(subject: &str, expires_in_seconds: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": subject, "exp": now + expires_in_seconds }),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// What one notification of a client's event loop is, for [`drive`].
enum Step<Event, Error, Ack, Code> {
    Connected(Ack),
    Refused(Code),
    Event(Event),
    Ended(Error),
}

/// Runs a client's event loop on its own thread until it ends: the answer to CONNECT comes
/// back (waited for up to [`TIMEOUT`]), later events go to `events` and the error that ends
/// the loop to `ended`.
fn drive<
    C: Send + 'static,
    Event: Send + 'static,
    Error: Send + 'static,
    Ack: Send + 'static,
    Code: Send + 'static,
>(
    mut connection: C,
    mut next: impl FnMut(&mut C) -> Option<Step<Event, Error, Ack, Code>> + Send + 'static,
    events: mpsc::Sender<Event>,
    ended: mpsc::Sender<Error>,
) -> Result<Ack, Code> {
    let (first_sender, first) = mpsc::channel();
    std::thread::spawn(move || {
        let mut first_sender = Some(first_sender);
        while let Some(step) = next(&mut connection) {
            match step {
                Step::Connected(ack) => {
                    if let Some(first) = first_sender.take() {
                        let _ = first.send(Ok(ack));
                    }
                }
                Step::Refused(code) => {
                    if let Some(first) = first_sender.take() {
                        let _ = first.send(Err(code));
                    }
                    return;
                }
                Step::Event(event) => {
                    if events.send(event).is_err() {
                        return;
                    }
                }
                Step::Ended(error) => {
                    let _ = ended.send(error);
                    return;
                }
            }
        }
    });
    first.recv_timeout(TIMEOUT).expect("an answer to CONNECT")
}

/// A 3.1.1 CONNECT with these credentials: its return code, or the client to go on with.
fn v4_connect(
    port: u16,
    id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<support::V4, rumqttc::ConnectReturnCode> {
    use rumqttc::{ConnectionError, Event, Packet};
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, connection) = rumqttc::Client::new(options, 100);
    let (sender, events) = mpsc::channel();
    let (end_sender, ended) = mpsc::channel();
    let next = |connection: &mut rumqttc::Connection| {
        Some(match connection.recv().ok()? {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => Step::Connected(connack),
            Ok(event) => Step::Event(event),
            Err(ConnectionError::ConnectionRefused(code)) => Step::Refused(code),
            Err(error) => Step::Ended(error.to_string()),
        })
    };
    drive(connection, next, sender, end_sender).map(|_| support::V4 {
        client,
        events,
        ended,
    })
}

/// A 5.0 CONNECT with these credentials: its reason code, or the client to go on with.
fn v5_connect(
    port: u16,
    id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<support::V5, rumqttc::v5::mqttbytes::v5::ConnectReturnCode> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{ConnectionError, Event};
    let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, connection) = rumqttc::v5::Client::new(options, 100);
    let (sender, events) = mpsc::channel();
    let (end_sender, ended) = mpsc::channel();
    let next = |connection: &mut rumqttc::v5::Connection| {
        Some(match connection.recv().ok()? {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => Step::Connected(connack),
            Ok(event) => Step::Event(event),
            Err(ConnectionError::ConnectionRefused(code)) => Step::Refused(code),
            Err(error) => Step::Ended(error),
        })
    };
    drive(connection, next, sender, end_sender).map(|connack| support::V5 {
        client,
        events,
        connack,
        ended,
    })
}

/// The reason codes of the next `count` SUBACKs `client` receives.
fn v5_subacks(
    client: &support::V5,
    count: usize,
) -> Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode> {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut codes = Vec::new();
    for _ in 0..count {
        match client.wait_for(TIMEOUT, |e| matches!(e, Event::Incoming(Packet::SubAck(_)))) {
            Some(Event::Incoming(Packet::SubAck(suback))) => codes.extend(suback.return_codes),
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    codes
}

fn mosquitto(tool: &str, port: u16, args: &[&str]) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["10", tool, "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null());
    command
}

#[test]
fn a_mosquitto_passwd_file_works_with_mosquitto_clients_and_paho() {
    let files = Files::new("mosquitto");
    let broker = Broker::start_with(2, &files.config());
    let port = broker.port.to_string();
    for version in ["mqttv311", "mqttv5"] {
        let mut subscriber = mosquitto(
            "mosquitto_sub",
            broker.port,
            &[
                "-V", version, "-u", "alice", "-P", "secret", "-t", "public/#", "-C", "1",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // The subscription is in place some time after the start: publish until the
        // subscriber has its one message (or 5 s have passed).
        for _ in 0..50 {
            let published = mosquitto(
                "mosquitto_pub",
                broker.port,
                &[
                    "-V", version, "-u", "bob", "-P", "hunter2", "-t", "public/x", "-m", "hello",
                ],
            )
            .status()
            .unwrap();
            assert!(published.success(), "bob publishes ({version})");
            std::thread::sleep(Duration::from_millis(100));
            if subscriber.try_wait().unwrap().is_some() {
                break;
            }
        }
        let output = subscriber.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).lines().next(),
            Some("hello"),
            "{version}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            broker.log_text()
        );
        let refused = mosquitto(
            "mosquitto_pub",
            broker.port,
            &[
                "-V", version, "-u", "alice", "-P", "wrong", "-t", "public/x", "-m", "no",
            ],
        )
        .output()
        .unwrap();
        assert!(!refused.status.success(), "a wrong password is refused");
        let refused = mosquitto(
            "mosquitto_pub",
            broker.port,
            &["-V", version, "-t", "public/x", "-m", "no"],
        )
        .output()
        .unwrap();
        assert!(!refused.status.success(), "an anonymous client is refused");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho/auth.py");
    let output = Command::new("timeout")
        .args(["60", "python3"])
        .arg(&script)
        .arg(&port)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("paho auth passed"),
        "paho:\n{stdout}\n{}\nbroker log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        broker.log_text()
    );
}

#[test]
fn refusals_carry_the_codes_of_each_version() {
    use rumqttc::ConnectReturnCode as V4Code;
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
    let files = Files::new("codes");
    let broker = Broker::start_with(2, &files.config());
    let port = broker.port;
    let expired = token("svc", -3600);
    let valid = token("svc", 3600);
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, V4Code, V5Code);
    let cases: [Case<'_>; 4] = [
        (
            "wrong-password",
            Some(("alice", "wrong")),
            V4Code::BadUserNamePassword,
            V5Code::BadUserNamePassword,
        ),
        (
            "unknown-user",
            Some(("mallory", "secret")),
            V4Code::BadUserNamePassword,
            V5Code::BadUserNamePassword,
        ),
        (
            "anonymous",
            None,
            V4Code::NotAuthorized,
            V5Code::NotAuthorized,
        ),
        (
            "expired-jwt",
            Some(("svc", &expired)),
            V4Code::BadUserNamePassword,
            V5Code::BadUserNamePassword,
        ),
    ];
    for (name, credentials, v4_code, v5_code) in cases {
        match v4_connect(port, &format!("{name}-4"), credentials) {
            Err(code) => assert_eq!(code, v4_code, "3.1.1 {name}"),
            Ok(_) => panic!("3.1.1 {name} was accepted"),
        }
        match v5_connect(port, &format!("{name}-5"), credentials) {
            Err(code) => assert_eq!(code, v5_code, "5.0 {name}"),
            Ok(_) => panic!("5.0 {name} was accepted"),
        }
    }
    for (name, credentials) in [("alice", ("alice", "secret")), ("svc", ("svc", &*valid))] {
        assert!(
            v4_connect(port, &format!("{name}-ok-4"), Some(credentials)).is_ok(),
            "3.1.1 {name}"
        );
        assert!(
            v5_connect(port, &format!("{name}-ok-5"), Some(credentials)).is_ok(),
            "5.0 {name}"
        );
    }
    // A reconnect storm costs no hash: the same credentials again come from the cache, and
    // still only they do.
    for round in 0..20 {
        assert!(v4_connect(port, &format!("storm-{round}"), Some(("bob", "hunter2"))).is_ok());
    }
    assert_eq!(
        v4_connect(port, "storm-wrong", Some(("bob", "hunter3"))).err(),
        Some(V4Code::BadUserNamePassword)
    );
}

#[test]
fn acl_refusals_of_subscribe_and_publish_in_both_versions() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode as S5};
    use rumqttc::{Event as E4, Packet as P4, SubscribeReasonCode as S4};
    let files = Files::new("acl");
    let broker = Broker::start_with(2, &files.config());
    let port = broker.port;
    let bob = v5_connect(port, "bob-reader", Some(("bob", "hunter2"))).unwrap();
    bob.subscribe("#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);

    let alice5 = v5_connect(port, "alice-5", Some(("alice", "secret"))).unwrap();
    alice5
        .client
        .subscribe("#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .unwrap();
    alice5
        .client
        .subscribe("sensors/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .unwrap();
    let codes = v5_subacks(&alice5, 2);
    assert_eq!(
        codes,
        [
            S5::NotAuthorized,
            S5::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        ]
    );
    // alice may read sensors/# but not write it.
    alice5
        .client
        .publish(
            "sensors/t",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "5.0 refused",
        )
        .unwrap();
    match alice5.wait_for(TIMEOUT, |e| {
        matches!(e, rumqttc::v5::Event::Incoming(P5::PubAck(_)))
    }) {
        Some(rumqttc::v5::Event::Incoming(P5::PubAck(ack))) => {
            assert_eq!(ack.reason, PubAckReason::NotAuthorized)
        }
        other => panic!("no PUBACK: {other:?}"),
    }

    let alice4 = v4_connect(port, "alice-4", Some(("alice", "secret"))).unwrap();
    alice4
        .client
        .subscribe("#", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    match alice4.wait_for(TIMEOUT, |e| matches!(e, E4::Incoming(P4::SubAck(_)))) {
        Some(E4::Incoming(P4::SubAck(suback))) => {
            assert_eq!(suback.return_codes, [S4::Failure], "0x80")
        }
        other => panic!("no SUBACK: {other:?}"),
    }
    alice4
        .client
        .publish(
            "sensors/t",
            rumqttc::QoS::AtLeastOnce,
            false,
            "3.1.1 refused",
        )
        .unwrap();
    // Acknowledged as usual (3.1.1 has no refusal), so the client does not resend it.
    alice4.acknowledged(1, TIMEOUT);
    alice4
        .client
        .publish("public/t", rumqttc::QoS::AtLeastOnce, false, "allowed")
        .unwrap();
    alice4.acknowledged(1, TIMEOUT);
    let received = bob.publishes(1, TIMEOUT);
    assert_eq!(
        received
            .iter()
            .map(|p| (
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.payload.clone()
            ))
            .collect::<Vec<_>>(),
        [(
            "public/t".to_string(),
            bytes::Bytes::from_static(b"allowed")
        )],
        "the refused messages were not routed"
    );
    assert!(bob.publishes(1, Duration::from_millis(300)).is_empty());
}

#[test]
fn a_reload_applies_to_new_connections_and_keeps_open_ones() {
    let files = Files::new("reload");
    let broker = Broker::start_with(2, &files.config());
    let port = broker.port;
    let open = v5_connect(port, "alice-open", Some(("alice", "secret"))).unwrap();
    open.subscribe("public/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce);
    // alice leaves the file, carol comes in.
    files.passwd(&["-D", "alice"]);
    files.passwd(&["-b", "carol", "s3cret"]);
    let (status, body) = admin_post(broker.admin_address(), "/api/v1/auth/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"users\":2"), "{body}");
    assert_eq!(
        v5_connect(port, "alice-new", Some(("alice", "secret"))).err(),
        Some(rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword)
    );
    let carol = v4_connect(port, "carol", Some(("carol", "s3cret"))).unwrap();
    // The open connection stays, and still receives.
    let bob = v4_connect(port, "bob", Some(("bob", "hunter2"))).unwrap();
    bob.client
        .publish(
            "public/after",
            rumqttc::QoS::AtLeastOnce,
            false,
            "still here",
        )
        .unwrap();
    bob.acknowledged(1, TIMEOUT);
    assert_eq!(open.publishes(1, TIMEOUT).len(), 1, "{}", broker.log_text());
    // A bad file is refused with the reason, and the rules in force stay.
    std::fs::write(files.path("acl"), "topic sideways #\n").unwrap();
    let (status, body) = admin_post(broker.admin_address(), "/api/v1/auth/reload");
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("acl_file") && body.contains("line 1"),
        "{body}"
    );
    assert!(v4_connect(port, "carol-2", Some(("carol", "s3cret"))).is_ok());
    drop(carol);
    // SIGHUP reloads too: a good ACL again, and dave added.
    std::fs::write(files.path("acl"), ACL).unwrap();
    files.passwd(&["-b", "dave", "pw-of-dave"]);
    let status = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + TIMEOUT;
    while v4_connect(port, "dave", Some(("dave", "pw-of-dave"))).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_bad_auth_file_stops_the_start_naming_the_key() {
    let files = Files::new("bad-start");
    std::fs::write(
        files.path("passwords"),
        format!("eve:$7$200000$c2FsdHNhbHRzYWx0${}==\n", "A".repeat(86)),
    )
    .unwrap();
    std::fs::write(files.path("config.toml"), files.config()).unwrap();
    let output = Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_shardmq"), "serve", "--listen"])
        .arg(format!("127.0.0.1:{}", support::free_port()))
        .arg("--config")
        .arg(files.path("config.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("auth.password_file") && stderr.contains("iterations"),
        "{stderr}"
    );
}

#[test]
fn anonymous_clients_on_a_listener_off_loopback_are_warned_about() {
    let wide = support::free_port();
    let broker = Broker::start_with(1, &format!("[[listener]]\nbind = \"0.0.0.0:{wide}\"\n"));
    let log = broker.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("anonymous clients may connect"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains(&format!("0.0.0.0:{wide}")), "{log}");
    // With a password file, anonymous clients are refused by default: no warning.
    let files = Files::new("no-warning");
    let broker = Broker::start_with(
        1,
        &format!(
            "{}[[listener]]\nbind = \"0.0.0.0:{}\"\n",
            files.config(),
            support::free_port()
        ),
    );
    assert!(
        !broker.log_text().contains("anonymous clients may connect"),
        "{}",
        broker.log_text()
    );
}

#[test]
fn a_full_verifier_queue_answers_server_unavailable() {
    let files = Files::new("queue");
    // A costly entry (20,000 PBKDF2 iterations; the hash does not matter, every check fails).
    std::fs::write(
        files.path("passwords"),
        format!("eve:$7$20000$c2FsdHNhbHRzYWx0${}==\n", "A".repeat(86)),
    )
    .unwrap();
    let config = format!(
        "{}verifier_threads = 1\nverifier_queue_max = 1\ncredential_cache_max = 0\n",
        files.config()
    );
    let broker = Broker::start_with(1, &config);
    let port = broker.port;
    let attempts: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                v4_connect(port, &format!("eve-{i}"), Some(("eve", "guess"))).err()
            })
        })
        .collect();
    let codes: Vec<_> = attempts
        .into_iter()
        .map(|attempt| attempt.join().unwrap())
        .collect();
    assert!(
        codes.contains(&Some(rumqttc::ConnectReturnCode::ServiceUnavailable)),
        "{codes:?}\n{}",
        broker.log_text()
    );
    assert!(
        codes.contains(&Some(rumqttc::ConnectReturnCode::BadUserNamePassword)),
        "{codes:?}"
    );
    assert!(
        codes.iter().all(Option::is_some),
        "none was accepted: {codes:?}"
    );
    assert!(broker.log_text().contains("the verifier queue is full"));
}

#[test]
fn a_tokens_acl_claim_narrows_what_it_may_do() {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as S5;
    let files = Files::new("claims");
    let broker = Broker::start_with(1, &format!("{}jwt_acl_claim = \"mqtt\"\n", files.config()));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // The file gives svc readwrite svc/#; the token narrows it to reading svc/in/#.
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({
            "sub": "svc", "exp": now + 600,
            "mqtt": { "subscribe": ["svc/in/#"] }
        }),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let client = v5_connect(broker.port, "svc-1", Some(("svc", &token))).unwrap();
    for filter in ["svc/in/#", "svc/out/#"] {
        client
            .client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
            .unwrap();
    }
    let codes = v5_subacks(&client, 2);
    assert_eq!(
        codes,
        [
            S5::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce),
            S5::NotAuthorized
        ]
    );
}
