//! Finding a user's folders: any directory with a `cur/` is a folder; the root is INBOX.
//! Maildir++ keeps folders flat as `.Name.Sub`; LAYOUT=fs nests them as `Name/Sub`.
//! Symlinks are reported and never followed, so a backup never leaves the Maildir.

use std::path::{Path, PathBuf};

use super::location::{Layout, MailLocation};
use super::{Maildir, MESSAGE_DIRS};
use crate::fsx::{self, Dir, FsError, Kind, PATH_MAX};

/// One mailbox: where its directories are, relative to the Maildir's roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// Relative to the Maildir root ("" for INBOX); the same in source and backup.
    pub rel: PathBuf,
    /// The mailbox name as Dovecot stores it (`INBOX`, `Archive.2024`, `Archive/2024`).
    pub name: String,
    /// The folder's control dir, relative to the control root.
    pub control_rel: PathBuf,
    /// The folder's index dir, relative to the index root.
    pub index_rel: PathBuf,
}

impl Folder {
    pub fn at(loc: &MailLocation, rel: PathBuf) -> Folder {
        Folder { name: folder_name(loc.layout, &rel), control_rel: loc.control_rel(&rel), index_rel: loc.index_rel(&rel), rel }
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

/// True if `dir` holds a real (not symlinked) `cur/` directory.
pub fn is_maildir(dir: &Dir) -> Result<bool, FsError> {
    Ok(dir.lstat("cur")?.is_some_and(|m| m.is_dir()))
}

/// Lists the folders of a Maildir, sorted by relative path. Symlinks, and names no Dovecot
/// folder has (control characters, not UTF-8), are left out and named in the warnings.
pub fn discover(md: &Maildir) -> Result<(Vec<Folder>, Vec<String>), FsError> {
    let layout = md.loc.layout;
    let mut rels = Vec::new();
    let mut warnings = Vec::new();
    // Depth first with an explicit stack of paths (not of open directories): a deep or wide
    // LAYOUT=fs tree costs neither our stack nor our descriptors.
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = match md.root.sub(&rel) {
            Ok(d) => d,
            // Gone or replaced since its parent was listed: not a folder now.
            Err(e) if e.is_not_found() || e.is_planted() => continue,
            Err(e) => return Err(e),
        };
        if is_maildir(&dir)? {
            rels.push(rel.clone());
        }
        if layout == Layout::MaildirPlusPlus && !rel.as_os_str().is_empty() {
            continue; // Maildir++ folders do not nest
        }
        let mut skipped = Vec::new();
        for entry in dir.list()? {
            if !matches!(entry.kind, Kind::Dir | Kind::Symlink) {
                continue;
            }
            let name = entry.name.to_str();
            if name.is_some_and(|n| MESSAGE_DIRS.contains(&n)) {
                continue;
            }
            let plus_plus_name = name.is_some_and(|n| n.starts_with('.') && !n.starts_with(".."));
            if layout == Layout::MaildirPlusPlus && !plus_plus_name {
                continue;
            }
            let shown = || fsx::shown(&dir.show(&entry.name));
            let child = rel.join(&entry.name);
            if entry.kind == Kind::Symlink {
                skipped.push(format!("skipped symlink {} (symlinks are never followed)", shown()));
            } else if name.is_none_or(fsx::has_control) {
                skipped.push(format!("skipped folder {}: no Dovecot folder has such a name", shown()));
            } else if child.as_os_str().len() > PATH_MAX {
                skipped.push(format!("skipped folder {}: nested too deep", shown()));
            } else {
                todo.push(child);
            }
        }
        warnings.extend(bounded_warnings(skipped, dir.path()));
    }
    rels.sort();
    Ok((rels.into_iter().map(|r| Folder::at(&md.loc, r)).collect(), warnings))
}

/// Warnings about one directory's entries, at most a handful: a directory full of planted
/// entries must not flood the report (the rest are counted).
pub fn bounded_warnings(mut skipped: Vec<String>, dir: &Path) -> Vec<String> {
    const MAX: usize = 20;
    if skipped.len() > MAX {
        let more = skipped.len() - MAX;
        skipped.truncate(MAX);
        skipped.push(format!("skipped {more} more entries of {}", fsx::shown(dir)));
    }
    skipped
}
