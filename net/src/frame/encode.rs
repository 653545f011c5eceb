//! Encoding: [`encode`] of one frame, refused whole above the peer's body limit, and the
//! length bounds ([`FRAME_BUDGET_DIVISOR`], the `len_bound` methods, [`cut_by_len`]) by which
//! producers of long bodies cut them into frames that always fit.
//!
//! Invariant: a `len_bound` is an upper bound of what its item takes in an encoded body, so a
//! run cut to half the limit never makes a frame the peer must refuse.

use bytes::{BufMut, BytesMut};
use rkyv::rancor;

use super::{
    Body, Forwarded, FrameError, HEADER_LEN, Item, LogEntry, MAGIC, PROTOCOL_VERSION, Route,
};

/// Appends the frame of `body` to `out`, if its body is at most `body_len_max` bytes (the
/// limit the peer decodes with) and fits the header's 32-bit length. A body above either is
/// refused with [`FrameError::TooLong`] and nothing is written: a peer would refuse the frame
/// and close the link, so a caller must cut what it sends to fit ([`FRAME_BUDGET_DIVISOR`])
/// rather than ever emit it.
pub fn encode(
    body: &Body,
    cluster: u64,
    body_len_max: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let bytes = rkyv::to_bytes::<rancor::Error>(body).expect("frame bodies always serialize");
    let body_len = u32::try_from(bytes.len())
        .ok()
        .filter(|&len| len as usize <= body_len_max)
        .ok_or(FrameError::TooLong(bytes.len()))?;
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6] = body.kind();
    header[8..16].copy_from_slice(&cluster.to_le_bytes());
    header[16..20].copy_from_slice(&body_len.to_le_bytes());
    header[20..24].copy_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let header_crc = crc32fast::hash(&header[0..24]);
    header[24..28].copy_from_slice(&header_crc.to_le_bytes());
    out.reserve(HEADER_LEN + bytes.len());
    out.put_slice(&header);
    out.put_slice(&bytes);
    Ok(())
}

/// Producers of long bodies (forwarded messages, route sets, the route log) fill a frame up
/// to `body_len_max / FRAME_BUDGET_DIVISOR` of estimated length ([`Forwarded::len_bound`],
/// [`Route::len_bound`], [`LogEntry::len_bound`]): half the limit, so that the estimate's
/// slack, the body's own fields and one last item always fit under the limit itself.
pub const FRAME_BUDGET_DIVISOR: usize = 2;

/// What rkyv may add around one field or element beyond its variable bytes: its inline part
/// (at most 16 bytes for what these bodies hold) and alignment padding (at most 15).
const FIELD_LEN_BOUND: usize = 32;

fn string_bound(s: &str) -> usize {
    s.len() + FIELD_LEN_BOUND
}

fn option_bound(s: Option<&str>) -> usize {
    s.map_or(0, str::len) + FIELD_LEN_BOUND
}

impl Route {
    /// An upper bound of this route's share of an encoded body.
    pub fn len_bound(&self) -> usize {
        string_bound(&self.filter) + option_bound(self.group.as_deref()) + FIELD_LEN_BOUND
    }
}

impl LogEntry {
    /// An upper bound of this entry's share of an encoded body.
    pub fn len_bound(&self) -> usize {
        FIELD_LEN_BOUND
            + match self {
                LogEntry::Joined(member) => {
                    string_bound(&member.cluster_address)
                        + string_bound(&member.mqtt_address)
                        + 3 * FIELD_LEN_BOUND
                }
                LogEntry::Down(_) | LogEntry::Up(_) | LogEntry::Removed(_) => FIELD_LEN_BOUND,
                LogEntry::Route { route, .. } => route.len_bound() + 2 * FIELD_LEN_BOUND,
                LogEntry::Replace { routes, .. } => {
                    routes.iter().map(Route::len_bound).sum::<usize>() + 2 * FIELD_LEN_BOUND
                }
                LogEntry::Setting { key, value } => string_bound(key) + string_bound(value),
            }
    }
}

impl Forwarded {
    /// An upper bound of this item's share of an encoded `Forward` body, from the lengths it
    /// holds (no encoding: this runs for every forwarded message).
    pub fn len_bound(&self) -> usize {
        let fixed = 4 * FIELD_LEN_BOUND;
        fixed
            + match &self.item {
                Item::Publish {
                    message, groups, ..
                } => {
                    let pairs = |pairs: &[(String, String)]| {
                        pairs
                            .iter()
                            .map(|(a, b)| string_bound(a) + string_bound(b) + FIELD_LEN_BOUND)
                            .sum::<usize>()
                    };
                    string_bound(&message.topic)
                        + message.payload.len()
                        + option_bound(message.publisher.as_deref())
                        + option_bound(message.response_topic.as_deref())
                        + message.correlation_data.as_ref().map_or(0, Vec::len)
                        + option_bound(message.content_type.as_deref())
                        + pairs(&message.user_properties)
                        + pairs(groups)
                        + 10 * FIELD_LEN_BOUND
                }
                Item::Claim { client_id, .. } => string_bound(client_id) + 4 * FIELD_LEN_BOUND,
                Item::Handover {
                    client_id, session, ..
                } => {
                    string_bound(client_id)
                        + session.as_ref().map_or(0, Vec::len)
                        + 4 * FIELD_LEN_BOUND
                }
                Item::Replicate { records, .. } => records.len() + 3 * FIELD_LEN_BOUND,
                Item::ReplicaOffer {
                    client_id, session, ..
                } => string_bound(client_id) + session.len() + 5 * FIELD_LEN_BOUND,
                Item::Disown { client_id, .. } => string_bound(client_id) + 2 * FIELD_LEN_BOUND,
            }
    }
}

/// An upper bound of the encoded body of a `NodeAnswer` carrying `answer`: a node checks it
/// against its frame budget before it sends one, and sends "too large; ask for fewer" in its
/// place when the answer does not fit.
pub fn node_answer_len_bound(answer: &Result<Vec<u8>, String>) -> usize {
    let variable = match answer {
        Ok(bytes) => bytes.len(),
        Err(error) => error.len(),
    };
    variable + 4 * FIELD_LEN_BOUND
}

/// Cuts `items` into runs, in order, each of whose bounds sum to at most `budget`; an item
/// whose bound alone is above it gets a run of its own (the caller decides whether such an
/// item can go at all).
pub fn cut_by_len<T>(
    items: impl IntoIterator<Item = T>,
    len_bound: impl Fn(&T) -> usize,
    budget: usize,
) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut run_len = 0usize;
    for item in items {
        let len = len_bound(&item);
        match runs.last_mut() {
            Some(run) if !run.is_empty() && run_len.saturating_add(len) <= budget => {
                run_len += len;
                run.push(item);
            }
            _ => {
                run_len = len;
                runs.push(vec![item]);
            }
        }
    }
    runs
}
