//! Listing a folder's messages (`cur/` and `new/`) keyed by unique name.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use crate::maildir::{MessageName, Subdir};

/// Where a message file is right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub sub: Subdir,
    pub name: String,
}

/// A directory's identity and change time: if these are unchanged (and were not fresh when
/// taken), nothing was created, renamed or removed in it since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirStamp {
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl DirStamp {
    pub fn of(dir: &Path) -> Option<DirStamp> {
        let md = fs::symlink_metadata(dir).ok()?;
        Some(DirStamp { ino: md.ino(), mtime: md.mtime(), mtime_nsec: md.mtime_nsec(), ctime: md.ctime(), ctime_nsec: md.ctime_nsec() })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub entries: HashMap<String, Listed>,
    /// Stamps of cur/ and new/ taken just before reading them.
    pub stamps: [Option<DirStamp>; 2],
    pub listed_at: Option<SystemTime>,
    pub warnings: Vec<String>,
    /// None for a full listing. Some(keys) for a partial one: only these keys were looked at
    /// (a key absent from `entries` is gone); every other message is as it was.
    pub touched: Option<HashSet<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("read directory {path}: {source}")]
    Io { path: String, #[source] source: io::Error },
    #[error("message file name is not UTF-8: {0} (rename it, then back up again)")]
    NonUtf8(String),
}

/// The key for a message: its unique name. A second file with the same unique name (which
/// Dovecot would repair) is kept under its full name so nothing is dropped.
fn key_for(entries: &HashMap<String, Listed>, unique: &str, full: &str) -> String {
    if entries.contains_key(unique) {
        format!("\0dup:{full}")
    } else {
        unique.to_string()
    }
}

pub fn dir_stamps(mail_dir: &Path) -> [Option<DirStamp>; 2] {
    [DirStamp::of(&mail_dir.join("cur")), DirStamp::of(&mail_dir.join("new"))]
}

/// Lists `cur/` and `new/` of a folder. A missing subdir counts as empty; a missing folder
/// is an error of kind NotFound (the caller treats the folder as deleted).
pub fn list_folder(mail_dir: &Path) -> Result<Listing, ScanError> {
    let mut listing = Listing { listed_at: Some(SystemTime::now()), stamps: dir_stamps(mail_dir), ..Default::default() };
    if let Err(e) = fs::symlink_metadata(mail_dir) {
        return Err(ScanError::Io { path: mail_dir.display().to_string(), source: e });
    }
    for sub in Subdir::ALL {
        let dir = mail_dir.join(sub.as_str());
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ScanError::Io { path: dir.display().to_string(), source: e }),
        };
        for entry in rd {
            let entry = entry.map_err(|e| ScanError::Io { path: dir.display().to_string(), source: e })?;
            let os_name = entry.file_name();
            let Some(name) = os_name.to_str() else {
                return Err(ScanError::NonUtf8(entry.path().display().to_string()));
            };
            let Some(msg) = MessageName::parse(name) else { continue };
            match entry.file_type() {
                Ok(ft) if ft.is_file() => {}
                Ok(ft) if ft.is_symlink() => {
                    listing.warnings.push(format!("skipped symlink {} (symlinks are never followed)", entry.path().display()));
                    continue;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ScanError::Io { path: entry.path().display().to_string(), source: e }),
            }
            let key = key_for(&listing.entries, msg.unique(), name);
            listing.entries.insert(key, Listed { sub, name: name.to_string() });
        }
    }
    Ok(listing)
}

impl ScanError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ScanError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// A partial listing from the names that changed (from inotify): for each message touched,
/// where it is now — looking only at the names it had or was given, never reading the
/// directories. `current` gives a key's location as last staged.
pub fn partial_listing(
    mail_dir: &Path,
    changes: &super::watch::Changes,
    current: impl Fn(&str) -> Option<Listed>,
) -> Listing {
    let mut candidates: HashMap<String, Vec<Listed>> = HashMap::new();
    let mut touched = HashSet::new();
    for (sub, name) in changes {
        let Some(msg) = MessageName::parse(name) else { continue };
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
            match fs::symlink_metadata(mail_dir.join(l.sub.as_str()).join(&l.name)) {
                Ok(md) if md.file_type().is_file() => {
                    let key = key_for(&listing.entries, &unique, &l.name);
                    listing.entries.insert(key, l);
                }
                Ok(md) if md.file_type().is_symlink() => listing.warnings.push(format!(
                    "skipped symlink {} (symlinks are never followed)",
                    mail_dir.join(l.sub.as_str()).join(&l.name).display()
                )),
                _ => {}
            }
        }
        touched.insert(unique);
    }
    listing.touched = Some(touched);
    listing
}
