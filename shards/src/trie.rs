//! A topic trie: topic filter -> subscribers, matched against topic names.
//!
//! Owns: the filters of one shard (or, for the node route table, of one node) and a value per
//! subscriber of each filter.
//! Invariants: a node exists only while some filter passes through it (removal prunes empty
//! branches); `filter_count` is the number of filters with at least one subscriber.
//!
//! Layout, chosen for millions of filters: nodes live in one `Vec` (an arena indexed by `u32`,
//! with a free list); the edges of literal levels live in one hash map keyed by (parent node,
//! level), so a node holds no map of its own; `+` and `#` children are direct indexes on the
//! node. Matching walks the topic's levels once, following at each node the literal edge, the
//! `+` child and the `#` child.

use hashbrown::{Equivalent, HashMap};

/// The index of a node in the arena; 0 is the root, and as a child index it means "none".
type NodeIndex = u32;
const ROOT: NodeIndex = 0;
const NONE: NodeIndex = 0;

#[derive(Debug)]
struct Node<T> {
    parent: NodeIndex,
    plus: NodeIndex,
    hash: NodeIndex,
    /// Literal children, counted so that pruning knows when a node is empty.
    literal_children: u32,
    subscribers: Vec<T>,
}

impl<T> Node<T> {
    fn new(parent: NodeIndex) -> Self {
        Self {
            parent,
            plus: NONE,
            hash: NONE,
            literal_children: 0,
            subscribers: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.plus == NONE
            && self.hash == NONE
            && self.literal_children == 0
            && self.subscribers.is_empty()
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Edge {
    parent: NodeIndex,
    level: Box<str>,
}

/// An edge looked up without allocating its level.
#[derive(Hash)]
struct EdgeRef<'a> {
    parent: NodeIndex,
    level: &'a str,
}

impl Equivalent<Edge> for EdgeRef<'_> {
    fn equivalent(&self, key: &Edge) -> bool {
        self.parent == key.parent && self.level == &*key.level
    }
}

// `EdgeRef` must hash exactly as `Edge` does: derive(Hash) on both hashes the fields in order,
// and `Box<str>` hashes as `str`.

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
    nodes: Vec<Node<T>>,
    free: Vec<NodeIndex>,
    edges: HashMap<Edge, NodeIndex>,
    filter_count: usize,
}

impl<T> Default for Trie<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Trie<T> {
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::new(ROOT)],
            free: Vec::new(),
            edges: HashMap::new(),
            filter_count: 0,
        }
    }

    /// Filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }

    /// Nodes in use, for memory accounting.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn allocate(&mut self, parent: NodeIndex) -> NodeIndex {
        match self.free.pop() {
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
                _ => {
                    let key = EdgeRef {
                        parent: node,
                        level,
                    };
                    match self.edges.get(&key) {
                        Some(&child) => child,
                        None => {
                            let child = self.allocate(node);
                            self.edges.insert(
                                Edge {
                                    parent: node,
                                    level: level.into(),
                                },
                                child,
                            );
                            self.nodes[node as usize].literal_children += 1;
                            child
                        }
                    }
                }
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
                _ => self
                    .edges
                    .get(&EdgeRef {
                        parent: node,
                        level,
                    })
                    .copied()
                    .unwrap_or(NONE),
            };
            if node == NONE {
                return None;
            }
        }
        Some(node)
    }

    /// Adds `value` as a subscriber of `filter` (a valid, non-shared filter).
    pub fn insert(&mut self, filter: &str, value: T) -> Change {
        let node = self.node_for(filter);
        let subscribers = &mut self.nodes[node as usize].subscribers;
        subscribers.push(value);
        if subscribers.len() == 1 {
            self.filter_count += 1;
            Change::FilterAdded
        } else {
            Change::Unchanged
        }
    }

    /// The subscribers of exactly `filter`.
    pub fn get(&self, filter: &str) -> &[T] {
        match self.find(filter) {
            Some(node) => &self.nodes[node as usize].subscribers,
            None => &[],
        }
    }

    /// The subscribers of exactly `filter`, to change in place.
    pub fn get_mut(&mut self, filter: &str) -> Option<&mut Vec<T>> {
        let node = self.find(filter)?;
        Some(&mut self.nodes[node as usize].subscribers)
    }

    /// Removes the first subscriber of `filter` for which `is_it` holds, pruning the branch if
    /// it became empty.
    pub fn remove(&mut self, filter: &str, is_it: impl Fn(&T) -> bool) -> Change {
        let Some(node) = self.find(filter) else {
            return Change::NotFound;
        };
        let subscribers = &mut self.nodes[node as usize].subscribers;
        let Some(position) = subscribers.iter().position(is_it) else {
            return Change::NotFound;
        };
        subscribers.swap_remove(position);
        if !subscribers.is_empty() {
            return Change::Unchanged;
        }
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
                _ => {
                    self.edges.remove(&EdgeRef { parent, level });
                    self.nodes[parent as usize].literal_children -= 1;
                }
            }
            self.nodes[node as usize].subscribers = Vec::new();
            self.free.push(node);
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

    fn visit_node(
        &self,
        node: NodeIndex,
        rest: &str,
        root_dollar: bool,
        visit: &mut impl FnMut(&[T]),
    ) {
        let current = &self.nodes[node as usize];
        // `#` matches the remaining levels, none included ("a/#" matches "a").
        if current.hash != NONE && !root_dollar {
            let subscribers = &self.nodes[current.hash as usize].subscribers;
            if !subscribers.is_empty() {
                visit(subscribers);
            }
        }
        let (level, next) = match rest.split_once('/') {
            Some((level, next)) => (level, Some(next)),
            None => (rest, None),
        };
        if let Some(&child) = self.edges.get(&EdgeRef {
            parent: node,
            level,
        }) {
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
                let subscribers = &self.nodes[child as usize].subscribers;
                if !subscribers.is_empty() {
                    visit(subscribers);
                }
                // "a/#" also matches "a": the `#` child of the last level.
                let hash = self.nodes[child as usize].hash;
                if hash != NONE {
                    let subscribers = &self.nodes[hash as usize].subscribers;
                    if !subscribers.is_empty() {
                        visit(subscribers);
                    }
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
        assert_eq!(trie.remove("a/+/c", |_| true), Change::NotFound);
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
