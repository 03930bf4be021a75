//! A store entry's message records (its `messages` file): the part of a snapshot's manifest
//! that holds one folder's messages. A part holds either every record of the folder or, when
//! the folder changed little since the previous snapshot, only what changed against the entry
//! that snapshot used (its base): messages new or different, messages renamed (a flag change,
//! a move from `new/` to `cur/`: same file, so same size and checksum) and messages gone.
//! Rewriting every record would write every checksum again: 32 bytes no compression removes,
//! per message, each night.
//!
//! A part is untrusted input like the manifest: its base is only ever a store entry of the
//! same series, a chain of bases is at most `MAX_CHAIN` long (so a forged loop ends), and a
//! change must name a message its base holds exactly once.

use serde::{Deserialize, Serialize};

use super::unique_names::{NotAdded, UniqueNames, MAX_RESERVED};
use super::{check_message, fast_message, Compressed, Lines, ManifestError, MessageRecord, RecordRef};
use crate::fsx::Dir;
use crate::maildir::{unique_part, MessageName, Subdir};
use crate::store::{self, PART_NAME};

/// Entries read, at most, to resolve one folder's records: the entry and its bases.
const MAX_CHAIN: usize = 10;

/// A line of a part. A part with a base starts with `Base`; one without holds only `Message`s.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum PartRecord {
    /// The entry whose records this part changes.
    Base { store: String },
    /// A message, whole: the base had none by its unique name, or a different one.
    Message(MessageRecord),
    /// The base's message of this unique name, now under this directory and name.
    Renamed { dir: Subdir, name: String },
    /// The base's message of this unique name is not in the folder any more.
    Gone { unique: String },
}

/// Hands each message record of store entry `id` of `series` (folder `folder`'s, if given) to
/// `message`, checked, its bases' records changed as the part says; returns how many there
/// were and their bytes.
pub(super) fn visit(series: &Dir, folder: Option<&str>, id: &str, message: &mut dyn FnMut(MessageRecord)) -> Result<(u64, u64), ManifestError> {
    let mut counted = Counted::default();
    visit_chain(series, folder, id, 0, &mut |m| {
        counted.add(&m);
        message(m)
    })?;
    counted.total(series, id)
}

/// Records counted as they pass (an overflow noted, reported at the end).
#[derive(Default)]
struct Counted {
    messages: u64,
    bytes: u64,
    overflow: bool,
}

impl Counted {
    fn add(&mut self, m: &MessageRecord) {
        self.messages += 1;
        match self.bytes.checked_add(m.size) {
            Some(b) => self.bytes = b,
            None => self.overflow = true,
        }
    }

    fn total(self, series: &Dir, id: &str) -> Result<(u64, u64), ManifestError> {
        if self.overflow {
            return Err(ManifestError::Bad { path: entry_path(series, id), line: 0, what: "message sizes overflow".into() });
        }
        Ok((self.messages, self.bytes))
    }
}

fn entry_path(series: &Dir, id: &str) -> String {
    series.show(store::STORE_DIR).join(id).join(PART_NAME).display().to_string()
}

/// Visits entry `id`, `depth` bases below the entry first asked for; returns how many bases
/// lie below it.
fn visit_chain(series: &Dir, folder: Option<&str>, id: &str, depth: usize, message: &mut dyn FnMut(MessageRecord)) -> Result<usize, ManifestError> {
    let mut lines = Lines::open(&store::open_entry(series, id)?, PART_NAME)?;
    let Some(first) = lines.next_line()? else { return Ok(0) };
    let base = match parse(&lines, &first)? {
        PartRecord::Base { store } => store,
        first => return visit_whole(&mut lines, folder, first, message).map(|()| 0),
    };
    if depth + 1 >= MAX_CHAIN {
        return Err(lines.bad(&format!("a chain of more than {MAX_CHAIN} store entries")));
    }
    let changes = Changes::read(&mut lines, folder)?;
    // Read to its end: its decompressor's memory is let go before the base's is taken (a chain
    // of ten, in every folder read side by side, held hundreds of megabytes).
    lines.close();
    let mut applying = Applying { changes, failed: None };
    let below = visit_chain(series, folder, &base, depth + 1, &mut |m| applying.pass(m, message))?;
    applying.finish(&lines, message)?;
    Ok(below + 1)
}

/// The records of a part without a base, from its first, `first`.
fn visit_whole(lines: &mut Lines, folder: Option<&str>, first: PartRecord, message: &mut dyn FnMut(MessageRecord)) -> Result<(), ManifestError> {
    let mut record = Some(first);
    while let Some(r) = record {
        let PartRecord::Message(m) = r else { return Err(lines.bad("a change in a part without a base")) };
        message(checked(lines, folder, m)?);
        record = lines.next_line()?.map(|l| parse(lines, &l)).transpose()?;
    }
    Ok(())
}

/// A line of a part (a message read directly: see `fast_message`).
fn parse(lines: &Lines, line: &[u8]) -> Result<PartRecord, ManifestError> {
    match fast_message(line) {
        Some(m) => Ok(PartRecord::Message(m)),
        None => lines.parse_as(line),
    }
}

/// A message record as read from `lines`, checked, and in `folder` if one is expected.
fn checked(lines: &Lines, folder: Option<&str>, m: MessageRecord) -> Result<MessageRecord, ManifestError> {
    check_message(&m).map_err(|w| lines.bad(&w))?;
    if let Some(f) = folder.filter(|f| *f != m.folder) {
        return Err(lines.bad(&format!("message {:?} is in folder {:?}, not {f:?}", m.name, m.folder)));
    }
    Ok(m)
}

/// What a part with a base changes, by unique name: packed (see [`UniqueNames`]), as a chain
/// of ten parts of a large folder is held at once while it is read.
struct Changes {
    /// The new names of renamed messages, the unique names of gone ones.
    names: UniqueNames,
    /// Each change's directory: None for a message gone.
    dirs: Vec<Option<Subdir>>,
    /// Changes the base has already passed.
    applied: Vec<bool>,
    added: Vec<MessageRecord>,
}

impl Changes {
    fn read(lines: &mut Lines, folder: Option<&str>) -> Result<Changes, ManifestError> {
        let mut c = Changes { names: UniqueNames::default(), dirs: Vec::new(), applied: Vec::new(), added: Vec::new() };
        while let Some(line) = lines.next_line()? {
            let (name, dir) = match parse(lines, &line)? {
                PartRecord::Base { .. } => return Err(lines.bad("a second base")),
                PartRecord::Message(m) => {
                    c.added.push(checked(lines, folder, m)?);
                    continue;
                }
                PartRecord::Renamed { dir, name } => {
                    if !MessageName::parse(&name).is_some_and(|n| n.is_safe()) {
                        return Err(lines.bad(&format!("message file name {name:?} is not usable")));
                    }
                    (name, Some(dir))
                }
                PartRecord::Gone { unique } if unique_part(&unique) == unique => (unique, None),
                PartRecord::Gone { unique } => return Err(lines.bad(&format!("{unique:?} is not a unique name"))),
            };
            match c.names.add(&name) {
                Ok(_) => c.dirs.push(dir),
                Err(NotAdded::Taken(_)) => return Err(lines.bad("a message changed twice")),
                Err(NotAdded::Full) => return Err(lines.bad("more changes than can be held")),
            }
        }
        c.applied = vec![false; c.dirs.len()];
        Ok(c)
    }
}

/// The changes of one part, applied to its base's records as they pass.
struct Applying {
    changes: Changes,
    failed: Option<String>,
}

impl Applying {
    fn pass(&mut self, mut m: MessageRecord, message: &mut dyn FnMut(MessageRecord)) {
        let c = &mut self.changes;
        if let Some(i) = c.names.find(&m.unique) {
            if std::mem::replace(&mut c.applied[i as usize], true) {
                self.failed.get_or_insert_with(|| format!("its base holds message {:?} twice", m.unique));
                return;
            }
            let Some(dir) = c.dirs[i as usize] else { return };
            let name = c.names.name(i);
            m.flags = MessageName::parse(name).map(|n| n.flags().to_string()).unwrap_or_default();
            (m.dir, m.name) = (dir, name.to_string());
        }
        message(m);
    }

    fn finish(self, lines: &Lines, message: &mut dyn FnMut(MessageRecord)) -> Result<(), ManifestError> {
        let c = self.changes;
        if let Some(what) = self.failed {
            return Err(lines.bad(&what));
        }
        if let Some(i) = c.applied.iter().position(|done| !done) {
            let unique = unique_part(c.names.name(i as u32));
            return Err(lines.bad(&format!("it changes message {unique:?}, which its base does not hold")));
        }
        c.added.into_iter().for_each(message);
        Ok(())
    }
}

/// What a base holds of each message, by unique name, and whether one is there twice: packed,
/// as a folder of a million messages may have one.
struct BaseRecords {
    names: UniqueNames,
    /// By position in `names`.
    messages: Vec<BaseMessage>,
    twice: bool,
    /// Bases below it.
    depth: usize,
}

/// What a change is measured against: where the message was, and which file it was (None:
/// recorded without a checksum, so never taken for the same).
struct BaseMessage {
    dir: Subdir,
    size: u64,
    /// The first half of its BLAKE3 (32 bytes a message, not 48; matching 128 bits of a
    /// message of the same name and size is out of anyone's reach).
    blake3: Option<[u8; 16]>,
}

/// The part of a checksum a base keeps.
fn half(blake3: Option<[u8; 32]>) -> Option<[u8; 16]> {
    blake3.and_then(|b| b[..16].try_into().ok())
}

impl BaseRecords {
    /// Entry `id`'s records (`messages` of them), if they can all be read; a base that cannot (or whose names pass
    /// 4 GiB) is not used.
    fn read(series: &Dir, folder: &str, (id, messages): (&str, u64)) -> Option<BaseRecords> {
        let mut b = BaseRecords { names: UniqueNames::default(), messages: Vec::new(), twice: false, depth: 0 };
        // Room made once: grown as they come, they would be held twice each time they move.
        let room = usize::try_from(messages).map_or(MAX_RESERVED, |n| n.min(MAX_RESERVED));
        b.names.reserve(room);
        let _ = b.messages.try_reserve(room);
        let mut fits = true;
        b.depth = visit_chain(series, Some(folder), id, 0, &mut |m| fits &= b.push(m)).ok()?;
        fits.then_some(b)
    }

    /// Adds `m`; false if it cannot be kept.
    fn push(&mut self, m: MessageRecord) -> bool {
        if unique_part(&m.name) != m.unique {
            return false;
        }
        match self.names.add(&m.name) {
            Ok(_) => self.messages.push(BaseMessage { dir: m.dir, size: m.size, blake3: half(m.checksum_bytes()) }),
            Err(NotAdded::Taken(_)) => self.twice = true,
            Err(NotAdded::Full) => return false,
        }
        true
    }
}

/// A folder's message records, as often as asked for.
pub type Records<'a> = &'a dyn Fn() -> Box<dyn Iterator<Item = MessageRecord> + 'a>;

/// Writes folder `folder`'s records as the part of the new entry `entry` of `series`: as
/// changes against entry `base` (the previous snapshot's, for the folder, and how many messages
/// its manifest says it holds) where that is shorter and its chain not too long, else whole. Returns how many records there were and
/// their bytes.
pub fn write(series: &Dir, entry: &Dir, folder: &str, base: Option<(&str, u64)>, records: Records) -> Result<(u64, u64), ManifestError> {
    let mut out = Compressed::create(entry, PART_NAME)?;
    let base = base.and_then(|base| Some((base.0, BaseRecords::read(series, folder, base)?)));
    let usable = base.filter(|(_, b)| !b.twice && b.depth + 1 < MAX_CHAIN);
    let (mut count, mut bytes) = (0u64, 0u64);
    let mut take = |out: &Compressed, m: &MessageRecord| -> Result<(), ManifestError> {
        check_message(m).map_err(|w| out.bad(w))?;
        if m.folder != folder {
            return Err(out.bad(format!("message {:?} is in folder {:?}, not {folder:?}", m.name, m.folder)));
        }
        count += 1;
        bytes = bytes.checked_add(m.size).ok_or_else(|| out.bad("message sizes overflow".into()))?;
        Ok(())
    };
    match usable.and_then(|(id, b)| Some((id, Diff::of(records(), b)?))) {
        Some((id, diff)) => {
            records().try_for_each(|m| take(&out, &m))?;
            out.put(&PartRecord::Base { store: id.to_string() })?;
            diff.lines.iter().try_for_each(|c| out.put(c))?;
            diff.whole.iter().try_for_each(|m| out.put(&RecordRef::Message(m)))?;
        }
        None => records().try_for_each(|m| {
            take(&out, &m)?;
            out.put(&RecordRef::Message(&m))
        })?,
    }
    out.finish()?;
    Ok((count, bytes))
}

/// What turns a base into a folder's records: the changes, and the records to write whole.
struct Diff {
    lines: Vec<PartRecord>,
    whole: Vec<MessageRecord>,
}

impl Diff {
    /// None if the changes are not shorter than the records.
    fn of(records: impl Iterator<Item = MessageRecord>, base: BaseRecords) -> Option<Diff> {
        let (mut lines, mut whole, mut total) = (Vec::new(), Vec::new(), 0usize);
        let most = base.messages.len();
        // Each base message is matched once at most (a second file of the same unique name is new).
        let mut matched = vec![false; most];
        for m in records {
            total += 1;
            let found = base.names.find(&m.unique).filter(|&i| !std::mem::replace(&mut matched[i as usize], true));
            match found.map(|i| (i, &base.messages[i as usize])) {
                None => whole.push(m),
                Some((_, b)) if b.size != m.size || b.blake3.is_none() || b.blake3 != half(m.checksum_bytes()) => {
                    lines.push(PartRecord::Gone { unique: m.unique.clone() });
                    whole.push(m);
                }
                Some((i, b)) if (b.dir, base.names.name(i)) != (m.dir, m.name.as_str()) => lines.push(PartRecord::Renamed { dir: m.dir, name: m.name }),
                Some(_) => {}
            }
            // Far more changed than the base held: written whole, without holding them all.
            if lines.len() + whole.len() > most {
                return None;
            }
        }
        let unmatched = (0..most as u32).filter(|&i| !matched[i as usize]);
        let mut gone: Vec<String> = unmatched.map(|i| unique_part(base.names.name(i)).to_string()).collect();
        gone.sort();
        lines.extend(gone.into_iter().map(|unique| PartRecord::Gone { unique }));
        (lines.len() + whole.len() < total).then_some(Diff { lines, whole })
    }
}

/// The base entry part `id` of `series` names, if any: kept by prune as long as `id` is.
/// None for a part of a folder with no records, or one written whole.
pub fn base_of(series: &Dir, id: &str) -> Result<Option<String>, ManifestError> {
    let mut lines = Lines::open(&store::open_entry(series, id)?, PART_NAME)?;
    let Some(first) = lines.next_line()? else { return Ok(None) };
    match lines.parse_as(&first)? {
        PartRecord::Base { store } => Ok(Some(store)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::test_support::tmp;

    fn record(name: &str, dir: Subdir, size: u64, sum: u8) -> MessageRecord {
        let n = MessageName::parse(name).unwrap();
        MessageRecord { folder: ".Sent".into(), dir, name: name.into(), unique: n.unique().into(), flags: n.flags().into(), size, blake3: format!("{sum:02x}").repeat(32) }
    }

    fn mailbox(n: usize) -> Vec<MessageRecord> {
        (0..n).map(|i| record(&format!("{i}.M{i}P1.h:2,S"), Subdir::Cur, 100 + i as u64, i as u8)).collect()
    }

    /// Writes `records` as a new entry of `series` against `base`; its id.
    fn put(series: &Dir, base: Option<&str>, records: &[MessageRecord]) -> String {
        let (id, entry) = store::create_entry(series).unwrap();
        write(series, &entry, ".Sent", base.map(|b| (b, records.len() as u64)), &|| Box::new(records.iter().cloned())).unwrap();
        id
    }

    fn read(series: &Dir, id: &str) -> Result<Vec<MessageRecord>, ManifestError> {
        let mut got = Vec::new();
        visit(series, Some(".Sent"), id, &mut |m| got.push(m))?;
        got.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(got)
    }

    fn sorted(mut v: Vec<MessageRecord>) -> Vec<MessageRecord> {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn raw_lines(series: &Dir, id: &str) -> Vec<String> {
        let bytes = fs::read(series.path().join(store::STORE_DIR).join(id).join(PART_NAME)).unwrap();
        String::from_utf8(zstd::decode_all(&bytes[..]).unwrap()).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn a_folder_that_changed_little_is_written_as_its_changes_and_read_whole() {
        let t = tmp();
        let series = Dir::open(t.path()).unwrap();
        let first = mailbox(40);
        let a = put(&series, None, &first);
        assert_eq!(base_of(&series, &a).unwrap(), None);
        let mut second = first.clone();
        second[1] = record("1.M1P1.h:2,SF", Subdir::Cur, 101, 1); // a flag change
        second[2] = record("2.M2P1.h", Subdir::New, 102, 2); // moved back to new/ (a forged case)
        second[3].blake3 = "ff".repeat(32); // the same name, other bytes
        second.remove(4); // expunged
        second.push(record("99.M99P1.h:2,", Subdir::Cur, 7, 99)); // new mail
        let b = put(&series, Some(&a), &second);
        assert_eq!(base_of(&series, &b).unwrap().as_deref(), Some(a.as_str()));
        let lines = raw_lines(&series, &b);
        // The base, two renames, two gone (expunged, replaced) and two whole records.
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert_eq!(read(&series, &b).unwrap(), sorted(second));
        assert_eq!(read(&series, &a).unwrap(), sorted(first));
    }

    #[test]
    fn a_folder_that_changed_much_or_a_long_chain_is_written_whole() {
        let t = tmp();
        let series = Dir::open(t.path()).unwrap();
        let first = mailbox(10);
        let a = put(&series, None, &first);
        // Every message flagged: the same files, all renamed.
        let renamed: Vec<_> = first.iter().map(|m| MessageRecord { blake3: m.blake3.clone(), ..record(&format!("{}F", m.name), m.dir, m.size, 0) }).collect();
        let b = put(&series, Some(&a), &renamed);
        assert_eq!(base_of(&series, &b).unwrap(), None);
        assert_eq!(read(&series, &b).unwrap(), sorted(renamed));
        // Each night one flag more: a chain of changes, started anew before it is too long.
        let (mut ids, mut now) = (vec![a], first);
        for night in 0..2 * MAX_CHAIN {
            now[night % 10] = record(&format!("{}F", now[night % 10].name), Subdir::Cur, now[night % 10].size, (night % 10) as u8);
            let id = put(&series, ids.last().map(String::as_str), &now);
            assert_eq!(read(&series, &id).unwrap(), sorted(now.clone()), "night {night}");
            ids.push(id);
        }
        let whole = ids.iter().filter(|id| base_of(&series, id).unwrap().is_none()).count();
        assert!(whole >= 3, "{whole} of {} written whole", ids.len());
    }

    /// Entry `id` of `series` holding exactly `lines`.
    fn forge(series: &Dir, id: &str, lines: &[String]) {
        let entry = entry_dir(series, id);
        fs::write(entry.join(PART_NAME), lines.join("\n") + "\n").unwrap();
    }

    fn entry_dir(series: &Dir, id: &str) -> std::path::PathBuf {
        let entry = series.path().join(store::STORE_DIR).join(id);
        fs::create_dir_all(&entry).unwrap();
        entry
    }

    fn line(r: &PartRecord) -> String {
        serde_json::to_string(r).unwrap()
    }

    #[test]
    fn forged_chains_are_refused() {
        let t = tmp();
        let series = Dir::open(t.path()).unwrap();
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        let whole = line(&PartRecord::Message(record("1.M1P1.h:2,S", Subdir::Cur, 5, 1)));
        let base = |id: &str| line(&PartRecord::Base { store: id.into() });
        let refused = |lines: &[String], what: &str| {
            forge(&series, &b, lines);
            match read(&series, &b) {
                Err(ManifestError::Bad { what: w, .. }) => assert!(w.contains(what), "expected {what:?}, got {w:?}"),
                Err(ManifestError::Fs(e)) => assert!(what.is_empty(), "expected {what:?}, got {e}"),
                Ok(got) => panic!("expected {what:?}, read {got:?}"),
            }
        };
        forge(&series, &a, &[whole.clone()]);
        let renamed = line(&PartRecord::Renamed { dir: Subdir::Cur, name: "1.M1P1.h:2,ST".into() });
        let gone = |u: &str| line(&PartRecord::Gone { unique: u.into() });
        // A loop of two entries, each the other's base.
        forge(&series, &a, &[base(&b)]);
        refused(&[base(&a)], "chain of more than");
        forge(&series, &a, &[whole.clone()]);
        // A base outside the store, or missing.
        refused(&[base("../../etc")], "");
        refused(&[base(&"c".repeat(32))], "");
        // A change to a message the base does not hold, or holds twice.
        refused(&[base(&a), gone("2.M2P1.h")], "does not hold");
        refused(&[base(&a), gone("1.M1P1.h:2,S")], "not a unique name");
        refused(&[base(&a), renamed.clone(), gone("1.M1P1.h")], "changed twice");
        refused(&[base(&a), gone("1.M1P1.h"), gone("1.M1P1.h")], "changed twice");
        forge(&series, &a, &[whole.clone(), whole.clone()]);
        refused(&[base(&a), renamed.clone()], "twice");
        forge(&series, &a, &[whole.clone()]);
        // A second base, a change without one, a renamed name that is not safe.
        refused(&[base(&a), base(&a)], "a second base");
        refused(&[whole.clone(), renamed], "without a base");
        refused(&[base(&a), line(&PartRecord::Renamed { dir: Subdir::Cur, name: "../x".into() })], "not usable");
        // What is left is read.
        forge(&series, &b, &[base(&a), gone("1.M1P1.h")]);
        assert_eq!(read(&series, &b).unwrap(), vec![]);
    }
}
