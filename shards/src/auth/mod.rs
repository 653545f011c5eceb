//! Authorization rules the shard checks on its own thread: the ACL file compiled into tries.
//!
//! Owns: parsing Mosquitto's ACL syntax and answering "may this client publish to this
//! topic / subscribe to this filter" in about one trie walk.
//! Never: reads a file (the caller hands the bytes in), hashes a password, or blocks.
//! Invariants: a compiled [`Acl`] is immutable; a reload builds a new one.
//!
//! Not wired into the shard yet: see ARCHITECTURE.md, "Authentication and authorization".

pub mod acl;

pub use acl::{Acl, AclError};
