//! Arguments more than one subcommand takes, and their parsers.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use maildir_backup::dotlock::LockSettings;
use maildir_backup::maildir::{Layout, MailLocation};

use super::Failure;

/// Parses seconds, fractions allowed ("0.5", "120").
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("'{s}' is not a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(v).map_err(|_| format!("'{s}' seconds is too large"))
}

/// Parses a duration such as 26h, 2days, 90m or 30s.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration such as 26h, 2days or 90m: {e}"))
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::parse(s).ok_or_else(|| format!("unknown layout '{s}' (expected maildir++ or fs)"))
}

/// Where the mail is: a 2.3 mail_location / path, or Dovecot 2.4's settings as options.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Dovecot 2.4 `mail_path`: the Maildir root (in place of the SOURCE or TARGET argument).
    #[arg(long, value_name = "DIR")]
    pub mail_path: Option<PathBuf>,
    /// Dovecot 2.4 `mail_control_path` (2.3: CONTROL=).
    #[arg(long, value_name = "DIR", requires = "mail_path")]
    pub control_path: Option<PathBuf>,
    /// Dovecot 2.4 `mail_index_path` (2.3: INDEX=).
    #[arg(long, value_name = "DIR", requires = "mail_path")]
    pub index_path: Option<PathBuf>,
    /// Dovecot 2.4 `mailbox_list_layout` (2.3: LAYOUT=): maildir++ or fs.
    #[arg(long, value_name = "LAYOUT", requires = "mail_path", value_parser = parse_layout)]
    pub layout: Option<Layout>,
}

impl SourceArgs {
    /// Splits positionals into (location, the `want_rest` others) according to whether
    /// --mail-path was given.
    pub fn resolve(&self, positionals: &[String], want_rest: usize) -> Result<(MailLocation, Vec<String>), Failure> {
        match &self.mail_path {
            Some(root) => {
                if positionals.len() != want_rest {
                    return Err(Failure::usage(format!("with --mail-path, give {want_rest} argument(s) after the options")));
                }
                let loc = MailLocation { root: root.clone(), control: self.control_path.clone(), index: self.index_path.clone(), layout: self.layout.unwrap_or(Layout::MaildirPlusPlus) };
                Ok((loc, positionals.to_vec()))
            }
            None => {
                if positionals.len() != want_rest + 1 {
                    return Err(Failure::usage(format!("give SOURCE and {want_rest} more argument(s), or use --mail-path")));
                }
                let loc = MailLocation::parse(&positionals[0]).map_err(|e| Failure::usage(e.to_string()))?;
                Ok((loc, positionals[1..].to_vec()))
            }
        }
    }
}

/// How dot-locks are made (Dovecot's `dotlock_use_excl` and `mail_nfs_storage`).
#[derive(Args, Debug, Clone, Copy)]
pub struct LockModeArgs {
    /// Create the lock with O_EXCL instead of link() (Dovecot's dotlock_use_excl = yes).
    #[arg(long)]
    pub excl_lock: bool,
    /// The Maildir is on NFS: flush attribute caches before judging locks (mail_nfs_storage = yes).
    #[arg(long)]
    pub nfs: bool,
}

/// The uidlist locks a backup or a restore takes.
#[derive(Args, Debug, Clone)]
pub struct UidlistLockArgs {
    /// Seconds to wait for the uidlist locks (backup: all folders at once; restore: each folder).
    #[arg(long, default_value = "122", value_parser = parse_secs, value_name = "SECS")]
    pub lock_timeout: Duration,
    /// Break a uidlist lock nobody changed for SECS (0 = never).
    #[arg(long, default_value = "120", value_parser = parse_secs, value_name = "SECS")]
    pub stale_timeout: Duration,
    #[command(flatten)]
    pub mode: LockModeArgs,
}

impl UidlistLockArgs {
    pub fn settings(&self) -> LockSettings {
        LockSettings { timeout: self.lock_timeout, stale_timeout: self.stale_timeout, use_excl: self.mode.excl_lock, nfs_flush: self.mode.nfs }
    }
}
