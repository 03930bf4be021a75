//! Faults: a full or failing disk and `kill -9`, at each point where backup, restore and prune
//! write, in turn. An LD_PRELOAD shim (`support/faults.c`) counts the calls that write into the
//! destination (or target, or repository) and makes the N-th fail with ENOSPC or EIO, or kills
//! the process right before it. Every fault must give a clear error (or leave a run that the
//! next one completes), never a half backup in sight, never a lost or changed message in the
//! source or the target; and the next run must go through.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use support::repo_helpers::with_bases;
use support::{cli, cli_env, Run, EX_CANTCREAT, EX_IOERR};

/// The shim, built once per test binary.
fn faults_so() -> &'static Path {
    static SO: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SO.get_or_init(|| {
        let t = tempfile::tempdir().expect("temp dir");
        let so = t.path().join("faults.so");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/faults.c");
        let out = Command::new("cc").args(["-shared", "-fPIC", "-Wall", "-o"]).arg(&so).arg(&src).arg("-ldl").output().expect("run cc");
        assert!(out.status.success(), "cc {}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
        (t, so)
    })
    .1
}

/// How a write is to fail.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Enospc,
    Eio,
    Kill,
}

impl Fault {
    fn env(self, under: &Path, at: usize) -> Vec<(String, String)> {
        let mut env = vec![
            ("LD_PRELOAD".to_string(), faults_so().display().to_string()),
            ("MB_FAULT_UNDER".to_string(), under.display().to_string()),
            ("MB_FAULT_AT".to_string(), at.to_string()),
        ];
        match self {
            Fault::Enospc => env.push(("MB_FAULT_ERRNO".into(), "ENOSPC".into())),
            Fault::Eio => env.push(("MB_FAULT_ERRNO".into(), "EIO".into())),
            Fault::Kill => env.push(("MB_FAULT_ACTION".into(), "kill".into())),
        }
        env
    }

    /// The exit code and the words of the error a failed write must give.
    fn expected(self) -> (i32, &'static str) {
        match self {
            Fault::Enospc => (EX_CANTCREAT, "No space left on device"),
            Fault::Eio => (EX_IOERR, "Input/output error"),
            Fault::Kill => unreachable!("a killed run says nothing"),
        }
    }
}

/// `maildir-backup ARGS` with `fault` at the `at`-th write below `under`.
fn cli_faulted(args: &[&str], fault: Fault, under: &Path, at: usize) -> Run {
    let env = fault.env(under, at);
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (k.as_str(), OsStr::new(v))).collect();
    cli_env(args, &env)
}

/// How many writes below `under` a clean `maildir-backup ARGS` makes (and it must succeed).
fn count_writes(args: &[&str], under: &Path) -> usize {
    let count = tempfile::NamedTempFile::new().expect("temp file");
    let r = cli_env(args, &[("LD_PRELOAD", faults_so().as_os_str()), ("MB_FAULT_UNDER", under.as_os_str()), ("MB_FAULT_COUNT", count.path().as_os_str())]);
    r.expect_ok();
    let n: usize = fs::read_to_string(count.path()).expect("count file").trim().parse().expect("a count");
    assert!(n > 10, "the shim saw only {n} writes below {}:\n{}", under.display(), r.show());
    n
}

/// `max` points spread over 1..=n (all of them if there are few), first and last included.
fn points(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (1..=n).collect();
    }
    let mut p: Vec<usize> = (0..max).map(|i| 1 + i * (n - 1) / (max - 1)).collect();
    p.dedup();
    p
}

/// A Maildir by hand: INBOX and two folders, small and big messages (a big one is copied
/// after the locks), a keywords file and a subscriptions file.
fn make_source(root: &Path) {
    for (rel, n) in [("", 12usize), (".Archive", 6), (".Lists.rust", 4)] {
        let f = root.join(rel);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(f.join(sub)).unwrap();
        }
        if !rel.is_empty() {
            fs::write(f.join("maildirfolder"), b"").unwrap();
        }
        for i in 0..n {
            let unique = format!("17000000{i:02}.M{i}P{}.fault{}", rel.len(), rel.replace('.', "_"));
            let size = if i == 3 { 300 * 1024 } else { 200 + 97 * i };
            let body: Vec<u8> = format!("Subject: {unique}\n\n").bytes().chain((0..size).map(|b| b"abcdefghij\n"[b % 11])).collect();
            let (sub, name) = if i % 4 == 0 { ("new", unique) } else { ("cur", format!("{unique}:2,S{}", if i % 3 == 0 { "a" } else { "" })) };
            fs::write(f.join(sub).join(name), body).unwrap();
        }
    }
    fs::write(root.join("dovecot-keywords"), b"0 $Forwarded\n").unwrap();
    fs::write(root.join("subscriptions"), b"Archive\nLists.rust\n").unwrap();
}

/// Every file below `dir` but those in `tmp/` (and lock files): path -> (size, BLAKE3).
fn digest(dir: &Path) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.map(Result::unwrap) {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() && e.file_name() != "tmp" {
                stack.push(p);
            } else if ft.is_file() && !e.file_name().to_string_lossy().ends_with(".lock") {
                let bytes = fs::read(&p).unwrap();
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (bytes.len() as u64, blake3::hash(&bytes).to_hex().to_string()));
            }
        }
    }
    out
}

/// The messages below `dir` as (unique name, BLAKE3), wherever they are (cur/ or new/, any flags).
fn messages(dir: &Path) -> BTreeSet<(String, String)> {
    digest(dir)
        .into_iter()
        .filter(|(p, _)| p.contains("cur/") || p.contains("new/"))
        .map(|(p, (_, sum))| {
            let name = Path::new(&p).file_name().unwrap().to_string_lossy().into_owned();
            (name.split(':').next().unwrap().to_string(), sum)
        })
        .collect()
}

/// The store entries a snapshot's folders link to (`cur -> ../.store/<id>/cur`); their records
/// may be written against further entries (see `with_bases`).
fn store_links(snapshot: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![snapshot.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().map(Result::unwrap) {
            if let Ok(t) = fs::read_link(e.path()) {
                out.insert(t.iter().rev().nth(1).unwrap().to_string_lossy().into_owned());
            } else if e.file_type().unwrap().is_dir() && e.file_name() != "cur" && e.file_name() != "new" && e.file_name() != "tmp" {
                dirs.push(e.path());
            }
        }
    }
    out
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The next run comes later: locks a killed run left below `dirs` are made 5 s old, past the
/// 2 s in which a lock is not yet judged by its (dead) holder.
fn age_leftover_locks(dirs: &[&Path]) {
    for dir in dirs {
        let found = Command::new("find").arg(dir).args(["-name", "*.lock", "-exec", "touch", "-h", "-d", "5 seconds ago", "{}", "+"]).status().unwrap();
        assert!(found.success());
    }
}

fn verify_ok(backup: &Path) {
    cli(&["verify", s(backup)]).expect_ok();
}

/// A backup whose write fails (ENOSPC, EIO) at any point says so, publishes nothing, leaves
/// nothing behind and changes nothing in the source; a write failing after the publish leaves
/// a whole backup and a warning.
#[test]
fn backup_write_faults_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let (src, out) = (t.path().join("Maildir"), t.path().join("out"));
    make_source(&src);
    fs::create_dir(&out).unwrap();
    let before = digest(&src);
    let n = count_writes(&["backup", "-q", s(&src), s(&out.join("probe"))], &out);
    fs::remove_dir_all(out.join("probe")).unwrap();
    let dest = out.join("b");
    let mut failed = 0;
    for (k, at) in points(n, 40).into_iter().enumerate() {
        let fault = if k % 2 == 0 { Fault::Enospc } else { Fault::Eio };
        let r = cli_faulted(&["backup", "-q", s(&src), s(&dest)], fault, &out, at);
        if r.code() == Some(0) {
            // Only what follows the publish may fail and leave the backup in place (flushing
            // its directory, removing its guard): with a warning that says so.
            assert!(r.stderr.contains("may not survive a crash") || r.stderr.contains("warning: releasing lock"), "no warning:\n{}", r.show());
            verify_ok(&dest);
            fs::remove_dir_all(&dest).unwrap();
            let _ = fs::remove_file(out.join(".b.maildir-backup-staging.lock"));
        } else {
            let (code, words) = fault.expected();
            r.expect_code(code).expect_stderr(&[words, "nothing was published at"]);
            failed += 1;
        }
        assert_eq!(names(&out), BTreeSet::new(), "left behind after fault {fault:?} at write {at}/{n}:\n{}", r.show());
        assert_eq!(digest(&src), before, "the source changed");
    }
    assert!(failed >= 30, "only {failed} of the faults made the backup fail");
    cli(&["backup", "-q", s(&src), s(&dest)]).expect_ok();
    verify_ok(&dest);
    assert_eq!(messages(&dest), messages(&src));
}

/// A restore whose write fails at any point says so and loses or changes nothing in the
/// target; running it again completes it.
#[test]
fn restore_write_faults_leave_the_target_whole() {
    let t = tempfile::tempdir().unwrap();
    let (src, snap) = (t.path().join("Maildir"), t.path().join("snap"));
    make_source(&src);
    cli(&["backup", "-q", s(&src), s(&snap)]).expect_ok();
    let wanted = messages(&snap);

    // Into a live Maildir that has mail of its own: a merge.
    let live = t.path().join("live");
    let own = t.path().join("own");
    make_source(&own);
    fs::remove_dir_all(own.join(".Archive")).unwrap();
    for e in fs::read_dir(own.join("cur")).unwrap().map(Result::unwrap) {
        let renamed = e.file_name().to_string_lossy().replace("fault", "own");
        fs::rename(e.path(), own.join("cur").join(renamed)).unwrap();
    }
    let n = {
        Command::new("cp").arg("-a").arg(&own).arg(&live).status().unwrap();
        let n = count_writes(&["restore", s(&snap), s(&live)], &live);
        fs::remove_dir_all(&live).unwrap();
        n
    };
    let own_before = digest(&own);
    let mut failed = 0;
    for (k, at) in points(n, 30).into_iter().enumerate() {
        let fault = if k % 2 == 0 { Fault::Eio } else { Fault::Enospc };
        Command::new("cp").arg("-a").arg(&own).arg(&live).status().unwrap();
        let r = cli_faulted(&["restore", s(&snap), s(&live)], fault, &live, at);
        // A fault in the clean-up of tmp/ (names already moved into place) harms nothing.
        if r.code() != Some(0) {
            let (code, words) = fault.expected();
            r.expect_code(code).expect_stderr(&[words]);
            failed += 1;
        }
        let after = digest(&live);
        for (path, sum) in &own_before {
            assert_eq!(after.get(path), Some(sum), "{path} of the target lost or changed by fault {fault:?} at write {at}/{n}:\n{}", r.show());
        }
        cli(&["restore", s(&snap), s(&live)]).expect_ok();
        // Every message of the snapshot is there (one the target already had under another
        // name counts: a merge skips what it finds by content).
        let have: BTreeSet<String> = messages(&live).into_iter().map(|(_, sum)| sum).collect();
        let missing: Vec<_> = wanted.iter().filter(|(_, sum)| !have.contains(sum)).collect();
        assert!(missing.is_empty(), "after the second restore, missing: {missing:?}");
        fs::remove_dir_all(&live).unwrap();
    }
    assert!(failed >= 20, "only {failed} of the faults made the restore fail");
}

/// `kill -9` at each point where a backup, a restore or a prune writes: no lock left that
/// blocks the next run, no half backup in sight, no message lost; the next run completes it.
#[test]
fn kill_9_at_every_point_of_backup_restore_and_prune() {
    let t = tempfile::tempdir().unwrap();
    let (src, out) = (t.path().join("Maildir"), t.path().join("out"));
    make_source(&src);
    fs::create_dir(&out).unwrap();
    let mut killed = 0;

    // Backup.
    let n = count_writes(&["backup", "-q", s(&src), s(&out.join("probe"))], &out);
    fs::remove_dir_all(out.join("probe")).unwrap();
    let dest = out.join("b");
    for at in points(n, 20) {
        let r = cli_faulted(&["backup", "-q", s(&src), s(&dest)], Fault::Kill, &out, at);
        assert_eq!(r.status.signal(), Some(9), "not killed at write {at}/{n}:\n{}", r.show());
        killed += 1;
        age_leftover_locks(&[&out, &src]);
        if dest.exists() {
            // Killed after the publish: whole. Its guard may be left beside it, stale: it keeps
            // no run from anything (a run into this DEST stops at the DEST itself).
            verify_ok(&dest);
            let _ = fs::remove_file(out.join(".b.maildir-backup-staging.lock"));
        } else {
            cli(&["backup", "-q", s(&src), s(&dest)]).expect_ok();
        }
        assert_eq!(names(&out), BTreeSet::from(["b".to_string()]), "after kill at write {at}/{n} and a new run");
        assert_eq!(messages(&dest), messages(&src));
        fs::remove_dir_all(&dest).unwrap();
    }

    // Restore, into a new Maildir.
    let snap = out.join("snap");
    cli(&["backup", "-q", s(&src), s(&snap)]).expect_ok();
    let target = t.path().join("target");
    let n = count_writes(&["restore", s(&snap), s(&target)], &target);
    fs::remove_dir_all(&target).unwrap();
    for at in points(n, 15) {
        let r = cli_faulted(&["restore", s(&snap), s(&target)], Fault::Kill, &target, at);
        assert_eq!(r.status.signal(), Some(9), "not killed at write {at}/{n}:\n{}", r.show());
        killed += 1;
        age_leftover_locks(&[&target]);
        cli(&["restore", s(&snap), s(&target)]).expect_ok();
        let have = messages(&target);
        assert_eq!(have, messages(&snap), "after kill at write {at}/{n} and a new restore");
        fs::remove_dir_all(&target).unwrap();
    }

    // Prune, of a repository with four snapshots down to one.
    let repo = t.path().join("repo");
    let template = t.path().join("repo-template");
    for i in 0..4 {
        fs::write(src.join("new").join(format!("17100000{i}.M1P1.extra")), format!("Subject: {i}\n\nextra\n")).unwrap();
        cli(&["backup", "-q", "--repo", s(&template), "--name", "alice", s(&src)]).expect_ok();
        std::thread::sleep(std::time::Duration::from_millis(1100)); // snapshot names are per second
    }
    let series = |repo: &Path| -> Vec<String> { names(&repo.join("alice")).into_iter().filter(|n| n.starts_with("20")).collect() };
    let newest = series(&template).last().cloned().unwrap();
    let newest_messages = messages(&template.join("alice").join(&newest));
    let copy_template = || {
        let _ = fs::remove_dir_all(&repo);
        assert!(Command::new("cp").arg("-a").arg(&template).arg(&repo).status().unwrap().success());
    };
    copy_template();
    let n = count_writes(&["prune", s(&repo), "--keep-last", "1"], &repo);
    for at in points(n, 20) {
        copy_template();
        let r = cli_faulted(&["prune", s(&repo), "--keep-last", "1"], Fault::Kill, &repo, at);
        assert_eq!(r.status.signal(), Some(9), "not killed at write {at}/{n}:\n{}", r.show());
        killed += 1;
        cli(&["prune", s(&repo), "--keep-last", "1"]).expect_ok();
        assert_eq!(series(&repo), [newest.clone()], "after kill at write {at}/{n} and a new prune");
        let left: Vec<String> = names(&repo.join("alice")).into_iter().filter(|n| n.starts_with('.') && n != ".store").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // The store holds what the snapshot left links to, and nothing a killed run made.
        let entries: Vec<String> = names(&repo.join("alice/.store")).into_iter().filter(|n| !n.starts_with('.')).collect();
        let needed = with_bases(&repo.join("alice/.store"), store_links(&repo.join("alice").join(&newest)).into_iter().collect());
        assert_eq!(entries.iter().cloned().collect::<std::collections::BTreeSet<_>>(), needed, "store entries after kill at write {at}/{n} and a new prune");
        verify_ok(&repo.join("alice/latest"));
        assert_eq!(messages(&repo.join("alice").join(&newest)), newest_messages);
    }
    assert!(killed >= 50, "only {killed} kill points");
    eprintln!("kill -9 at {killed} points: every next run completed");
}
