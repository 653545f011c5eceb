//! Debian's mosquitto_pub and mosquitto_sub against a real broker, in MQTT 3.1, 3.1.1 and 5.0.
//! The test command installs mosquitto-clients; a missing tool fails the test.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::Broker;

fn mosquitto(tool: &str) -> Command {
    let mut command = Command::new(tool);
    command.stdin(Stdio::null());
    command
}

fn publish(broker: &Broker, version: &str, args: &[&str]) {
    let status = mosquitto("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-V",
            version,
        ])
        .args(args)
        .status()
        .expect("mosquitto_pub is installed (the test command installs mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub {args:?} failed");
}

fn subscribe(broker: &Broker, version: &str, args: &[&str]) -> std::process::Child {
    let child = mosquitto("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-V",
            version,
            "-W",
            "10",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is installed (the test command installs mosquitto-clients)");
    // Let the subscription reach the broker before anything is published. mosquitto_sub gives
    // no signal for it, so this waits generously: a loaded CI machine is slow to start a process.
    std::thread::sleep(Duration::from_millis(1000));
    child
}

fn output(child: std::process::Child) -> String {
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "mosquitto_sub failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn every_version_and_qos_round_trips() {
    let broker = Broker::start(2);
    for version in ["mqttv31", "mqttv311", "mqttv5"] {
        let topic = format!("mosq/{version}");
        let subscriber = subscribe(
            &broker,
            version,
            &[
                "-t",
                "mosq/#",
                "-q",
                "2",
                "-C",
                "3",
                "-v",
                "-i",
                &format!("sub-{version}"),
            ],
        );
        for qos in ["0", "1", "2"] {
            publish(
                &broker,
                version,
                &[
                    "-t",
                    &topic,
                    "-q",
                    qos,
                    "-m",
                    &format!("qos{qos}"),
                    "-i",
                    &format!("pub-{version}-{qos}"),
                ],
            );
        }
        assert_eq!(
            output(subscriber),
            format!("{topic} qos0\n{topic} qos1\n{topic} qos2\n"),
            "{version}"
        );
    }
}

#[test]
fn retained_message_reaches_a_later_subscriber() {
    let broker = Broker::start(1);
    publish(
        &broker,
        "mqttv311",
        &["-t", "mosq/retained", "-r", "-q", "1", "-m", "kept"],
    );
    let subscriber = subscribe(&broker, "mqttv5", &["-t", "mosq/retained", "-C", "1", "-v"]);
    assert_eq!(output(subscriber), "mosq/retained kept\n");
}

#[test]
fn v5_user_properties_pass_through() {
    let broker = Broker::start(2);
    let subscriber = subscribe(
        &broker,
        "mqttv5",
        &["-t", "props/t", "-C", "1", "-F", "%t %p %P"],
    );
    publish(
        &broker,
        "mqttv5",
        &[
            "-t",
            "props/t",
            "-m",
            "body",
            "-D",
            "publish",
            "user-property",
            "colour",
            "blue",
        ],
    );
    assert_eq!(output(subscriber), "props/t body colour:blue\n");
}
