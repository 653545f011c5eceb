//! Limits through a real broker: connections beyond a shard's limit are closed at once, and
//! the connections already open carry on.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{Broker, raw, read_until_closed};

const CONNECT_V311: [u8; 16] = [
    0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x02, b'c', b'0',
];

fn connected(port: u16, id: u8) -> std::net::TcpStream {
    let mut stream = raw(port);
    let mut connect = CONNECT_V311;
    connect[15] = id;
    stream.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    stream
}

#[test]
fn connections_beyond_the_shard_limit_are_refused_and_others_carry_on() {
    let broker = Broker::start_with(1, "[limits]\nconnections_per_shard_max = 2\n");
    let mut first = connected(broker.port, b'a');
    let mut second = connected(broker.port, b'b');
    let mut third = raw(broker.port);
    let _ = third.write_all(&CONNECT_V311);
    let (bytes, closed) = read_until_closed(&mut third, Duration::from_secs(3));
    assert!(
        closed && bytes.is_empty(),
        "the third connection is closed without an answer: {bytes:02x?}"
    );
    for stream in [&mut first, &mut second] {
        stream.write_all(&[0xC0, 0x00]).unwrap();
        let mut pong = [0u8; 2];
        stream.read_exact(&mut pong).unwrap();
        assert_eq!(pong, [0xD0, 0x00], "PINGRESP on an established connection");
    }
    assert!(
        broker.log_text().contains("connection limit"),
        "one log line says why"
    );
}
