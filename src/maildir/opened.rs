//! A user's Maildir opened for use: a directory descriptor for its root and, where Dovecot
//! keeps them elsewhere (`CONTROL=`, `INDEX=`), for its control and index roots. Everything
//! below is reached through these descriptors, never by path.

use std::path::Path;

use super::{Folder, MailLocation};
use crate::fsx::{Dir, FsError};

pub struct Maildir {
    pub loc: MailLocation,
    pub root: Dir,
    /// None: not split out (the root), or split out but not created yet.
    control: Option<Dir>,
    index: Option<Dir>,
}

impl Maildir {
    /// Opens the roots named by `loc` (admin paths: see `Dir::open`). A control or index root
    /// that does not exist yet is not an error: Dovecot creates it on first use.
    pub fn open(loc: &MailLocation) -> Result<Maildir, FsError> {
        let root = Dir::open(&loc.root)?;
        let opt = |p: &Option<std::path::PathBuf>| p.as_deref().map(Dir::open_opt).transpose().map(Option::flatten);
        Ok(Maildir { control: opt(&loc.control)?, index: opt(&loc.index)?, root, loc: loc.clone() })
    }

    /// Where per-user control files and the folders' control dirs are, if it exists.
    pub fn control_root(&self) -> Option<&Dir> {
        if self.loc.control.is_some() { self.control.as_ref() } else { Some(&self.root) }
    }

    /// Where the index files are, if it exists.
    pub fn index_root(&self) -> Option<&Dir> {
        if self.loc.index.is_some() { self.index.as_ref() } else { Some(&self.root) }
    }

    /// A folder's own directory (holding cur/, new/, tmp/).
    pub fn folder_dir(&self, f: &Folder) -> Result<Dir, FsError> {
        self.root.sub(&f.rel)
    }

    /// A folder's control dir (where its uidlist and lock are); None if it does not exist.
    pub fn control_dir(&self, f: &Folder) -> Result<Option<Dir>, FsError> {
        sub_of(self.control_root(), &f.control_rel)
    }

    /// A folder's index dir; None if it does not exist.
    pub fn index_dir(&self, f: &Folder) -> Result<Option<Dir>, FsError> {
        sub_of(self.index_root(), &f.index_rel)
    }
}

fn sub_of(root: Option<&Dir>, rel: &Path) -> Result<Option<Dir>, FsError> {
    match root {
        Some(r) => r.sub_opt(rel),
        None => Ok(None),
    }
}
