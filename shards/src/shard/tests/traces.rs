//! Per-client traces in the shard: which connections are marked as the traced set changes,
//! across shards and hand-offs (the records themselves go to `tracing`; `src/trace.rs` and
//! `tests/admin_trace.rs` check what reaches the file).

use super::*;

fn marked(node: &Node, id: ConnectionId) -> Option<String> {
    node.shards
        .iter()
        .find_map(|shard| shard.connections.get(&id))
        .and_then(|connection| connection.trace.as_ref().map(ToString::to_string))
}

fn set_traced(node: &mut Node, client_ids: &[&'static str]) {
    for shard in &mut node.shards {
        shard.set_traced(
            client_ids
                .iter()
                .map(|id| ByteString::from_static(id))
                .collect(),
        );
        shard.check_invariants();
    }
}

#[test]
fn connections_are_marked_exactly_while_their_client_is_traced() {
    let mut node = Node::new(2, Limits::default());
    set_traced(&mut node, &["traced"]);
    // CONNECTs on both shards: whichever shard owns the identifier marks it.
    for (id, shard, client) in [(1, 0, "traced"), (2, 1, "other")] {
        let connack = node.connect(id, shard, connect(V5, client, true));
        assert_eq!(connack.reason, ReasonCode::SUCCESS);
    }
    assert_eq!(marked(&node, 1).as_deref(), Some("traced"));
    assert_eq!(marked(&node, 2), None);
    // The trace of an open connection starts and stops with the set.
    set_traced(&mut node, &["other"]);
    assert_eq!(marked(&node, 1), None);
    assert_eq!(marked(&node, 2).as_deref(), Some("other"));
    node.send(2, &subscribe(1, "a/b", QoS::AtLeastOnce));
    assert_eq!(subacks(&node.take(2)), [vec![ReasonCode::GRANTED_QOS_1]]);
    set_traced(&mut node, &[]);
    assert!(node.shards.iter().all(|shard| shard.traced.is_empty()));
    assert_eq!(marked(&node, 2), None);
    // A new connection of a client traced again is marked from its CONNECT.
    set_traced(&mut node, &["traced"]);
    node.lose(1);
    let connack = node.connect(3, 1, connect(V5, "traced", true));
    assert_eq!(connack.reason, ReasonCode::SUCCESS);
    assert_eq!(marked(&node, 3).as_deref(), Some("traced"));
}
