//! Helpers for the unit tests: Maildirs made by hand in temp dirs (no Dovecot, no root), and
//! the engine's own listing functions to feed `Tree::apply`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::engine::reconcile::watch_and_list;
use crate::engine::scan::Listing;
use crate::maildir::{folders, Folder, MailLocation, Maildir};

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A folder's cur/ new/ tmp/ at `dir` (and maildirfolder for a Maildir++ subfolder `.X`).
pub fn make_folder(dir: &Path) {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    if dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
        fs::write(dir.join("maildirfolder"), b"").unwrap();
    }
}

/// A Maildir at `root` with INBOX and the (Maildir++ or fs) folder dirs `rels`.
pub fn make_maildir(root: &Path, rels: &[&str]) {
    make_folder(root);
    for rel in rels {
        make_folder(&root.join(rel));
    }
}

/// Writes message `name` into `<folder>/<sub>/`.
pub fn put(folder: &Path, sub: &str, name: &str, body: &[u8]) -> PathBuf {
    let p = folder.join(sub).join(name);
    fs::write(&p, body).unwrap();
    p
}

/// A message body that tells who it is.
pub fn body(unique: &str) -> Vec<u8> {
    format!("From: test\r\nSubject: {unique}\r\n\r\nbody of {unique}\r\n").into_bytes()
}

pub fn open(root: &Path) -> Maildir {
    Maildir::open(&MailLocation::plain(root)).unwrap()
}

pub fn open_at(loc: &MailLocation) -> Maildir {
    Maildir::open(loc).unwrap()
}

/// Every folder found, listed in full (what a pass without a watcher sees), and the folders
/// of `known` that are gone (listed as None).
pub fn list_all(md: &Maildir, known: &[Folder]) -> Vec<(Folder, Option<Listing>)> {
    let (found, _) = folders::discover(md).unwrap();
    let mut out: Vec<_> = found.iter().map(|f| (f.clone(), watch_and_list(md, f, None).unwrap())).collect();
    for f in known {
        if !found.contains(f) {
            out.push((f.clone(), None));
        }
    }
    out
}

/// Every file below `dir` whose parent is a cur/ or new/ directory, sorted.
pub fn message_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() && matches!(d.file_name().and_then(|n| n.to_str()), Some("cur" | "new")) {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

pub fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

pub fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// A real backup of `loc` into the new directory `dest` (the engine without the job layer).
pub fn backup(loc: &MailLocation, dest: &Path, opts: &crate::engine::BackupOptions) -> Result<crate::engine::BackupReport, crate::engine::BackupError> {
    let md = crate::engine::open_source(loc)?;
    crate::engine::check_outside(&md, dest)?;
    let (parent, name) = crate::staging::split_dest(dest)?;
    crate::engine::backup_to(&md, &crate::engine::OnDisk, &parent, &name, opts, crate::engine::InRepo::default(), &crate::engine::NoProgress)
}
