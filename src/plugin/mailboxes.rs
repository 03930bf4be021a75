//! A user's mailboxes as Dovecot lists them, locked with Dovecot's own uidlist lock: the
//! engine's `Mailboxes`, carried out through the shim's callbacks.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{ffi, opt_str, row, report_error};
use crate::engine::reconcile::{lock_round, NEXT_LOCK_WAIT};
use crate::engine::{BackupError, BackupOptions, Busy, HeldLocks, Mailboxes};
use crate::maildir::folders::{folder_name, is_maildir};
use crate::maildir::{Folder, MailLocation, Maildir};
use crate::repo::imap_view;
use crate::sysexits;

/// Dovecot's mailboxes of one user, locked with Dovecot's own lock through the shim. Listed again
/// through the shim each time the engine asks, like the CLI walks the Maildir again: a folder created
/// or renamed during the backup is found, and locked in its turn.
pub(super) struct DovecotMailboxes<'j> {
    job: &'j ffi::mb_user_job,
    loc: MailLocation,
    state: RefCell<Listed>,
}

#[derive(Default)]
struct Listed {
    folders: Vec<Folder>,
    /// Index into the shim's folder array for each of `folders`.
    index: Vec<u32>,
    /// Path in the backup → Dovecot's name (for the output rows).
    vnames: HashMap<String, String>,
    /// Shim indexes already reported as unusable.
    reported: HashSet<u32>,
}

impl<'j> DovecotMailboxes<'j> {
    /// The mailboxes the shim listed for `job` at the start, and a sysexits code if one of
    /// them cannot be backed up.
    pub(super) fn new(job: &'j ffi::mb_user_job, loc: MailLocation) -> (DovecotMailboxes<'j>, c_int) {
        let boxes = DovecotMailboxes { job, loc, state: Default::default() };
        let code = boxes.take(raw_folders(job.folders, job.folder_count));
        (boxes, code)
    }

    /// Dovecot's name of the folder at `path` in the backup.
    pub(super) fn vname(&self, path: &str) -> Option<String> {
        self.state.borrow().vnames.get(path).cloned()
    }

    /// Takes the shim's folder array; returns a sysexits code if one was unusable.
    fn take(&self, raw: &[ffi::mb_folder]) -> c_int {
        let mut st = self.state.borrow_mut();
        let mut code = 0;
        st.folders.clear();
        st.index.clear();
        for (i, f) in raw.iter().enumerate() {
            // SAFETY: the shim's strings live for the whole run.
            let (name, mail_dir, control_dir, index_dir) =
                unsafe { (opt_str(f.vname).unwrap_or_default(), opt_str(f.mail_dir), opt_str(f.control_dir), opt_str(f.index_dir)) };
            let Some(mail_dir) = mail_dir.map(PathBuf::from) else { continue };
            if imap_view::shows(&mail_dir) {
                continue; // the user's snapshots, shown to them by Dovecot: not mail to back up
            }
            let loc = &self.loc;
            let Ok(rel) = mail_dir.strip_prefix(&loc.root).map(Path::to_path_buf) else {
                if st.reported.insert(i as u32) {
                    let why = format!("its directory {} is outside the user's Maildir {}; not backed up", mail_dir.display(), loc.root.display());
                    report_error(self.job, &format!("mailbox {name}: {why}"));
                    row(self.job, &name, 0, 0, 0.0, &why);
                }
                code = sysexits::EX_DATAERR;
                continue;
            };
            // Dovecot's own control and index dirs, relative to their roots (we reach them only
            // through those roots' descriptors).
            let below = |dir: Option<String>, root: Option<&PathBuf>, default: PathBuf| match (dir, root) {
                (Some(d), Some(r)) => Path::new(&d).strip_prefix(r).map(Path::to_path_buf).unwrap_or(default),
                _ => default,
            };
            let control_rel = below(control_dir, Some(loc.control.as_ref().unwrap_or(&loc.root)), loc.control_rel(&rel));
            let index_rel = below(index_dir, Some(loc.index.as_ref().unwrap_or(&loc.root)), loc.index_rel(&rel));
            st.vnames.insert(rel.to_string_lossy().into_owned(), name);
            st.folders.push(Folder { name: folder_name(loc.layout, &rel), control_rel, index_rel, rel });
            st.index.push(i as u32);
        }
        code
    }
}

fn raw_folders<'a>(p: *const ffi::mb_folder, n: u32) -> &'a [ffi::mb_folder] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: the shim passes n valid entries that live for the whole run.
        unsafe { std::slice::from_raw_parts(p, n as usize) }
    }
}

/// How often a busy Dovecot lock is tried again while it is waited for.
const POLL: Duration = Duration::from_millis(1);

struct DovecotLocks<'j> {
    boxes: &'j DovecotMailboxes<'j>,
    held: Vec<u32>,
}

impl DovecotLocks<'_> {
    fn unlock_all(&mut self) {
        if let Some(unlock) = self.boxes.job.unlock {
            for i in self.held.drain(..) {
                // SAFETY: the shim's callback, on the thread that called us.
                unsafe { unlock(self.boxes.job.ctx, i) }
            }
        }
    }
}

impl HeldLocks for DovecotLocks<'_> {
    fn touch(&self) {
        if let Some(touch) = self.boxes.job.touch {
            for &i in &self.held {
                // SAFETY: as above.
                unsafe { touch(self.boxes.job.ctx, i) }
            }
        }
    }
    fn add(&mut self, md: &Maildir, more: &[Folder], _opts: &BackupOptions, _warnings: &mut Vec<String>)
        -> Result<Result<(), Busy>, BackupError> {
        for (f, i) in self.boxes.indexes(more) {
            match self.boxes.try_lock(md, f, i, NEXT_LOCK_WAIT)? {
                Ok(true) => self.held.push(i),
                Ok(false) => {}
                Err(why) => return Ok(Err(Busy { folder: f.name.clone(), why })),
            }
        }
        Ok(Ok(()))
    }
    fn release(mut self: Box<Self>, _warnings: &mut Vec<String>) {
        self.unlock_all();
    }
}

impl Drop for DovecotLocks<'_> {
    fn drop(&mut self) {
        self.unlock_all();
    }
}

/// One lock taken through the shim; dropping it releases it (used while gathering all).
struct OneLock<'j> {
    job: &'j ffi::mb_user_job,
    i: u32,
    held: bool,
}

impl Drop for OneLock<'_> {
    fn drop(&mut self) {
        if let (true, Some(unlock)) = (self.held, self.job.unlock) {
            // SAFETY: as above.
            unsafe { unlock(self.job.ctx, self.i) }
        }
    }
}

/// The folder is (still) there, under the name we know.
fn still_there(md: &Maildir, f: &Folder) -> bool {
    md.root.sub(&f.rel).and_then(|d| is_maildir(&d)).unwrap_or(false)
}

impl Mailboxes for DovecotMailboxes<'_> {
    fn folders(&self, md: &Maildir, _warnings: &mut Vec<String>) -> Result<Vec<Folder>, BackupError> {
        if let Some(relist) = self.job.relist {
            let (mut p, mut n) = (std::ptr::null(), 0u32);
            // SAFETY: the shim's callback, on the thread that called us.
            if unsafe { relist(self.job.ctx, &mut p, &mut n) } == 0 {
                self.take(raw_folders(p, n));
            }
        }
        // A mailbox renamed or deleted since Dovecot listed it is gone.
        Ok(self.state.borrow().folders.iter().filter(|f| still_there(md, f)).cloned().collect())
    }

    fn lock_all<'a>(&'a self, md: &Maildir, folders: &[Folder], _opts: &BackupOptions, first_wait: Duration, _warnings: &mut Vec<String>)
        -> Result<Result<(Box<dyn HeldLocks + 'a>, Instant), Busy>, BackupError> {
        let order = self.indexes(folders);
        if let Some(refresh) = self.job.refresh {
            // Dovecot reads what changed in a uidlist when it takes the lock: read it now,
            // before any lock is held.
            for &(_, i) in &order {
                // SAFETY: the shim's callback, on the thread that called us.
                unsafe { refresh(self.job.ctx, i) }
            }
        }
        let round = lock_round(order.len(), first_wait, |n, wait| {
            let (f, i) = order[n];
            Ok(self.try_lock(md, f, i, wait)?.map(|held| OneLock { job: self.job, i, held }))
        })?;
        let (locks, since) = match round {
            Ok(taken) => taken,
            Err((n, why)) => return Ok(Err(Busy { folder: order[n].0.name.clone(), why })),
        };
        let held = locks.iter().filter(|l| l.held).map(|l| l.i).collect();
        std::mem::forget(locks); // ownership passes to DovecotLocks, which unlocks them
        Ok(Ok((Box::new(DovecotLocks { boxes: self, held }), since)))
    }
}

impl DovecotMailboxes<'_> {
    /// Each of `folders` with its index in the shim's array (folders the shim no longer lists
    /// are left out).
    fn indexes<'f>(&self, folders: &'f [Folder]) -> Vec<(&'f Folder, u32)> {
        let st = self.state.borrow();
        folders.iter().filter_map(|f| st.folders.iter().position(|g| g == f).map(|p| (f, st.index[p]))).collect()
    }

    /// Dovecot's uidlist lock of folder `f` (shim index `i`), polled every `POLL` for up to
    /// `wait` (Dovecot's try-lock never waits): Ok(true) held, Ok(false) the folder is gone
    /// (nothing left to protect; the engine sees it gone), Err(why) busy.
    fn try_lock(&self, md: &Maildir, f: &Folder, i: u32, wait: Duration) -> Result<Result<bool, String>, BackupError> {
        let try_lock = self.job.try_lock.ok_or_else(|| BackupError::Io {
            op: "lock",
            path: md.loc.root.clone(),
            source: std::io::Error::other("the shim lends no uidlist lock"),
        })?;
        let until = Instant::now() + wait;
        loop {
            // SAFETY: the shim's callback, on the thread that called us.
            match unsafe { try_lock(self.job.ctx, i) } {
                1 => return Ok(Ok(true)),
                _ if !still_there(md, f) => return Ok(Ok(false)),
                0 if Instant::now() < until => std::thread::sleep(until.saturating_duration_since(Instant::now()).min(POLL)),
                0 => return Ok(Err(format!("Dovecot holds the uidlist lock of {}", f.name))),
                _ => {
                    return Err(BackupError::Io {
                        op: "lock (Dovecot maildir_uidlist_try_lock)",
                        path: md.loc.control.as_ref().unwrap_or(&md.loc.root).join(&f.control_rel),
                        source: std::io::Error::other("see Dovecot's error log line above"),
                    })
                }
            }
        }
    }
}

