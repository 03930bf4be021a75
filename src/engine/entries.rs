//! A folder's messages by key (as listed, or as staged), each stored once: the key of nearly
//! every message is its name's unique part, so it is not kept beside the name (at a million
//! messages, a second string per message was a fifth of the engine's memory).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::scan::Listed;
use crate::maildir::{unique_part, MessageName, Subdir};

/// A message as it is in the staged copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sub: Subdir,
    pub name: Box<str>,
    pub size: u64,
    /// None until known (a deferred copy, or a link made without checksums). Kept as 32
    /// bytes, not hex: the tree holds one per message.
    pub blake3: Option<blake3::Hash>,
}

impl Entry {
    /// Where it is: the order of a folder's records.
    pub fn place(&self) -> (Subdir, &str) {
        (self.sub, &self.name)
    }
}

/// What is kept of a message under its key: it has a file name.
pub trait Named {
    fn name(&self) -> &str;
}

impl Named for Entry {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for Listed {
    fn name(&self) -> &str {
        &self.name
    }
}

/// A folder's messages by key (see `scan::Listing`).
#[derive(Clone)]
pub struct Keyed<T> {
    /// Those whose key is their name's unique part, side by side (no allocation each).
    all: Vec<T>,
    /// Where in `all` each is: found by hashing that part of the name.
    by_unique: HashTable<u32>,
    /// The few others, under their own key: a second file with a unique name already taken
    /// (a `\0dup:` key).
    others: HashMap<String, T>,
    hasher: RandomState,
}

/// The staged messages of a folder.
pub type Entries = Keyed<Entry>;

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Keyed { all: Vec::new(), by_unique: HashTable::new(), others: HashMap::new(), hasher: RandomState::new() }
    }
}

impl<T: Named> Keyed<T> {
    pub fn len(&self) -> usize {
        self.all.len() + self.others.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room for `more` entries (a folder's copies, known before they are recorded).
    pub fn reserve(&mut self, more: usize) {
        self.all.reserve_exact(more);
        let (all, hasher) = (&self.all, &self.hasher);
        self.by_unique.reserve(more, |&i| hasher.hash_one(unique_part(all[i as usize].name())));
    }

    fn position(&self, key: &str) -> Option<usize> {
        let i = self.by_unique.find(self.hasher.hash_one(key), |&i| unique_part(self.all[i as usize].name()) == key)?;
        Some(*i as usize)
    }

    pub fn get(&self, key: &str) -> Option<&T> {
        self.position(key).map(|i| &self.all[i]).or_else(|| self.others.get(key))
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The key `e` has unless recorded under another (its name's unique part).
    pub fn key_of(e: &T) -> Option<&str> {
        MessageName::parse(e.name()).map(|m| m.unique())
    }

    /// Records `e` under `key`, in place of any entry there.
    pub fn insert(&mut self, key: String, e: T) {
        if Self::key_of(&e) == Some(&key) {
            self.insert_named(e);
        } else {
            self.remove(&key);
            self.others.insert(key, e);
        }
    }

    /// Records `e` under its name's unique part, in place of any entry there.
    pub fn insert_named(&mut self, e: T) {
        let key = unique_part(e.name());
        let hash = self.hasher.hash_one(key);
        if self.contains_key(key) {
            let key = key.to_string();
            self.remove(&key);
        }
        let i = u32::try_from(self.all.len()).expect("a folder holds fewer than 2^32 messages");
        self.all.push(e);
        let (all, hasher) = (&self.all, &self.hasher);
        self.by_unique.insert_unique(hash, i, |&i| hasher.hash_one(unique_part(all[i as usize].name())));
    }

    pub fn remove(&mut self, key: &str) -> Option<T> {
        let (all, hasher) = (&self.all, &self.hasher);
        let Ok(found) = self.by_unique.find_entry(hasher.hash_one(key), |&i| unique_part(all[i as usize].name()) == key) else {
            return self.others.remove(key);
        };
        let i = found.remove().0 as usize;
        let e = self.all.swap_remove(i);
        // The last entry took its place: point its slot there.
        if let Some(moved) = self.all.get(i) {
            let (last, hasher) = (self.all.len() as u32, &self.hasher);
            if let Some(slot) = self.by_unique.find_mut(hasher.hash_one(unique_part(moved.name())), |&j| j == last) {
                *slot = i as u32;
            }
        }
        Some(e)
    }

    /// Adds every entry of `more` (in place of any under the same key).
    pub fn extend(&mut self, more: Keyed<T>) {
        if self.is_empty() {
            *self = more;
            return;
        }
        self.reserve(more.all.len());
        more.all.into_iter().for_each(|e| self.insert_named(e));
        more.others.into_iter().for_each(|(k, e)| self.insert(k, e));
    }

    /// Each with its own key where it has one (no key string made for the others).
    pub fn into_keyed(self) -> impl Iterator<Item = (Option<String>, T)> {
        self.all.into_iter().map(|e| (None, e)).chain(self.others.into_iter().map(|(k, e)| (Some(k), e)))
    }

    /// Records `e` under `own_key`, or under its name's unique part (see `into_keyed`).
    pub fn insert_keyed(&mut self, own_key: Option<String>, e: T) {
        match own_key {
            Some(key) => self.insert(key, e),
            None => self.insert_named(e),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        let by_unique = self.all.iter().map(|e| (unique_part(e.name()), e));
        by_unique.chain(self.others.iter().map(|(k, e)| (k.as_str(), e)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, e)| e)
    }
}

impl Entries {
    /// Moves the entry at `key` to `sub`/`name` (a rename keeps the unique part, and so the key).
    pub fn set_place(&mut self, key: &str, sub: Subdir, name: Box<str>) {
        if let Some(e) = self.remove(key) {
            self.insert(key.to_string(), Entry { sub, name, ..e });
        }
    }

    /// Gives the entry at `key` the size and checksum of its deferred copy, if it still waits
    /// for them.
    pub fn fill_deferred(&mut self, key: &str, size: u64, blake3: Option<blake3::Hash>) {
        let e = match self.position(key) {
            Some(i) => Some(&mut self.all[i]),
            None => self.others.get_mut(key),
        };
        if let Some(e) = e.filter(|e| e.blake3.is_none()) {
            (e.size, e.blake3) = (size, blake3);
        }
    }

}

impl<T: Named + 'static> IntoIterator for Keyed<T> {
    type Item = (String, T);
    type IntoIter = Box<dyn Iterator<Item = (String, T)>>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.into_keyed().map(|(k, e)| (k.unwrap_or_else(|| unique_part(e.name()).to_string()), e)))
    }
}

impl<T: Named> std::ops::Index<&str> for Keyed<T> {
    type Output = T;

    fn index(&self, key: &str) -> &T {
        self.get(key).expect("no entry with that key")
    }
}

impl<T: Named + fmt::Debug> fmt::Debug for Keyed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sub: Subdir, name: &str) -> Entry {
        Entry { sub, name: name.into(), size: 1, blake3: None }
    }

    #[test]
    fn a_key_that_is_not_the_unique_part_is_kept_beside_its_entry() {
        let mut es = Entries::default();
        es.insert("1.M1P1.h".into(), entry(Subdir::Cur, "1.M1P1.h:2,S"));
        es.insert("\0dup:1.M1P1.h:2,".into(), entry(Subdir::New, "1.M1P1.h:2,"));
        assert_eq!(es.len(), 2);
        assert_eq!(&*es["1.M1P1.h"].name, "1.M1P1.h:2,S");
        assert_eq!(&*es["\0dup:1.M1P1.h:2,"].name, "1.M1P1.h:2,");
        let mut keys: Vec<&str> = es.keys().collect();
        keys.sort();
        assert_eq!(keys, ["\0dup:1.M1P1.h:2,", "1.M1P1.h"]);
        assert_eq!(es.remove("1.M1P1.h").map(|e| e.sub), Some(Subdir::Cur));
        assert!(!es.contains_key("1.M1P1.h") && es.contains_key("\0dup:1.M1P1.h:2,"));
    }

    #[test]
    fn a_renamed_entry_is_found_by_its_key_and_replaces_none_other() {
        let mut es = Entries::default();
        for i in 0..1000 {
            es.insert(format!("{i}.M1P1.h"), entry(Subdir::New, &format!("{i}.M1P1.h")));
        }
        es.set_place("7.M1P1.h", Subdir::Cur, "7.M1P1.h:2,FS".into());
        es.insert("7.M1P1.h".into(), Entry { size: 9, ..es["7.M1P1.h"].clone() });
        es.fill_deferred("7.M1P1.h", 10, Some(blake3::hash(b"x")));
        assert_eq!(es.len(), 1000);
        assert_eq!(es["7.M1P1.h"], Entry { sub: Subdir::Cur, name: "7.M1P1.h:2,FS".into(), size: 10, blake3: Some(blake3::hash(b"x")) });
        es.fill_deferred("7.M1P1.h", 11, None);
        for i in (0..1000).step_by(3) {
            assert!(es.remove(&format!("{i}.M1P1.h")).is_some());
        }
        for i in 0..1000 {
            assert_eq!(es.contains_key(&format!("{i}.M1P1.h")), i % 3 != 0, "{i}");
        }
        assert_eq!(es["7.M1P1.h"].size, 10, "a checksum once known is kept");
        let all: Vec<(String, Entry)> = es.into_iter().collect();
        assert_eq!(all.len(), 1000 - 334);
        assert!(all.iter().all(|(k, e)| unique_part(&e.name) == k));
    }
}
