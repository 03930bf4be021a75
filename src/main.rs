//! `maildir-backup`: the command-line front end. Parsing and printing only; the work is in
//! the `maildir_backup` library.

mod cli;

use clap::Parser;

/// A backup keeps a file open per control file until the reconcile: allow as many as the
/// hard limit does (the default soft limit of 1024 is low for users with many folders).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// glibc malloc tuned for a process whose big buffers (a folder's tables and vectors) come and
/// go: one arena for all threads, as glibc gives each worker thread an arena of its own whose
/// freed memory the others cannot reuse (snapshot of 100,000 messages: peak RSS 88 MiB instead
/// of 108); and blocks of 128 KiB or more always mapped on their own and given back when freed.
/// glibc otherwise raises that threshold after the first big free, and later big blocks come
/// from the heap, where what is freed around them stays held (1,000,000 messages: first
/// snapshot 64 -> 46 MiB, snapshot after changes 76 -> 59 MiB, same speed). The doveadm plugin
/// leaves doveadm's allocator alone.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes tunables; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

fn main() {
    tune_malloc();
    raise_fd_limit();
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // `check` is a monitoring plugin: there, bad usage is UNKNOWN (3), as Nagios expects.
            let is_check = std::env::args().nth(1).as_deref() == Some("check");
            let code = match (e.use_stderr(), is_check) {
                (false, _) => 0,
                (true, true) => maildir_backup::check::State::Unknown.exit_code(),
                (true, false) => maildir_backup::sysexits::EX_USAGE,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    std::process::exit(cli::run(args));
}
