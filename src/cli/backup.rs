//! `backup` and `verify`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use maildir_backup::dotlock::LockSettings;
use maildir_backup::engine::{self, BackupOptions, BackupReport, Progress};
use maildir_backup::maildir::{Layout, MailLocation};
use maildir_backup::sysexits::{self, ExitCode};
use maildir_backup::verify;

use super::lock::LockModeArgs;
use super::parse_secs;

/// Where the mail is: a 2.3 mail_location / path, or Dovecot 2.4's settings as options.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Dovecot 2.4 `mail_path`: the Maildir root (then give only DEST as argument).
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

fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::parse(s).ok_or_else(|| format!("unknown layout '{s}' (expected maildir++ or fs)"))
}

impl SourceArgs {
    /// Splits positionals into (source, rest) according to whether --mail-path was given.
    pub fn resolve(&self, positionals: &[String], want_rest: usize) -> Result<(MailLocation, Vec<String>), String> {
        match &self.mail_path {
            Some(root) => {
                if positionals.len() != want_rest {
                    return Err(format!("with --mail-path, give {want_rest} argument(s) after the options"));
                }
                let loc = MailLocation { root: root.clone(), control: self.control_path.clone(), index: self.index_path.clone(), layout: self.layout.unwrap_or(Layout::MaildirPlusPlus) };
                Ok((loc, positionals.to_vec()))
            }
            None => {
                if positionals.len() != want_rest + 1 {
                    return Err(format!("give SOURCE and {want_rest} more argument(s), or use --mail-path"));
                }
                let loc = MailLocation::parse(&positionals[0]).map_err(|e| e.to_string())?;
                Ok((loc, positionals[1..].to_vec()))
            }
        }
    }
}

/// Back up a live Maildir consistently (bulk copy, then a short reconcile under Dovecot's lock).
#[derive(Args, Debug)]
#[command(after_help = "SOURCE is a Maildir path or a Dovecot 2.3 mail_location such as\n  maildir:/srv/mail/alice/Maildir:CONTROL=/srv/control/alice:INDEX=/srv/index/alice:LAYOUT=fs\nFor Dovecot 2.4 settings use --mail-path/--control-path/--index-path/--layout and give only DEST.")]
pub struct BackupArgs {
    /// SOURCE and DEST (DEST only with --mail-path; neither DEST with --repo). DEST must not exist.
    #[arg(value_name = "SOURCE DEST", num_args = 0..=2)]
    pub paths: Vec<String>,
    /// Write a snapshot into this repository (REPO/NAME/<UTC time>) instead of DEST,
    /// hard-linking messages unchanged since the previous snapshot.
    #[arg(long, value_name = "REPO")]
    pub repo: Option<PathBuf>,
    /// The snapshot series name in the repository [default: the user's directory name].
    #[arg(long, value_name = "NAME", requires = "repo")]
    pub name: Option<String>,
    /// With --repo: also compare checksums (not only sizes) before linking a message.
    #[arg(long, requires = "repo")]
    pub paranoid: bool,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Options shared by everything that takes a backup.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Seconds to keep trying to lock all folders for the reconcile.
    #[arg(long, default_value = "122", value_parser = parse_secs, value_name = "SECS")]
    pub lock_timeout: Duration,
    /// Break a uidlist lock nobody changed for SECS (0 = never).
    #[arg(long, default_value = "120", value_parser = parse_secs, value_name = "SECS")]
    pub stale_timeout: Duration,
    #[command(flatten)]
    pub mode: LockModeArgs,
    /// Parallel copy threads.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// Also copy Dovecot's index files (best effort; Dovecot rebuilds them if they disagree).
    #[arg(long)]
    pub with_indexes: bool,
    /// Print the summary as JSON (for monitoring).
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no summary.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl RunArgs {
    pub fn options(&self) -> BackupOptions {
        BackupOptions {
            lock: LockSettings {
                timeout: self.lock_timeout,
                stale_timeout: self.stale_timeout,
                use_excl: self.mode.excl_lock,
                nfs_flush: self.mode.nfs,
            },
            jobs: self.jobs.into(),
            with_indexes: self.with_indexes,
        }
    }

    pub fn progress(&self) -> Bar {
        let show = !self.quiet && !self.json && std::io::stderr().is_terminal();
        Bar(show.then(|| {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} messages, {binary_bytes} ({binary_bytes_per_sec}) {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            pb
        }))
    }
}

/// indicatif on a terminal, nothing otherwise.
pub struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn phase(&self, name: &str) {
        if let Some(pb) = &self.0 {
            pb.set_message(name.to_string());
        }
    }
    fn total(&self, messages: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(messages);
        }
    }
    fn advance(&self, messages: u64, _bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(messages);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", units[i]) }
}

pub fn print_report(r: &BackupReport, run: &RunArgs) {
    for w in &r.warnings {
        eprintln!("maildir-backup: {w}");
    }
    if run.json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
    } else if !run.quiet {
        println!(
            "backed up {} folders, {} messages, {} to {} in {:.2} s (lock held {:.1} ms, {} attempt{}; {} changes during the backup)",
            r.folders,
            r.messages,
            human_bytes(r.bytes),
            r.destination.display(),
            r.seconds,
            r.lock_hold_ms,
            r.lock_attempts,
            if r.lock_attempts == 1 { "" } else { "s" },
            r.changed_during_backup
        );
    }
}

pub fn run_backup(a: BackupArgs) -> i32 {
    let want_rest = if a.repo.is_some() { 0 } else { 1 };
    let (source, rest) = match a.source.resolve(&a.paths, want_rest) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("maildir-backup backup: {e}");
            return sysexits::EX_USAGE;
        }
    };
    let bar = a.run.progress();
    let opts = a.run.options();
    let (result, target) = match &a.repo {
        Some(repo) => {
            let Some(name) = a.name.clone().or_else(|| maildir_backup::repo::default_name(&source.root)) else {
                eprintln!("maildir-backup backup: cannot derive a name from {}; give --name", source.root.display());
                return sysexits::EX_USAGE;
            };
            let r = maildir_backup::repo::snapshot(&source, &engine::OnDisk, repo, &name, &opts, a.paranoid, &bar);
            (r.map_err(|e| (e.to_string(), e.exit_code())), repo.join(name))
        }
        None => {
            let dest = PathBuf::from(&rest[0]);
            (engine::backup(&source, &dest, &opts, &bar).map_err(|e| (e.to_string(), e.exit_code())), dest)
        }
    };
    drop(bar);
    match result {
        Ok(r) => {
            print_report(&r, &a.run);
            0
        }
        Err((msg, code)) => {
            eprintln!("maildir-backup backup: {msg}; nothing was published at {}", target.display());
            code
        }
    }
}

/// Check a backup against its manifest and its dovecot-uidlist files.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The backup (or repository snapshot) directory.
    pub backup: PathBuf,
    #[arg(long, short = 'j', default_value_t = 4)]
    pub jobs: u16,
    #[arg(long)]
    pub json: bool,
}

pub fn run_verify(a: VerifyArgs) -> i32 {
    match verify::verify(&a.backup, a.jobs.into()) {
        Err(e) => {
            eprintln!("maildir-backup verify: {e}");
            sysexits::EX_NOINPUT
        }
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                println!(
                    "{}: {} folders, {} messages, {}: {}",
                    r.backup.display(),
                    r.folders,
                    r.messages,
                    human_bytes(r.bytes),
                    if r.is_whole() { "whole".to_string() } else { format!("{} problem(s)", r.problems.len()) }
                );
            }
            if r.is_whole() { 0 } else { 1 }
        }
    }
}
