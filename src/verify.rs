//! `verify`: re-checks a backup against its manifest (every file's size and BLAKE3, or only
//! its size for a quick check) and every `dovecot-uidlist` line against the files, and finds
//! files the manifest lacks.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::fsx::{self, Dir, FsError};
use crate::maildir::uidlist::{Reader, UidlistError};
use crate::maildir::{MessageName, Subdir, UIDLIST};
use crate::manifest::{FolderRecord, Manifest, ManifestError, MessageRecord};
use crate::store::MessageDirs;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub backup: PathBuf,
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_whole(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0} does not exist or is not a directory")]
    NoBackup(PathBuf),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// How closely each message file is compared with the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Its size only (a stat per message: quick enough for a monitoring check).
    Sizes,
    /// Its size and BLAKE3 (reads every byte).
    Checksums,
}

/// Verifies the backup (or snapshot) at `path` with `jobs` threads, reading every message.
pub fn verify(path: &Path, jobs: usize) -> Result<VerifyReport, VerifyError> {
    verify_to(path, jobs, Depth::Checksums)
}

/// Verifies the backup (or snapshot) at `path` with `jobs` threads, to `depth`.
pub fn verify_to(path: &Path, jobs: usize, depth: Depth) -> Result<VerifyReport, VerifyError> {
    let dir = match crate::repo::open_snapshot(path) {
        Ok(d) => d,
        Err(e) if e.is_not_found() || e.errno() == Some(libc::ENOTDIR) => return Err(VerifyError::NoBackup(path.to_path_buf())),
        Err(e) => return Err(e.into()),
    };
    let mut report = VerifyReport { backup: path.to_path_buf(), ..Default::default() };
    // Every record and count checked as they stream by, keeping the folders and the records
    // kept in the manifest itself (a plain backup's, a first-form snapshot's); a stored
    // folder's records are read from its entry, one folder at a time, and counted here.
    let (folders, stored) = (RefCell::new(Vec::new()), RefCell::new(HashSet::new()));
    let mut inline: HashMap<String, Vec<MessageRecord>> = HashMap::new();
    let keep_folder = |f: FolderRecord| {
        if f.store.is_some() {
            stored.borrow_mut().insert(f.path.clone());
        }
        folders.borrow_mut().push(f);
    };
    let keep_inline = |m: MessageRecord| {
        if !stored.borrow().contains(&m.folder) {
            inline.entry(m.folder.clone()).or_default().push(m);
        }
    };
    let header = match Manifest::visit_unstored(&dir, keep_folder, keep_inline) {
        Ok(h) => h,
        Err(e) => {
            report.problems.push(format!("no usable manifest: {e}"));
            return Ok(report);
        }
    };
    let folders = folders.into_inner();
    (report.folders, report.messages, report.bytes) = (header.folders, header.messages, header.bytes);
    let dirs = MessageDirs::new(&dir)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs.max(1)).build().ok();
    let mut problems = Vec::new();
    for f in &folders {
        let records = match &f.store {
            Some(id) => stored_records(&dir, id).unwrap_or_else(|e| {
                problems.push(format!("no usable records for folder {:?}: {e}", f.name));
                Vec::new()
            }),
            None => inline.remove(f.path.as_str()).unwrap_or_default(),
        };
        let check = || check_messages(&dir, &dirs, &records, depth);
        problems.extend(match &pool {
            Some(p) => p.install(check),
            None => check(),
        });
        if records.len() as u64 != f.messages {
            problems.push(format!("folder {:?}: the manifest says {} messages, its records are {}", f.name, f.messages, records.len()));
        } else if f.store.is_some() {
            // Its entry's bytes: the manifest pass took them on the folder record's word.
            let bytes = records.iter().try_fold(0u64, |sum, m| sum.checked_add(m.size));
            if bytes != f.bytes {
                problems.push(format!("folder {:?}: the manifest says {:?} bytes, its records {bytes:?}", f.name, f.bytes));
            }
        }
        // Files on disk, against the records and the uidlist.
        let mut expected = HashSet::new();
        for m in &records {
            if !expected.insert((m.dir, m.name.as_str())) {
                problems.push(format!("{}: listed twice in the manifest", dir.show(m.rel_path()).display()));
            }
        }
        match dir.sub(&f.path) {
            Ok(fdir) => check_folder(&fdir, &dirs, f, &expected, &mut problems),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for (folder, records) in inline {
        problems.push(format!("{} messages of folder {folder:?}, which the manifest does not list", records.len()));
    }
    problems.sort();
    report.problems = problems;
    Ok(report)
}

/// The records of a stored folder, from its store entry.
fn stored_records(dir: &Dir, id: &str) -> Result<Vec<MessageRecord>, ManifestError> {
    let mut records = Vec::new();
    Manifest::visit_stored(&dir.parent()?, id, |m| records.push(m))?;
    Ok(records)
}

/// Each message file against its record: its size, and its BLAKE3 to `depth`.
fn check_messages(dir: &Dir, dirs: &MessageDirs, records: &[MessageRecord], depth: Depth) -> Vec<String> {
    records
        .par_iter()
        .filter_map(|m| {
            let shown = dir.show(m.rel_path());
            let opened = dirs.open_message(&m.folder, m.dir, &m.name).map_err(|e| e.to_string());
            let measured = match (depth, m.checksum()) {
                (Depth::Checksums, Some(_)) => opened.and_then(|mut f| fsx::hash_file(&mut f).map(|(size, sum)| (size, Some(sum))).map_err(|e| e.to_string())),
                _ => opened.map(|f| (f.meta.size(), None)),
            };
            match measured {
                Err(e) => Some(e),
                Ok((size, _)) if size != m.size => Some(format!("{}: size {size}, manifest says {}", shown.display(), m.size)),
                Ok((_, Some(sum))) if sum != m.blake3 => Some(format!("{}: checksum differs from the manifest", shown.display())),
                Ok(_) => None,
            }
        })
        .collect()
}

/// One folder's directories and uidlist against its part of the manifest.
fn check_folder(fdir: &Dir, dirs: &MessageDirs, f: &FolderRecord, expected: &HashSet<(Subdir, &str)>, problems: &mut Vec<String>) {
    let mut uniques = HashSet::new();
    for sub in Subdir::ALL {
        match dirs.get(&f.path, sub).and_then(|d| d.map(|d| d.list().map(|l| (d, l))).transpose()) {
            Err(e) => problems.push(e.to_string()),
            Ok(None) => problems.push(format!("{}: missing", fdir.show(sub.as_str()).display())),
            Ok(Some((d, entries))) => {
                for e in entries {
                    let name = e.name.to_string_lossy();
                    if let Some(msg) = MessageName::parse(&name) {
                        uniques.insert(msg.unique().to_string());
                        if !expected.contains(&(sub, name.as_ref())) {
                            problems.push(format!("{}: not in the manifest", d.show(&e.name).display()));
                        }
                    }
                }
            }
        }
    }
    match fdir.sub("tmp").and_then(|d| d.list()) {
        Ok(entries) if !entries.is_empty() => problems.push(format!("{}: tmp/ is not empty", fdir.path().display())),
        Ok(_) => {}
        Err(e) => problems.push(e.to_string()),
    }
    let shown = fdir.show(UIDLIST);
    let reader = match Reader::open(fdir) {
        Ok(r) => r,
        Err(e) => {
            problems.push(e.to_string());
            return;
        }
    };
    match (&f.uidlist_header, reader) {
        (None, None) => {}
        (None, Some(_)) => problems.push(format!("{}: present but not in the manifest", shown.display())),
        (Some(_), None) => problems.push(format!("{}: missing", shown.display())),
        (Some(header), Some(u)) => {
            if &u.header.line != header {
                problems.push(format!("{}: header {:?}, manifest says {:?}", shown.display(), u.header.line, header));
            }
            for entry in u {
                match entry {
                    Ok(e) if !uniques.contains(&e.unique) && !f.uidlist_expunged_partial && f.uidlist_expunged.binary_search(&e.unique).is_err() => {
                        problems.push(format!("{}: uid {} names {} but no such message file exists", shown.display(), e.uid, e.unique))
                    }
                    Ok(_) => {}
                    Err(e @ UidlistError::Syntax { .. }) | Err(e @ UidlistError::Fs(_)) => {
                        problems.push(e.to_string());
                        break;
                    }
                }
            }
        }
    }
}
