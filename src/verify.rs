//! `verify`: re-checks a backup against its manifest (every file's size and BLAKE3) and
//! every `dovecot-uidlist` line against the files, and finds files the manifest lacks.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::engine::copy::hash_file;
use crate::maildir::uidlist::Uidlist;
use crate::maildir::{MessageName, Subdir, UIDLIST};
use crate::manifest::{Manifest, MANIFEST_NAME};

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
}

/// Verifies the backup (or snapshot) at `dir` with `jobs` threads.
pub fn verify(dir: &Path, jobs: usize) -> Result<VerifyReport, VerifyError> {
    if !fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(VerifyError::NoBackup(dir.to_path_buf()));
    }
    let mut report = VerifyReport { backup: dir.to_path_buf(), ..Default::default() };
    let manifest = match Manifest::read(&dir.join(MANIFEST_NAME)) {
        Ok(m) => m,
        Err(e) => {
            report.problems.push(format!("no usable manifest: {e}"));
            return Ok(report);
        }
    };
    report.folders = manifest.folders.len() as u64;
    report.messages = manifest.messages.len() as u64;
    report.bytes = manifest.messages.iter().map(|m| m.size).sum();

    let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs.max(1)).build().ok();
    let check_all = || -> Vec<String> {
        manifest
            .messages
            .par_iter()
            .filter_map(|m| {
                let path = dir.join(&m.folder).join(m.dir.as_str()).join(&m.name);
                match hash_file(&path) {
                    Err(e) => Some(format!("{}: {e}", path.display())),
                    Ok((size, _)) if size != m.size => Some(format!("{}: size {size}, manifest says {}", path.display(), m.size)),
                    Ok((_, sum)) if sum != m.blake3 => Some(format!("{}: checksum differs from the manifest", path.display())),
                    Ok(_) => None,
                }
            })
            .collect()
    };
    let mut problems = match &pool {
        Some(p) => p.install(check_all),
        None => check_all(),
    };

    // Files on disk per folder, against the manifest and the uidlist.
    let mut by_folder: HashMap<&str, HashSet<(Subdir, &str)>> = HashMap::new();
    for m in &manifest.messages {
        by_folder.entry(m.folder.as_str()).or_default().insert((m.dir, m.name.as_str()));
    }
    for f in &manifest.folders {
        let fdir = dir.join(&f.path);
        let expected = by_folder.remove(f.path.as_str()).unwrap_or_default();
        let mut uniques = HashSet::new();
        for sub in Subdir::ALL {
            let sdir = fdir.join(sub.as_str());
            match fs::read_dir(&sdir) {
                Err(e) => problems.push(format!("{}: {e}", sdir.display())),
                Ok(rd) => {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if let Some(msg) = MessageName::parse(&name) {
                            uniques.insert(msg.unique().to_string());
                            if !expected.contains(&(sub, name.as_str())) {
                                problems.push(format!("{}: not in the manifest", e.path().display()));
                            }
                        }
                    }
                }
            }
        }
        match fs::read_dir(fdir.join("tmp")) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    problems.push(format!("{}: tmp/ is not empty", fdir.display()));
                }
            }
            Err(e) => problems.push(format!("{}/tmp: {e}", fdir.display())),
        }
        let uidlist_path = fdir.join(UIDLIST);
        match (&f.uidlist_header, uidlist_path.exists()) {
            (None, false) => {}
            (None, true) => problems.push(format!("{}: present but not in the manifest", uidlist_path.display())),
            (Some(_), false) => problems.push(format!("{}: missing", uidlist_path.display())),
            (Some(header), true) => match Uidlist::read(&uidlist_path) {
                Err(e) => problems.push(e.to_string()),
                Ok(u) => {
                    if &u.header != header {
                        problems.push(format!("{}: header {:?}, manifest says {:?}", uidlist_path.display(), u.header, header));
                    }
                    for entry in &u.entries {
                        let unique = entry.unique.split(':').next().unwrap_or(&entry.unique);
                        if !uniques.contains(unique) && f.uidlist_expunged.binary_search_by(|x| x.as_str().cmp(unique)).is_err() {
                            problems.push(format!(
                                "{}: uid {} names {} but no such message file exists",
                                uidlist_path.display(),
                                entry.uid,
                                entry.unique
                            ));
                        }
                    }
                }
            },
        }
    }
    for (folder, _) in by_folder {
        problems.push(format!("manifest lists messages in folder {folder:?} that has no folder record"));
    }
    problems.sort();
    report.problems = problems;
    Ok(report)
}
