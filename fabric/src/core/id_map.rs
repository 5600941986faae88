//! A hash map keyed by channel id, with a hash much cheaper than the standard SipHash (the
//! channel map is looked up several times per message) that a peer still cannot aim collisions
//! at: the ids are mixed with a key drawn at random for each map.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// A map from channel id to `V`.
pub(crate) type IdMap<V> = HashMap<u32, V, IdHashBuilder>;

/// A new, empty [`IdMap`].
pub(crate) fn id_map<V>() -> IdMap<V> {
    HashMap::with_hasher(IdHashBuilder::new())
}

/// Builds [`IdHasher`]s that share one random key.
#[derive(Clone)]
pub(crate) struct IdHashBuilder {
    key: u64,
}

impl IdHashBuilder {
    fn new() -> Self {
        IdHashBuilder {
            key: RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            key: self.key,
            h: 0,
        }
    }
}

/// Keyed multiply-xorshift of one integer (a different type of key still hashes, bytewise).
pub(crate) struct IdHasher {
    key: u64,
    h: u64,
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        let x = (self.h ^ v ^ self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // Fold the high bits down: the table indexes by the low bits.
        self.h = x ^ (x >> 32) ^ (x >> 47);
    }

    fn finish(&self) -> u64 {
        self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_share_low_bits_spread_over_buckets() {
        let b = IdHashBuilder::new();
        let mut low = std::collections::HashSet::new();
        for i in 0..1024u32 {
            low.insert(b.hash_one(i << 20) & 1023);
        }
        assert!(
            low.len() > 500,
            "only {} distinct buckets of 1024",
            low.len()
        );
    }

    #[test]
    fn works_as_a_map() {
        let mut m = id_map();
        for i in 0..10_000u32 {
            m.insert(i, i * 2);
        }
        assert!((0..10_000u32).all(|i| m[&i] == i * 2));
    }
}
