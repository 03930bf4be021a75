//! The previous snapshot's messages by unique name, packed for mailboxes of millions: every
//! name in one string, 56 bytes per message and 4 in the index (a map of boxed strings took
//! about 200). A snapshot links each message it finds here instead of copying it.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::manifest::MessageRecord;

#[derive(Default)]
pub struct MessageIndex {
    /// Each message's unique name, then the rest of its file name (or, if that does not start
    /// with it, its whole file name).
    names: String,
    messages: Vec<Packed>,
    /// Positions in `messages`, by unique name; made by `index`.
    by_unique: HashTable<u32>,
    hasher: RandomState,
}

/// Offsets into `names` are 32-bit: an index stops taking messages at 4 GiB of names (about
/// 60 million messages); those past it are copied afresh.
struct Packed {
    unique_at: u32,
    unique_len: u16,
    name_at: u32,
    name_len: u16,
    dir: u32,
    size: u64,
    blake3: [u8; 32],
}

/// A message found in the index.
pub struct Found<'a> {
    /// The directory it is in, as the caller numbered it.
    pub dir: u32,
    pub name: &'a str,
    pub size: u64,
    pub blake3: [u8; 32],
}

impl MessageIndex {
    /// Adds `m`, in the caller's directory number `dir`. Not one recorded without its
    /// checksum (by a link snapshot): that is copied afresh, as a copy always has one.
    pub fn push(&mut self, m: &MessageRecord, dir: u32) {
        let Some(blake3) = m.checksum_bytes() else { return };
        let (Ok(unique_len), Ok(name_len)) = (u16::try_from(m.unique.len()), u16::try_from(m.name.len())) else { return };
        if u32::try_from(self.names.len() + m.unique.len() + m.name.len()).is_err() {
            return;
        }
        let unique_at = self.names.len() as u32; // fits: checked just above
        self.names.push_str(&m.unique);
        let name_at = match m.name.strip_prefix(m.unique.as_str()) {
            Some(rest) => {
                self.names.push_str(rest);
                unique_at
            }
            None => {
                self.names.push_str(&m.name);
                unique_at + u32::from(unique_len)
            }
        };
        self.messages.push(Packed { unique_at, unique_len, name_at, name_len, dir, size: m.size, blake3 });
    }

    /// The messages of `parts`, one after another, in memory of exactly their size (each part
    /// freed once taken).
    pub fn concat(parts: Vec<MessageIndex>) -> MessageIndex {
        let mut all = MessageIndex {
            names: String::with_capacity(parts.iter().map(|p| p.names.len()).sum()),
            messages: Vec::with_capacity(parts.iter().map(|p| p.messages.len()).sum()),
            ..Default::default()
        };
        for part in parts {
            // Offsets stay 32-bit: parts past 4 GiB of names are left out (copied afresh).
            if u32::try_from(all.names.len() + part.names.len()).is_err() {
                break;
            }
            let shift = all.names.len() as u32; // fits: checked just above
            all.names.push_str(&part.names);
            all.messages.extend(part.messages.into_iter().map(|p| Packed { unique_at: p.unique_at + shift, name_at: p.name_at + shift, ..p }));
        }
        all
    }

    /// Makes the index by unique name; of two messages with the same, the later is found.
    pub fn index(&mut self) {
        let mut table = HashTable::with_capacity(self.messages.len());
        for i in 0..self.messages.len().min(u32::MAX as usize) as u32 {
            let unique = self.unique(i);
            let hash = self.hasher.hash_one(unique);
            match table.find_mut(hash, |&j| self.unique(j) == unique) {
                Some(slot) => *slot = i,
                None => {
                    table.insert_unique(hash, i, |&j| self.hasher.hash_one(self.unique(j)));
                }
            }
        }
        self.by_unique = table;
    }

    pub fn get(&self, unique: &str) -> Option<Found<'_>> {
        let &i = self.by_unique.find(self.hasher.hash_one(unique), |&j| self.unique(j) == unique)?;
        let p = &self.messages[i as usize];
        let at = p.name_at as usize;
        Some(Found { dir: p.dir, name: &self.names[at..at + p.name_len as usize], size: p.size, blake3: p.blake3 })
    }

    fn unique(&self, i: u32) -> &str {
        let p = &self.messages[i as usize];
        let at = p.unique_at as usize;
        &self.names[at..at + p.unique_len as usize]
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
        let mut first = MessageIndex::default();
        first.push(&record("1.M1P1.h:2,S", 10, &a), 0);
        first.push(&record("2.M2P1.h", 20, &b), 1);
        first.push(&record("3.M3P1.h:2,", 30, ""), 0); // no checksum: not kept
        let mut second = MessageIndex::default();
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
    fn a_file_name_that_does_not_start_with_its_unique_name_is_kept_whole() {
        let mut index = MessageIndex::default();
        let mut odd = record("5.M5P1.h:2,S", 5, &"33".repeat(32));
        odd.unique = "other".into();
        index.push(&odd, 7);
        index.index();
        let f = index.get("other").unwrap();
        assert_eq!((f.dir, f.name), (7, "5.M5P1.h:2,S"));
    }
}
