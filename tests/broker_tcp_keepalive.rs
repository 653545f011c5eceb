//! TCP keepalive on client connections: an accepted socket has its keepalive timer running
//! with the configured idle time, so that a client whose host vanished is found even with
//! MQTT keep alive 0; `server.tcp_keepalive_idle_seconds = 0` turns it off.

mod support;

use std::process::Command;
use std::time::Duration;

use support::Broker;

/// The timer column `ss` shows for the broker's side of the established connection from
/// `client_port` to `port` (as `timer:(keepalive,44sec,0)`), or "" if it has none.
fn timer_of(port: u16, client_port: u16) -> String {
    let output = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!("( sport = :{port} and dport = :{client_port} )"))
        .output()
        .expect("ss (iproute2; tools/test.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split_whitespace()
        .find(|field| field.starts_with("timer:"))
        .unwrap_or("")
        .to_string()
}

fn connected_timer(broker: &Broker) -> String {
    let client = support::raw(broker.port);
    let client_port = client.local_addr().unwrap().port();
    // Accepted sockets get the listener's options; give the kernel a moment to show it.
    std::thread::sleep(Duration::from_millis(200));
    timer_of(broker.port, client_port)
}

#[test]
fn accepted_sockets_have_keepalive_with_the_configured_idle_time() {
    let broker = Broker::start_with(2, "tcp_keepalive_idle_seconds = 45\n");
    let timer = connected_timer(&broker);
    assert!(timer.starts_with("timer:(keepalive,"), "{timer:?}");
    // The first probe is due within the idle time.
    let seconds: u64 = timer
        .trim_start_matches("timer:(keepalive,")
        .split("sec")
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{timer:?}"));
    assert!((40..=45).contains(&seconds), "{timer:?}");
}

#[test]
fn keepalive_zero_turns_it_off() {
    let broker = Broker::start_with(1, "tcp_keepalive_idle_seconds = 0\n");
    let timer = connected_timer(&broker);
    assert!(!timer.contains("keepalive"), "{timer:?}");
}
