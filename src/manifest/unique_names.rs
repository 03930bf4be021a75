//! Message file names found by their unique part, packed for folders of a million messages:
//! every name in one string, positions in a table keyed by a hash of the unique part. About
//! 14 bytes a name beside the name itself, where a map of strings took over 100.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::maildir::unique_part;

/// Bytes reserved for a name: a Dovecot file name is about 60.
const NAME_ESTIMATE: usize = 64;
/// Names reserved at most; more are made room for as they come.
pub(super) const MAX_RESERVED: usize = 10_000_000;

#[derive(Default)]
pub(super) struct UniqueNames {
    text: String,
    /// Where each name is in `text`, by position.
    spans: Vec<(u32, u16)>,
    by_unique: HashTable<u32>,
    hasher: RandomState,
}

/// Why a name was not added.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotAdded {
    /// One of the same unique part is there, at this position.
    Taken(u32),
    /// Past 4 GiB of names, or a name past 64 KiB.
    Full,
}

impl UniqueNames {
    /// Room for `n` more names, if it can be had (untouched room costs address space, not
    /// memory). Only a hint: `n` may come from an untrusted count.
    pub fn reserve(&mut self, n: usize) {
        let n = n.min(MAX_RESERVED);
        let _ = self.text.try_reserve(n * NAME_ESTIMATE);
        let _ = self.spans.try_reserve(n);
        let (text, spans, hasher) = (&self.text, &self.spans, &self.hasher);
        let _ = self.by_unique.try_reserve(n, |&j| hasher.hash_one(unique_of(text, spans, j)));
    }

    /// The name at position `i`.
    pub fn name(&self, i: u32) -> &str {
        name_of(&self.text, &self.spans, i)
    }

    /// Adds `name` at the next position, unless one with its unique part is there.
    pub fn add(&mut self, name: &str) -> Result<u32, NotAdded> {
        let unique = unique_part(name);
        let hash = self.hasher.hash_one(unique);
        if let Some(&i) = self.by_unique.find(hash, |&j| unique_part(self.name(j)) == unique) {
            return Err(NotAdded::Taken(i));
        }
        let (Ok(at), Ok(len), Ok(i)) = (u32::try_from(self.text.len()), u16::try_from(name.len()), u32::try_from(self.spans.len())) else { return Err(NotAdded::Full) };
        if u32::try_from(self.text.len() + name.len()).is_err() {
            return Err(NotAdded::Full);
        }
        self.text.push_str(name);
        self.spans.push((at, len));
        let (text, spans, hasher) = (&self.text, &self.spans, &self.hasher);
        self.by_unique.insert_unique(hash, i, |&j| hasher.hash_one(unique_of(text, spans, j)));
        Ok(i)
    }

    /// The position of the name whose unique part is `unique`.
    pub fn find(&self, unique: &str) -> Option<u32> {
        self.by_unique.find(self.hasher.hash_one(unique), |&j| unique_part(self.name(j)) == unique).copied()
    }
}

/// Name `i`, from the parts of a `UniqueNames` (for the table's rehash, which borrows it).
fn name_of<'t>(text: &'t str, spans: &[(u32, u16)], i: u32) -> &'t str {
    let (at, len) = spans[i as usize];
    &text[at as usize..][..usize::from(len)]
}

fn unique_of<'t>(text: &'t str, spans: &[(u32, u16)], i: u32) -> &'t str {
    unique_part(name_of(text, spans, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_by_their_unique_part_and_taken_once() {
        let mut names = UniqueNames::default();
        names.reserve(10);
        assert_eq!(names.add("1.M1P1.h:2,S"), Ok(0));
        assert_eq!(names.add("2.M2P1.h"), Ok(1));
        assert_eq!(names.add("1.M1P1.h:2,FS"), Err(NotAdded::Taken(0)));
        assert_eq!(names.add(&"x".repeat(70_000)), Err(NotAdded::Full));
        for i in 3..2000 {
            assert_eq!(names.add(&format!("{i}.M{i}P1.h:2,S")), Ok(i - 1));
        }
        assert_eq!((names.spans.len(), names.find("1.M1P1.h"), names.find("2.M2P1.h")), (1999, Some(0), Some(1)));
        assert_eq!(names.find("1500.M1500P1.h").map(|i| names.name(i)), Some("1500.M1500P1.h:2,S"));
        assert_eq!(names.find("1.M1P1.h:2,S"), None);
    }
}
