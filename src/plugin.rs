//! The doveadm plugin's Rust side: FFI only. The C shim (`c-shim/`) finds a user's mailboxes
//! through Dovecot and lends us Dovecot's own uidlist lock; this file turns that into a call
//! of the same core the CLI uses, and the result back into output rows and an exit code.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::engine::{self, BackupError, BackupOptions, HeldLocks, Mailboxes, NoProgress};
use crate::fsx::Dir;
use crate::maildir::folders::is_maildir;
use crate::maildir::{Folder, Layout, MailLocation, Maildir};
use crate::sysexits::{self, ExitCode};

#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/shim_bindings.rs"));
}

/// `doveadm_<name>_plugin_version`: a `const char *` holding the ABI string of the Dovecot
/// whose headers the shim was compiled against, so another release refuses the plugin.
#[repr(transparent)]
pub struct AbiVersion(*const c_char);
// SAFETY: points at an immutable, 'static, NUL-terminated string.
unsafe impl Sync for AbiVersion {}

#[no_mangle]
pub static doveadm_maildir_backup_plugin_version: AbiVersion =
    AbiVersion(concat!(env!("MB_DOVECOT_ABI_VERSION"), "\0").as_ptr() as *const c_char);

/// doveadm's working directory when it loaded us: for `-u` it later changes to the user's home (or
/// `/`), so a relative destination is resolved against this, as the caller meant.
static START_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

#[no_mangle]
pub extern "C" fn doveadm_maildir_backup_plugin_init(_module: *mut c_void) {
    let _ = START_DIR.set(std::env::current_dir().ok());
    // SAFETY: called once by doveadm's module loader on its main thread.
    unsafe { ffi::mb_shim_init() }
}

#[no_mangle]
pub extern "C" fn doveadm_maildir_backup_plugin_deinit() {
    // SAFETY: as above.
    unsafe { ffi::mb_shim_deinit() }
}

/// # Safety
/// `p` is NULL or a valid NUL-terminated string for the duration of the call.
unsafe fn opt_str(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}

/// Dovecot's mailboxes of one user, locked with Dovecot's own lock through the shim. Listed again
/// through the shim each time the engine asks, like the CLI walks the Maildir again: a folder created
/// or renamed during the backup is found, and the engine starts its reconcile over.
struct DovecotMailboxes<'j> {
    job: &'j ffi::mb_user_job,
    loc: MailLocation,
    state: std::cell::RefCell<Listed>,
}

#[derive(Default)]
struct Listed {
    folders: Vec<Folder>,
    /// Index into the shim's folder array for each of `folders`.
    index: Vec<u32>,
    /// Path in the backup → Dovecot's name (for the output rows).
    vnames: std::collections::HashMap<String, String>,
    /// Shim indexes already reported as unusable.
    reported: std::collections::HashSet<u32>,
}

impl DovecotMailboxes<'_> {
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
            st.folders.push(Folder { name: crate::maildir::folders::folder_name(loc.layout, &rel), control_rel, index_rel, rel });
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
        -> Result<Result<(), String>, BackupError> {
        for (f, i) in self.boxes.indexes(more) {
            match self.boxes.try_lock(md, f, i, engine::reconcile::NEXT_LOCK_WAIT)? {
                Ok(true) => self.held.push(i),
                Ok(false) => {}
                Err(why) => return Ok(Err(why)),
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

    fn lock_all<'a>(&'a self, md: &Maildir, folders: &[Folder], opts: &BackupOptions, attempts: &mut u32, _warnings: &mut Vec<String>)
        -> Result<(Box<dyn HeldLocks + 'a>, Instant), BackupError> {
        let order = self.indexes(folders);
        let (locks, since) = engine::reconcile::lock_all_or_none(order.len(), opts.lock.timeout, attempts, |n, wait| {
            let (f, i) = order[n];
            Ok(self.try_lock(md, f, i, wait)?.map(|held| OneLock { job: self.job, i, held }))
        })?;
        let held = locks.iter().filter(|l| l.held).map(|l| l.i).collect();
        std::mem::forget(locks); // ownership passes to DovecotLocks, which unlocks them
        Ok((Box::new(DovecotLocks { boxes: self, held }), since))
    }
}

impl DovecotMailboxes<'_> {
    /// Each of `folders` with its index in the shim's array (folders the shim no longer lists
    /// are left out).
    fn indexes<'f>(&self, folders: &'f [Folder]) -> Vec<(&'f Folder, u32)> {
        let st = self.state.borrow();
        folders.iter().filter_map(|f| st.folders.iter().position(|g| g == f).map(|p| (f, st.index[p]))).collect()
    }

    /// Dovecot's uidlist lock of folder `f` (shim index `i`), polled for up to `wait` (Dovecot's
    /// try-lock never waits): Ok(true) held, Ok(false) the folder is gone (nothing left to
    /// protect; the engine sees it gone), Err(why) busy.
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
                0 if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
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

fn report_error(job: &ffi::mb_user_job, msg: &str) {
    if let (Some(error), Ok(c)) = (job.error, CString::new(msg.replace('\0', " "))) {
        // SAFETY: the shim's callback with a valid C string.
        unsafe { error(job.ctx, c.as_ptr()) }
    }
}

fn row(job: &ffi::mb_user_job, mailbox: &str, messages: u64, bytes: u64, lock_ms: f64, status: &str) {
    if let (Some(row), Ok(m), Ok(s)) = (job.row, CString::new(mailbox), CString::new(status)) {
        // SAFETY: as above.
        unsafe { row(job.ctx, m.as_ptr(), messages, bytes, lock_ms, s.as_ptr()) }
    }
}

/// Backs up one user for `doveadm maildir-backup`; returns a sysexits code.
#[no_mangle]
pub extern "C" fn mb_backup_user(job: *const ffi::mb_user_job) -> c_int {
    if job.is_null() {
        return sysexits::EX_SOFTWARE;
    }
    // SAFETY: the shim passes a job that lives for this call.
    let job = unsafe { &*job };
    match std::panic::catch_unwind(|| backup_user(job)) {
        Ok(code) => code,
        Err(_) => {
            report_error(job, "internal error (panic) in maildir-backup; nothing was published");
            sysexits::EX_SOFTWARE
        }
    }
}

fn backup_user(job: &ffi::mb_user_job) -> c_int {
    // SAFETY: the shim's strings live for this call.
    let (user, template, root, control, index, layout) = unsafe {
        (
            opt_str(job.username).unwrap_or_default(),
            opt_str(job.dest_template),
            opt_str(job.root_dir).unwrap_or_default(),
            opt_str(job.control_root),
            opt_str(job.index_root),
            opt_str(job.layout).unwrap_or_default(),
        )
    };
    let Some(template) = template else {
        report_error(job, "no destination: give one on the command line or set maildir_backup_dest");
        return sysexits::EX_USAGE;
    };
    // "repo:REPO" writes a dated snapshot into REPO/<user>/ instead of a plain backup.
    let (repo_mode, template) = match template.strip_prefix("repo:") {
        Some(rest) => (true, rest.to_string()),
        None => (false, template),
    };
    let dest = match crate::template::expand(&template, &user) {
        Ok(d) => PathBuf::from(d),
        Err(e) => {
            report_error(job, &e.to_string());
            return sysexits::EX_USAGE;
        }
    };
    let dest = if dest.is_relative() {
        match START_DIR.get().cloned().flatten() {
            Some(dir) => dir.join(dest),
            None => {
                report_error(job, &format!("relative destination {} but doveadm's working directory is unknown; give an absolute path", dest.display()));
                return sysexits::EX_USAGE;
            }
        }
    } else {
        dest
    };
    let location = location_from(&root, control, index, &layout);

    let mailboxes = DovecotMailboxes { job, loc: location.clone(), state: Default::default() };
    let code = mailboxes.take(raw_folders(job.folders, job.folder_count));

    let mut opts = BackupOptions::default();
    if job.lock_timeout_secs >= 0.0 {
        opts.lock.timeout = Duration::from_secs_f64(job.lock_timeout_secs);
    }
    if job.jobs > 0 {
        opts.jobs = job.jobs as usize;
    }
    opts.with_indexes = job.with_indexes != 0;

    let result = if repo_mode {
        crate::repo::snapshot(&location, &mailboxes, &dest, &user, &opts, false, &NoProgress).map_err(|e| (e.to_string(), e.exit_code()))
    } else {
        backup_to_path(&location, &mailboxes, &dest, &opts).map_err(|e| (e.to_string(), e.exit_code()))
    };
    match result {
        Ok(report) => {
            for w in &report.warnings {
                report_error(job, &format!("warning: {w}"));
            }
            let st = mailboxes.state.borrow();
            for f in &report.folder_details {
                let shown = st.vnames.get(&f.path).unwrap_or(&f.name);
                row(job, shown, f.messages, f.bytes, report.lock_hold_ms, "ok");
            }
            code
        }
        Err((msg, code)) => {
            report_error(job, &format!("{msg}; nothing was published at {}", dest.display()));
            code
        }
    }
}

/// A plain backup of `location` into the new directory `dest`, whose parent is created if
/// missing (as the mail user, with the mode doveadm's umask leaves).
fn backup_to_path(location: &MailLocation, mailboxes: &DovecotMailboxes, dest: &Path, opts: &BackupOptions) -> Result<engine::BackupReport, BackupError> {
    let md = engine::open_source(location)?;
    // Before creating any directory: never a destination inside the user's Maildir.
    engine::check_outside(&md, dest)?;
    let name = dest.file_name().ok_or_else(|| crate::staging::StagingError::BadDest(dest.to_path_buf()))?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (parent, _) = Dir::open_or_create(parent, 0o700, None)?;
    engine::backup_to(&md, mailboxes, &parent, name, opts, None, &NoProgress)
}

fn location_from(root: &str, control: Option<String>, index: Option<String>, layout: &str) -> MailLocation {
    MailLocation {
        root: PathBuf::from(root),
        control: control.map(PathBuf::from),
        index: index.map(PathBuf::from),
        layout: Layout::parse(layout).unwrap_or(Layout::MaildirPlusPlus),
    }
}

/// # Safety
/// `p` is NULL or a NULL-terminated array of valid C strings.
unsafe fn str_array(mut p: *const *const c_char) -> Vec<String> {
    let mut out = Vec::new();
    if p.is_null() {
        return out;
    }
    while !(*p).is_null() {
        out.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
        p = p.add(1);
    }
    out
}

/// Restores into one user for `doveadm maildir-backup-restore`; returns a sysexits code.
#[no_mangle]
pub extern "C" fn mb_restore_user(job: *const ffi::mb_restore_job) -> c_int {
    if job.is_null() {
        return sysexits::EX_SOFTWARE;
    }
    // SAFETY: the shim passes a job that lives for this call.
    let job = unsafe { &*job };
    let report = |msg: &str| {
        if let (Some(error), Ok(c)) = (job.error, CString::new(msg.replace('\0', " "))) {
            // SAFETY: the shim's callback with a valid C string.
            unsafe { error(job.ctx, c.as_ptr()) }
        }
    };
    let row = |mode: &str, restored: u64, skipped: u64, status: &str| {
        if let (Some(row), Ok(m), Ok(s)) = (job.row, CString::new(mode), CString::new(status)) {
            // SAFETY: as above.
            unsafe { row(job.ctx, m.as_ptr(), restored, skipped, s.as_ptr()) }
        }
    };
    let run = || -> c_int {
        // SAFETY: the shim's strings and arrays live for this call.
        let (user, template, root, control, index, layout, folders, messages, uids) = unsafe {
            (
                opt_str(job.username).unwrap_or_default(),
                opt_str(job.snapshot_template).unwrap_or_default(),
                opt_str(job.root_dir).unwrap_or_default(),
                opt_str(job.control_root),
                opt_str(job.index_root),
                opt_str(job.layout).unwrap_or_default(),
                str_array(job.folders),
                str_array(job.messages),
                str_array(job.uids),
            )
        };
        let snapshot = match template.strip_prefix("repo:") {
            Some(repo) => match crate::template::expand(repo, &user) {
                Ok(r) => match crate::repo::latest_path(&Path::new(&r).join(&user)) {
                    Some(s) => s,
                    None => {
                        report(&format!("no snapshot of {user} in repository {r}"));
                        return sysexits::EX_NOINPUT;
                    }
                },
                Err(e) => {
                    report(&e.to_string());
                    return sysexits::EX_USAGE;
                }
            },
            None => match crate::template::expand(&template, &user) {
                Ok(s) => PathBuf::from(s),
                Err(e) => {
                    report(&e.to_string());
                    return sysexits::EX_USAGE;
                }
            },
        };
        let target = location_from(&root, control, index, &layout);
        let req = crate::restore::RestoreRequest { folders, messages, uids, dry_run: job.dry_run != 0, ..Default::default() };
        match crate::restore::restore(&snapshot, &target, &req) {
            Ok(r) => {
                for w in &r.warnings {
                    report(&format!("warning: {w}"));
                }
                row(&r.mode, r.restored, r.skipped, if req.dry_run { "dry run" } else { "ok" });
                0
            }
            Err(e) => {
                report(&e.to_string());
                row("-", 0, 0, "failed");
                e.exit_code()
            }
        }
    };
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        report("internal error (panic) in maildir-backup restore");
        sysexits::EX_SOFTWARE
    })
}
