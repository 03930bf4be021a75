//! The doveadm plugin's Rust side: FFI only. The C shim (`c-shim/`) registers the commands,
//! reads their parameters and the user's settings, finds the user's mailboxes through
//! Dovecot and lends us Dovecot's own uidlist lock; this module turns one user's call into a
//! job (`crate::job`), the same the CLI runs, and the result into output rows, log lines and
//! an exit code.

mod mailboxes;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::engine::{BackupOptions, BackupReport, MessageFiles, NoProgress};
use crate::job::{self, Destination, HandOff, Metrics, RestorePlan, SnapshotRef};
use crate::maildir::{Layout, MailLocation};
use crate::repo::status::LastRun;
use crate::restore::{RestoreReport, RestoreRequest};
use crate::sysexits::{self, ExitCode};
use crate::warnings::{self, Sink};
use mailboxes::DovecotMailboxes;

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
/// `/`), so a relative destination is resolved against this, as the caller meant. None in
/// doveadm server (`-S`, a proxy, the HTTP API): its directory is Dovecot's base_dir, not the
/// caller's, so a relative destination is refused there.
static START_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

fn start_dir() -> Option<&'static std::path::Path> {
    START_DIR.get().and_then(|d| d.as_deref())
}

#[no_mangle]
pub extern "C" fn doveadm_maildir_backup_plugin_init(_module: *mut c_void) {
    let in_server = std::env::current_exe().is_ok_and(|p| p.file_name().is_some_and(|n| n == "doveadm-server"));
    let _ = START_DIR.set(std::env::current_dir().ok().filter(|_| !in_server));
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

fn c_string(s: &str) -> Option<CString> {
    CString::new(s.replace('\0', " ")).ok()
}

/// Dovecot's error log through the shim (`maildir-backup: user U: ...`).
struct DovecotLog {
    ctx: *mut c_void,
    error: Option<unsafe extern "C" fn(*mut c_void, *const c_char)>,
}

impl DovecotLog {
    fn error(&self, msg: &str) {
        if let (Some(error), Some(c)) = (self.error, c_string(msg)) {
            // SAFETY: the shim's callback with a valid C string, on doveadm's thread.
            unsafe { error(self.ctx, c.as_ptr()) }
        }
    }

    /// Logs `e` (after any warnings kept meanwhile) and gives its exit code.
    fn failed(&self, e: &job::JobError) -> c_int {
        warnings::emit_deferred(self);
        self.error(&e.to_string());
        e.exit_code()
    }
}

impl Sink for DovecotLog {
    fn warn(&self, message: &str) {
        self.error(&format!("warning: {message}"));
    }
}

fn report_error(job: &ffi::mb_user_job, msg: &str) {
    DovecotLog { ctx: job.ctx, error: job.error }.error(msg);
}

fn row(job: &ffi::mb_user_job, mailbox: &str, messages: u64, bytes: u64, lock_ms: f64, status: &str) {
    if let (Some(row), Some(m), Some(s)) = (job.row, c_string(mailbox), c_string(status)) {
        // SAFETY: as above.
        unsafe { row(job.ctx, m.as_ptr(), messages, bytes, lock_ms, s.as_ptr()) }
    }
}

/// Runs `body`, turning a panic into an internal error (logged) rather than unwinding into C.
fn guarded(log: &DovecotLog, what: &str, body: impl FnOnce() -> c_int + std::panic::UnwindSafe) -> c_int {
    std::panic::catch_unwind(body).unwrap_or_else(|_| {
        log.error(&format!("internal error (panic) in maildir-backup {what}"));
        sysexits::EX_SOFTWARE
    })
}

fn location_from(root: *const c_char, control: *const c_char, index: *const c_char, layout: *const c_char) -> MailLocation {
    // SAFETY: the shim's strings live for the call.
    let (root, control, index, layout) = unsafe { (opt_str(root).unwrap_or_default(), opt_str(control), opt_str(index), opt_str(layout)) };
    MailLocation {
        root: PathBuf::from(root),
        control: control.map(PathBuf::from),
        index: index.map(PathBuf::from),
        layout: layout.as_deref().and_then(Layout::parse).unwrap_or(Layout::MaildirPlusPlus),
    }
}

/// Backs up one user for `doveadm maildir-backup`; returns a sysexits code.
#[no_mangle]
pub extern "C" fn mb_backup_user(job: *const ffi::mb_user_job) -> c_int {
    // SAFETY: the shim passes NULL or a job that lives for this call.
    let Some(job) = (unsafe { job.as_ref() }) else { return sysexits::EX_SOFTWARE };
    let log = DovecotLog { ctx: job.ctx, error: job.error };
    guarded(&log, "backup; nothing was published", || backup_user(job, &log))
}

fn backup_options(job: &ffi::mb_user_job) -> BackupOptions {
    let mut opts = BackupOptions::default();
    if job.lock_timeout_secs >= 0.0 {
        opts.lock.timeout = Duration::from_secs_f64(job.lock_timeout_secs);
    }
    if job.jobs > 0 {
        opts.jobs = job.jobs as usize;
    }
    opts.with_indexes = job.with_indexes != 0;
    if job.link != 0 || !job.hand_off.is_null() {
        opts.messages = MessageFiles::Link { checksums: job.checksum != 0 };
    }
    opts
}

fn backup_user(job: &ffi::mb_user_job, log: &DovecotLog) -> c_int {
    // SAFETY: the shim's strings live for this call.
    let (user, template, hand_off) = unsafe { (opt_str(job.username).unwrap_or_default(), opt_str(job.dest_template), opt_str(job.hand_off)) };
    let Some(template) = template else {
        log.error(match hand_off {
            Some(_) => "no stage: give one with -s or set maildir_backup_stage",
            None => "no destination: give one on the command line or set maildir_backup_dest",
        });
        return sysexits::EX_USAGE;
    };
    let location = location_from(job.root_dir, job.control_root, job.index_root, job.layout);
    let (mailboxes, code) = DovecotMailboxes::new(job, location.clone());
    let result = match hand_off {
        Some(command) => hand_off_user(job, &user, &template, command, &location, &mailboxes),
        None => Destination::from_template(&template, &user, start_dir()).and_then(|mut dest| {
            if let Destination::Repo { options, .. } = &mut dest {
                options.imap_view = job.imap_view != 0;
            }
            // SAFETY: as above.
            let metrics = unsafe { opt_str(job.metrics_file) }.map(|file| Metrics { file: PathBuf::from(file), user: user.clone() });
            job::run_backup(&location, &mailboxes, &dest, &backup_options(job), &NoProgress, metrics.as_ref())
        }),
    };
    match result {
        Ok(report) => {
            print_backup(job, log, &report, &mailboxes);
            code
        }
        Err(e) => log.failed(&e),
    }
}

/// `doveadm maildir-backup-hand-off`: a link snapshot at the user's stage, handed to the admin's
/// shell command (its output goes to doveadm's standard error, which is not its table).
fn hand_off_user(job: &ffi::mb_user_job, user: &str, stage: &str, command: String, location: &MailLocation, mailboxes: &DovecotMailboxes) -> Result<BackupReport, job::JobError> {
    let h = HandOff {
        stage: job::user_path(stage, user, start_dir())?,
        user: user.to_string(),
        command: vec!["/bin/sh".into(), "-c".into(), command.into()],
        keep_stage: job.keep_stage != 0,
        stdout_to_stderr: true,
    };
    job::run_hand_off(location, mailboxes, &h, &backup_options(job), &NoProgress)
}

/// A row per folder, named as Dovecot names it; the warnings to the log.
fn print_backup(job: &ffi::mb_user_job, log: &DovecotLog, report: &BackupReport, mailboxes: &DovecotMailboxes) {
    warnings::emit(log, &report.warnings);
    for f in &report.folder_details {
        let shown = mailboxes.vname(&f.path).unwrap_or_else(|| f.name.clone());
        row(job, &shown, f.messages, f.bytes, report.lock_hold_ms, "ok");
    }
}

/// Reports one user's last run into a repository for `doveadm maildir-backup-status`: a row,
/// and 0, whether that run succeeded or not (its outcome is in the row); a sysexits code if the
/// record cannot be read.
#[no_mangle]
pub extern "C" fn mb_status_user(job: *const ffi::mb_status_job) -> c_int {
    // SAFETY: the shim passes NULL or a job that lives for this call.
    let Some(job) = (unsafe { job.as_ref() }) else { return sysexits::EX_SOFTWARE };
    let log = DovecotLog { ctx: job.ctx, error: job.error };
    guarded(&log, "status", || {
        // SAFETY: the shim's strings live for this call.
        let (user, template) = unsafe { (opt_str(job.username).unwrap_or_default(), opt_str(job.repo_template).unwrap_or_default()) };
        match job::last_run(&template, &user, start_dir()) {
            Ok(run) => {
                status_row(job, run.as_ref());
                sysexits::EX_OK
            }
            Err(e) => log.failed(&e),
        }
    })
}

fn status_row(job: &ffi::mb_status_job, run: Option<&LastRun>) {
    let time = |t: i64| chrono::DateTime::from_timestamp(t, 0).map_or("-".to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
    let (result, started, finished, exit, snapshot, error) = match run {
        None => ("none", "-".to_string(), "-".to_string(), 0, "-".to_string(), "-".to_string()),
        Some(r) => (
            if r.ok { "ok" } else { "failed" },
            time(r.started),
            time(r.finished),
            r.exit_code,
            r.snapshot.clone().unwrap_or_else(|| "-".into()),
            r.error.clone().unwrap_or_else(|| "-".into()),
        ),
    };
    let cells = [result, started.as_str(), finished.as_str(), snapshot.as_str(), error.as_str()].map(c_string);
    if let (Some(row), [Some(result), Some(started), Some(finished), Some(snapshot), Some(error)]) = (job.row, cells) {
        // SAFETY: the shim's callback with valid C strings.
        unsafe { row(job.ctx, result.as_ptr(), started.as_ptr(), finished.as_ptr(), exit, snapshot.as_ptr(), error.as_ptr()) }
    }
}

/// Restores into one user for `doveadm maildir-backup-restore`; returns a sysexits code.
#[no_mangle]
pub extern "C" fn mb_restore_user(job: *const ffi::mb_restore_job) -> c_int {
    // SAFETY: the shim passes NULL or a job that lives for this call.
    let Some(job) = (unsafe { job.as_ref() }) else { return sysexits::EX_SOFTWARE };
    let log = DovecotLog { ctx: job.ctx, error: job.error };
    guarded(&log, "restore", || restore_user(job, &log))
}

fn restore_plan(job: &ffi::mb_restore_job) -> Result<RestorePlan, job::JobError> {
    // SAFETY: the shim's strings and arrays live for this call.
    let (user, template, folders, messages, uids) = unsafe {
        (
            opt_str(job.username).unwrap_or_default(),
            opt_str(job.snapshot_template).unwrap_or_default(),
            str_array(job.folders),
            str_array(job.messages),
            str_array(job.uids),
        )
    };
    Ok(RestorePlan {
        snapshot: SnapshotRef::from_template(&template, &user, start_dir())?,
        target: location_from(job.root_dir, job.control_root, job.index_root, job.layout),
        request: RestoreRequest { folders, messages, uids, dry_run: job.dry_run != 0, ..Default::default() },
    })
}

fn restore_user(job: &ffi::mb_restore_job, log: &DovecotLog) -> c_int {
    let result = restore_plan(job).and_then(|plan| Ok((job::run_restore(&plan)?, plan.request.dry_run)));
    match result {
        Ok((report, dry_run)) => {
            warnings::emit(log, &report.warnings);
            restore_row(job, &report, if dry_run { "dry run" } else { "ok" });
            sysexits::EX_OK
        }
        Err(e) => {
            let code = log.failed(&e);
            restore_row(job, &RestoreReport { mode: "-".into(), ..Default::default() }, "failed");
            code
        }
    }
}

fn restore_row(job: &ffi::mb_restore_job, r: &RestoreReport, status: &str) {
    if let (Some(row), Some(m), Some(s)) = (job.row, c_string(&r.mode), c_string(status)) {
        // SAFETY: the shim's callback with valid C strings.
        unsafe { row(job.ctx, m.as_ptr(), r.restored, r.skipped, s.as_ptr()) }
    }
}
