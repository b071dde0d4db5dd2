//! Hash maps for the hot paths: keyed by entry hashes, chat ids and
//! public keys, looked up several times for every entry a node composes,
//! verifies or serves.
//!
//! They hash with foldhash, seeded at random per map, instead of std's
//! SipHash-1-3: a tenth of the cost for a 32-byte key, and still keyed, so
//! a peer that grinds entry hashes cannot aim them at one bucket without
//! knowing the seed. Nothing relies on their iteration order.

/// A [`std::collections::HashMap`] hashed with foldhash (see the module).
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A [`std::collections::HashSet`] hashed with foldhash (see the module).
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
