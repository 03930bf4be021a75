//! `backup` refusing or failing: the documented exit code, nothing published, no staging dir left.
//!
//! `maildir-backup backup` refusing or failing: each case gives a message naming the path, the sysexits code
//! documented for it, publishes nothing at DEST and leaves no staging dir (or its lock) behind.
//!
//! Not a Maildir 65, SOURCE missing 66, DEST exists 73, DEST inside SOURCE (or its CONTROL=) 64, bad
//! mail_location 64, unreadable message or folder (run as `nobody`) 77, ENOSPC on a small tmpfs 73, a uidlist
//! lock held by someone else past `--lock-timeout` 75. A staging dir left by a dead run (planted junk, or a
//! backup SIGKILLed mid-copy) is removed by the next run, which succeeds.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::churn;
use support::*;

const USER: &str = "alice";

fn backup_cmd(source: &str, dest: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("backup").args(extra).arg(source).arg(dest);
    c
}

fn staging_of(dest: &Path) -> PathBuf {
    dest.parent().unwrap().join(format!(".{}.maildir-backup-staging", dest.file_name().unwrap().to_string_lossy()))
}

fn staging_lock_of(dest: &Path) -> PathBuf {
    let mut s = staging_of(dest).into_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

/// Runs `backup SOURCE DEST EXTRA...` and checks the refusal: exit `code`, stderr naming each of `mention`,
/// DEST's parent exactly as before (so nothing published, no staging dir, no staging lock).
fn assert_refused(source: &str, dest: &Path, extra: &[&str], code: i32, mention: &[&str]) -> Run {
    let parent = dest.parent().unwrap();
    let before = listing(parent);
    let dest_before = fs::symlink_metadata(dest).ok().map(|m| (m.is_dir(), listing(dest)));
    let r = Run::of(backup_cmd(source, dest, extra));
    assert_eq!(r.code(), Some(code), "backup {source} {}: {}", dest.display(), r.show());
    for m in mention {
        assert!(r.stderr.contains(m), "stderr does not mention {m:?}: {}", r.show());
    }
    assert_eq!(listing(parent), before, "DEST's parent changed: {}", r.show());
    assert_eq!(fs::symlink_metadata(dest).ok().map(|m| (m.is_dir(), listing(dest))), dest_before, "DEST changed");
    assert!(!staging_of(dest).exists() && !staging_lock_of(dest).exists(), "staging left: {}", r.show());
    r
}

fn small_maildir(d: &Dovecot) -> PathBuf {
    populate(d, USER, &["INBOX", "Work"], 10);
    d.maildir(USER)
}

#[test]
fn bad_sources_and_destinations() {
    let d = Dovecot::start(DovecotOptions::default());
    let root = small_maildir(&d);
    let rs = root.display().to_string();
    let out = tempdir();
    let dest = out.path().join("backup");
    let root_before = listing(&root);

    // Not a Maildir: the user's dir above it, and a plain file.
    let above = root.parent().unwrap();
    assert_refused(&above.display().to_string(), &dest, &[], EX_DATAERR, &[&above.display().to_string(), "not a Maildir"]);
    let file = out.path().join("a-file");
    fs::write(&file, "x").unwrap();
    assert_refused(&file.display().to_string(), &dest, &[], EX_DATAERR, &[&file.display().to_string()]);

    // Missing, as a path and as a mail_location.
    let missing = root.join("no-such-dir");
    assert_refused(&missing.display().to_string(), &dest, &[], EX_NOINPUT, &[&missing.display().to_string()]);
    assert_refused(&format!("maildir:{}", missing.display()), &dest, &[], EX_NOINPUT, &[&missing.display().to_string()]);

    // DEST exists: a directory with something in it, a file, a dangling symlink. Left exactly as they were.
    let existing = out.path().join("old");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("keep"), "precious").unwrap();
    assert_refused(&rs, &existing, &[], EX_CANTCREAT, &[&existing.display().to_string(), "already exists"]);
    assert_eq!(fs::read_to_string(existing.join("keep")).unwrap(), "precious");
    assert_refused(&rs, &file, &[], EX_CANTCREAT, &[&file.display().to_string()]);
    let dangling = out.path().join("dangling");
    std::os::unix::fs::symlink(out.path().join("nowhere"), &dangling).unwrap();
    assert_refused(&rs, &dangling, &[], EX_CANTCREAT, &[&dangling.display().to_string()]);

    // DEST inside SOURCE: plainly, as something Dovecot would take for a folder, through a symlinked path,
    // and inside the CONTROL= dir.
    assert_refused(&rs, &root.join("backup"), &[], EX_USAGE, &[&root.join("backup").display().to_string(), "inside"]);
    assert_refused(&rs, &root.join(".Backup"), &[], EX_USAGE, &[".Backup"]);
    assert_refused(&rs, &root.join(".Work/cur/x"), &[], EX_USAGE, &[".Work/cur/x"]);
    let link = out.path().join("link-to-maildir");
    std::os::unix::fs::symlink(&root, &link).unwrap();
    assert_refused(&rs, &link.join("backup"), &[], EX_USAGE, &[&link.join("backup").display().to_string()]);
    let control = out.path().join("control");
    fs::create_dir(&control).unwrap();
    assert_refused(&format!("maildir:{rs}:CONTROL={}", control.display()), &control.join("b"), &[], EX_USAGE, &[&control.join("b").display().to_string()]);
    assert_eq!(listing(&root), root_before, "the source was written to");

    // Bad mail_location strings.
    for (loc, says) in [
        (format!("mdbox:{rs}"), "mdbox"),
        (format!("sdbox:{rs}"), "sdbox"),
        (format!("maildir:{rs}:LAYOUT=weird"), "weird"),
        (format!("maildir:{rs}:ALT=/srv/alt"), "ALT"),
        ("maildir:/srv/mail/%u/Maildir".to_string(), "%u"),
        ("maildir:".to_string(), "empty"),
    ] {
        assert_refused(&loc, &dest, &[], EX_USAGE, &[says]);
    }
    assert!(!dest.exists());

    // And after all that, a real backup works.
    let r = Run::of(backup_cmd(&rs, &dest, &["-q"]));
    assert_eq!(r.code(), Some(0), "{}", r.show());
    assert_eq!(churn::scan_message_ids(&dest).len(), 20);
}

/// `setpriv` to nobody:nogroup.
fn as_nobody(source: &str, dest: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN, "backup"]).arg(source).arg(dest);
    c
}

fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if fs::symlink_metadata(p).unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

#[test]
fn unreadable_message_or_folder_as_unprivileged_user() {
    let d = Dovecot::start(DovecotOptions::default());
    let root = small_maildir(&d);
    let out = tempdir();
    // A copy of the Maildir owned by nobody (root reads everything, so the backup must run as nobody).
    let src = out.path().join("Maildir");
    assert!(Command::new("cp").arg("-a").arg(&root).arg(&src).status().unwrap().success());
    let dst_parent = out.path().join("dst");
    fs::create_dir(&dst_parent).unwrap();
    chown_tree(&src, 65534, 65534);
    chown_tree(&dst_parent, 65534, 65534);
    let dest = dst_parent.join("backup");

    // Sanity: readable, it works as nobody.
    let ok = dst_parent.join("ok");
    let r = Run::of(as_nobody(&src.display().to_string(), &ok));
    assert_eq!(r.code(), Some(0), "{}", r.show());
    assert_eq!(churn::scan_message_ids(&ok).len(), 20);

    let victim = churn::all_files(&src.join(".Work/cur")).into_iter().next().unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o000)).unwrap();
    let before = listing(&dst_parent);
    let r = Run::of(as_nobody(&src.display().to_string(), &dest));
    assert_eq!(r.code(), Some(EX_NOPERM), "{}", r.show());
    assert!(r.stderr.contains(&victim.display().to_string()), "stderr does not name {}: {}", victim.display(), r.show());
    assert!(r.stderr.contains("ermission denied"), "{}", r.show());
    assert_eq!(listing(&dst_parent), before, "{}", r.show());
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();

    // An unreadable cur/ directory.
    let cur = src.join(".Work/cur");
    fs::set_permissions(&cur, fs::Permissions::from_mode(0o000)).unwrap();
    let r = Run::of(as_nobody(&src.display().to_string(), &dest));
    fs::set_permissions(&cur, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(r.code(), Some(EX_NOPERM), "{}", r.show());
    assert!(r.stderr.contains(&cur.display().to_string()), "stderr does not name {}: {}", cur.display(), r.show());
    assert_eq!(listing(&dst_parent), before, "{}", r.show());
}

/// A tmpfs mounted for the test, unmounted (lazily, if busy) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"]).arg(dir).status().unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !Command::new("umount").arg(&self.0).status().map(|s| s.success()).unwrap_or(false) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn no_space_left_on_destination() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, USER, &["INBOX", "Work", "Sent"], 200);
    let root = d.maildir(USER);
    let out = tempdir();
    let small = Tmpfs::mount(&out.path().join("small"), "1m");
    let dest = small.0.join("backup");
    // 600 files of 0.5-3.5 kB: well over 1 MiB on tmpfs (a page per file at least).
    let r = assert_refused(&root.display().to_string(), &dest, &["-q"], EX_CANTCREAT, &["No space left", &small.0.display().to_string()]);
    assert!(listing(&small.0).is_empty(), "left on the full filesystem: {:?} {}", listing(&small.0), r.show());
    // The failed run left nothing that keeps the space: a small Maildir then fits.
    drop(small);
    let small = Tmpfs::mount(&out.path().join("small2"), "1m");
    let d2 = Dovecot::start(DovecotOptions::default());
    populate(&d2, USER, &["INBOX"], 20);
    let ok = small.0.join("backup");
    let r = Run::of(backup_cmd(&d2.maildir(USER).display().to_string(), &ok, &["-q"]));
    assert_eq!(r.code(), Some(0), "{}", r.show());
}

#[test]
fn lock_held_past_the_lock_timeout() {
    let d = Dovecot::start(DovecotOptions::default());
    let root = small_maildir(&d);
    let rs = root.display().to_string();
    let out = tempdir();
    let dest = out.path().join("backup");

    // INBOX's lock held by `maildir-backup lock` (our CLI, Dovecot's lock format).
    let lock = root.join("dovecot-uidlist.lock");
    // (`sleep` ends by itself: see the report about signals forwarded by `lock`.)
    let mut holder: Child = Command::new(BIN).arg("lock").arg(&root).args(["--", "sleep", "5"]).stdin(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while !lock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "lock holder did not lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = assert_refused(&rs, &dest, &["--lock-timeout", "2"], EX_TEMPFAIL, &[&lock.display().to_string()]);
    assert!(r.elapsed >= Duration::from_secs(2) && r.elapsed < Duration::from_secs(10), "{}", r.show());
    assert!(lock.exists(), "someone else's lock was removed");
    assert!(holder.wait().unwrap().success());
    assert!(!lock.exists());

    // A folder's lock held the way Dovecot holds it (O_EXCL, "<live pid>:<host>").
    let work_ctl = d.mailbox_path(USER, "Work", "control");
    let fake = fake_uidlist_lock(&work_ctl);
    let r = assert_refused(&rs, &dest, &["--lock-timeout", "1"], EX_TEMPFAIL, &[&fake.path().display().to_string()]);
    assert!(r.elapsed >= Duration::from_secs(1), "{}", r.show());
    assert!(fake.path().exists());
    fake.release();

    // Free again: the same DEST now works, and no lock of ours is left in the source.
    let r = Run::of(backup_cmd(&rs, &dest, &["-q", "--lock-timeout", "5"]));
    assert_eq!(r.code(), Some(0), "{}", r.show());
    let locks: Vec<PathBuf> = churn::all_files(&root).into_iter().filter(|f| f.to_string_lossy().ends_with(".lock")).collect();
    assert!(locks.is_empty(), "{locks:?}");
}

#[test]
fn staging_left_by_a_dead_run_is_cleaned_by_the_next() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, USER, &["INBOX", "Work", "Sent", "Archive"], 600);
    let root = d.maildir(USER);
    let rs = root.display().to_string();
    let total = churn::scan_message_ids(&root).len();
    let out = tempdir();

    // (a) Junk where the staging dir goes.
    let dest = out.path().join("a");
    let staging = staging_of(&dest);
    fs::create_dir_all(staging.join("cur")).unwrap();
    fs::create_dir_all(staging.join(".Junk/cur")).unwrap();
    fs::write(staging.join("cur/1700000000.M1P1.junk:2,S"), "From: x\r\nMessage-ID: <junk@staging>\r\n\r\n").unwrap();
    fs::write(staging.join("maildir-backup.manifest"), "garbage").unwrap();
    let r = Run::of(backup_cmd(&rs, &dest, &["-q"]));
    assert_eq!(r.code(), Some(0), "{}", r.show());
    assert!(!staging.exists() && !staging_lock_of(&dest).exists());
    assert!(!dest.join(".Junk").exists());
    let ids = churn::scan_message_ids(&dest);
    assert!(!ids.contains_key("<junk@staging>"));
    assert_eq!(ids.len(), total);
    let v = Run::of({
        let mut c = Command::new(BIN);
        c.arg("verify").arg(&dest);
        c
    });
    assert_eq!(v.code(), Some(0), "{}", v.show());

    // (b) A backup SIGKILLed while it copies.
    let dest = out.path().join("b");
    let staging = staging_of(&dest);
    let mut child = backup_cmd(&rs, &dest, &["-q", "-j", "1"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    let killed_with = loop {
        let n = churn::all_files(&staging).len();
        if n >= 50 {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            break n;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the backup finished ({st}) before it could be killed mid-copy");
        }
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(staging.is_dir(), "a SIGKILLed run leaves its staging dir");
    assert!(!dest.exists());
    let left = churn::all_files(&staging).len();
    eprintln!("killed with {killed_with} files staged ({left} left behind); staging lock left: {}", staging_lock_of(&dest).exists());

    // The next run, right away.
    let r = Run::of(backup_cmd(&rs, &dest, &["-q"]));
    assert_eq!(r.code(), Some(0), "rerun right after the killed one: {}", r.show());
    assert!(!staging.exists() && !staging_lock_of(&dest).exists());
    assert_eq!(churn::scan_message_ids(&dest).len(), total);
    let v = Run::of({
        let mut c = Command::new(BIN);
        c.arg("verify").arg(&dest);
        c
    });
    assert_eq!(v.code(), Some(0), "{}", v.show());
    // Dovecot is not blocked by anything the killed run left in the source.
    let mut imap = d.imap(USER);
    imap.set_read_timeout(Some(Duration::from_secs(10)));
    imap.append("INBOX", "", &message(1, 100)).unwrap();
    imap.logout();
}
