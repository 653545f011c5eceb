//! Topic names and topic filters (MQTT 5.0 §4.7, shared subscriptions §4.8.2): validation and
//! matching. The topic trie in `shards` builds on these rules; `matches` is also the oracle the
//! trie is tested against.

use super::{DecodeError, ReasonCode};

/// The first level of a shared subscription filter: `$share/{group}/{filter}`.
pub const SHARED_PREFIX: &str = "$share/";

const fn name_error(rule: &'static str, message: &'static str) -> DecodeError {
    DecodeError::new(rule, message, ReasonCode::TOPIC_NAME_INVALID)
}

const fn filter_error(rule: &'static str, message: &'static str) -> DecodeError {
    DecodeError::new(rule, message, ReasonCode::TOPIC_FILTER_INVALID)
}

/// A topic name, as published to: at least one character [MQTT-4.7.3-1] and no wildcard
/// [MQTT-3.3.2-2]. Length and U+0000 are already checked by the UTF-8 string rules.
pub fn validate_name(name: &str) -> Result<(), DecodeError> {
    if name.is_empty() {
        return Err(name_error("MQTT-4.7.3-1", "empty Topic Name"));
    }
    if name.contains(['+', '#']) {
        return Err(name_error("MQTT-3.3.2-2", "wildcard in a Topic Name"));
    }
    Ok(())
}

/// A topic filter, as subscribed to, shared or not.
pub fn validate_filter(filter: &str) -> Result<(), DecodeError> {
    match split_shared(filter) {
        Some(Ok((_, inner))) => validate_plain_filter(inner),
        Some(Err(error)) => Err(error),
        None => validate_plain_filter(filter),
    }
}

/// A filter without the `$share` prefix: at least one character [MQTT-4.7.3-1], `#` only as a
/// whole last level [MQTT-4.7.1-1], `+` only as a whole level [MQTT-4.7.1-2].
fn validate_plain_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(filter_error("MQTT-4.7.3-1", "empty Topic Filter"));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(filter_error(
                "MQTT-4.7.1-1",
                "'#' is not alone in the last level of the Topic Filter",
            ));
        }
        if level.contains('+') && level != "+" {
            return Err(filter_error(
                "MQTT-4.7.1-2",
                "'+' does not occupy a whole level of the Topic Filter",
            ));
        }
    }
    Ok(())
}

/// Splits `$share/{group}/{filter}` into group and filter: `None` for a filter that is not
/// shared, an error for a shared one without a valid group or filter [MQTT-4.8.2-1],
/// [MQTT-4.8.2-2].
pub fn split_shared(filter: &str) -> Option<Result<(&str, &str), DecodeError>> {
    let rest = filter.strip_prefix(SHARED_PREFIX)?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(filter_error(
            "MQTT-4.8.2-2",
            "shared subscription without a '/' and a Topic Filter after the ShareName",
        )));
    };
    if group.is_empty() {
        return Some(Err(filter_error("MQTT-4.8.2-1", "empty ShareName")));
    }
    if group.contains(['+', '#']) {
        return Some(Err(filter_error(
            "MQTT-4.8.2-2",
            "ShareName contains '+' or '#'",
        )));
    }
    if inner.is_empty() {
        return Some(Err(filter_error(
            "MQTT-4.8.2-2",
            "shared subscription without a Topic Filter",
        )));
    }
    Some(Ok((group, inner)))
}

/// Whether a plain (not shared) filter matches a topic name. Topics that begin with `$` are not
/// matched by a wildcard in the first level [MQTT-4.7.2-1]; `#` also matches the parent level
/// (`a/#` matches `a`).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(filter_level), Some(topic_level)) if filter_level == topic_level => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a filter contains a wildcard.
pub fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "/", "a/b", "$SYS/x", " ", "a//b", "/finance"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        assert_eq!(validate_name("").unwrap_err().rule, "MQTT-4.7.3-1");
        for bad in ["a/+", "#", "a/b#", "+"] {
            assert_eq!(
                validate_name(bad).unwrap_err().rule,
                "MQTT-3.3.2-2",
                "{bad}"
            );
        }
    }

    #[test]
    fn filters() {
        for good in [
            "#",
            "+",
            "a/#",
            "+/+",
            "/+",
            "a/+/b",
            "sport/tennis/#",
            "$SYS/#",
            "$share/g/a/#",
            "$share/g/#",
            "$share",
            "a/$share/b",
        ] {
            assert!(validate_filter(good).is_ok(), "{good}");
        }
        for (bad, rule) in [
            ("", "MQTT-4.7.3-1"),
            ("a#", "MQTT-4.7.1-1"),
            ("a/#/b", "MQTT-4.7.1-1"),
            ("sport/tennis#", "MQTT-4.7.1-1"),
            ("a+", "MQTT-4.7.1-2"),
            ("sport+", "MQTT-4.7.1-2"),
            ("a/b+/c", "MQTT-4.7.1-2"),
            ("$share/", "MQTT-4.8.2-2"),
            ("$share/g", "MQTT-4.8.2-2"),
            ("$share//a", "MQTT-4.8.2-1"),
            ("$share/g+/a", "MQTT-4.8.2-2"),
            ("$share/g/", "MQTT-4.8.2-2"),
            ("$share/g/a+", "MQTT-4.7.1-2"),
        ] {
            assert_eq!(validate_filter(bad).unwrap_err().rule, rule, "{bad:?}");
        }
    }

    #[test]
    fn matching_follows_the_specification_examples() {
        // MQTT 5.0 §4.7.1.2 and §4.7.1.3, §4.7.2.
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/x", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("#", "a", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("ACCOUNTS", "Accounts", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }
}
