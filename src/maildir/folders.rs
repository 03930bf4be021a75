//! Finding a user's folders: any directory with a `cur/` is a folder; the root is INBOX.
//! Maildir++ keeps folders flat as `.Name.Sub`; LAYOUT=fs nests them as `Name/Sub`.
//! Symlinks are reported and never followed, so a backup never leaves the Maildir.

use std::path::{Path, PathBuf};

use super::location::{Layout, MailLocation};
use super::{Maildir, MESSAGE_DIRS};
use crate::fsx::{Dir, FsError, Kind};

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

/// Lists the folders of a Maildir, sorted by relative path. Symlinks are left out and named
/// in the returned warnings.
pub fn discover(md: &Maildir) -> Result<(Vec<Folder>, Vec<String>), FsError> {
    let mut rels = Vec::new();
    let mut warnings = Vec::new();
    walk(md.loc.layout, &md.root, PathBuf::new(), &mut rels, &mut warnings)?;
    rels.sort();
    Ok((rels.into_iter().map(|r| Folder::at(&md.loc, r)).collect(), warnings))
}

fn walk(layout: Layout, dir: &Dir, rel: PathBuf, out: &mut Vec<PathBuf>, warnings: &mut Vec<String>) -> Result<(), FsError> {
    if is_maildir(dir)? {
        out.push(rel.clone());
    }
    let at_root = rel.as_os_str().is_empty();
    if layout == Layout::MaildirPlusPlus && !at_root {
        return Ok(()); // Maildir++ folders do not nest
    }
    for entry in dir.list()? {
        let Some(name) = entry.name.to_str() else { continue };
        if MESSAGE_DIRS.contains(&name) {
            continue;
        }
        if layout == Layout::MaildirPlusPlus && (!name.starts_with('.') || name.starts_with("..")) {
            continue;
        }
        match entry.kind {
            Kind::Symlink => warnings.push(format!("skipped symlink {} (symlinks are never followed)", dir.show(name).display())),
            Kind::Dir => match dir.sub(name) {
                Ok(sub) => walk(layout, &sub, rel.join(name), out, warnings)?,
                // Renamed or swapped for a symlink since the listing: not a folder now.
                Err(e) if e.is_not_found() || e.is_planted() => {}
                Err(e) => return Err(e),
            },
            _ => {}
        }
    }
    Ok(())
}
