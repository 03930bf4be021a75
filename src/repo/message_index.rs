//! The previous snapshot's messages by unique name, packed for mailboxes of millions: 64 bytes
//! per message and its flags' few bytes (a map of boxed strings took about 200, a table of
//! names about 120). A snapshot links each message it finds here instead of copying it.
//!
//! A message is found by a keyed 64-bit hash of its unique name, not by the name itself: the
//! name to link is the caller's unique name followed by the flags kept here, so a file linked
//! always has the caller's unique name. Two unique names of one hash (one chance in 2^64 for a
//! pair, and not to be aimed at without the key) would at worst give a message the other's
//! checksum, which `verify` then reports.

use std::hash::{BuildHasher, RandomState};

use crate::manifest::MessageRecord;

#[derive(Default)]
pub struct MessageIndex {
    /// Sorted by hash once `index` has run (of one hash, in the order pushed).
    messages: Vec<Packed>,
    /// Each message's file name past its unique name (`:2,` and its flags).
    rests: String,
    hasher: RandomState,
}

/// Offsets into `rests` are 32-bit: an index stops taking messages at 4 GiB of them (about a
/// billion messages); those past it are copied afresh.
struct Packed {
    hash: u64,
    size: u64,
    blake3: [u8; 32],
    rest_at: u32,
    rest_len: u8,
    dir: u32,
}

/// A message found in the index.
pub struct Found {
    /// The directory it is in, as the caller numbered it.
    pub dir: u32,
    pub name: String,
    pub size: u64,
    pub blake3: [u8; 32],
}

impl MessageIndex {
    /// An empty index hashing with `hasher` (the same for every part later put together).
    pub fn new(hasher: RandomState) -> MessageIndex {
        MessageIndex { messages: Vec::new(), rests: String::new(), hasher }
    }

    /// Adds `m`, in the caller's directory number `dir`. Not one recorded without its
    /// checksum (by a link snapshot), nor one whose name does not start with its unique name:
    /// that is copied afresh, as a copy always has one.
    pub fn push(&mut self, m: &MessageRecord, dir: u32) {
        let Some(blake3) = m.checksum_bytes() else { return };
        let Some(rest) = m.name.strip_prefix(m.unique.as_str()) else { return };
        let (Ok(rest_at), Ok(rest_len)) = (u32::try_from(self.rests.len() + rest.len()), u8::try_from(rest.len())) else { return };
        let rest_at = rest_at - u32::from(rest_len);
        self.rests.push_str(rest);
        self.messages.push(Packed { hash: self.hasher.hash_one(m.unique.as_str()), size: m.size, blake3, rest_at, rest_len, dir });
    }

    /// The messages of `parts` (made with one hasher), one after another, in memory of exactly
    /// their size (each part freed once taken).
    pub fn concat(parts: Vec<MessageIndex>) -> MessageIndex {
        let mut all = MessageIndex {
            messages: Vec::with_capacity(parts.iter().map(|p| p.messages.len()).sum()),
            rests: String::with_capacity(parts.iter().map(|p| p.rests.len()).sum()),
            hasher: parts.first().map(|p| p.hasher.clone()).unwrap_or_default(),
        };
        for part in parts {
            // Offsets stay 32-bit: parts past 4 GiB are left out (copied afresh).
            if u32::try_from(all.rests.len() + part.rests.len()).is_err() {
                break;
            }
            let shift = all.rests.len() as u32; // fits: checked just above
            all.rests.push_str(&part.rests);
            all.messages.extend(part.messages.into_iter().map(|p| Packed { rest_at: p.rest_at + shift, ..p }));
        }
        all
    }

    /// Makes the index searchable; of two messages with the same unique name, the later is found.
    pub fn index(&mut self) {
        self.messages.sort_by_key(|p| p.hash);
    }

    pub fn get(&self, unique: &str) -> Option<Found> {
        let hash = self.hasher.hash_one(unique);
        let end = self.messages.partition_point(|p| p.hash <= hash);
        let p = self.messages[..end].last().filter(|p| p.hash == hash)?;
        let rest = &self.rests[p.rest_at as usize..][..usize::from(p.rest_len)];
        Some(Found { dir: p.dir, name: format!("{unique}{rest}"), size: p.size, blake3: p.blake3 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maildir::{MessageName, Subdir};

    fn record(name: &str, size: u64, sum: &str) -> MessageRecord {
        let n = MessageName::parse(name).unwrap();
        MessageRecord { folder: String::new(), dir: Subdir::Cur, name: name.into(), unique: n.unique().into(), flags: n.flags().into(), size, blake3: sum.into() }
    }

    #[test]
    fn messages_are_found_by_unique_name_across_appended_parts() {
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        let hasher = RandomState::new();
        let mut first = MessageIndex::new(hasher.clone());
        first.push(&record("1.M1P1.h:2,S", 10, &a), 0);
        first.push(&record("2.M2P1.h", 20, &b), 1);
        first.push(&record("3.M3P1.h:2,", 30, ""), 0); // no checksum: not kept
        let mut second = MessageIndex::new(hasher);
        second.push(&record("4.M4P1.h:2,FS", 40, &a), 2);
        second.push(&record("1.M1P1.h:2,ST", 11, &b), 3); // the same unique name again: found instead
        let mut first = MessageIndex::concat(vec![first, second]);
        first.index();
        let found = |u: &str| first.get(u).map(|f| (f.dir, f.name.to_string(), f.size, f.blake3[0]));
        assert_eq!(found("1.M1P1.h"), Some((3, "1.M1P1.h:2,ST".into(), 11, 0x22)));
        assert_eq!(found("2.M2P1.h"), Some((1, "2.M2P1.h".into(), 20, 0x22)));
        assert_eq!(found("4.M4P1.h"), Some((2, "4.M4P1.h:2,FS".into(), 40, 0x11)));
        assert!(found("3.M3P1.h").is_none() && found("1.M1P1").is_none() && found("").is_none());
    }

    #[test]
    fn a_file_name_that_does_not_start_with_its_unique_name_is_not_kept() {
        let mut index = MessageIndex::default();
        let mut odd = record("5.M5P1.h:2,S", 5, &"33".repeat(32));
        odd.unique = "other".into();
        index.push(&odd, 7);
        index.push(&record("6.M6P1.h:2,S", 6, &"44".repeat(32)), 8);
        index.index();
        assert!(index.get("other").is_none() && index.get("5.M5P1.h").is_none());
        assert_eq!(index.get("6.M6P1.h").map(|f| (f.dir, f.name)), Some((8, "6.M6P1.h:2,S".to_string())));
    }
}
