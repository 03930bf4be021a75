//! The previous snapshot's messages by unique name, for mailboxes of millions. A snapshot links
//! each message it finds here instead of copying it.
//!
//! In memory, each message costs 12 bytes: a keyed 64-bit hash of its unique name and where its
//! details are (size, checksum, directory, and its file name past the unique name). The
//! details, about 50 bytes a message, stay in memory for a small mailbox; for a large one they
//! go to a nameless scratch file and are read back with one `pread` per lookup, so that the
//! page cache holds them, not the process.
//!
//! A message is found by the hash, not by the name: the name to link is the caller's unique
//! name followed by the flags kept here, so a file linked always has the caller's unique name.
//! Two unique names of one hash (one chance in 2^64 for a pair, and not to be aimed at without
//! the key) would at worst give a message the other's checksum, which `verify` then reports.

use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::manifest::MessageRecord;

/// Details kept in memory up to this estimate of their size (about 170,000 messages).
const DETAILS_IN_MEMORY: u64 = 8 << 20;
/// What one message's details take, for that estimate.
const DETAIL_ESTIMATE: u64 = 48;
/// Size, checksum, directory, length of the rest of the name.
const DETAIL_HEAD: usize = 8 + 32 + 4 + 1;
const DETAIL_MAX: usize = DETAIL_HEAD + u8::MAX as usize;
/// Messages indexed at most (keys of 600 MB): a larger mailbox is copied afresh.
const MAX_MESSAGES: u64 = 50_000_000;
/// Parts read at once, side by side. Each holds its chain of changes meanwhile, so not as many
/// as a copy pool has threads; and on threads of their own, as a pool's thread waiting for its
/// own tasks runs others meanwhile, and those may be waiting for this very index.
const READERS: usize = 2;
/// Details a reader gathers before it appends them.
const DETAIL_BATCH: usize = 64 << 10;

pub struct MessageIndex {
    /// Sorted by hash (of one hash, in the order read).
    keys: Vec<Key>,
    details: Details,
    hasher: RandomState,
}

/// 12 bytes, not 16: a million messages are a million keys.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Key {
    hash: u64,
    at: u32,
}

/// The room of a message not kept (recorded without its checksum).
const UNUSED: Key = Key { hash: 0, at: u32::MAX };

/// Offsets are 32-bit: details past 4 GiB (about 80 million messages) are not kept, and
/// those messages are copied afresh.
enum Details {
    Memory(Vec<u8>),
    File { file: File, len: u64 },
}

impl Details {
    /// Appends `bytes`; where they start.
    fn append(&mut self, bytes: &[u8]) -> Option<u32> {
        let at = match self {
            Details::Memory(v) => v.len() as u64,
            Details::File { len, .. } => *len,
        };
        u32::try_from(at + bytes.len() as u64).ok()?;
        match self {
            Details::Memory(v) => v.extend_from_slice(bytes),
            Details::File { file, len } => {
                file.write_all_at(bytes, at).ok()?;
                *len += bytes.len() as u64;
            }
        }
        Some(at as u32)
    }

    /// The details at `at` (and perhaps more after them).
    fn read<'a>(&'a self, at: u32, buf: &'a mut [u8; DETAIL_MAX]) -> Option<&'a [u8]> {
        match self {
            Details::Memory(v) => v.get(at as usize..),
            Details::File { file, .. } => {
                let n = file.read_at(buf, u64::from(at)).ok()?;
                Some(&buf[..n])
            }
        }
    }
}

/// The messages of parts of `counts` messages, if no more than `MAX_MESSAGES` (the counts are
/// the previous manifest's, untrusted: the keys' room is made before they are read).
fn total(counts: &[u64]) -> Option<u64> {
    counts.iter().try_fold(0u64, |sum, &n| sum.checked_add(n)).filter(|&n| n <= MAX_MESSAGES)
}

/// Where the details of `messages` messages go: a large mailbox's to a scratch file if there is one.
fn details_for(messages: u64, scratch: impl FnOnce() -> Option<File>) -> Details {
    match (messages.saturating_mul(DETAIL_ESTIMATE) > DETAILS_IN_MEMORY).then(scratch).flatten() {
        Some(file) => Details::File { file, len: 0 },
        None => Details::Memory(Vec::new()),
    }
}

/// A message found in the index.
pub struct Found {
    /// The directory it is in, as the caller numbered it.
    pub dir: u32,
    pub name: String,
    pub size: u64,
    pub blake3: [u8; 32],
}

/// Fills one part's share of the index, as its records are read.
pub struct Filler<'a> {
    keys: &'a mut [Key],
    filled: usize,
    /// Keys up to here point at details already appended.
    appended: usize,
    batch: Vec<u8>,
    details: &'a Mutex<Details>,
    hasher: &'a RandomState,
    /// More records than the part said it has, or details that could not be kept.
    failed: bool,
}

impl Filler<'_> {
    /// Adds `m`, in the caller's directory number `dir`. Not one recorded without its checksum
    /// (by a link snapshot), nor one whose name does not start with its unique name: that is
    /// copied afresh, as a copy always has one.
    pub fn push(&mut self, m: &MessageRecord, dir: u32) {
        let Some(slot) = self.keys.get_mut(self.filled) else {
            self.failed = true;
            return;
        };
        self.filled += 1;
        let Some(blake3) = m.checksum_bytes() else { return };
        let Some(rest) = m.name.strip_prefix(m.unique.as_str()) else { return };
        let Ok(rest_len) = u8::try_from(rest.len()) else { return };
        // Until appended, `at` is where in the batch.
        *slot = Key { hash: self.hasher.hash_one(m.unique.as_str()), at: self.batch.len() as u32 };
        self.batch.extend_from_slice(&m.size.to_le_bytes());
        self.batch.extend_from_slice(&blake3);
        self.batch.extend_from_slice(&dir.to_le_bytes());
        self.batch.push(rest_len);
        self.batch.extend_from_slice(rest.as_bytes());
        if self.batch.len() >= DETAIL_BATCH {
            self.append();
        }
    }

    /// Appends the batch, and points its keys at where it went.
    fn append(&mut self) {
        let at = self.details.lock().ok().and_then(|mut d| d.append(&self.batch));
        for key in &mut self.keys[self.appended..self.filled] {
            if key.at != UNUSED.at {
                *key = match at {
                    Some(at) => Key { at: at + key.at, ..*key },
                    None => UNUSED,
                };
            }
        }
        self.appended = self.filled;
        self.batch.clear();
    }

    /// How many records it was given, once its details are appended.
    fn finish(mut self) -> Option<usize> {
        self.append();
        (!self.failed).then_some(self.filled)
    }
}

impl MessageIndex {
    /// The index of parts of `counts[i]` messages each, read side by side by `read(i, filler)`
    /// on threads of its own (not a pool's: see `READERS`). None if a part could not be read or
    /// held another number of messages. `scratch` gives a file for the details of a large
    /// mailbox (None: memory).
    pub fn read(counts: &[u64], scratch: impl FnOnce() -> Option<File>, read: impl Fn(usize, &mut Filler) -> bool + Sync) -> Option<MessageIndex> {
        MessageIndex::read_into(details_for(total(counts)?, scratch), counts, read)
    }

    fn read_into(details: Details, counts: &[u64], read: impl Fn(usize, &mut Filler) -> bool + Sync) -> Option<MessageIndex> {
        let (details, hasher) = (Mutex::new(details), RandomState::new());
        // One vector, each part filling its own share: no part is copied into it later.
        let total = usize::try_from(total(counts)?).ok()?;
        let mut keys = Vec::new();
        keys.try_reserve_exact(total).ok()?;
        keys.resize(total, UNUSED);
        let mut shares = Vec::with_capacity(counts.len());
        let mut rest = keys.as_mut_slice();
        for &n in counts {
            let (share, tail) = rest.split_at_mut(n as usize); // n <= the sum
            shares.push(share);
            rest = tail;
        }
        let fill = |(i, keys): (usize, &mut [Key])| {
            let mut filler = Filler { keys, filled: 0, appended: 0, batch: Vec::new(), details: &details, hasher: &hasher, failed: false };
            let read_whole = read(i, &mut filler);
            (filler.finish()? as u64 == counts[i] && read_whole).then_some(())
        };
        let parts = Mutex::new(shares.into_iter().enumerate());
        // Each reader takes the next part until none is left.
        let reader = || -> Option<()> {
            loop {
                let Some(part) = parts.lock().ok()?.next() else { return Some(()) };
                fill(part)?;
            }
        };
        let done: Vec<Option<()>> = std::thread::scope(|s| {
            let others: Vec<_> = (1..READERS).map(|_| s.spawn(reader)).collect();
            let mine = reader();
            others.into_iter().map(|h| h.join().ok().flatten()).chain([mine]).collect()
        });
        done.into_iter().collect::<Option<Vec<()>>>()?;
        keys.retain(|k| k.at != UNUSED.at);
        // Stable: of two messages with the same unique name, the later read is found.
        keys.sort_by_key(|k| k.hash);
        Some(MessageIndex { keys, details: details.into_inner().ok()?, hasher })
    }

    pub fn get(&self, unique: &str) -> Option<Found> {
        let hash = self.hasher.hash_one(unique);
        let end = self.keys.partition_point(|k| k.hash <= hash);
        let key = self.keys[..end].last().filter(|k| k.hash == hash)?;
        let mut buf = [0; DETAIL_MAX];
        let d = self.details.read(key.at, &mut buf)?;
        let size = u64::from_le_bytes(d.get(..8)?.try_into().ok()?);
        let blake3 = d.get(8..40)?.try_into().ok()?;
        let dir = u32::from_le_bytes(d.get(40..44)?.try_into().ok()?);
        let rest = d.get(DETAIL_HEAD..DETAIL_HEAD + usize::from(*d.get(44)?))?;
        Some(Found { dir, name: format!("{unique}{}", std::str::from_utf8(rest).ok()?), size, blake3 })
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

    /// An index of `parts`, its details in a scratch file if `file`.
    fn index(parts: &[Vec<(MessageRecord, u32)>], file: bool) -> Option<MessageIndex> {
        let counts: Vec<u64> = parts.iter().map(|p| p.len() as u64).collect();
        let details = if file { Details::File { file: tempfile::tempfile().unwrap(), len: 0 } } else { Details::Memory(Vec::new()) };
        MessageIndex::read_into(details, &counts, |i, f| {
            parts[i].iter().for_each(|(m, dir)| f.push(m, *dir));
            true
        })
    }

    #[test]
    fn a_large_mailbox_keeps_its_details_in_a_file_if_it_can() {
        let file = || Some(tempfile::tempfile().unwrap());
        assert!(matches!(details_for(1_000_000, file), Details::File { .. }));
        assert!(matches!(details_for(1_000_000, || None), Details::Memory(_)));
        assert!(matches!(details_for(1000, file), Details::Memory(_)));
    }

    fn two_parts() -> Vec<Vec<(MessageRecord, u32)>> {
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        vec![
            vec![(record("1.M1P1.h:2,S", 10, &a), 0), (record("2.M2P1.h", 20, &b), 1), (record("3.M3P1.h:2,", 30, ""), 0)],
            // The same unique name again (found instead), after one with a long rest.
            vec![(record("4.M4P1.h:2,FS", 40, &a), 2), (record("1.M1P1.h:2,ST", 11, &b), 3)],
        ]
    }

    #[test]
    fn messages_are_found_by_unique_name_across_parts_in_memory_and_in_a_file() {
        for file in [false, true] {
            let index = index(&two_parts(), file).unwrap();
            assert_eq!(matches!(index.details, Details::File { .. }), file);
            let found = |u: &str| index.get(u).map(|f| (f.dir, f.name.to_string(), f.size, f.blake3[0]));
            assert_eq!(found("1.M1P1.h"), Some((3, "1.M1P1.h:2,ST".into(), 11, 0x22)));
            assert_eq!(found("2.M2P1.h"), Some((1, "2.M2P1.h".into(), 20, 0x22)));
            assert_eq!(found("4.M4P1.h"), Some((2, "4.M4P1.h:2,FS".into(), 40, 0x11)));
            // No checksum: not kept. Not a unique name read: not found.
            assert!(found("3.M3P1.h").is_none() && found("1.M1P1").is_none() && found("").is_none());
        }
    }

    #[test]
    fn a_part_with_more_or_fewer_messages_than_it_said_fails_the_index() {
        let parts = two_parts();
        let read = |i: usize, f: &mut Filler| {
            parts[i].iter().for_each(|(m, dir)| f.push(m, *dir));
            true
        };
        assert!(MessageIndex::read(&[3, 2], || None, read).is_some());
        assert!(MessageIndex::read(&[3, 1], || None, read).is_none());
        assert!(MessageIndex::read(&[3, 3], || None, read).is_none());
        // Counts no mailbox has (a forged manifest) are refused before any room is made.
        assert!(MessageIndex::read(&[3, u64::MAX], || None, read).is_none());
        assert!(MessageIndex::read(&[3, MAX_MESSAGES], || None, read).is_none());
        // A part whose reading failed.
        assert!(MessageIndex::read(&[3, 2], || None, |i, f| read(i, f) && i == 0).is_none());
    }

    #[test]
    fn many_messages_in_batches_are_all_found_in_a_file() {
        let sum = "33".repeat(32);
        let part: Vec<_> = (0..5000).map(|i| (record(&format!("{i}.M{i}P1.h:2,S{}", "a".repeat(i % 30)), i as u64, &sum), i as u32 % 7)).collect();
        let index = index(&[part.clone(), Vec::new(), part[..10].to_vec()], true).unwrap();
        for (m, dir) in &part {
            let f = index.get(&m.unique).unwrap();
            assert_eq!((f.dir, f.name.as_str(), f.size), (*dir, m.name.as_str(), m.size));
        }
    }

    #[test]
    fn a_file_name_that_does_not_start_with_its_unique_name_is_not_kept() {
        let mut odd = record("5.M5P1.h:2,S", 5, &"33".repeat(32));
        odd.unique = "other".into();
        let index = index(&[vec![(odd, 7), (record("6.M6P1.h:2,S", 6, &"44".repeat(32)), 8)]], false).unwrap();
        assert!(index.get("other").is_none() && index.get("5.M5P1.h").is_none());
        assert_eq!(index.get("6.M6P1.h").map(|f| (f.dir, f.name)), Some((8, "6.M6P1.h:2,S".to_string())));
    }
}
