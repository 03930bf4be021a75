//! A series' snapshots as Dovecot can show them to their user, read-only, as IMAP folders
//! (`Snapshots/<snapshot>/<folder>`): `SERIES/imap-view/`
//!
//! - `mail/<snapshot>/<folder path>/{cur,new,tmp}`: LAYOUT=fs, one directory per snapshot, so
//!   a snapshot appears (renamed in whole from `staging/`) and disappears at once. Its message
//!   files are hard links to the snapshot's; its directories are the user's but mode 0500, so
//!   Dovecot finds them read-only (`access(cur, W_OK)`) and never renames, moves or locks in them.
//! - `control/<snapshot>/<folder path>/`: copies of each folder's `dovecot-uidlist` and
//!   `dovecot-keywords` (UIDs and keyword names), writable by the user: Dovecot takes its uidlist
//!   lock and keeps its own state there, never in a snapshot.
//!
//! The view exists once asked for (`--imap-view`) and is then kept up to date by every snapshot
//! and prune of the series; removing `imap-view/` turns it off.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::fsx::{self, running_as_root, Dir, Kind, Owner, Replace};
use crate::maildir::{control_file_limit, Layout, Subdir, MESSAGE_DIRS};
use crate::store;
use crate::manifest::Manifest;

use super::{RepoError, Snapshot};

pub const VIEW_DIR: &str = "imap-view";
const MAIL: &str = "mail";
const CONTROL: &str = "control";
const STAGING: &str = "staging";
const LOCK: &str = ".lock";
/// The control files a folder's view carries.
const CONTROL_FILES: [&str; 2] = ["dovecot-uidlist", "dovecot-keywords"];
/// Directories of the mail part: readable, and to Dovecot read-only.
const READ_ONLY: u32 = 0o500;

/// Whether `path` lies in the mail part of an IMAP view (`…/imap-view/mail/…`): a snapshot as
/// Dovecot shows it, which is never mail to back up.
pub fn shows(path: &Path) -> bool {
    let parts: Vec<_> = path.components().map(|c| c.as_os_str()).collect();
    parts.windows(2).any(|w| w[0] == VIEW_DIR && w[1] == MAIL)
}

/// What a refresh changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// What the admin should know: folders the view cannot show, a view Dovecot cannot reach.
    pub warnings: Vec<String>,
}

/// Makes the view of `series` show exactly `snapshots`: each one it lacks is added, any other
/// removed. Without a view there, one is made only if `create`; None if there is none.
pub fn refresh(series: &Dir, snapshots: &[Snapshot], create: bool) -> Result<Option<ViewChanges>, RepoError> {
    if series.lstat(VIEW_DIR)?.is_none() && !create {
        return Ok(None);
    }
    let Some(owner) = view_owner(series, snapshots)? else { return Ok(None) };
    let view = View::open(series, owner)?;
    let _turn = view.root.lock_file(LOCK, true)?;
    view.clear_staging()?;
    let shown = view.shown()?;
    let wanted: BTreeSet<&str> = snapshots.iter().map(|s| s.name.as_str()).collect();
    let mut changes = ViewChanges { warnings: unreachable(series, owner)?.into_iter().collect(), ..Default::default() };
    for name in shown.iter().filter(|n| !wanted.contains(n.as_str())) {
        view.remove(name)?;
        changes.removed.push(name.clone());
    }
    for snap in snapshots.iter().filter(|s| !shown.contains(&s.name)) {
        changes.warnings.extend(view.add(series, &snap.name)?);
        changes.added.push(snap.name.clone());
    }
    Ok(Some(changes))
}

/// Whose view it is: whose mail the newest snapshot holds (its manifest says, when root made it;
/// ours when we are not root). None when there is no snapshot to take it from.
fn view_owner(series: &Dir, snapshots: &[Snapshot]) -> Result<Option<Owner>, RepoError> {
    if !running_as_root() {
        return Ok(Some(Owner { uid: rustix::process::geteuid().as_raw(), gid: rustix::process::getegid().as_raw() }));
    }
    let Some(newest) = snapshots.last() else { return Ok(None) };
    let snap = series.sub(&newest.name)?;
    let header = Manifest::read_header(&snap).map_err(|e| RepoError::View { snapshot: snap.path().to_path_buf(), what: e.to_string() })?;
    Ok(Some(match header.owner {
        Some(o) => o,
        None => snap.stat()?.owner(),
    }))
}

/// Why Dovecot, running as `owner`, cannot get through the directories above the series to
/// its view, if it cannot (the series itself is opened up by `View::open`).
fn unreachable(series: &Dir, owner: Owner) -> Result<Option<String>, RepoError> {
    for (depth, a) in series.ancestors()?.iter().enumerate().skip(1) {
        let o = a.owner();
        let bit = if o.uid == owner.uid { 0o100 } else if o.gid == owner.gid { 0o010 } else { 0o001 };
        if owner.uid != 0 && a.mode() & bit == 0 {
            let shown = series.path().ancestors().nth(depth).map_or_else(|| format!("{depth} levels above it"), |p| p.display().to_string());
            return Ok(Some(format!(
                "Dovecot, as uid {}, cannot reach the IMAP view in {}: {shown} (mode {:04o}) does not let it through (chmod o+x)",
                owner.uid,
                series.path().display(),
                a.mode()
            )));
        }
    }
    Ok(None)
}

/// An opened `imap-view/`, and whose it is.
struct View {
    root: Dir,
    mail: Dir,
    control: Dir,
    staging: Dir,
    owner: Owner,
}

impl View {
    /// Opens (making what is missing) the view in `series`. The user must be able to reach it
    /// through the series, which root otherwise keeps to itself.
    fn open(series: &Dir, owner: Owner) -> Result<View, RepoError> {
        let root = series.ensure_dir(VIEW_DIR, 0o711, None)?.0;
        if running_as_root() {
            for d in [series, &root] {
                let mode = d.stat()?.mode();
                if mode & 0o011 != 0o011 {
                    d.set_mode(mode | 0o011)?;
                }
            }
        }
        let mail = root.ensure_dir(MAIL, READ_ONLY, Some(owner))?.0;
        let control = root.ensure_dir(CONTROL, 0o700, Some(owner))?.0;
        let staging = root.ensure_dir(STAGING, 0o700, None)?.0;
        Ok(View { root, mail, control, staging, owner })
    }

    /// The snapshots the view shows now.
    fn shown(&self) -> Result<BTreeSet<String>, RepoError> {
        let names = self.mail.list()?.into_iter().filter(|e| e.kind == Kind::Dir);
        Ok(names.filter_map(|e| e.name.to_str().filter(|n| super::parse_time(n).is_some()).map(String::from)).collect())
    }

    /// Whatever a killed refresh left half made or half removed.
    fn clear_staging(&self) -> Result<(), RepoError> {
        for e in self.staging.list()? {
            self.staging.remove_tree(&e.name)?;
        }
        Ok(())
    }

    /// Takes `name` out of the view at once (renamed away), then deletes it and its control.
    fn remove(&self, name: &str) -> Result<(), RepoError> {
        // Moving a directory to another parent rewrites its "..": it must be writable too.
        let moved = self.mail.sub(name)?;
        self.writable(&moved, || self.writable(&self.mail, || Ok(self.mail.rename(name, &self.staging, name, Replace::Never)?)))?;
        self.staging.remove_tree(name)?;
        self.control.remove_tree(name)?;
        Ok(())
    }

    /// Adds the snapshot `name` of `series`: its control first (Dovecot would otherwise give a
    /// folder without its uidlist new UIDs), then its mail, made in `staging/` and renamed in.
    fn add(&self, series: &Dir, name: &str) -> Result<Vec<String>, RepoError> {
        let snap = series.sub(name)?;
        let (header, folders) = Manifest::read_folders(&snap).map_err(|e| RepoError::View { snapshot: snap.path().to_path_buf(), what: e.to_string() })?;
        self.control.remove_tree(name)?;
        let control = self.control.ensure_dir(name, 0o700, Some(self.owner))?.0;
        let staged = self.staging.ensure_dir(name, 0o700, None)?.0;
        let mut made = vec![staged.try_clone()?];
        let mut warnings = Vec::new();
        for f in &folders {
            let Some(rel) = view_path(&f.path, header.layout) else {
                warnings.push(format!("{}: folder {:?} has a name the view cannot show", snap.path().display(), f.name));
                continue;
            };
            let from = snap.sub(&f.path)?;
            copy_control(&from, &control.ensure_dirs(&rel, 0o700, Some(self.owner))?, self.owner)?;
            made.extend(link_messages(&snap, &f.path, &staged, &rel)?);
        }
        // Read-only only now that they are filled; handed to the user as they are. The top
        // last: moving a directory to another parent rewrites its "..".
        for d in made.iter().rev() {
            if running_as_root() {
                d.set_owner(self.owner)?;
            }
            d.set_mode(READ_ONLY)?;
        }
        self.writable(&staged, || self.writable(&self.mail, || Ok(self.staging.rename(name, &self.mail, name, Replace::Never)?)))?;
        Ok(warnings)
    }

    /// Runs `f` with `dir` (read-only to Dovecot) writable to us: root needs no such help.
    fn writable(&self, dir: &Dir, f: impl FnOnce() -> Result<(), RepoError>) -> Result<(), RepoError> {
        if running_as_root() {
            return f();
        }
        dir.set_mode(0o700)?;
        let r = f();
        dir.set_mode(READ_ONLY)?;
        r
    }
}

/// Where a snapshot's folder (its directory `path` there) appears in the view: `INBOX`, or
/// the parts of its name as nested directories. None for a name the view cannot hold.
fn view_path(path: &str, layout: Layout) -> Option<PathBuf> {
    let parts: Vec<&str> = match layout {
        _ if path.is_empty() => vec!["INBOX"],
        Layout::MaildirPlusPlus => path.strip_prefix('.')?.split('.').collect(),
        Layout::Fs => path.split('/').collect(),
    };
    let usable = |p: &&str| fsx::check_name(OsStr::new(p)).is_ok() && !MESSAGE_DIRS.contains(p);
    // Only the snapshot's INBOX is INBOX.
    let another_inbox = !path.is_empty() && parts.len() == 1 && parts[0].eq_ignore_ascii_case("INBOX");
    (parts.iter().all(usable) && !another_inbox).then(|| parts.iter().collect())
}

/// Copies a folder's uidlist and keywords into its control dir in the view, as the user's.
fn copy_control(from: &Dir, to: &Dir, owner: Owner) -> Result<(), RepoError> {
    for name in CONTROL_FILES {
        let Some(data) = from.read_small(name, control_file_limit(name), "control file")? else { continue };
        to.replace_file(name, 0o600, Some(owner), |f| f.write_all(&data))?;
    }
    Ok(())
}

/// Links the message files of the folder `folder` of snapshot `snap` (regular files only) into
/// `rel` under `staged`, making its directories; returns each directory it made.
fn link_messages(snap: &Dir, folder: &str, staged: &Dir, rel: &Path) -> Result<Vec<Dir>, RepoError> {
    let mut made = Vec::new();
    let mut at = staged.try_clone()?;
    for part in rel.iter() {
        let (d, created) = at.ensure_dir(part, 0o700, None)?;
        if created {
            made.push(d.try_clone()?);
        }
        at = d;
    }
    for sub in MESSAGE_DIRS {
        let to = at.ensure_dir(sub, 0o700, None)?.0;
        let message_dir = Subdir::ALL.into_iter().find(|s| s.as_str() == sub);
        if let Some(src) = message_dir.and_then(|s| store::message_dir(snap, folder, s).ok().flatten()) {
            for e in src.list()?.into_iter().filter(|e| e.kind == Kind::File) {
                match src.link(&e.name, &to, &e.name) {
                    Err(e) if e.is_not_found() => {} // removed meanwhile (its snapshot pruned)
                    r => r?,
                }
            }
        }
        made.push(to);
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_become_nested_directories() {
        let p = |path, layout| view_path(path, layout).map(|p| p.display().to_string());
        assert_eq!(p("", Layout::MaildirPlusPlus).as_deref(), Some("INBOX"));
        assert_eq!(p(".Archive.2024", Layout::MaildirPlusPlus).as_deref(), Some("Archive/2024"));
        assert_eq!(p(".INBOX.sub", Layout::MaildirPlusPlus).as_deref(), Some("INBOX/sub"));
        assert_eq!(p("Archive/2024", Layout::Fs).as_deref(), Some("Archive/2024"));
        // Names the view cannot hold: another INBOX, an empty part, a message directory.
        for (path, layout) in [(".INBOX", Layout::MaildirPlusPlus), (".a..b", Layout::MaildirPlusPlus), ("a/cur", Layout::Fs), (".new", Layout::MaildirPlusPlus)] {
            assert_eq!(p(path, layout), None, "{path}");
        }
    }

    #[test]
    fn only_the_mail_part_of_a_view_is_shown_mail() {
        assert!(shows(Path::new("/srv/backup/alice/imap-view/mail/2026-01-01T000000Z/INBOX")));
        assert!(!shows(Path::new("/srv/backup/alice/imap-view/control/x")));
        assert!(!shows(Path::new("/srv/mail/alice/Maildir/.mail")));
    }
}
