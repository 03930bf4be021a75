//! Warnings: what a run met and went past without failing (a symlink in a Maildir, a lock
//! someone broke). Most travel back in the reports; the few that arise where no caller can
//! take them (a lock released by a destructor, the lock refresher's thread) wait here until
//! the job layer hands them all to the front end's [`Sink`]: stderr for the CLI, Dovecot's
//! log for the plugin, whose logging may only be called from doveadm's own thread.

use std::sync::Mutex;

/// Where a front end shows warnings.
pub trait Sink {
    fn warn(&self, message: &str);
}

/// Warnings with nobody to return to, oldest first.
static DEFERRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// A lock refresher that keeps failing must not grow this without end.
const DEFERRED_LIMIT: usize = 1000;

/// Keeps `message` for the next [`emit_deferred`].
pub fn defer(message: String) {
    let mut q = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
    if q.len() < DEFERRED_LIMIT {
        q.push(message);
    }
}

/// Hands the kept warnings to `sink`, on the caller's thread.
pub fn emit_deferred(sink: &dyn Sink) {
    let taken = std::mem::take(&mut *DEFERRED.lock().unwrap_or_else(|p| p.into_inner()));
    for w in taken {
        sink.warn(&w);
    }
}

/// `warnings` and then the kept ones, to `sink`.
pub fn emit(sink: &dyn Sink, warnings: &[String]) {
    for w in warnings {
        sink.warn(w);
    }
    emit_deferred(sink);
}
