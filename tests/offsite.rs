//! `hand-off`: a link snapshot of a live Maildir handed to real restic and borg (Debian's packages,
//! repositories in a temp dir), against a real Dovecot 2.3 under IMAP churn.
//!
//! - `restic_and_borg_get_the_reconcile_instant_under_churn`: five hand-offs to each while IMAP sessions
//!   change flags, move, append and expunge; every restic snapshot and borg archive, restored, holds every
//!   message of its reconcile instant exactly once (by Message-ID) and nothing from tmp/, verifies, and
//!   Dovecot reads it with the UIDs and flags its uidlist and names say. The stage is gone after each.
//! - `restores_from_restic_and_borg_merge_into_the_live_mailbox`: a deleted folder and an expunged
//!   message come back from a restic snapshot and from a borg archive, each restored into a directory
//!   and read straight from its FUSE mount (`restic mount`, `borg mount`), into alice's live mailbox,
//!   each once; bob and carol, who never had mail, get a mounted snapshot whole, with the UIDs and
//!   flags alice had at the hand-off.
//! - `hand_off_fails_cleanly`: the tool's exit status is ours, a missing tool is 69, a stage that is not
//!   ours is refused (73), and two hand-offs on one stage do not mix.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::churn::{backups_under_churn, files_under_tmp, imap_churn, presence_problems, scan_message_ids, Churn, ChurnBackup, Tracker};
use support::procs::mb;
use support::readback::{assert_no_problems, assert_verified, check_dovecot_reads_backup};
use support::repo_helpers::{start_with_users, uidlist_uniques};
use support::*;

const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive", "Archive.2024"];
const PASSWORD_ENV: [(&str, &str); 2] = [("RESTIC_PASSWORD", "test"), ("BORG_PASSPHRASE", "test")];

/// An offsite tool with a repository in a temp dir.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Restic,
    Borg,
}

impl Tool {
    fn init(self, repo: &Path) {
        let mut c = match self {
            Tool::Restic => Command::new("restic"),
            Tool::Borg => Command::new("borg"),
        };
        match self {
            Tool::Restic => c.args(["init", "-q", "-r"]).arg(repo),
            Tool::Borg => c.args(["init", "-e", "repokey"]).arg(repo),
        };
        Run::of(with_env(c)).expect_ok();
    }

    /// The command hand-off runs in the stage (the recipes of the README).
    fn backup_command(self, repo: &Path) -> Vec<String> {
        let repo = repo.display().to_string();
        match self {
            Tool::Restic => ["restic", "-q", "-r", &repo, "backup", "--ignore-ctime", "--tag", "maildir-backup", "."].map(String::from).to_vec(),
            // Exit 1 is borg's warning, e.g. "file changed while we backed it up": Dovecot renamed a
            // message in the live Maildir meanwhile, which changes the shared inode's ctime, not its content.
            Tool::Borg => vec![
                "sh".into(),
                "-c".into(),
                format!("borg create \"$@\" --files-cache=mtime,size,inode '{repo}::{{now:%Y-%m-%dT%H:%M:%S.%f}}' .; rc=$?; [ $rc -le 1 ] || exit $rc"),
                "borg-create".into(),
            ],
        }
    }

    /// The newest snapshot (archive), restored into the new directory `into`.
    fn restore_latest(self, repo: &Path, into: &Path) {
        match self {
            Tool::Restic => {
                // Backed up as ".", so restored at the target's top.
                let mut c = Command::new("restic");
                c.args(["-q", "-r"]).arg(repo).args(["restore", "latest", "--target"]).arg(into);
                Run::of(with_env(c)).expect_ok();
            }
            Tool::Borg => {
                fs::create_dir_all(into).unwrap();
                let mut c = Command::new("borg");
                c.arg("extract").arg(format!("{}::{}", repo.display(), borg_last(repo))).current_dir(into);
                Run::of(with_env(c)).expect_ok();
            }
        }
    }
}

/// How a restore reads a tool's newest snapshot: restored into a directory, or in its FUSE mount.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Extract,
    Mount,
}

/// A tool's repository mounted with FUSE (`restic mount`, `borg mount`), unmounted on drop.
struct Mounted {
    at: std::path::PathBuf,
    restic: Option<std::process::Child>,
    /// The newest snapshot's directory in the mount.
    latest: std::path::PathBuf,
}

impl Tool {
    /// Mounts `repo` at the new directory `at`.
    fn mount(self, repo: &Path, at: &Path) -> Mounted {
        fs::create_dir_all(at).unwrap();
        match self {
            Tool::Restic => {
                // restic serves the mount until it is unmounted; `tags/TAG/latest` links to the newest
                // snapshot with the tag (the recipes tag them).
                let mut c = Command::new("restic");
                c.args(["-q", "-r"]).arg(repo).arg("mount").arg(at).stdout(std::process::Stdio::null());
                let child = with_env(c).spawn().expect("start restic mount");
                let latest = at.join("tags/maildir-backup/latest");
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !latest.join(MANIFEST).exists() {
                    assert!(std::time::Instant::now() < deadline, "restic mount did not show {} within 30 s", latest.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Mounted { at: at.to_path_buf(), restic: Some(child), latest }
            }
            Tool::Borg => {
                // `borg mount` returns once the archive is mounted (it goes on in the background).
                let mut c = Command::new("borg");
                c.arg("mount").arg(format!("{}::{}", repo.display(), borg_last(repo))).arg(at);
                Run::of(with_env(c)).expect_ok();
                Mounted { at: at.to_path_buf(), restic: None, latest: at.to_path_buf() }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.at).status();
        if let Some(mut child) = self.restic.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const MANIFEST: &str = "maildir-backup.manifest";

/// The name of the newest archive in the borg repository `repo`.
fn borg_last(repo: &Path) -> String {
    let mut list = Command::new("borg");
    list.args(["list", "--short", "--last", "1"]).arg(repo);
    let last = Run::of(with_env(list));
    last.expect_ok();
    last.stdout.trim().to_string()
}

fn with_env(mut c: Command) -> Command {
    c.envs(PASSWORD_ENV).env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes").env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
    c
}

/// `hand-off SOURCE --stage STAGE -- COMMAND...`
fn hand_off(source: &Path, stage: &Path, command: &[String]) -> Run {
    let mut c = mb();
    c.args(["hand-off", "-q"]).arg(source).arg("--stage").arg(stage).arg("--").args(command);
    Run::of(with_env(c))
}

/// Dovecot with alice (FOLDERS × `n` messages, junk in every tmp/), bob and carol (never used).
fn alice_with_junk(n: usize) -> (Dovecot, Vec<String>) {
    let d = start_with_users(&["alice", "bob", "carol"]);
    populate(&d, "alice", FOLDERS, n);
    let mut junk = Vec::new();
    for (k, f) in FOLDERS.iter().enumerate() {
        let tmp = d.mailbox_path("alice", f, "mailbox").join("tmp");
        let id = format!("<junk.{k}@tmp.example>");
        fs::write(tmp.join(format!("1700000000.M{k}P999.junkhost,S=100")), format!("From: x@example.com\r\nMessage-ID: {id}\r\n\r\nhalf\r\n")).unwrap();
        junk.push(id);
    }
    chown_vmail_recursive(&d.maildir("alice"));
    (d, junk)
}

#[test]
fn restic_and_borg_get_the_reconcile_instant_under_churn() {
    let (d, junk) = alice_with_junk(100);
    let maildir = d.maildir("alice");
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&maildir), 400);
    // The stage beside the mail, on its file system; the repositories anywhere.
    let out = tempdir();
    let stage = out.path().join("stage/alice");
    for tool in [Tool::Restic, Tool::Borg] {
        let repo = out.path().join(format!("{tool:?}-repo"));
        tool.init(&repo);
        let command = tool.backup_command(&repo);
        let churn = Churn::start(imap_churn(&d, FOLDERS, 3), tracker.clone());
        churn.wait_ops(30, Duration::from_secs(20));
        let prefix = format!("{tool:?}-");
        let (runs, _) = backups_under_churn(churn, &tracker, out.path(), &prefix, 5, (20, Duration::from_secs(20)), |dest| {
            let r = hand_off(&maildir, &stage, &command);
            assert!(!stage.exists(), "{tool:?}: the stage was left behind");
            if r.status.success() {
                tool.restore_latest(&repo, dest);
            }
            r
        });
        for ChurnBackup { dest, start, end, .. } in &runs {
            let what = format!("{tool:?} {}", dest.display());
            assert_verified(dest);
            assert!(files_under_tmp(dest).is_empty(), "{what}: files in tmp/");
            assert!(!scan_message_ids(dest).keys().any(|m| junk.contains(m)), "{what}: junk from tmp/");
            assert_no_problems(&format!("{what}: presence"), &presence_problems(&tracker, dest, *start, *end));
            chown_vmail_recursive(dest);
            assert_no_problems(&format!("{what}: Dovecot reading it"), &check_dovecot_reads_backup(&d, "alice", dest, false));
        }
    }
}

/// Folder → (UID, flags) of each message, as Dovecot gives them to `user`.
fn uid_flags(d: &Dovecot, user: &str) -> BTreeMap<&'static str, Vec<(u32, String)>> {
    FOLDERS.iter().map(|f| (*f, d.fetch_uid_flags(user, f, None))).collect()
}

/// Message-ID → how many times the Maildir at `root` has it.
fn message_counts(root: &Path) -> BTreeMap<String, usize> {
    scan_message_ids(root).into_iter().map(|(id, files)| (id, files.len())).collect()
}

/// Message-ID → how many times alice's live mailbox has it.
fn live_ids(d: &Dovecot) -> BTreeMap<String, usize> {
    message_counts(&d.maildir("alice"))
}

#[test]
fn restores_from_restic_and_borg_merge_into_the_live_mailbox() {
    let (d, _) = alice_with_junk(10);
    let maildir = d.maildir("alice");
    let out = tempdir();
    let stage = out.path().join("stage/alice");
    let whole = live_ids(&d);
    let mut handed = BTreeMap::new();
    for (tool, via) in [(Tool::Restic, Via::Extract), (Tool::Restic, Via::Mount), (Tool::Borg, Via::Extract), (Tool::Borg, Via::Mount)] {
        let repo = out.path().join(format!("{tool:?}-repo"));
        if via == Via::Extract {
            tool.init(&repo);
            hand_off(&maildir, &stage, &tool.backup_command(&repo)).expect_ok();
            handed = uid_flags(&d, "alice");
        }
        let mut _mounted = None;
        let restored = match via {
            Via::Extract => {
                let restored = out.path().join(format!("{tool:?}-restored"));
                tool.restore_latest(&repo, &restored);
                restored
            }
            Via::Mount => _mounted.insert(tool.mount(&repo, &out.path().join(format!("{tool:?}-mount")))).latest.clone(),
        };

        // Alice loses a folder and one message of INBOX.
        d.doveadm_ok(&["mailbox", "delete", "-u", "alice", "Sent"]);
        let uid = d.fetch_uid_flags("alice", "INBOX", None)[0].0;
        let unique = uidlist_uniques(&maildir)[&uid].clone();
        d.doveadm_ok(&["expunge", "-u", "alice", "mailbox", "INBOX", "uid", &uid.to_string()]);
        assert!(live_ids(&d).len() < whole.len());

        let (from, target) = (restored.display().to_string(), maildir.display().to_string());
        cli_ok(&["restore", &from, &target, "--folder", "Sent"]);
        cli_ok(&["restore", &from, &target, "--message", &unique]);
        assert_eq!(live_ids(&d), whole, "{tool:?} {via:?}: alice's mail after the restores (Message-ID → copies)");
        if via == Via::Mount {
            // Whole into a user who never had mail: Dovecot gives the UIDs and flags of the hand-off.
            let fresh = if tool == Tool::Restic { "bob" } else { "carol" };
            cli_ok(&["restore", &from, &d.maildir(fresh).display().to_string()]);
            assert_eq!(uid_flags(&d, fresh), handed, "{tool:?}: {fresh}'s mail restored whole from the mount");
        }
    }
}

#[test]
fn hand_off_fails_cleanly() {
    let (d, _) = alice_with_junk(3);
    let maildir = d.maildir("alice");
    let out = tempdir();
    let stage = out.path().join("stage/alice");
    let r = hand_off(&maildir, &stage, &["sh".into(), "-c".into(), "test -f maildir-backup.manifest && test \"$MAILDIR_BACKUP_USER\" = alice && exit 3".into()]);
    assert_eq!(r.code(), Some(3), "{}", r.show());
    assert!(r.stderr.contains("sh failed (exit status: 3) on the snapshot of 12 messages"), "{}", r.show());
    assert!(!stage.exists());
    hand_off(&maildir, &stage, &["no-such-tool".into()]).expect_code(69).expect_stderr(&["cannot run no-such-tool"]);
    // --keep-stage leaves it; the next hand-off replaces it.
    let mut c = mb();
    c.args(["hand-off", "-q", "--keep-stage"]).arg(&maildir).arg("--stage").arg(&stage).args(["--", "true"]);
    Run::of(c).expect_ok();
    assert_verified(&stage);
    hand_off(&maildir, &stage, &["true".into()]).expect_ok();
    assert!(!stage.exists());
    // Not ours: refused, untouched.
    fs::create_dir_all(stage.join("precious")).unwrap();
    hand_off(&maildir, &stage, &["true".into()]).expect_code(EX_CANTCREAT).expect_stderr(&["is not a stage of maildir-backup"]);
    assert!(stage.join("precious").is_dir());
    fs::remove_dir_all(&stage).unwrap();
    // Two at once on one stage: the second is told to wait for its turn, the first is whole.
    let mut first = mb();
    first.args(["hand-off", "-q"]).arg(&maildir).arg("--stage").arg(&stage).args(["--", "sh", "-c", "touch started; sleep 3"]);
    let mut child = first.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !stage.join("started").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    hand_off(&maildir, &stage, &["true".into()]).expect_code(EX_TEMPFAIL).expect_stderr(&["another hand-off is using"]);
    assert!(child.wait().unwrap().success());
}

/// The README's borgmatic recipe: its `before_backup` hook makes the snapshot (`--keep-stage`), and
/// borgmatic backs up the stage with the files cache that skips unchanged links. Twice, so the hook
/// also replaces a kept stage; the newest archive, extracted, is exactly alice's mail, verifies, and
/// holds nothing from tmp/.
#[test]
fn borgmatic_backs_up_the_stage_its_hook_made() {
    let (d, junk) = alice_with_junk(10);
    let maildir = d.maildir("alice");
    let out = tempdir();
    let stage = out.path().join("stage/alice");
    let repo = out.path().join("borg");
    Tool::Borg.init(&repo);
    let config = out.path().join("borgmatic.yaml");
    let yaml = format!(
        "location:
    source_directories:
        - {stage}
    repositories:
        - {repo}
    files_cache: mtime,size,inode
storage:
    encryption_passphrase: test
    archive_name_format: 'alice-{{now:%Y-%m-%dT%H:%M:%S.%f}}'
hooks:
    before_backup:
        - {bin} hand-off --keep-stage -q {maildir} --stage {stage} --name alice -- true
",
        stage = stage.display(),
        repo = repo.display(),
        bin = BIN,
        maildir = maildir.display()
    );
    fs::write(&config, yaml).unwrap();
    for _ in 0..2 {
        let mut c = Command::new("borgmatic");
        c.arg("--config").arg(&config).arg("create");
        Run::of(with_env(c)).expect_ok();
        assert_verified(&stage);
    }
    let extracted = out.path().join("extracted");
    Tool::Borg.restore_latest(&repo, &extracted);
    // borg keeps the source directory's path below the extraction directory.
    let restored = extracted.join(stage.strip_prefix("/").unwrap());
    assert_verified(&restored);
    let ids = message_counts(&restored);
    assert_eq!(ids, live_ids(&d), "the archive's messages (Message-ID → copies) are not alice's");
    assert!(!ids.keys().any(|m| junk.contains(m)), "junk from tmp/ in the archive");
}

/// Run as root, the tool reads the stage by path while the mail user owns the directories in it: a
/// stage whose parent others can enter, or which lies below a directory the mail user (vmail here) can
/// change, is refused (77) before anything is made or run.
#[test]
fn a_root_hand_off_needs_a_stage_only_root_can_enter() {
    use std::os::unix::fs::PermissionsExt;
    let (d, _) = alice_with_junk(3);
    let maildir = d.maildir("alice");
    let out = tempdir();
    let ran = out.path().join("ran");
    let tool = ["sh".to_string(), "-c".into(), format!("touch {}", ran.display())];
    let open = out.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    hand_off(&maildir, &open.join("alice"), &tool).expect_code(EX_NOPERM).expect_stderr(&["must be a directory only root can enter", "mode 0755"]);
    let theirs = out.path().join("theirs");
    fs::create_dir_all(theirs.join("private")).unwrap();
    fs::set_permissions(theirs.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(ensure_vmail().0), None).unwrap();
    hand_off(&maildir, &theirs.join("private/alice"), &tool).expect_code(EX_NOPERM).expect_stderr(&[&format!("{} above it is owned by uid {}", theirs.display(), ensure_vmail().0)]);
    assert!(!ran.exists() && !open.join("alice").exists() && !theirs.join("private/alice").exists());
    hand_off(&maildir, &out.path().join("private/alice"), &tool).expect_ok();
    assert!(ran.exists());
}

/// `n` messages of random text (nothing for the tools to deduplicate inside them) in five folders,
/// numbered from `first`, written as vmail; returns their paths.
fn generated_maildir(root: &Path, n: usize, first: usize) -> Vec<std::path::PathBuf> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ first as u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let folders = ["", ".Sent", ".Archive", ".Lists", ".Trash"];
    for f in folders {
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(root.join(f).join(sub)).unwrap();
        }
    }
    let files: Vec<_> = (first..first + n)
        .map(|i| {
            let size = 1024 + (next() % 8192) as usize;
            let mut data = format!("Message-ID: <{i}@generated>\r\nSubject: {i}\r\n\r\n").into_bytes();
            data.extend((data.len()..size).map(|_| b'a' + (next() % 26) as u8));
            let path = root.join(folders[i % folders.len()]).join("cur").join(format!("{}.M{i}P1.gen,S={size}:2,", 1_700_000_000 + i));
            fs::write(&path, data).unwrap();
            path
        })
        .collect();
    chown_vmail_recursive(root);
    files
}

/// The JSON object in `out` that has `key`: all of it (borg), or its last such line (restic).
fn json_with(out: &str, key: &str) -> serde_json::Value {
    std::iter::once(out)
        .chain(out.lines().rev())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get(key).is_some())
        .unwrap_or_else(|| panic!("no JSON with {key} in:\n{out}"))
}

/// What a hand-off cost a tool: bytes added to its repository, files it read again, and (restic)
/// the snapshot's id.
struct Cost {
    added: u64,
    read: u64,
    snapshot: String,
}

fn cost(tool: Tool, r: &Run) -> Cost {
    r.expect_ok();
    match tool {
        Tool::Restic => {
            let s = json_with(&r.stdout, "files_unmodified");
            let read = s["files_new"].as_u64().unwrap() + s["files_changed"].as_u64().unwrap();
            Cost { added: s["data_added"].as_u64().unwrap(), read, snapshot: s["snapshot_id"].as_str().unwrap().to_string() }
        }
        Tool::Borg => {
            // --list names each file it read: A(dded) or M(odified); unchanged ones it skipped.
            let read = r.stderr.lines().filter(|l| l.starts_with("A ") || l.starts_with("M ")).count() as u64;
            let added = json_with(&r.stdout, "archive")["archive"]["stats"]["deduplicated_size"].as_u64().unwrap();
            Cost { added, read, snapshot: String::new() }
        }
    }
}

fn restic_cat(repo: &Path, what: &[&str]) -> String {
    let mut c = Command::new("restic");
    c.args(["-q", "-r"]).arg(repo).arg("cat").args(what);
    let r = Run::of(with_env(c));
    r.expect_ok();
    r.stdout
}

/// A restic snapshot's metadata: its trees (directory listings) and our manifest (rewritten every
/// hand-off, and the only file of the snapshot that is neither a message nor a control file).
fn restic_metadata_bytes(repo: &Path, snapshot: &str) -> u64 {
    let mut c = Command::new("restic");
    c.args(["-q", "-r"]).arg(repo).args(["ls", "--json", snapshot]);
    let ls = Run::of(with_env(c));
    ls.expect_ok();
    let manifest = ls
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|n| n["name"] == "maildir-backup.manifest")
        .and_then(|n| n["size"].as_u64())
        .unwrap_or_else(|| panic!("no manifest in restic snapshot {snapshot}"));
    manifest + restic_tree_bytes(repo, snapshot)
}

/// The bytes of every tree (directory listing) of a restic snapshot.
fn restic_tree_bytes(repo: &Path, snapshot: &str) -> u64 {
    let snap: serde_json::Value = serde_json::from_str(&restic_cat(repo, &["snapshot", snapshot])).unwrap();
    let mut todo = vec![snap["tree"].as_str().unwrap().to_string()];
    let mut total = 0;
    while let Some(id) = todo.pop() {
        let tree = restic_cat(repo, &["blob", &id]);
        total += tree.len() as u64;
        let nodes: serde_json::Value = serde_json::from_str(&tree).unwrap();
        todo.extend(nodes["nodes"].as_array().unwrap().iter().filter_map(|n| n["subtree"].as_str().map(String::from)));
    }
    total
}

/// After 10 % flag changes (renames) and 1 % new mail, a hand-off makes restic and borg read only the
/// renamed and new files, and store no more than 1.2 × the new mail plus the snapshot's metadata (every
/// link changes a file's ctime, which both record, and our manifest is rewritten): for restic, the
/// snapshot's trees and manifest; for borg, what a hand-off with nothing changed stores.
#[test]
fn a_second_hand_off_costs_what_changed() {
    const N: usize = 20_000;
    let out = tempdir();
    let maildir = out.path().join("alice/Maildir");
    let files = generated_maildir(&maildir, N, 0);
    let stage = out.path().join("stage/alice");
    for tool in [Tool::Restic, Tool::Borg] {
        let repo = out.path().join(format!("{tool:?}-repo"));
        tool.init(&repo);
        let mut command = tool.backup_command(&repo);
        match tool {
            Tool::Restic => command.insert(4, "--json".into()),
            Tool::Borg => command.extend(["--json".to_string(), "--list".into()]),
        }
        hand_off(&maildir, &stage, &command).expect_ok();
        let unchanged = cost(tool, &hand_off(&maildir, &stage, &command));

        let renamed: Vec<_> = files.iter().step_by(10).map(|f| (f.clone(), f.with_file_name(format!("{}S", f.file_name().unwrap().to_str().unwrap())))).collect();
        for (from, to) in &renamed {
            fs::rename(from, to).unwrap();
        }
        let new_bytes: u64 = generated_maildir(&out.path().join("new-mail"), N / 100, N)
            .into_iter()
            .map(|f| {
                let to = maildir.join("new").join(f.file_name().unwrap().to_str().unwrap().replace(":2,", ""));
                fs::rename(&f, &to).unwrap();
                fs::metadata(&to).unwrap().len()
            })
            .sum();
        let Cost { added, read, snapshot } = cost(tool, &hand_off(&maildir, &stage, &command));
        let metadata = match tool {
            Tool::Restic => restic_metadata_bytes(&repo, &snapshot),
            Tool::Borg => unchanged.added,
        };
        eprintln!("{tool:?}: read {read} of {} files again; added {added} B for {new_bytes} B of new mail and {metadata} B of its metadata (nothing changed: read {}, added {} B)", N + N / 100, unchanged.read, unchanged.added);
        // Only the manifest is new every time (the generated Maildir has no control files).
        assert!(unchanged.read <= 1, "{tool:?} read {} files again when nothing had changed", unchanged.read);
        assert!(read as f64 <= 0.15 * (N + N / 100) as f64, "{tool:?} read {read} files again");
        assert!((added as f64) <= 1.2 * new_bytes as f64 + 1.1 * metadata as f64, "{tool:?} added {added} B for {new_bytes} B of new mail and {metadata} B of metadata");

        // Put the Maildir back for the next tool.
        for (from, to) in &renamed {
            fs::rename(to, from).unwrap();
        }
        fs::remove_dir_all(maildir.join("new")).unwrap();
        fs::create_dir(maildir.join("new")).unwrap();
        fs::remove_dir_all(out.path().join("new-mail")).unwrap();
    }
}
