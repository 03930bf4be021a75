//! Finding a user's folders: any directory with a `cur/` is a folder; the root is INBOX.
//! Maildir++ keeps folders flat as `.Name.Sub`; LAYOUT=fs nests them as `Name/Sub`.
//! Symlinks are reported and never followed, so a backup never leaves the Maildir.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::location::{Layout, MailLocation};

/// One mailbox's directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// Path relative to the Maildir root ("" for INBOX); the same in source and backup.
    pub rel: PathBuf,
    /// The mailbox name as Dovecot stores it (`INBOX`, `Archive.2024`, `Archive/2024`).
    pub name: String,
    pub mail_dir: PathBuf,
    pub control_dir: PathBuf,
    pub index_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FolderError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

const MESSAGE_DIRS: [&str; 3] = ["cur", "new", "tmp"];

impl Folder {
    pub fn at(loc: &MailLocation, rel: PathBuf) -> Folder {
        let name = folder_name(loc.layout, &rel);
        Folder {
            mail_dir: loc.root.join(&rel),
            control_dir: loc.control_dir(&rel),
            index_dir: loc.index_dir(&rel),
            rel,
            name,
        }
    }

    pub fn is_inbox(&self) -> bool {
        self.rel.as_os_str().is_empty()
    }
}

/// Dovecot's name for a folder at `rel`.
pub fn folder_name(layout: Layout, rel: &Path) -> String {
    let s = rel.to_string_lossy();
    if s.is_empty() {
        return "INBOX".to_string();
    }
    match layout {
        Layout::MaildirPlusPlus => s.strip_prefix('.').unwrap_or(&s).to_string(),
        Layout::Fs => s.into_owned(),
    }
}

/// True if `dir` is a real (not symlinked) directory holding `cur/`.
pub fn is_maildir(dir: &Path) -> bool {
    matches!(fs::symlink_metadata(dir.join("cur")), Ok(md) if md.is_dir())
}

/// Lists the folders of a Maildir, sorted by relative path. Symlinked directories are left
/// out and named in the returned warnings.
pub fn discover(loc: &MailLocation) -> Result<(Vec<Folder>, Vec<String>), FolderError> {
    let mut rels = Vec::new();
    let mut warnings = Vec::new();
    walk(loc, &loc.root, PathBuf::new(), &mut rels, &mut warnings)?;
    rels.sort();
    Ok((rels.into_iter().map(|r| Folder::at(loc, r)).collect(), warnings))
}

fn walk(loc: &MailLocation, dir: &Path, rel: PathBuf, out: &mut Vec<PathBuf>, warnings: &mut Vec<String>) -> Result<(), FolderError> {
    if is_maildir(dir) {
        out.push(rel.clone());
    }
    let at_root = rel.as_os_str().is_empty();
    if loc.layout == Layout::MaildirPlusPlus && !at_root {
        return Ok(()); // Maildir++ folders do not nest
    }
    let entries = fs::read_dir(dir).map_err(|e| FolderError { op: "read directory", path: dir.to_path_buf(), source: e })?;
    for entry in entries {
        let entry = entry.map_err(|e| FolderError { op: "read directory", path: dir.to_path_buf(), source: e })?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if MESSAGE_DIRS.contains(&name_s.as_ref()) {
            continue;
        }
        if loc.layout == Layout::MaildirPlusPlus && (!name_s.starts_with('.') || name_s.starts_with("..") || name_s == ".") {
            continue;
        }
        let ft = entry.file_type().map_err(|e| FolderError { op: "stat", path: entry.path(), source: e })?;
        if ft.is_symlink() {
            if fs::metadata(entry.path()).map(|m| m.is_dir()).unwrap_or(false) {
                warnings.push(format!("skipped symlinked folder {} (symlinks are never followed)", entry.path().display()));
            }
            continue;
        }
        if ft.is_dir() {
            walk(loc, &entry.path(), rel.join(&name), out, warnings)?;
        }
    }
    Ok(())
}
