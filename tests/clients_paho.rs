//! Eclipse Paho's Python client (paho-mqtt from PyPI, installed by the test command) against a
//! real broker: QoS 2 ordering in 3.1.1 and 5.0, 5.0 properties, topic aliases, subscription
//! identifiers, No Local and retain handling. The scenarios live in `tests/paho/scenarios.py`.

mod support;

use std::process::Command;

use support::Broker;

#[test]
fn paho_scenarios_pass() {
    let broker = Broker::start(2);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho/scenarios.py");
    let output = Command::new("timeout")
        .args(["120", "python3"])
        .arg(&script)
        .arg(broker.port.to_string())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "paho scenarios failed:\n{stdout}\n{stderr}\nbroker log:\n{}",
        broker.log_text()
    );
    assert!(stdout.contains("paho scenarios passed"));
}
