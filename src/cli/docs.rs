//! Man pages and shell completions, generated from the same clap definitions that parse the
//! command line (`maildir-backup generate-docs DIR`, run by `make` and the package build), and
//! pages for the two doveadm commands, whose options the C shim defines and this mirrors.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Args, Command, CommandFactory};
use clap_complete::Shell;

use super::{Cli, Failure, Outcome};

/// Write the man pages and the shell completions into DIR (man/, completions/).
#[derive(Args, Debug)]
pub struct GenerateDocsArgs {
    pub dir: PathBuf,
}

pub fn run_generate_docs(a: GenerateDocsArgs) -> Outcome {
    let failed = |what: &str, path: &Path| {
        let path = path.to_path_buf();
        let what = what.to_string();
        move |e: io::Error| Failure::new(maildir_backup::sysexits::for_io_error(&e), format!("{what} {}: {e}", path.display()))
    };
    let (man, completions) = (a.dir.join("man"), a.dir.join("completions"));
    for d in [&man, &completions] {
        fs::create_dir_all(d).map_err(failed("create", d))?;
    }
    let mut cli = Cli::command();
    cli.build();
    let mut pages = vec![cli.clone()];
    pages.extend(cli.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help").map(|s| s.clone().name(format!("maildir-backup-{}", s.get_name()))));
    pages.extend([doveadm_backup(), doveadm_hand_off(), doveadm_restore(), doveadm_status()]);
    for page in pages {
        let path = man.join(format!("{}.1", page.get_name()));
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out).map_err(failed("render", &path))?;
        // clap_mangen heads the after-help text "EXTRA"; man-pages(7) calls such a section NOTES.
        let out = String::from_utf8_lossy(&out).replacen(".SH EXTRA\n", ".SH NOTES\n", 1);
        fs::write(&path, out).map_err(failed("write", &path))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli, "maildir-backup", &completions).map_err(failed("write completions into", &completions))?;
    }
    Ok(0)
}

const DOVEADM_SETTINGS: &str = "\
Settings, in dovecot.conf (plugin { } on 2.3, top-level keys on 2.4); command-line options win:

maildir_backup_dest: the destination template, as DEST-TEMPLATE.

maildir_backup_lock_timeout: as -t (on 2.4 with a unit, e.g. 30s).

maildir_backup_jobs: as -j.

maildir_backup_with_indexes: as -i.

maildir_backup_metrics: a Prometheus node-exporter textfile, updated after every user.

maildir_backup_imap_view: as -V.

maildir_backup_stage, maildir_backup_hand_off: see doveadm-maildir-backup-hand-off(1).

Over doveadm's HTTP API the command is maildirBackup, with the parameters mailbox, lockTimeout, link, \
imapView, jobs, withIndexes and destination. Exit status: sysexits, as in maildir-backup(1); a user that \
fails does not stop the others. See /usr/share/doc/maildir-backup/README.md.";

/// `doveadm maildir-backup`, as the shim registers it.
fn doveadm_backup() -> Command {
    let page = Command::new("doveadm-maildir-backup")
        .about("Consistent, live backups of Dovecot Maildirs, run inside doveadm")
        .long_about("Backs up each user's Maildir with Dovecot's own view of the user (userdb, mail location, namespaces) and Dovecot's own uidlist locks: a bulk copy without locks, then a reconcile of a few milliseconds under the locks of all folders at once. One output row per folder: user, mailbox, messages, bytes, lock_ms, status.")
        .override_usage("doveadm [-f flow|tab|json] maildir-backup [-u USER | -A | -F FILE] [-S SOCKET] [-m MAILBOX]... [-t SECS] [-j JOBS] [-i] [-L] [-V] [DEST-TEMPLATE]");
    with_backup_args(page)
        .arg(Arg::new("link").short('L').action(ArgAction::SetTrue).help("Hard-link message files instead of copying them (the destination must be on the mail's file system), as maildir-backup backup --link"))
        .arg(Arg::new("imap-view").short('V').action(ArgAction::SetTrue).help("With repo:REPO: show each user their snapshots as read-only IMAP folders (REPO/USER/imap-view, for the namespace in 95-maildir-backup.conf); kept by every later snapshot and prune"))
        .arg(Arg::new("destination").value_name("DEST-TEMPLATE").help("Where each user's backup goes: %u %n %d (2.4: %{user}, %{user | username}, %{user | domain}); repo:REPO writes dated snapshots into a repository, REPO/USER/<UTC time>"))
        .after_long_help(DOVEADM_SETTINGS)
}

/// The options `doveadm maildir-backup` and `maildir-backup-hand-off` share.
fn with_backup_args(page: Command) -> Command {
    page.disable_help_flag(true)
        .arg(Arg::new("mailbox").short('m').value_name("MAILBOX").action(ArgAction::Append).help("Back up only this mailbox (repeatable; Dovecot's mailbox patterns)"))
        .arg(Arg::new("lock-timeout").short('t').value_name("SECS").help("Seconds to keep trying to lock all of a user's folders [default: 122]"))
        .arg(Arg::new("jobs").short('j').value_name("JOBS").help("Parallel copy threads [default: 4]"))
        .arg(Arg::new("with-indexes").short('i').action(ArgAction::SetTrue).help("Also copy Dovecot's index files (best effort)"))
}

/// `doveadm maildir-backup-hand-off`, as the shim registers it.
fn doveadm_hand_off() -> Command {
    let page = Command::new("doveadm-maildir-backup-hand-off")
        .about("Hand consistent link snapshots of Dovecot users' Maildirs to restic or borg")
        .long_about("For each user, makes a link snapshot (as doveadm maildir-backup -L) at the user's stage, runs the shell COMMAND in it as the mail user, and removes the stage again. The output rows are those of doveadm maildir-backup; COMMAND's output goes to standard error. A user whose COMMAND fails gets its exit status; the others go on.")
        .override_usage("doveadm maildir-backup-hand-off [-u USER | -A | -F FILE] [-m MAILBOX]... [-t SECS] [-j JOBS] [-i] [-s STAGE-TEMPLATE] [-K] [-c] [COMMAND]");
    with_backup_args(page)
        .arg(Arg::new("stage").short('s').value_name("STAGE-TEMPLATE").help("Where each user's snapshot is made, the same path every run, on the mail's file system: %u %n %d (2.4: %{user}, ...) [setting: maildir_backup_stage]"))
        .arg(Arg::new("keep-stage").short('K').action(ArgAction::SetTrue).help("Leave the snapshot at the stage afterwards"))
        .arg(Arg::new("checksum").short('c').action(ArgAction::SetTrue).help("Record every message's checksum in the snapshot's manifest"))
        .arg(Arg::new("command").value_name("COMMAND").help("A shell command run by /bin/sh -c in the stage, with MAILDIR_BACKUP_USER, MAILDIR_BACKUP_TIME and MAILDIR_BACKUP_STAGE set [setting: maildir_backup_hand_off]"))
        .after_long_help("Settings, as for doveadm-maildir-backup(1): maildir_backup_stage and maildir_backup_hand_off, and the lock timeout and jobs settings. COMMAND runs with the mail user's ids only (also under -A, where doveadm keeps root as its real uid): the repository and its password must be readable by the mail user. Over doveadm's HTTP API the command is maildirBackupHandOff, with the parameters mailbox, lockTimeout, jobs, withIndexes, stage, keepStage, checksum and command. See /usr/share/doc/maildir-backup/README.md.")
}

/// `doveadm maildir-backup-restore`, as the shim registers it.
fn doveadm_restore() -> Command {
    Command::new("doveadm-maildir-backup-restore")
        .about("Restore mail from a maildir-backup snapshot into Dovecot users' Maildirs")
        .long_about("Restores into the mail location Dovecot gives for each user. Into a Maildir with mail it merges: nothing is overwritten, a message already there is skipped, restored messages get new UIDs. Into an empty one, UIDs, UIDVALIDITY, flags and keywords are kept.")
        .disable_help_flag(true)
        .override_usage("doveadm maildir-backup-restore [-u USER | -A | -F FILE] [-m FOLDER]... [-g UNIQUE]... [-U FOLDER:UID]... [-n] SNAPSHOT")
        .arg(Arg::new("folder").short('m').value_name("FOLDER").action(ArgAction::Append).help("Restore only this folder (repeatable)"))
        .arg(Arg::new("message").short('g').value_name("UNIQUE").action(ArgAction::Append).help("Restore only the message with this Maildir unique name (repeatable)"))
        .arg(Arg::new("uid").short('U').value_name("FOLDER:UID").action(ArgAction::Append).help("Restore only the message that had this UID in the snapshot (repeatable)"))
        .arg(Arg::new("dry-run").short('n').action(ArgAction::SetTrue).help("Only say what would be restored"))
        .arg(Arg::new("snapshot").value_name("SNAPSHOT").required(true).help("A backup or snapshot directory (%u %n %d expanded), or repo:REPO for the user's newest snapshot"))
}

fn doveadm_status() -> Command {
    Command::new("doveadm-maildir-backup-status")
        .about("Show each Dovecot user's last backup run into a repository")
        .long_about("One row per user from the run record in the repository (last-run.json): result (ok, failed, or none when no run is recorded), start and end (UTC), exit code, snapshot made, and the reason a failed run failed. It exits 0 whenever it could read the record, whatever the run's outcome: over the doveadm HTTP API, which answers a failed command with its exit code alone, this is how a caller gets a failed backup's reason (send it in the same request, after maildirBackup).")
        .disable_help_flag(true)
        .override_usage("doveadm maildir-backup-status [-u USER | -A | -F FILE] [repo:REPO]")
        .arg(Arg::new("repository").value_name("repo:REPO").help("The repository (%u %n %d expanded); default: maildir_backup_dest, which must then be a repo: destination"))
}
