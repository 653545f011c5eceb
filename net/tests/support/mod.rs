//! Helpers shared by the codec tests.

use shardmq_net::mqtt::{Packet, Sender};

/// Which side may send `packet`: what the decoder must be told to accept it.
pub fn sender_of(packet: &Packet) -> Sender {
    match packet {
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            Sender::Server
        }
        Packet::Publish(publish) if !publish.properties.subscription_identifiers.is_empty() => {
            Sender::Server
        }
        _ => Sender::Client,
    }
}
