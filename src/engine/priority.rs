//! While the uidlist locks are held, every IMAP session of the user waits for us; on a busy
//! machine, a backup descheduled then makes them wait longer. So the threads that work under
//! the locks run at a raised priority for that time only, where that is allowed (as root, or
//! with CAP_SYS_NICE); elsewhere nothing changes.

use rustix::process::{getpriority_process, setpriority_process, Pid};
use rustix::thread::gettid;

/// The nice value of the threads while the locks are held (unless already lower).
const UNDER_LOCKS: i32 = -10;

/// Raised priority for this thread and the copy pool's; each gets its own nice value back when
/// dropped.
pub(crate) struct Raised {
    threads: Vec<(Pid, i32)>,
}

impl Raised {
    pub(crate) fn new(pool: &rayon::ThreadPool) -> Raised {
        let mut tids = vec![gettid()];
        tids.extend(pool.broadcast(|_| gettid()));
        let threads = tids
            .into_iter()
            .filter_map(|tid| {
                let before = getpriority_process(Some(tid)).ok()?;
                (before > UNDER_LOCKS && setpriority_process(Some(tid), UNDER_LOCKS).is_ok()).then_some((tid, before))
            })
            .collect();
        Raised { threads }
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        for &(tid, before) in &self.threads {
            // Lowering a priority is always allowed.
            let _ = setpriority_process(Some(tid), before);
        }
    }
}

#[cfg(test)]
mod tests;
