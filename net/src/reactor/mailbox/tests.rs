//! The mailbox drain on a real reactor: a handler that passes every message it is told on to
//! the test.

use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use super::super::{Actions, Event, Handler, Mailboxes, Reactor, test_config};
use super::MAILBOX_BATCH;

struct Forward(Sender<usize>);

impl Handler for Forward {
    type Message = usize;
    fn event(&mut self, _now_ms: u64, event: Event<usize>) {
        if let Event::Message(n) = event {
            let _ = self.0.send(n);
        }
    }
    fn flush(&mut self, _actions: &mut Actions<usize>) {}
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
}

/// More messages than one loop iteration drains, behind one wakeup (the eventfd adds the
/// posts' wakeups up, and one read takes them all), and nothing else to wake the reactor:
/// the rest must not wait for the loop's idle timeout (1 s) batch after batch. That is how a
/// restarted shard's first CONNECT handed over by another shard waited 10 s behind the other
/// shard's route messages for its restored subscriptions (tuning/results/2026-12-03-recovery.md).
#[test]
fn a_mailbox_holding_many_batches_behind_one_wakeup_is_drained_at_once() {
    let count = MAILBOX_BATCH * 8;
    let mailboxes = Mailboxes::new(1, count).expect("mailboxes");
    for n in 0..count {
        mailboxes.post(0, n);
    }
    let (sender, received) = channel();
    let reactor_mailboxes = mailboxes.clone();
    let started = Instant::now();
    let thread = std::thread::spawn(move || {
        Reactor::new(test_config(), reactor_mailboxes, Forward(sender))?
            .run()
            .map(drop)
    });
    for expected in 0..count {
        let n = received
            .recv_timeout(Duration::from_secs(30))
            .expect("every message is handled");
        assert_eq!(n, expected, "in the order posted");
    }
    let elapsed = started.elapsed();
    mailboxes.stop();
    thread
        .join()
        .expect("reactor thread")
        .expect("the reactor ran");
    // Waiting 1 s per batch would take at least 6 s.
    assert!(
        elapsed < Duration::from_secs(2),
        "{count} messages took {elapsed:?}: the loop slept with messages left in its mailbox"
    );
}
