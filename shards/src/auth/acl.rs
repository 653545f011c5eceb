//! ACL files in Mosquitto's syntax, compiled into tries.
//!
//! Syntax (one rule a line; `#` starts a comment line; blank lines are ignored):
//! - `user NAME`: the `topic` lines that follow are NAME's, until the next `user`. `topic`
//!   lines before the first `user` are the anonymous section (clients without a username).
//! - `topic [read|write|readwrite|deny] FILTER`: no access word means `readwrite`; `deny`
//!   refuses both.
//! - `pattern [read|write|readwrite|deny] FILTER`: applies to every client, wherever it
//!   stands in the file; a level that is exactly `%c` matches the client identifier, one that
//!   is exactly `%u` the username (never an anonymous client). `%c` or `%u` inside a longer
//!   level is refused with its line number (Mosquitto 2 substitutes them only as whole levels).
//!
//! Decisions:
//! - PUBLISH to a topic is allowed when no matching rule of the client's (its user's section,
//!   or the anonymous one, and the patterns) denies, and one grants write.
//! - SUBSCRIBE to a filter is allowed when one such rule *covers* it (every topic the filter
//!   topic matches both). So under one ACL a granted subscription never needs a check per
//!   delivered message (hence retained messages sent on subscribe also obey the reader's ACL);
//!   the shard still checks each delivery, for subscriptions granted before a reload. Stricter than
//!   Mosquitto in one case: `topic read #` with `topic deny secret/#` refuses a subscription
//!   to `#`, where Mosquitto would grant it and filter each message.
//! - A topic starting with `$` is not matched by `+` or `#` at its first level (MQTT 4.7.2).
//!
//! Bounds: a file of at most [`ACL_FILE_BYTES_MAX`], lines of at most [`ACL_LINE_BYTES_MAX`];
//! a check visits each trie node at most once (a node sits at one depth), so its cost is
//! bounded by the topic's levels and the rules that share its prefix.

use std::fmt;

use hashbrown::HashMap;

/// The largest ACL file accepted, in bytes.
pub const ACL_FILE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The longest line accepted, in bytes: a topic filter's 65,535 bytes and the keywords.
pub const ACL_LINE_BYTES_MAX: usize = 65_535 + 64;

const READ: u8 = 1;
const WRITE: u8 = 2;
const DENY: u8 = 4;

/// Why an ACL file was refused, with its line number (1-based; 0 for the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for AclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for AclError {}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    Plus,
    Hash,
    ClientId,
    Username,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    client_id: Option<Box<Node>>,
    username: Option<Box<Node>>,
    /// Access of a rule ending in `#` here: this level and everything below.
    hash: u8,
    /// Access of a rule ending exactly here.
    here: u8,
}

/// One section's rules: a trie for the checks and the deny rules for intersection.
#[derive(Debug, Default)]
struct Rules {
    root: Node,
    denies: Vec<Vec<Level>>,
}

/// Who asks: the client identifier and the username, if any.
#[derive(Debug, Clone, Copy)]
struct Asker<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
}

/// A compiled ACL file.
#[derive(Debug, Default)]
pub struct Acl {
    anonymous: Rules,
    users: HashMap<Box<str>, Rules>,
    patterns: Rules,
    rule_count: usize,
}

impl Acl {
    /// Parses and compiles an ACL file's bytes.
    pub fn parse(text: &[u8]) -> Result<Self, AclError> {
        if text.len() > ACL_FILE_BYTES_MAX {
            return Err(AclError {
                line: 0,
                message: format!(
                    "the file has {} bytes, more than the {ACL_FILE_BYTES_MAX} accepted",
                    text.len()
                ),
            });
        }
        let text = std::str::from_utf8(text).map_err(|e| AclError {
            line: 1 + text[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            message: "not UTF-8".into(),
        })?;
        let mut acl = Acl::default();
        let mut user: Option<Box<str>> = None;
        for (number, line) in text.lines().enumerate() {
            let number = number + 1;
            let error = |message: String| AclError {
                line: number,
                message,
            };
            if line.len() > ACL_LINE_BYTES_MAX {
                return Err(error(format!(
                    "a line of {} bytes, more than the {ACL_LINE_BYTES_MAX} accepted",
                    line.len()
                )));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(error("`user` without a name".into()));
                    }
                    user = Some(rest.into());
                }
                "topic" | "pattern" => {
                    let pattern = keyword == "pattern";
                    let (access, filter) = match split_word(rest) {
                        ("read", filter) => (READ, filter),
                        ("write", filter) => (WRITE, filter),
                        ("readwrite", filter) => (READ | WRITE, filter),
                        ("deny", filter) => (DENY, filter),
                        _ => (READ | WRITE, rest),
                    };
                    let levels = parse_filter(filter, pattern).map_err(error)?;
                    let rules = if pattern {
                        &mut acl.patterns
                    } else {
                        match &user {
                            Some(name) => acl.users.entry(name.clone()).or_default(),
                            None => &mut acl.anonymous,
                        }
                    };
                    rules.add(levels, access);
                    acl.rule_count += 1;
                }
                other => {
                    return Err(error(format!(
                        "unknown keyword `{}` (expected user, topic or pattern)",
                        crate::limits::quote(other)
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Rules compiled.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    fn sections<'s>(&'s self, username: Option<&str>) -> [Option<&'s Rules>; 2] {
        let own = match username {
            Some(name) => self.users.get(name),
            None => Some(&self.anonymous),
        };
        [own, Some(&self.patterns)]
    }

    /// Whether the client may publish to `topic` (a valid topic name).
    pub fn may_publish(&self, client_id: &str, username: Option<&str>, topic: &str) -> bool {
        let asker = Asker {
            client_id,
            username,
        };
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut access = 0;
        for rules in self.sections(username).into_iter().flatten() {
            match_name(&rules.root, &levels, 0, dollar, asker, &mut access);
        }
        access & DENY == 0 && access & WRITE != 0
    }

    /// Whether the client may subscribe to `filter` (a valid topic filter, without a
    /// `$share/group/` prefix).
    pub fn may_subscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        let asker = Asker {
            client_id,
            username,
        };
        let levels: Vec<&str> = filter.split('/').collect();
        let dollar = filter.starts_with('$');
        let mut access = 0;
        let mut denied = false;
        for rules in self.sections(username).into_iter().flatten() {
            match_cover(&rules.root, &levels, 0, dollar, asker, &mut access);
            denied |= rules
                .denies
                .iter()
                .any(|deny| intersects(&levels, deny, 0, asker));
        }
        !denied && access & READ != 0
    }
}

impl Rules {
    fn add(&mut self, levels: Vec<Level>, access: u8) {
        if access & DENY != 0 {
            self.denies.push(levels.clone());
        }
        let mut node = &mut self.root;
        for level in &levels {
            node = match level {
                Level::Literal(text) => node.children.entry(text.clone()).or_default(),
                Level::Plus => node.plus.get_or_insert_with(Box::default),
                Level::ClientId => node.client_id.get_or_insert_with(Box::default),
                Level::Username => node.username.get_or_insert_with(Box::default),
                Level::Hash => {
                    node.hash |= access;
                    return;
                }
            };
        }
        node.here |= access;
    }
}

fn split_word(text: &str) -> (&str, &str) {
    match text.find(char::is_whitespace) {
        Some(at) => (&text[..at], text[at..].trim_start()),
        None => (text, ""),
    }
}

fn parse_filter(filter: &str, pattern: bool) -> Result<Vec<Level>, String> {
    if filter.is_empty() {
        return Err("a rule without a topic filter".into());
    }
    if filter.len() > 65_535 {
        return Err("a topic filter longer than 65,535 bytes".into());
    }
    if filter.contains('\0') {
        return Err("a topic filter with U+0000".into());
    }
    let parts: Vec<&str> = filter.split('/').collect();
    let mut levels = Vec::with_capacity(parts.len());
    for (at, part) in parts.iter().enumerate() {
        let level = match *part {
            "#" if at + 1 == parts.len() => Level::Hash,
            "#" => return Err(format!("`#` is not the last level of `{}`", quote(filter))),
            "+" => Level::Plus,
            "%c" if pattern => Level::ClientId,
            "%u" if pattern => Level::Username,
            text if text.contains(['+', '#']) => {
                return Err(format!(
                    "a wildcard inside a level of `{}` (`+` and `#` stand alone)",
                    quote(filter)
                ));
            }
            text if pattern && (text.contains("%c") || text.contains("%u")) => {
                return Err(format!(
                    "`%c` or `%u` inside a level of `{}`: they stand for whole levels only",
                    quote(filter)
                ));
            }
            text => Level::Literal(text.into()),
        };
        levels.push(level);
    }
    Ok(levels)
}

fn quote(text: &str) -> std::borrow::Cow<'_, str> {
    crate::limits::quote(text)
}

/// Calls `visit` with each child of `node` that a topic level `level` (not a wildcard) may
/// take: the literal, `+` (unless `wild` is false: a `$` topic's first level), `%c`, `%u`.
fn children_for<'n>(
    node: &'n Node,
    level: &str,
    wild: bool,
    asker: Asker<'_>,
    mut visit: impl FnMut(&'n Node),
) {
    if let Some(child) = node.children.get(level) {
        visit(child);
    }
    if wild && let Some(child) = &node.plus {
        visit(child);
    }
    if level == asker.client_id
        && let Some(child) = &node.client_id
    {
        visit(child);
    }
    if asker.username == Some(level)
        && let Some(child) = &node.username
    {
        visit(child);
    }
}

/// Ors into `access` the rules under `node` that match topic name `levels[depth..]`.
fn match_name(
    node: &Node,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    asker: Asker<'_>,
    access: &mut u8,
) {
    let wild = !(depth == 0 && dollar);
    if wild {
        *access |= node.hash;
    }
    let Some(&level) = levels.get(depth) else {
        *access |= node.here;
        return;
    };
    children_for(node, level, wild, asker, |child| {
        match_name(child, levels, depth + 1, dollar, asker, access)
    });
}

/// Ors into `access` the rules under `node` that cover filter `levels[depth..]`.
fn match_cover(
    node: &Node,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    asker: Asker<'_>,
    access: &mut u8,
) {
    let wild = !(depth == 0 && dollar);
    if wild {
        *access |= node.hash;
    }
    let Some(&level) = levels.get(depth) else {
        *access |= node.here;
        return;
    };
    match level {
        // Only a `#` rule covers a `#` filter level: done above.
        "#" => {}
        // Only a `+` rule covers a `+` filter level.
        "+" => {
            if let Some(child) = &node.plus {
                match_cover(child, levels, depth + 1, dollar, asker, access);
            }
        }
        _ => children_for(node, level, wild, asker, |child| {
            match_cover(child, levels, depth + 1, dollar, asker, access)
        }),
    }
}

/// Whether some topic matches both filter `filter[depth..]` and rule `rule[depth..]`.
fn intersects(filter: &[&str], rule: &[Level], depth: usize, asker: Asker<'_>) -> bool {
    let (Some(&level), Some(rule_level)) = (filter.get(depth), rule.get(depth)) else {
        // One ended: they meet if the other ends too, or goes on with `#` alone.
        return matches!(
            (filter.get(depth), rule.get(depth)),
            (None, None) | (Some(&"#"), None) | (None, Some(Level::Hash))
        );
    };
    // A wildcard at the first level matches no `$` topic.
    let first = depth == 0;
    let meets = match (level, rule_level) {
        ("#", Level::Literal(text)) if first && text.starts_with('$') => false,
        ("#", _) => return true,
        (text, Level::Hash) if first && text.starts_with('$') => false,
        (_, Level::Hash) => return true,
        ("+", Level::Literal(text)) => !(first && text.starts_with('$')),
        ("+", Level::Username) => asker.username.is_some(),
        ("+", _) => true,
        (text, Level::Plus) => !(first && text.starts_with('$')),
        (text, Level::Literal(rule)) => text == &**rule,
        (text, Level::ClientId) => text == asker.client_id,
        (text, Level::Username) => asker.username == Some(text),
    };
    meets && intersects(filter, rule, depth + 1, asker)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# the anonymous section
topic read public/#

user alice
topic readwrite alice/#
topic read sensors/+/temperature
topic deny sensors/secret/temperature
topic write   cmd/with space

user bob
topic #
topic deny private/#

pattern write devices/%c/status
pattern read inbox/%u/#
";

    fn acl() -> Acl {
        Acl::parse(FILE.as_bytes()).expect("valid file")
    }

    #[test]
    fn publish_checks_user_section_patterns_and_deny() {
        let acl = acl();
        assert!(acl.may_publish("c1", Some("alice"), "alice/x/y"));
        assert!(acl.may_publish("c1", Some("alice"), "alice"));
        assert!(!acl.may_publish("c1", Some("alice"), "sensors/a/temperature"));
        assert!(acl.may_publish("c1", Some("alice"), "cmd/with space"));
        assert!(acl.may_publish("c1", Some("alice"), "devices/c1/status"));
        assert!(!acl.may_publish("c1", Some("alice"), "devices/c2/status"));
        assert!(acl.may_publish("c1", Some("bob"), "anything/at/all"));
        assert!(!acl.may_publish("c1", Some("bob"), "private/x"));
        assert!(
            !acl.may_publish("c1", Some("bob"), "$SYS/x"),
            "# does not match $ topics"
        );
        // Anonymous: read only.
        assert!(!acl.may_publish("c1", None, "public/x"));
        assert!(acl.may_publish("c9", None, "devices/c9/status"));
        // A user with no section has the patterns only.
        assert!(!acl.may_publish("c1", Some("carol"), "public/x"));
        assert!(acl.may_publish("c1", Some("carol"), "devices/c1/status"));
    }

    #[test]
    fn subscribe_needs_a_covering_read_rule_and_no_intersecting_deny() {
        let acl = acl();
        assert!(acl.may_subscribe("c1", None, "public/#"));
        assert!(acl.may_subscribe("c1", None, "public/+/x"));
        assert!(!acl.may_subscribe("c1", None, "#"));
        assert!(!acl.may_subscribe("c1", None, "+/x"));
        assert!(acl.may_subscribe("c1", Some("alice"), "sensors/kitchen/temperature"));
        // Covered by sensors/+/temperature, but the deny rule meets it.
        assert!(!acl.may_subscribe("c1", Some("alice"), "sensors/+/temperature"));
        assert!(!acl.may_subscribe("c1", Some("alice"), "sensors/secret/temperature"));
        assert!(!acl.may_subscribe("c1", Some("alice"), "sensors/#"));
        assert!(acl.may_subscribe("c1", Some("bob"), "public/#"));
        assert!(
            !acl.may_subscribe("c1", Some("bob"), "#"),
            "deny private/# meets #"
        );
        assert!(
            !acl.may_subscribe("c1", Some("bob"), "+/x"),
            "deny private/# meets +/x"
        );
        assert!(!acl.may_subscribe("c1", Some("bob"), "+/x/y/z/w"));
        assert!(acl.may_subscribe("c1", Some("bob"), "a/+"));
        assert!(acl.may_subscribe("c1", Some("dave"), "inbox/dave/#"));
        assert!(!acl.may_subscribe("c1", Some("dave"), "inbox/erin/#"));
        assert!(!acl.may_subscribe("c1", Some("dave"), "inbox/+/#"));
        assert!(
            !acl.may_subscribe("c1", None, "inbox/dave/#"),
            "no %u for anonymous"
        );
    }

    #[test]
    fn dollar_topics_need_rules_that_name_them() {
        let acl = Acl::parse(b"topic read #\ntopic read $SYS/#\n").unwrap();
        assert!(acl.may_subscribe("c", None, "$SYS/broker/load"));
        let acl = Acl::parse(b"topic read #\n").unwrap();
        assert!(!acl.may_subscribe("c", None, "$SYS/broker/load"));
        assert!(acl.may_subscribe("c", None, "#"));
        let acl = Acl::parse(b"topic readwrite #\ntopic deny $SYS/#\n").unwrap();
        assert!(acl.may_subscribe("c", None, "#"), "$SYS/# does not meet #");
        assert!(acl.may_publish("c", None, "a"));
    }

    #[test]
    fn hostile_files_are_refused_with_line_numbers() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"topic read a/#/b\n", 1, "not the last level"),
            (b"\n\nfrobnicate x\n", 3, "unknown keyword"),
            (b"user\n", 1, "without a name"),
            (b"topic read\n", 1, "without a topic filter"),
            (b"topic read a+/b\n", 1, "wildcard inside"),
            (b"pattern read a/x%c\n", 1, "whole levels"),
            (b"topic a\n\xff\n", 2, "UTF-8"),
            (b"topic a\0b\n", 1, "U+0000"),
        ];
        for (text, line, words) in cases {
            let error = Acl::parse(text).expect_err("refused");
            assert_eq!(error.line, *line, "{error}");
            assert!(error.message.contains(words), "{error}");
        }
        let long = format!("topic {}\n", "a".repeat(ACL_LINE_BYTES_MAX));
        assert!(Acl::parse(long.as_bytes()).is_err());
        let huge = vec![b'#'; ACL_FILE_BYTES_MAX + 1];
        assert_eq!(Acl::parse(&huge).unwrap_err().line, 0);
        // `%c` in a `topic` line is a literal level.
        let acl = Acl::parse(b"topic write a/%c\n").unwrap();
        assert!(acl.may_publish("x", None, "a/%c"));
        assert!(!acl.may_publish("x", None, "a/x"));
    }

    #[test]
    fn deep_topics_against_many_wildcards_stay_bounded() {
        // Every level may match `+` or a literal: a node is still visited once.
        let mut text = String::new();
        for depth in 1..=32 {
            let filter: Vec<&str> = (0..depth)
                .map(|i| if i % 2 == 0 { "+" } else { "a" })
                .collect();
            text.push_str(&format!("topic write {}\n", filter.join("/")));
            text.push_str(&format!("topic write {}\n", vec!["a"; depth].join("/")));
        }
        let acl = Acl::parse(text.as_bytes()).unwrap();
        let topic = vec!["a"; 32].join("/");
        assert!(acl.may_publish("c", None, &topic));
        assert!(!acl.may_publish("c", None, &vec!["a"; 33].join("/")));
    }

    /// The oracle: Mosquitto-style matching, one rule at a time.
    fn naive_publish(rules: &[(u8, &str)], topic: &str) -> bool {
        let mut access = 0;
        for &(bits, filter) in rules {
            if shardmq_net::mqtt::topic::matches(filter, topic) {
                access |= bits;
            }
        }
        access & DENY == 0 && access & WRITE != 0
    }

    #[test]
    fn publish_agrees_with_a_rule_by_rule_oracle() {
        let rules: &[(u8, &str)] = &[
            (WRITE, "a/+/c"),
            (READ | WRITE, "a/#"),
            (DENY, "a/b/+"),
            (WRITE, "+/b/#"),
            (READ, "x/y"),
            (WRITE, "#"),
            (DENY, "z"),
        ];
        let mut text = String::new();
        for &(bits, filter) in rules {
            let word = match bits {
                READ => "read",
                WRITE => "write",
                DENY => "deny",
                _ => "readwrite",
            };
            text.push_str(&format!("topic {word} {filter}\n"));
        }
        let acl = Acl::parse(text.as_bytes()).unwrap();
        let words = ["a", "b", "c", "x", "y", "z", "$s"];
        let mut topics = Vec::new();
        for a in words {
            topics.push(a.to_string());
            for b in words {
                topics.push(format!("{a}/{b}"));
                for c in words {
                    topics.push(format!("{a}/{b}/{c}"));
                }
            }
        }
        for topic in topics {
            assert_eq!(
                acl.may_publish("c", None, &topic),
                naive_publish(rules, &topic),
                "{topic}"
            );
        }
    }
}
