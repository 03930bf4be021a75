//! Listing a folder's messages (`cur/` and `new/`) keyed by unique name.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use super::entries::Keyed;
pub use crate::fsx::DirStamp;
use crate::fsx::{self, Dir, FsError, Kind};
use crate::maildir::folders::bounded_warnings;
use crate::maildir::{Folder, Maildir, MessageName, Subdir};

/// Where a message file is right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub sub: Subdir,
    pub name: String,
}

#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub entries: Keyed<Listed>,
    /// Stamps of cur/ and new/ taken just before reading them.
    pub stamps: [Option<DirStamp>; 2],
    pub listed_at: Option<SystemTime>,
    pub warnings: Vec<String>,
    /// None for a full listing. Some(keys) for a partial one: only these keys were looked at
    /// (a key absent from `entries` is gone); every other message is as it was.
    pub touched: Option<HashSet<String>>,
}

/// Adds message `l` under its key: its unique name `unique`. A second file with the same
/// unique name (which Dovecot would repair) is kept under its full name so nothing is dropped.
fn add(entries: &mut Keyed<Listed>, unique: &str, l: Listed) {
    if entries.contains_key(unique) {
        entries.insert(format!("\0dup:{}", l.name), l);
    } else {
        entries.insert_named(l);
    }
}

/// A folder's cur/ and new/, opened (None where missing). One replaced by a symlink or a file is never
/// followed: it is reported in `warnings` and counts as missing.
pub fn open_subdirs(folder: &Dir, warnings: &mut Vec<String>) -> Result<[Option<Dir>; 2], FsError> {
    let open = |sub: Subdir, warnings: &mut Vec<String>| match folder.sub_opt(sub.as_str()) {
        Err(e) if e.is_planted() => {
            warnings.push(format!("skipped {e}"));
            Ok(None)
        }
        r => r,
    };
    Ok([open(Subdir::Cur, warnings)?, open(Subdir::New, warnings)?])
}

/// The stamps of a folder's cur/ and new/ as they are now.
pub fn dir_stamps(md: &Maildir, f: &Folder) -> [Option<DirStamp>; 2] {
    let Ok(dir) = md.root.sub(&f.rel) else { return [None, None] };
    Subdir::ALL.map(|sub| match dir.lstat(sub.as_str()) {
        Ok(Some(m)) if m.is_dir() => Some(DirStamp::of(&m)),
        _ => None,
    })
}

/// Lists the opened `cur/` and `new/` of a folder. Anything but a regular file with a usable
/// name is left out, with a warning.
pub fn list_folder(subs: &[Option<Dir>; 2]) -> Result<Listing, FsError> {
    let mut listing = Listing { listed_at: Some(SystemTime::now()), ..Default::default() };
    for (i, sub) in Subdir::ALL.into_iter().enumerate() {
        let Some(dir) = &subs[i] else { continue };
        listing.stamps[i] = Some(DirStamp::of(&dir.stat()?));
        let mut skipped = Vec::new();
        for entry in dir.list()? {
            let shown = || fsx::shown(&dir.show(&entry.name));
            let Some(name) = entry.name.to_str() else {
                skipped.push(format!("skipped {}: the file name is not UTF-8", shown()));
                continue;
            };
            let Some(msg) = MessageName::parse(name) else { continue };
            if !msg.is_safe() {
                skipped.push(format!("skipped {}: control characters in a file name", shown()));
                continue;
            }
            if entry.kind != Kind::File {
                skipped.push(format!("skipped {}: it is {}, not a regular file", shown(), entry.kind.describe()));
                continue;
            }
            add(&mut listing.entries, msg.unique(), Listed { sub, name: name.to_string() });
        }
        listing.warnings.extend(bounded_warnings(skipped, dir.path()));
    }
    Ok(listing)
}

/// A partial listing from the names that changed (from inotify): for each message touched,
/// where it is now — looking only at the names it had or was given, never reading the
/// directories. `current` gives a key's location as last staged.
pub fn partial_listing(subs: &[Option<Dir>; 2], changes: &super::watch::Changes, current: impl Fn(&str) -> Option<Listed>) -> Listing {
    let mut candidates: HashMap<String, Vec<Listed>> = HashMap::new();
    let mut touched = HashSet::new();
    for (sub, name) in changes {
        let Some(msg) = MessageName::parse(name).filter(MessageName::is_safe) else { continue };
        let unique = msg.unique().to_string();
        touched.insert(format!("\0dup:{name}"));
        candidates.entry(unique).or_default().push(Listed { sub: *sub, name: name.clone() });
    }
    let mut listing = Listing { touched: None, ..Default::default() };
    for (unique, mut names) in candidates {
        if let Some(now) = current(&unique) {
            names.push(now);
        }
        names.sort_by(|a, b| (a.sub, &a.name).cmp(&(b.sub, &b.name)));
        names.dedup();
        for l in names {
            let Some(dir) = &subs[l.sub.index()] else { continue };
            match dir.lstat(&l.name) {
                Ok(Some(md)) if md.is_file() => {
                    add(&mut listing.entries, &unique, l);
                }
                Ok(Some(md)) => listing.warnings.push(format!(
                    "skipped {}: it is {}, not a regular file",
                    fsx::shown(&dir.show(&l.name)),
                    md.kind().describe()
                )),
                _ => {}
            }
        }
        touched.insert(unique);
    }
    listing.touched = Some(touched);
    listing
}

#[cfg(test)]
mod tests;
