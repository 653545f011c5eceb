//! A topic trie: topic filter -> subscribers, matched against topic names.
//!
//! Owns: the filters of one shard (or, for the node route table, of one node) and a value per
//! subscriber of each filter.
//! Invariants: a node exists only while some filter passes through it (removal prunes empty
//! branches); `filter_count` is the number of filters with at least one subscriber.
//!
//! Layout, chosen for millions of filters (TARGETS.md: <= 200 bytes per filter):
//! - nodes live in one `Vec` (an arena indexed by `u32`, with a free list), 20 bytes each;
//! - the literal edges of all nodes live in one `hashbrown::HashTable` of 16-byte entries
//!   (parent, child, and the level as offset and length into one byte arena), so neither a node
//!   nor an edge owns an allocation; the arena is compacted when half of it is garbage;
//! - `+` and `#` children are direct indexes on the node;
//! - subscriber lists exist only on nodes that have subscribers, and hold a single subscriber
//!   inline (the common case) before growing into a `Vec`.
//!
//! Matching walks the topic's levels once, following at each node the literal edge, the `+`
//! child and the `#` child.

use std::hash::{BuildHasher, Hasher};

use hashbrown::{DefaultHashBuilder, HashTable};

/// The index of a node in the arena; 0 is the root, and as a child index it means "none".
type NodeIndex = u32;
const ROOT: NodeIndex = 0;
const NONE: NodeIndex = 0;

#[derive(Debug, Clone, Copy)]
struct Node {
    parent: NodeIndex,
    plus: NodeIndex,
    hash: NodeIndex,
    /// Literal children, counted so that pruning knows when a node is empty.
    literal_children: u32,
    /// 1 + the index of this node's subscriber list, or 0 for none.
    list: u32,
}

impl Node {
    fn new(parent: NodeIndex) -> Self {
        Self {
            parent,
            plus: NONE,
            hash: NONE,
            literal_children: 0,
            list: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.plus == NONE && self.hash == NONE && self.literal_children == 0 && self.list == 0
    }
}

/// A literal edge: `child` is reached from `parent` by the level stored at
/// `levels[start..start + length]`.
#[derive(Debug, Clone, Copy)]
struct Edge {
    parent: NodeIndex,
    child: NodeIndex,
    start: u32,
    length: u32,
}

/// The subscribers of one filter: one inline, more in a `Vec`.
#[derive(Debug)]
enum Subscribers<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Subscribers<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Subscribers::One(value) => std::slice::from_ref(value),
            Subscribers::Many(values) => values,
        }
    }
}

/// What `insert` and `remove` report about a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The filter gained its first subscriber (0 -> 1) or lost its last (1 -> 0): the moment
    /// to emit a route delta.
    FilterAdded,
    FilterRemoved,
    /// The filter already had (still has) other subscribers.
    Unchanged,
    /// `remove` found no such subscriber.
    NotFound,
}

/// Topic filter -> subscribers of type `T`.
#[derive(Debug)]
pub struct Trie<T> {
    nodes: Vec<Node>,
    free_nodes: Vec<NodeIndex>,
    edges: HashTable<Edge>,
    levels: Vec<u8>,
    /// Bytes of `levels` no edge refers to any more.
    levels_garbage: usize,
    hasher: DefaultHashBuilder,
    lists: Vec<Option<Subscribers<T>>>,
    free_lists: Vec<u32>,
    filter_count: usize,
}

impl<T> Default for Trie<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn edge_hash(hasher: &DefaultHashBuilder, parent: NodeIndex, level: &[u8]) -> u64 {
    let mut state = hasher.build_hasher();
    state.write_u32(parent);
    state.write(level);
    state.finish()
}

fn edge_level<'a>(levels: &'a [u8], edge: &Edge) -> &'a [u8] {
    &levels[edge.start as usize..(edge.start + edge.length) as usize]
}

impl<T> Trie<T> {
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::new(ROOT)],
            free_nodes: Vec::new(),
            edges: HashTable::new(),
            levels: Vec::new(),
            levels_garbage: 0,
            hasher: DefaultHashBuilder::default(),
            lists: Vec::new(),
            free_lists: Vec::new(),
            filter_count: 0,
        }
    }

    /// Filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }

    /// Nodes in use, for memory accounting.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    fn allocate(&mut self, parent: NodeIndex) -> NodeIndex {
        match self.free_nodes.pop() {
            Some(index) => {
                self.nodes[index as usize] = Node::new(parent);
                index
            }
            None => {
                let index =
                    NodeIndex::try_from(self.nodes.len()).expect("trie node index overflow");
                self.nodes.push(Node::new(parent));
                index
            }
        }
    }

    fn literal_child(&self, parent: NodeIndex, level: &str) -> NodeIndex {
        let hash = edge_hash(&self.hasher, parent, level.as_bytes());
        self.edges
            .find(hash, |edge| {
                edge.parent == parent && edge_level(&self.levels, edge) == level.as_bytes()
            })
            .map_or(NONE, |edge| edge.child)
    }

    fn add_literal_child(&mut self, parent: NodeIndex, level: &str) -> NodeIndex {
        let child = self.allocate(parent);
        let start = u32::try_from(self.levels.len()).expect("trie level arena overflow");
        self.levels.extend_from_slice(level.as_bytes());
        let edge = Edge {
            parent,
            child,
            start,
            length: level.len() as u32,
        };
        let Trie {
            edges,
            levels,
            hasher,
            ..
        } = self;
        let hash = edge_hash(hasher, parent, level.as_bytes());
        edges.insert_unique(hash, edge, |edge| {
            edge_hash(hasher, edge.parent, edge_level(levels, edge))
        });
        self.nodes[parent as usize].literal_children += 1;
        child
    }

    fn remove_literal_child(&mut self, parent: NodeIndex, level: &str) {
        let hash = edge_hash(&self.hasher, parent, level.as_bytes());
        let levels = &self.levels;
        if let Ok(entry) = self.edges.find_entry(hash, |edge| {
            edge.parent == parent && edge_level(levels, edge) == level.as_bytes()
        }) {
            let (edge, _) = entry.remove();
            self.levels_garbage += edge.length as usize;
            self.nodes[parent as usize].literal_children -= 1;
        }
        if self.levels_garbage > 4096 && self.levels_garbage * 2 > self.levels.len() {
            self.compact_levels();
        }
    }

    /// Rewrites the level arena with only the levels edges still use.
    fn compact_levels(&mut self) {
        let mut compacted = Vec::with_capacity(self.levels.len() - self.levels_garbage);
        for edge in self.edges.iter_mut() {
            let start = compacted.len() as u32;
            compacted.extend_from_slice(edge_level(&self.levels, edge));
            edge.start = start;
        }
        self.levels = compacted;
        self.levels_garbage = 0;
    }

    /// The node of `filter`, created along with its path if missing.
    fn node_for(&mut self, filter: &str) -> NodeIndex {
        let mut node = ROOT;
        for level in filter.split('/') {
            node = match level {
                "+" => {
                    if self.nodes[node as usize].plus == NONE {
                        let child = self.allocate(node);
                        self.nodes[node as usize].plus = child;
                    }
                    self.nodes[node as usize].plus
                }
                "#" => {
                    if self.nodes[node as usize].hash == NONE {
                        let child = self.allocate(node);
                        self.nodes[node as usize].hash = child;
                    }
                    self.nodes[node as usize].hash
                }
                _ => match self.literal_child(node, level) {
                    NONE => self.add_literal_child(node, level),
                    child => child,
                },
            };
        }
        node
    }

    /// The node of `filter`, if it exists.
    fn find(&self, filter: &str) -> Option<NodeIndex> {
        let mut node = ROOT;
        for level in filter.split('/') {
            node = match level {
                "+" => self.nodes[node as usize].plus,
                "#" => self.nodes[node as usize].hash,
                _ => self.literal_child(node, level),
            };
            if node == NONE {
                return None;
            }
        }
        Some(node)
    }

    fn subscribers_of(&self, node: NodeIndex) -> &[T] {
        match self.nodes[node as usize].list {
            0 => &[],
            list => self.lists[list as usize - 1]
                .as_ref()
                .expect("a live list")
                .as_slice(),
        }
    }

    /// Adds `value` as a subscriber of `filter` (a valid, non-shared filter).
    pub fn insert(&mut self, filter: &str, value: T) -> Change {
        let node = self.node_for(filter);
        match self.nodes[node as usize].list {
            0 => {
                let list = match self.free_lists.pop() {
                    Some(list) => {
                        self.lists[list as usize] = Some(Subscribers::One(value));
                        list
                    }
                    None => {
                        self.lists.push(Some(Subscribers::One(value)));
                        u32::try_from(self.lists.len() - 1).expect("trie list index overflow")
                    }
                };
                self.nodes[node as usize].list = list + 1;
                self.filter_count += 1;
                Change::FilterAdded
            }
            list => {
                let slot = &mut self.lists[list as usize - 1];
                *slot = Some(match slot.take().expect("a live list") {
                    Subscribers::One(first) => Subscribers::Many(vec![first, value]),
                    Subscribers::Many(mut values) => {
                        values.push(value);
                        Subscribers::Many(values)
                    }
                });
                Change::Unchanged
            }
        }
    }

    /// Every value of every filter, in arena order (which follows the history of inserts and
    /// removals): for counts and consistency checks, not for anything that reaches a client.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.lists
            .iter()
            .flatten()
            .flat_map(|subscribers| subscribers.as_slice())
    }

    /// Every filter with subscribers that starts with `prefix`, with its subscribers, until
    /// `visit` returns false. Filters come level by level, the children of each level in the
    /// order of their bytes (`+` and `#` among them), so the order is a function of the
    /// filters alone. Costs a sort of every literal edge by its parent (O(E log E)) and then a
    /// walk of the branches that can hold such a filter: for an operator's listing, never the
    /// message path.
    pub fn for_each_filter(&self, prefix: &str, mut visit: impl FnMut(&str, &[T]) -> bool) {
        let mut literal: Vec<(NodeIndex, &[u8], NodeIndex)> = self
            .edges
            .iter()
            .map(|edge| (edge.parent, edge_level(&self.levels, edge), edge.child))
            .collect();
        // By parent alone (a cheap integer key): siblings are ordered where they are walked.
        literal.sort_unstable_by_key(|edge| edge.0);
        // (node, its filter); the root's is empty and never visited as a filter.
        let mut stack: Vec<(NodeIndex, String)> = vec![(ROOT, String::new())];
        while let Some((node, path)) = stack.pop() {
            if node != ROOT && path.starts_with(prefix) {
                let subscribers = self.subscribers_of(node);
                if !subscribers.is_empty() && !visit(&path, subscribers) {
                    return;
                }
            }
            let first = literal.partition_point(|edge| edge.0 < node);
            let mut children: Vec<(&[u8], NodeIndex)> = literal[first..]
                .iter()
                .take_while(|edge| edge.0 == node)
                .map(|edge| (edge.1, edge.2))
                .collect();
            let wildcards = [
                (&b"+"[..], self.nodes[node as usize].plus),
                (&b"#"[..], self.nodes[node as usize].hash),
            ];
            children.extend(wildcards.into_iter().filter(|(_, child)| *child != NONE));
            children.sort_unstable();
            // Reversed onto the stack, so that the first child is walked first.
            for (level, child) in children.into_iter().rev() {
                let level = String::from_utf8_lossy(level);
                let child_path = if node == ROOT {
                    level.into_owned()
                } else {
                    format!("{path}/{level}")
                };
                if child_path.starts_with(prefix) || prefix.starts_with(child_path.as_str()) {
                    stack.push((child, child_path));
                }
            }
        }
    }

    /// The subscribers of exactly `filter`.
    pub fn get(&self, filter: &str) -> &[T] {
        match self.find(filter) {
            Some(node) => self.subscribers_of(node),
            None => &[],
        }
    }

    /// Removes the first subscriber of `filter` for which `is_it` holds, pruning the branch if
    /// it became empty.
    pub fn remove(&mut self, filter: &str, is_it: impl Fn(&T) -> bool) -> Change {
        let Some(node) = self.find(filter) else {
            return Change::NotFound;
        };
        let list = self.nodes[node as usize].list;
        if list == 0 {
            return Change::NotFound;
        }
        let slot = &mut self.lists[list as usize - 1];
        let remaining = match slot.take().expect("a live list") {
            Subscribers::One(value) if is_it(&value) => None,
            Subscribers::One(value) => {
                *slot = Some(Subscribers::One(value));
                return Change::NotFound;
            }
            Subscribers::Many(mut values) => {
                let Some(position) = values.iter().position(is_it) else {
                    *slot = Some(Subscribers::Many(values));
                    return Change::NotFound;
                };
                values.swap_remove(position);
                Some(if values.len() == 1 {
                    Subscribers::One(values.pop().expect("one left"))
                } else {
                    Subscribers::Many(values)
                })
            }
        };
        if let Some(remaining) = remaining {
            *slot = Some(remaining);
            return Change::Unchanged;
        }
        self.free_lists.push(list - 1);
        self.nodes[node as usize].list = 0;
        self.filter_count -= 1;
        self.prune(node, filter);
        Change::FilterRemoved
    }

    /// Frees `node` and its ancestors while they are empty. `filter` is the path to `node`.
    fn prune(&mut self, mut node: NodeIndex, filter: &str) {
        let mut levels = filter.rsplit('/');
        while node != ROOT && self.nodes[node as usize].is_empty() {
            let level = levels.next().expect("the path is as deep as the node");
            let parent = self.nodes[node as usize].parent;
            match level {
                "+" => self.nodes[parent as usize].plus = NONE,
                "#" => self.nodes[parent as usize].hash = NONE,
                _ => self.remove_literal_child(parent, level),
            }
            self.free_nodes.push(node);
            node = parent;
        }
    }

    /// Calls `visit` with the subscribers of every filter that matches `topic` (a valid topic
    /// name), once per matching filter. Wildcards in the first level do not match topics that
    /// begin with `$` [MQTT-4.7.2-1].
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&[T])) {
        let dollar = topic.starts_with('$');
        self.visit_node(ROOT, topic, dollar, &mut visit);
    }

    fn visit_subscribers(&self, node: NodeIndex, visit: &mut impl FnMut(&[T])) {
        let subscribers = self.subscribers_of(node);
        if !subscribers.is_empty() {
            visit(subscribers);
        }
    }

    fn visit_node(
        &self,
        node: NodeIndex,
        rest: &str,
        root_dollar: bool,
        visit: &mut impl FnMut(&[T]),
    ) {
        let current = self.nodes[node as usize];
        // `#` matches the remaining levels, none included ("a/#" matches "a").
        if current.hash != NONE && !root_dollar {
            self.visit_subscribers(current.hash, visit);
        }
        let (level, next) = match rest.split_once('/') {
            Some((level, next)) => (level, Some(next)),
            None => (rest, None),
        };
        let child = self.literal_child(node, level);
        if child != NONE {
            self.visit_child(child, next, visit);
        }
        if current.plus != NONE && !root_dollar {
            self.visit_child(current.plus, next, visit);
        }
    }

    fn visit_child(&self, child: NodeIndex, next: Option<&str>, visit: &mut impl FnMut(&[T])) {
        match next {
            Some(rest) => self.visit_node(child, rest, false, visit),
            None => {
                self.visit_subscribers(child, visit);
                // "a/#" also matches "a": the `#` child of the last level.
                let hash = self.nodes[child as usize].hash;
                if hash != NONE {
                    self.visit_subscribers(hash, visit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shardmq_net::mqtt::topic::matches;

    #[test]
    fn filters_are_listed_by_prefix_in_level_order_and_the_walk_stops_when_told() {
        let mut trie = Trie::new();
        for (value, filter) in ["a/b", "a/+", "a/#", "b", "/x", "a//c", "ab", "a/b/c"]
            .into_iter()
            .enumerate()
        {
            trie.insert(filter, value as u32);
        }
        trie.remove("b", |_| true);
        let listed = |prefix: &str, limit: usize| {
            let mut found = Vec::new();
            trie.for_each_filter(prefix, |filter, values| {
                found.push((filter.to_string(), values.to_vec()));
                found.len() < limit
            });
            found
        };
        let filters = |found: Vec<(String, Vec<u32>)>| {
            found
                .into_iter()
                .map(|(filter, _)| filter)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            filters(listed("", 100)),
            ["/x", "a//c", "a/#", "a/+", "a/b", "a/b/c", "ab"]
        );
        assert_eq!(
            filters(listed("a/", 100)),
            ["a//c", "a/#", "a/+", "a/b", "a/b/c"]
        );
        assert_eq!(filters(listed("a/b", 100)), ["a/b", "a/b/c"]);
        assert_eq!(listed("a/b", 1), [("a/b".to_string(), vec![0])]);
        assert!(listed("b", 100).is_empty(), "a removed filter is gone");
        assert!(listed("zz", 100).is_empty());
    }

    fn matched(trie: &Trie<u32>, topic: &str) -> Vec<u32> {
        let mut found = Vec::new();
        trie.for_each_match(topic, |subscribers| found.extend_from_slice(subscribers));
        found.sort_unstable();
        found
    }

    #[test]
    fn specification_examples() {
        let mut trie = Trie::new();
        let filters = [
            "sport/tennis/player1/#",
            "sport/#",
            "sport/tennis/+",
            "+/+",
            "/+",
            "+",
            "#",
            "$SYS/#",
            "+/monitor/Clients",
        ];
        for (index, filter) in filters.iter().enumerate() {
            assert_eq!(trie.insert(filter, index as u32), Change::FilterAdded);
        }
        assert_eq!(matched(&trie, "sport/tennis/player1"), vec![0, 1, 2, 6]);
        assert_eq!(matched(&trie, "sport"), vec![1, 5, 6]);
        assert_eq!(matched(&trie, "/finance"), vec![3, 4, 6]);
        assert_eq!(matched(&trie, "$SYS/monitor/Clients"), vec![7]);
        assert_eq!(matched(&trie, "x/monitor/Clients"), vec![6, 8]);
    }

    #[test]
    fn insert_and_remove_report_route_changes_and_prune() {
        let mut trie = Trie::new();
        assert_eq!(trie.insert("a/+/c", 1), Change::FilterAdded);
        assert_eq!(trie.insert("a/+/c", 2), Change::Unchanged);
        assert_eq!(trie.remove("a/+/c", |&value| value == 3), Change::NotFound);
        assert_eq!(trie.remove("a/+/c", |&value| value == 1), Change::Unchanged);
        assert_eq!(
            trie.remove("a/+/c", |&value| value == 2),
            Change::FilterRemoved
        );
        assert_eq!(trie.filter_count(), 0);
        assert_eq!(trie.node_count(), 1, "only the root is left");
        assert!(trie.edges.is_empty());
        assert_eq!(trie.lists.iter().flatten().count(), 0);
        assert_eq!(trie.remove("a/+/c", |_| true), Change::NotFound);
    }

    #[test]
    fn level_arena_compaction_keeps_every_edge_usable() {
        let mut trie = Trie::new();
        for index in 0..5_000u32 {
            trie.insert(&format!("building/{index}/floor/+"), index);
        }
        // Remove most: their levels become garbage and the arena is compacted on the way.
        for index in 100..5_000u32 {
            assert_eq!(
                trie.remove(&format!("building/{index}/floor/+"), |&v| v == index),
                Change::FilterRemoved
            );
        }
        assert!(
            trie.levels.len() < 4096,
            "the arena was compacted: {} bytes",
            trie.levels.len()
        );
        for index in 0..100u32 {
            assert_eq!(
                matched(&trie, &format!("building/{index}/floor/3")),
                vec![index]
            );
        }
        assert!(matched(&trie, "building/4000/floor/3").is_empty());
        trie.insert("building/7/floor/#", 7000);
        assert_eq!(matched(&trie, "building/7/floor"), vec![7000]);
    }

    #[derive(Debug, Clone)]
    enum Operation {
        Insert(String, u32),
        Remove(String, u32),
        Match(String),
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof!["[ab$]{0,2}", Just("+".to_string())];
        (proptest::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
            let mut filter = levels.join("/");
            if hash {
                filter.push_str("/#");
            }
            filter
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec("[ab$]{0,2}", 1..5).prop_map(|levels| levels.join("/"))
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            3 => (filter(), 0..4u32).prop_map(|(f, v)| Operation::Insert(f, v)),
            2 => (filter(), 0..4u32).prop_map(|(f, v)| Operation::Remove(f, v)),
            3 => topic().prop_map(Operation::Match),
            1 => Just(Operation::Insert("#".into(), 9)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The trie against a list of (filter, value) pairs and the codec's `matches`.
        #[test]
        fn trie_agrees_with_a_naive_matcher(operations in proptest::collection::vec(operation(), 1..80)) {
            let mut trie = Trie::new();
            let mut oracle: Vec<(String, u32)> = Vec::new();
            for operation in operations {
                match operation {
                    Operation::Insert(filter, value) => {
                        let first = !oracle.iter().any(|(f, _)| *f == filter);
                        let change = trie.insert(&filter, value);
                        prop_assert_eq!(change, if first { Change::FilterAdded } else { Change::Unchanged });
                        oracle.push((filter, value));
                    }
                    Operation::Remove(filter, value) => {
                        let position = oracle.iter().position(|(f, v)| *f == filter && *v == value);
                        let change = trie.remove(&filter, |&v| v == value);
                        let expected = match position {
                            None => Change::NotFound,
                            Some(position) => {
                                oracle.remove(position);
                                if oracle.iter().any(|(f, _)| *f == filter) { Change::Unchanged } else { Change::FilterRemoved }
                            }
                        };
                        prop_assert_eq!(change, expected);
                    }
                    Operation::Match(topic) => {
                        let mut expected: Vec<u32> = oracle
                            .iter()
                            .filter(|(filter, _)| matches(filter, &topic))
                            .map(|&(_, value)| value)
                            .collect();
                        expected.sort_unstable();
                        prop_assert_eq!(matched(&trie, &topic), expected, "topic {:?}", topic);
                    }
                }
                let distinct: std::collections::HashSet<&String> = oracle.iter().map(|(f, _)| f).collect();
                prop_assert_eq!(trie.filter_count(), distinct.len());
            }
            // Removing everything leaves only the root.
            for (filter, value) in oracle {
                prop_assert_ne!(trie.remove(&filter, |&v| v == value), Change::NotFound);
            }
            prop_assert_eq!(trie.node_count(), 1);
        }
    }
}
