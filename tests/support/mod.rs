//! Shared integration-test harness: a private, real Dovecot (2.3 on this host, 2.4 in a Debian 13 root) on
//! 127.0.0.1, a small IMAP client, the plugin in a real doveadm, and one way to run commands.
//!
//! Every `tests/*.rs` file does `mod support;` and uses a subset of this, hence `dead_code` is allowed.
//!
//! Environment:
//! - `MB_TEST_TMP`: parent directory for test directories (default `/tmp`). It must be traversable by the
//!   `vmail` user (Dovecot's mail processes run as vmail), and short: Dovecot puts unix sockets under it.
//! - `MB_KEEP_TEST_DIRS`: when set, instance directories are kept (and their path printed) instead of removed.
//! - `MB_TRIXIE_ROOT`, `MB_PLUGIN_SO`, `MB_PLUGIN24_SO`, `MB_SETTINGS24_SO`: see [`trixie`] and [`plugin`].
//!
//! Requirements: running as root, Dovecot 2.3 installed (`dovecot`, `doveadm`, `/usr/lib/dovecot/dovecot-lda`),
//! `useradd` (the `vmail` system user is created on first use if missing); for 2.4, debootstrap and a Debian
//! mirror the first time (`scripts/trixie-root.sh`).
#![allow(dead_code)]

pub mod churn;
pub mod cluster;
pub mod dovecot;
pub mod dovecot_common;
pub mod hostile;
pub mod imap;
pub mod plugin;
pub mod procs;
pub mod promtext;
pub mod readback;
pub mod repo_helpers;
pub mod run;
pub mod trixie;

#[allow(unused_imports)]
pub use dovecot::{Dovecot, DovecotOptions, Instance, Release, LDA_BIN, PASSWORD, V23};
#[allow(unused_imports)]
pub use imap::{imap_quote, is_timeout, mutf7_encode, Imap};
#[allow(unused_imports)]
pub use dovecot_common::{
    chown_vmail_recursive, ensure_vmail, expunge, fake_uidlist_lock, free_port, message, normalize_flags, populate,
    populate_flags, tempdir, FakeLock,
};
#[allow(unused_imports)]
pub use run::{
    cli, cli_bin, cli_env, cli_ok, Run, BIN, EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_NOPERM,
    EX_NOUSER, EX_OK, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE,
};
#[allow(unused_imports)]
pub use trixie::{host_to_root, root_path, Dovecot24, V24};
