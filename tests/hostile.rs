//! Backup and restore of Maildirs owned by a hostile user (symlinks, special files, races, forgeries).
//!
//! Root runs `maildir-backup` over Maildirs whose owner is hostile: she controls every name, link, file type
//! and size inside, and races us. Black-box tests against the CLI; the attacker is a real unprivileged user
//! (`mbhostile`, created on first use) whose perl loops run as her through `setpriv`. A root-owned victim tree
//! beside her home must stay exactly as it was (entries, modes, owners, sizes, mtimes, contents, and the
//! secret's atime: never even read), and its marker string must never reach a backup, a target or the output.
//! Every CLI run has a 60 s hard limit (a hang fails, never hangs the suite). Harness: tests/support/hostile.rs.
//!
//! Backup (as root, of her Maildir):
//! - `backup_never_follows_symlinked_folders`: `.Evil -> victim dir`, `.Work2 -> .Work`: warned ("symlink"),
//!   exit 0, exactly her messages.
//! - `backup_never_follows_symlinked_cur_or_new`: a folder's cur/ or new/ (INBOX's too) a symlink to a victim
//!   dir of marker-holding messages: never followed; exit 0 (then the other folders complete) or a refusal.
//! - `backup_never_follows_symlinked_control_files`: dovecot-uidlist, dovecot-keywords, maildirfolder,
//!   subscriptions, dovecot-uidvalidity each a symlink to the secret: exit 0, warned, not read.
//! - `backup_survives_fifos`, `backup_survives_unix_sockets`, `backup_survives_device_nodes`: a message and
//!   each control file replaced by that file type: exit 0 in time, warned, no uidlist lock left behind.
//! - `backup_skips_a_sparse_2gib_message`: peak RSS < 100 MiB, the holes never read, the file left out
//!   with a warning naming it ("sparse"), the backup < 1 MiB.
//! - `many_links_to_one_file_cost_one_copy`: one 4 MiB file under 200 message names, and linked as every
//!   folder's uidlist and 50 uidvalidity markers (links cost her no quota): every message name backed up and
//!   restored, the data stored once each time; the linked control files skipped with a warning.
//! - `a_plain_backup_is_closed_to_her_whatever_her_modes`: her Maildir opened 0755; the backup's top dir is
//!   0700 root: she can neither list it nor append to or truncate her messages in it.
//! - `backup_of_a_huge_uidlist_warns_and_stays_small`: a 1 GiB dovecot-uidlist: exit 0, warned, peak RSS
//!   < 100 MiB, every message backed up.
//! - `backup_races_swapping_dirs_and_control_files_for_symlinks`: her loop swaps folder dirs, cur/, new/ and
//!   control files for symlinks to the victim and back while root backs up again and again: no marker, the
//!   victim untouched, a backup that exits 0 verifies.
//! - `snapshot_repository_is_root_only`: a repository root creates is 0700 root; as her, mv / rm -rf /
//!   append / create inside a snapshot all fail and the snapshot is unchanged.
//!
//! Restore (as root, from a snapshot of a clean Maildir, into hers: a merge into her live mail, or a full
//! restore into her Maildir with no mail):
//! - `restore_into_symlinked_target_folders`: `.Work`, `.Work/cur`, `.Work/new`, `.Work/tmp` symlinks to
//!   victim dirs: the victim untouched, her mail kept; exit 0 with every snapshot message in, or a refusal
//!   naming the path and "symlink".
//! - `restore_never_writes_through_symlinked_control_files`: dovecot-uidlist, dovecot-keywords,
//!   maildirfolder (in a folder dir without cur/), subscriptions, dovecot-uidvalidity symlinks to the secret,
//!   and a spray of symlinks under the old predictable temp names (`dovecot-uidlist.maildir-backup-restore.PID`,
//!   `dovecot-keywords.maildir-backup.PID`) for the next pids: same expectations.
//! - `control_dirs_elsewhere_are_never_followed`: CONTROL= in her home; a folder's control dir, or the
//!   control root itself, a symlink to a victim dir: the backup neither locks nor reads through it (warned;
//!   a symlinked root refused), the restore refuses it.
//! - `restore_chown_race_in_tmp`: her loop (woken by inotify) replaces every file appearing in tmp/ and
//!   `.Work/tmp/` with a symlink to the secret (then to a victim dir) while restores run: the victim keeps its
//!   owner, mode and content.
//! - `restore_races_swapping_dirs_and_control_files`: the backup race's loop (also swapping tmp/ and
//!   `.Work/tmp`), during restores; it strikes once the restore has begun writing, past any up-front check.
//!
//! Forged snapshots (a copy of a good one, edited as root):
//! - `forged_manifests_are_refused`: traversal or absolute `folder`/`path`, `name` with `..`, `/`, NUL or
//!   newline, `unique` with `/`, a 100 MiB line, header counts that disagree with the records: restore exits
//!   65 within 10 s (peak RSS < 100 MiB), her home and a missing target untouched; verify exits non-zero.
//! - `forged_snapshot_with_symlinked_messages_is_refused`: messages that are symlinks to the secret (the
//!   manifest matching it): restore refuses, the marker never lands in the target.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{lchown, symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::hostile::*;
use support::EX_DATAERR;
use support::repo_helpers::{assert_same_tree, tree_listing};

type Hashes = std::collections::BTreeMap<String, usize>;

/// Her usual Maildir: INBOX and Work with mail.
const HERS: &[(&str, usize)] = &[("", 6), (".Work", 8)];
/// Her Maildir with folders but no mail (a restore into it is a full one).
const EMPTY: &[(&str, usize)] = &[("", 0), (".Work", 0)];

/// Backs up her Maildir into `top/NAME`; panics unless it exits 0, then checks the victim.
fn backup_ok(w: &World, name: &str, what: &str) -> (Out, PathBuf) {
    let dest = w.top.join(name);
    let o = backup(&w.maildir, &dest);
    assert!(o.ok(), "{what}: backup failed:\n{}", o.show());
    w.victim.check(what);
    w.victim.assert_not_leaked(Some(&o), &[&dest], what);
    (o, dest)
}

fn assert_verifies(dest: &Path, what: &str) {
    let v = verify(dest);
    assert!(v.ok(), "{what}: verify of the backup failed:\n{}", v.show());
}

// ---------------------------------------------------------------------------------------------
// Backup

#[test]
fn backup_never_follows_symlinked_folders() {
    let w = World::new();
    w.her_maildir(HERS);
    let want = mail_hashes(&w.maildir);
    w.plant_symlink(".Evil", &w.victim.mail);
    w.plant_symlink(".Work2", Path::new(".Work"));
    let (o, dest) = backup_ok(&w, "b", "symlinked folders");
    for name in [".Evil", ".Work2"] {
        assert!(o.says_symlink(name), "no warning about the symlinked folder {name}:\n{}", o.show());
    }
    assert_eq!(mail_hashes(&dest), want, "the backup must hold exactly her messages, once each");
    assert_verifies(&dest, "symlinked folders");
}

#[test]
fn backup_never_follows_symlinked_cur_or_new() {
    let w = World::new();
    let mut cases = Cases::new(&w.victim);
    for (i, (rel, to, other)) in
        [(".Work/cur", "cur", ""), (".Work/new", "new", ""), ("new", "new", ".Work"), ("cur", "cur", ".Work")].into_iter().enumerate()
    {
        let what = format!("{rel} -> {}", w.victim.mail.join(to).display());
        cases.run(&what.clone(), || {
        w.her_maildir(HERS);
        let others = folder_hashes(&w.maildir.join(other));
        w.plant_symlink(rel, &w.victim.mail.join(to));
        let dest = w.top.join(format!("b{i}"));
        let o = backup(&w.maildir, &dest);
        w.victim.check(&what);
        w.victim.assert_not_leaked(Some(&o), &[&dest], &what);
        if o.ok() {
            assert_mail_kept(&others, &mail_hashes(&dest), &format!("{what}: the other folder's messages"));
            assert_verifies(&dest, &what);
        } else {
            assert!(!dest.exists(), "{what}: a failed backup published {}", dest.display());
        }
        });
    }
    cases.finish();
}

/// Control files a backup copies: each folder's, and the per-user ones in the root.
const CONTROL_FILES: &[&str] =
    &[".Work/dovecot-uidlist", ".Work/dovecot-keywords", ".Work/maildirfolder", "dovecot-uidlist", "dovecot-keywords", "subscriptions", "dovecot-uidvalidity"];

#[test]
fn backup_never_follows_symlinked_control_files() {
    let w = World::new();
    let mut cases = Cases::new(&w.victim);
    for (i, rel) in CONTROL_FILES.iter().enumerate() {
        let what = format!("{rel} -> the secret");
        cases.run(&what.clone(), || {
        w.her_maildir(HERS);
        let want = mail_hashes(&w.maildir);
        w.plant_symlink(rel, &w.victim.secret);
        let (o, dest) = backup_ok(&w, &format!("b{i}"), &what);
        let base = rel.rsplit('/').next().unwrap();
        assert!(o.stderr_line_with(&[base]), "{what}: no warning naming {base}:\n{}", o.show());
        assert_eq!(mail_hashes(&dest), want, "{what}: the backup's messages");
        assert_verifies(&dest, &what);
        });
    }
    cases.finish();
}

/// Replaces `p` (as her where she can: a FIFO or a socket; a device node as root, then hers) with a file
/// of `kind`.
fn make_special(w: &World, kind: &str, p: &Path) {
    remove_any(p);
    match kind {
        "fifo" => {
            her_perl("use POSIX (); POSIX::mkfifo($ARGV[0], 0600) or die \"mkfifo: $!\"", &[p]);
        }
        "socket" => {
            her_perl("use IO::Socket::UNIX; IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0], Listen => 1) or die \"bind: $!\"", &[p]);
        }
        "device" => {
            nix::sys::stat::mknod(p, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(1, 3))
                .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
            lchown(p, Some(w.uid), Some(w.gid)).unwrap();
        }
        _ => unreachable!(),
    }
}

/// A message of `.Work`, then each control file, replaced by a special file of `kind`: every backup ends in
/// time with exit 0, warns naming the file, leaves no uidlist lock and holds all the other messages.
fn special_files(kind: &str, extra: &[&str]) {
    let w = World::new();
    // The control files first: the old code blocks forever opening a FIFO there.
    let mut places: Vec<String> = CONTROL_FILES.iter().map(|s| s.to_string()).collect();
    places.push("a message in .Work/cur".into());
    for (i, place) in places.iter().enumerate() {
        w.her_maildir(HERS);
        let p = if place.starts_with("a message") {
            let cur = w.maildir.join(".Work/cur");
            let mut names: Vec<PathBuf> = fs::read_dir(&cur).unwrap().flatten().map(|e| e.path()).collect();
            names.sort();
            names.swap_remove(0)
        } else {
            w.maildir.join(place)
        };
        make_special(&w, kind, &p);
        let want = mail_hashes(&w.maildir);
        let what = format!("{} as a {kind}", p.strip_prefix(&w.maildir).unwrap().display());
        let dest = w.top.join(format!("b{i}"));
        let o = backup_with(&w.maildir, &dest, extra);
        assert!(o.ok(), "{what}: backup failed:\n{}", o.show());
        let base = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(o.stderr_line_with(&[&base]), "{what}: no warning naming {base}:\n{}", o.show());
        let locks = uidlist_locks(&w.maildir);
        assert!(locks.is_empty(), "{what}: locks left behind: {locks:?}");
        assert_eq!(kind_of(&p), if kind == "device" { "char device" } else { kind }, "{what}: the special file was replaced");
        assert_eq!(mail_hashes(&dest), want, "{what}: the backup's messages");
        assert_verifies(&dest, &what);
    }
}

#[test]
fn backup_survives_fifos() {
    special_files("fifo", &[]);
}

#[test]
fn backup_survives_unix_sockets() {
    special_files("socket", &[]);
}

#[test]
fn backup_survives_device_nodes() {
    special_files("device", &[]);
}

/// The same with `--link`: what is linked is the file opened and checked, never a FIFO.
#[test]
fn link_backup_survives_fifos() {
    special_files("fifo", &["--link"]);
}

#[test]
fn backup_skips_a_sparse_2gib_message() {
    const SIZE: u64 = 2 << 30;
    let w = World::new();
    w.her_maildir(HERS);
    let want = mail_hashes(&w.maildir);
    let name = format!("1700000900.M9P9.sparse,S={SIZE}:2,S");
    let p = w.maildir.join("cur").join(&name);
    her_perl(
        "open(my $f, '>', $ARGV[0]) or die $!; print $f \"Subject: sparse\\r\\n\\r\\n\"; close $f; truncate($ARGV[0], $ARGV[1]) or die $!",
        &[p.as_os_str(), OsStr::new(&SIZE.to_string())],
    );
    let dest = w.top.join("b");
    let o = backup(&w.maildir, &dest);
    assert!(o.ok(), "backup failed:\n{}", o.show());
    assert!(o.maxrss_kib < RSS_LIMIT_KIB, "peak RSS {} KiB:\n{}", o.maxrss_kib, o.show());
    // Holes cost her nothing and would cost us a read (and a checksum) of every byte: a message
    // file is never sparse, so it is left out, and said so.
    assert!(o.stderr_line_with(&[&name, "sparse"]), "no warning naming the sparse message:\n{}", o.show());
    assert!(fs::symlink_metadata(dest.join("cur").join(&name)).is_err(), "the sparse file is in the backup");
    let mut allocated = 0;
    walk(&dest, &mut |_, md| allocated += md.blocks() * 512);
    assert!(allocated < 1 << 20, "the backup allocates {allocated} bytes");
    assert_mail_kept(&want, &mail_hashes(&dest), "her other messages");
    assert_verifies(&dest, "sparse");
}

/// Links cost her no quota: one 4 MiB message under 200 names would be 800 MiB in a backup (and again in a
/// restore) that copied each name; the same file linked as every folder's dovecot-uidlist and as many
/// dovecot-uidvalidity.* markers, likewise. The backup holds every message name and stores each source
/// file once; a control file with several names is skipped (Dovecot's never have more than one); the
/// restore into a new Maildir stores the message once too.
#[test]
fn many_links_to_one_file_cost_one_copy() {
    const SIZE: u64 = 4 << 20;
    const LINKS: usize = 200;
    let w = World::new();
    w.her_maildir(&[("", 2), (".Work", 2), (".A", 1), (".B", 1), (".C", 1)]);
    let first = w.maildir.join("cur").join(format!("1700000950.M0P9.links,S={SIZE}:2,S"));
    her_perl(
        "open(my $f, '>', $ARGV[0]) or die $!; print $f \"Subject: linked\\r\\n\\r\\n\"; print $f 'x' x ($ARGV[1] - 21); close $f; \
         for my $i (1 .. $ARGV[2]) { (my $n = $ARGV[0]) =~ s/M0P9/M${i}P9/; link($ARGV[0], $n) or die $! } \
         for my $d (@ARGV[3 .. $#ARGV]) { unlink \"$d/dovecot-uidlist\"; link($ARGV[0], \"$d/dovecot-uidlist\") or die $! } \
         for my $i (1 .. 50) { link($ARGV[0], \"$ARGV[3]/dovecot-uidvalidity.$i\") or die $! }",
        &[
            first.as_os_str(),
            OsStr::new(&SIZE.to_string()),
            OsStr::new(&(LINKS - 1).to_string()),
            w.maildir.as_os_str(),
            w.maildir.join(".Work").as_os_str(),
            w.maildir.join(".A").as_os_str(),
            w.maildir.join(".B").as_os_str(),
            w.maildir.join(".C").as_os_str(),
        ],
    );
    let want = mail_hashes(&w.maildir);
    let allocated = |root: &Path| {
        let mut inodes = std::collections::BTreeMap::new();
        walk(root, &mut |_, md| {
            if md.is_file() {
                inodes.insert(md.ino(), md.blocks() * 512);
            }
        });
        inodes.values().sum::<u64>()
    };
    let dest = w.top.join("b");
    let o = backup(&w.maildir, &dest);
    assert!(o.ok(), "backup failed:\n{}", o.show());
    assert_eq!(mail_hashes(&dest), want, "the backup's messages (every name)");
    assert!(allocated(&dest) < 2 * SIZE, "the backup allocates {} bytes for {LINKS} links to one {SIZE}-byte file", allocated(&dest));
    assert!(o.stderr_line_with(&[".Work/dovecot-uidlist", "names"]), "no warning about the linked uidlist:\n{}", o.show());
    assert_verifies(&dest, "links");

    let target = w.top.join("restored/Maildir");
    let o = restore(&dest, &target);
    assert!(o.ok(), "restore failed:\n{}", o.show());
    assert_eq!(mail_hashes(&target), want, "the restored messages (every name)");
    assert!(allocated(&target) < 2 * SIZE, "the restore allocates {} bytes for {LINKS} names of one file", allocated(&target));
}

/// She opens her Maildir to everyone (chmod 755, as a user may): the plain backup root makes of it must still
/// be root's alone — she can neither list it nor change her messages in it.
#[test]
fn a_plain_backup_is_closed_to_her_whatever_her_modes() {
    let w = World::new();
    w.her_maildir(HERS);
    her_perl("chmod(0755, @ARGV) == @ARGV or die $!", &[w.maildir.clone(), w.maildir.join("cur"), w.maildir.join(".Work"), w.maildir.join(".Work/cur")]);
    let dest = w.top.join("b");
    let o = backup(&w.maildir, &dest);
    assert!(o.ok(), "backup failed:\n{}", o.show());
    let md = fs::symlink_metadata(&dest).unwrap();
    assert_eq!((md.mode() & 0o777, md.uid()), (0o700, 0), "the backup's top directory");
    let message = fs::read_dir(dest.join("cur")).unwrap().flatten().next().unwrap().path();
    let before = tree_listing(&dest);
    for (what, c) in [
        ("list the backup", { let mut c = as_her("ls"); c.arg(&dest); c }),
        ("append to a message", { let mut c = as_her("sh"); c.args(["-c", "echo owned >> \"$0\""]).arg(&message); c }),
        ("truncate a message", { let mut c = as_her("truncate"); c.args(["-s", "0"]).arg(&message); c }),
    ] {
        let r = run_limited(c, CLI_LIMIT);
        assert!(!r.ok(), "as {HOSTILE}, {what} succeeded");
    }
    assert_same_tree(&before, &tree_listing(&dest), "the backup");
    assert_verifies(&dest, "closed");
}

#[test]
fn backup_of_a_huge_uidlist_warns_and_stays_small() {
    let w = World::new();
    w.her_maildir(HERS);
    let want = mail_hashes(&w.maildir);
    her_perl("truncate($ARGV[0], 1 << 30) or die $!", &[w.maildir.join(".Work/dovecot-uidlist")]);
    let dest = w.top.join("b");
    let o = backup(&w.maildir, &dest);
    assert!(o.ok(), "backup failed:\n{}", o.show());
    assert!(o.maxrss_kib < RSS_LIMIT_KIB, "peak RSS {} KiB:\n{}", o.maxrss_kib, o.show());
    assert!(o.stderr_line_with(&[".Work", "dovecot-uidlist"]), "no warning naming .Work/dovecot-uidlist:\n{}", o.show());
    assert_eq!(mail_hashes(&dest), want, "the backup's messages");
}

/// Folder dirs and control files her racers swap for symlinks.
const RACE_DIRS: &[&str] = &[".Work", ".Work/cur", ".Work/new", "new", ".Other"];
const RACE_FILES: &[&str] = &[".Work/dovecot-uidlist", ".Work/dovecot-keywords", ".Work/maildirfolder", "dovecot-uidlist", "subscriptions"];

#[test]
fn backup_races_swapping_dirs_and_control_files_for_symlinks() {
    backups_race_swapping_dirs_and_control_files(&[]);
}

/// With `--link`, nothing of hers is linked that she swapped in: only files opened without
/// following a link and checked regular.
#[test]
fn link_backup_races_swapping_dirs_and_control_files_for_symlinks() {
    backups_race_swapping_dirs_and_control_files(&["--link"]);
}

fn backups_race_swapping_dirs_and_control_files(extra: &[&str]) {
    let w = World::new();
    w.her_maildir(&[("", 20), (".Work", 30), (".Other", 10)]);
    let want = mail_hashes(&w.maildir);
    let racer = Racer::start("swap dirs and control files", SWAP_BODY, &w.swap_args(RACE_DIRS, RACE_FILES, &[]));
    let t = Instant::now();
    let (mut runs, mut ok) = (0, 0);
    while runs < 40 && (runs < 10 || t.elapsed() < Duration::from_secs(15)) {
        let what = format!("backup {runs} {extra:?} during the race");
        let dest = w.top.join(format!("b{runs}"));
        let o = backup_with(&w.maildir, &dest, extra);
        w.victim.assert_not_leaked(Some(&o), &[&dest], &what);
        w.victim.check(&what);
        if o.ok() {
            ok += 1;
            assert_verifies(&dest, &what);
        }
        remove_any(&dest);
        runs += 1;
    }
    let swaps = racer.stop();
    w.assert_stash_clean();
    eprintln!("{runs} backups ({ok} exit 0) during {swaps} swaps in {:.1?}", t.elapsed());
    assert!(swaps > 100, "the racer swapped only {swaps} times: the race proved nothing");
    // Her Maildir is whole again, and so is a backup of it.
    let (_, dest) = backup_ok(&w, "after", "backup after the race");
    assert_eq!(mail_hashes(&dest), want, "backup after the race");
}

#[test]
fn snapshot_repository_is_root_only() {
    let w = World::new();
    w.her_maildir(HERS);
    let repo = w.top.join("repo");
    let o = cli(&[OsStr::new("backup"), OsStr::new("-q"), OsStr::new("--repo"), repo.as_os_str(), OsStr::new("--name"), OsStr::new("u"), w.maildir.as_os_str()]);
    assert!(o.ok(), "{}", o.show());
    let series = repo.join("u");
    let snap = series.join(fs::read_link(series.join("latest")).unwrap());
    let message = fs::read_dir(snap.join(".Work/cur")).unwrap().flatten().next().unwrap().path();
    let before = tree_listing(&repo);

    let loot = w.home.join("loot");
    let mut problems = Vec::new();
    let md = fs::symlink_metadata(&repo).unwrap();
    if md.mode() & 0o7777 != 0o700 || md.uid() != 0 {
        problems.push(format!("{} is mode {:o} owned by uid {}, not 0700 root", repo.display(), md.mode() & 0o7777, md.uid()));
    }
    let attempts: Vec<(&str, Command)> = vec![
        ("mv the snapshot away", { let mut c = as_her("mv"); c.arg(&snap).arg(&loot); c }),
        ("rm -rf the snapshot", { let mut c = as_her("rm"); c.arg("-rf").arg(&snap); c }),
        ("append to a message", { let mut c = as_her("sh"); c.args(["-c", "echo owned >> \"$0\""]).arg(&message); c }),
        ("create a file in the snapshot", { let mut c = as_her("touch"); c.arg(snap.join("planted")); c }),
        ("create a file in its .Work/cur", { let mut c = as_her("touch"); c.arg(snap.join(".Work/cur/1700000000.M1P1.planted,S=0:2,S")); c }),
    ];
    for (what, c) in attempts {
        let r = run_limited(c, CLI_LIMIT);
        if r.ok() {
            problems.push(format!("as {HOSTILE}, {what} succeeded"));
        }
    }
    let after = tree_listing(&repo);
    if after != before {
        problems.push("the repository changed".into());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_same_tree(&before, &after, "the repository");
}

// ---------------------------------------------------------------------------------------------
// Restore

/// The checks after any restore into her Maildir: the victim untouched, no marker in her home, the mail
/// she had kept. With `snap_mail` (not during races): if the restore exited 0, every message of the
/// snapshot is in; if not, it said "symlink" and named one of `planted`.
fn check_restore(w: &World, o: &Out, before: &Hashes, snap_mail: Option<&Hashes>, planted: &[&str], what: &str) {
    w.victim.check(what);
    w.victim.assert_not_leaked(Some(o), &[&w.home], what);
    assert_mail_kept(before, &mail_hashes(&w.maildir), &format!("{what}: the mail she had"));
    let Some(snap_mail) = snap_mail else { return };
    if o.ok() {
        assert_mail_kept(snap_mail, &mail_hashes(&w.maildir), &format!("{what}: exit 0, so every snapshot message must be in"));
    } else if !planted.is_empty() {
        assert!(planted.iter().any(|p| o.says_symlink(p)), "{what}: the refusal must name the path and say \"symlink\":\n{}", o.show());
    }
}

fn mode_name(full: bool) -> &'static str {
    if full { "full restore" } else { "merge" }
}

#[test]
fn restore_into_symlinked_target_folders() {
    let w = World::new();
    let (snap, _) = w.clean_snapshot("clean", &[("", 6), (".Work", 9)]);
    let snap_mail = mail_hashes(&snap);
    let v = &w.victim;
    let cases: [(&str, PathBuf); 5] = [
        (".Work", v.mail.clone()),
        (".Work", v.sub.clone()),
        (".Work/cur", v.mail.join("cur")),
        (".Work/new", v.mail.join("new")),
        (".Work/tmp", v.mail.join("tmp")),
    ];
    let mut results = Cases::new(v);
    for full in [false, true] {
        for (rel, to) in &cases {
            let what = format!("{}: {rel} -> {}", mode_name(full), to.display());
            results.run(&what.clone(), || {
                w.her_maildir(if full { EMPTY } else { HERS });
                w.plant_symlink(rel, to);
                let before = mail_hashes(&w.maildir);
                let o = restore(&snap, &w.maildir);
                check_restore(&w, &o, &before, Some(&snap_mail), &[rel], &what);
            });
        }
    }
    results.finish();
}

/// Moves her control files into a CONTROL= tree of hers (`home/control`), laid out as Dovecot does for
/// Maildir++: `.INBOX/` and `.Work/` hold each folder's uidlist and keywords, the root the per-user files.
fn move_control_files(w: &World) -> PathBuf {
    let control = w.home.join("control");
    remove_any(&control);
    for (folder, dir) in [("", ".INBOX"), (".Work", ".Work")] {
        fs::create_dir_all(control.join(dir)).unwrap();
        for f in ["dovecot-uidlist", "dovecot-keywords"] {
            fs::rename(w.maildir.join(folder).join(f), control.join(dir).join(f)).unwrap();
        }
    }
    for f in ["subscriptions", "dovecot-uidvalidity", "dovecot-uidvalidity.65a1b2c3"] {
        fs::rename(w.maildir.join(f), control.join(f)).unwrap();
    }
    chown_tree(&control, w.uid, w.gid);
    control
}

/// CONTROL=: her folders' control dirs (uidlist, keywords, and the uidlist lock) are in a tree of hers beside
/// the Maildir. A folder's control dir made a symlink to the victim's Maildir-shaped dir: the backup neither
/// locks nor reads through it (exit 0, warned), the restore refuses it; the control root itself a symlink (in
/// her home, which she can write): both refuse it, naming it.
#[test]
fn control_dirs_elsewhere_are_never_followed() {
    let w = World::new();
    let (snap, _) = w.clean_snapshot("clean", &[("", 6), (".Work", 9)]);
    let snap_mail = mail_hashes(&snap);
    let mut cases = Cases::new(&w.victim);
    for (planted, shown) in [(".Work", ".Work"), ("", "control")] {
        let setup = || {
            w.her_maildir(HERS);
            let control = move_control_files(&w);
            let at = if planted.is_empty() { control.clone() } else { control.join(planted) };
            remove_any(&at);
            symlink(&w.victim.mail, &at).unwrap();
            lchown(&at, Some(w.uid), Some(w.gid)).unwrap();
            format!("maildir:{}:CONTROL={}", w.maildir.display(), control.display())
        };
        let what = format!("backup, control dir {shown} a symlink");
        cases.run(&what.clone(), || {
            let loc = setup();
            let dest = w.top.join("b");
            remove_any(&dest);
            let o = cli(&[OsStr::new("backup"), OsStr::new(&loc), dest.as_os_str()]);
            w.victim.check(&what);
            w.victim.assert_not_leaked(Some(&o), &[&dest], &what);
            assert!(o.says_symlink(shown), "{what}: no refusal or warning naming {shown} as a symlink:\n{}", o.show());
            if planted.is_empty() {
                assert!(!o.ok(), "{what}: a symlinked control root must be refused:\n{}", o.show());
            } else {
                assert!(o.ok(), "{what}: backup failed:\n{}", o.show());
                assert_eq!(mail_hashes(&dest), mail_hashes(&w.maildir), "{what}: the backup's messages");
            }
        });
        let what = format!("merge, control dir {shown} a symlink");
        cases.run(&what.clone(), || {
            let loc = setup();
            let before = mail_hashes(&w.maildir);
            let o = cli(&[OsStr::new("restore"), snap.as_os_str(), OsStr::new(&loc)]);
            check_restore(&w, &o, &before, Some(&snap_mail), &[shown], &what);
            assert!(!o.ok(), "{what}: a restore through a symlinked control dir must be refused:\n{}", o.show());
        });
    }
    cases.finish();
}

#[test]
fn restore_never_writes_through_symlinked_control_files() {
    let w = World::new();
    let (snap, _) = w.clean_snapshot("clean", &[("", 6), (".Work", 9)]);
    let snap_mail = mail_hashes(&snap);
    let files = [".Work/dovecot-uidlist", ".Work/dovecot-keywords", "dovecot-uidlist", "dovecot-keywords", ".Work/maildirfolder", "subscriptions", "dovecot-uidvalidity"];
    let mut cases = Cases::new(&w.victim);
    for full in [false, true] {
        for rel in files {
            let what = format!("{}: {rel} -> the secret", mode_name(full));
            cases.run(&what.clone(), || {
                w.her_maildir(if full { EMPTY } else { HERS });
                if rel == ".Work/maildirfolder" {
                    // A folder dir that is not a Maildir yet (no cur/): the restore creates it, maildirfolder too.
                    for sub in ["cur", "new", "tmp"] {
                        remove_any(&w.maildir.join(".Work").join(sub));
                    }
                }
                w.plant_symlink(rel, &w.victim.secret);
                let before = mail_hashes(&w.maildir);
                let o = restore(&snap, &w.maildir);
                check_restore(&w, &o, &before, Some(&snap_mail), &[rel], &what);
            });
        }

        // Symlinks under the temp names the old code used, for the pids the restore will likely get.
        let what = format!("{}: a spray of symlinks named like the old temp files", mode_name(full));
        cases.run(&what.clone(), || {
            w.her_maildir(if full { EMPTY } else { HERS });
            let (pids, planted) = w.spray_old_temp_names(&["", ".Work"]);
            let before = mail_hashes(&w.maildir);
            let o = restore(&snap, &w.maildir);
            assert!(pids.contains(&(o.pid as u32)), "{what}: the restore got pid {}, outside the sprayed range: the attack proved nothing", o.pid);
            for p in &planted {
                let _ = fs::remove_file(p);
            }
            check_restore(&w, &o, &before, Some(&snap_mail), &[], &what);
        });
    }
    cases.finish();
}

#[test]
fn restore_chown_race_in_tmp() {
    let w = World::new();
    let (snap, _) = w.clean_snapshot("clean", &[("", 120), (".Work", 120)]);
    let mut hijacked = 0;
    for round in 0..10 {
        let full = round % 2 == 1;
        let to = if round < 5 { &w.victim.secret } else { &w.victim.sub };
        let what = format!("{} {round}, tmp/ files hijacked to {}", mode_name(full), to.display());
        w.her_maildir(if full { EMPTY } else { HERS });
        let before = mail_hashes(&w.maildir);
        let racer = Racer::start("hijack tmp/", TMP_HIJACK_BODY, &[to.clone(), w.maildir.join("tmp"), w.maildir.join(".Work/tmp")]);
        let o = restore(&snap, &w.maildir);
        hijacked += racer.stop();
        check_restore(&w, &o, &before, None, &[], &what);
    }
    eprintln!("the racer replaced {hijacked} files in tmp/ with symlinks");
}

#[test]
fn restore_races_swapping_dirs_and_control_files() {
    let w = World::new();
    let (snap, _) = w.clean_snapshot("clean", &[("", 30), (".Work", 60)]);
    let dirs = [".Work", ".Work/cur", ".Work/new", ".Work/tmp", "tmp"];
    let files = [".Work/dovecot-uidlist", ".Work/dovecot-keywords", "dovecot-uidlist", "dovecot-keywords"];
    let t = Instant::now();
    let (mut rounds, mut swaps, mut ok) = (0, 0, 0);
    while rounds < 300 && (rounds < 8 || t.elapsed() < Duration::from_secs(15)) {
        let full = rounds % 2 == 1;
        let what = format!("{} {rounds} during the race", mode_name(full));
        w.her_maildir(if full { EMPTY } else { HERS });
        let before = mail_hashes(&w.maildir);
        // She strikes once the restore has begun writing (its first file in a tmp/), past any up-front check.
        let racer = Racer::start("swap dirs and control files", SWAP_BODY, &w.swap_args(&dirs, &files, &["tmp", ".Work/tmp"]));
        let o = restore(&snap, &w.maildir);
        swaps += racer.stop();
        w.assert_stash_clean();
        check_restore(&w, &o, &before, None, &[], &what);
        ok += o.ok() as u32;
        rounds += 1;
    }
    eprintln!("{rounds} restores ({ok} exit 0) during {swaps} swaps in {:.1?}", t.elapsed());
    assert!(swaps > 50, "the racer swapped only {swaps} times: the race proved nothing");
}

// ---------------------------------------------------------------------------------------------
// Forged snapshots

fn read_lines(snap: &Path) -> Vec<serde_json::Value> {
    support::repo_helpers::manifest_text(snap).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_lines(snap: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    fs::write(snap.join("maildir-backup.manifest"), text).unwrap();
}

/// `cp -a FROM TO`.
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// One forgery of a manifest.
enum Forgery {
    /// Set a field of the first message record of `.Work`.
    Message(&'static str, String),
    /// Set the path of `.Work`'s folder record.
    FolderPath(String),
    /// Keep 3 message records (and their files), the header saying 10.
    Counts,
    /// A message record holding a 100 MiB name: one line of 100 MiB.
    HugeLine,
}

fn forge(snap: &Path, f: &Forgery) {
    let mut lines = read_lines(snap);
    let first_work = lines.iter().position(|v| v["kind"] == "message" && v["folder"] == ".Work").unwrap();
    match f {
        Forgery::Message(field, value) => lines[first_work][*field] = value.clone().into(),
        Forgery::FolderPath(path) => {
            let i = lines.iter().position(|v| v["kind"] == "folder" && v["path"] == ".Work").unwrap();
            lines[i]["path"] = path.clone().into();
        }
        Forgery::Counts => {
            let mut kept = 0;
            let mut bytes = 0;
            lines.retain(|v| {
                if v["kind"] != "message" {
                    return true;
                }
                let keep = kept < 3;
                let file = snap.join(v["folder"].as_str().unwrap()).join(v["dir"].as_str().unwrap()).join(v["name"].as_str().unwrap());
                if keep {
                    kept += 1;
                    bytes += v["size"].as_u64().unwrap();
                } else {
                    fs::remove_file(&file).unwrap();
                }
                keep
            });
            let per_folder = |p: &str| lines.iter().filter(|v| v["kind"] == "message" && v["folder"] == p).count();
            let counts: Vec<(usize, usize)> = lines.iter().enumerate().filter(|(_, v)| v["kind"] == "folder").map(|(i, v)| (i, per_folder(v["path"].as_str().unwrap()))).collect();
            for (i, n) in counts {
                lines[i]["messages"] = n.into();
                lines[i]["uidlist_expunged"] = serde_json::Value::Array(vec![]);
            }
            lines[0]["messages"] = 10.into();
            lines[0]["bytes"] = bytes.into();
        }
        Forgery::HugeLine => {
            // Streamed: a 100 MiB string in this process would count in every later child's peak RSS.
            let mut out = std::io::BufWriter::new(fs::File::create(snap.join("maildir-backup.manifest")).unwrap());
            for (i, v) in lines.iter().enumerate() {
                if i == first_work {
                    out.write_all(b"{\"kind\":\"message\",\"folder\":\".Work\",\"dir\":\"cur\",\"name\":\"").unwrap();
                    let chunk = vec![b'a'; 1 << 20];
                    for _ in 0..100 {
                        out.write_all(&chunk).unwrap();
                    }
                    out.write_all(b"\",\"unique\":\"a\",\"flags\":\"\",\"size\":1,\"blake3\":\"00\"}\n").unwrap();
                }
                writeln!(out, "{v}").unwrap();
            }
            return;
        }
    }
    write_lines(snap, &lines);
}

#[test]
fn forged_manifests_are_refused() {
    let w = World::new();
    // Copied away from its series below: a backup with its records in its own manifest.
    let (snap, _) = w.clean_plain_backup("clean", &[("", 4), (".Work", 5)]);
    w.her_maildir(HERS);
    let fresh = w.top.join("fresh").join("Maildir");
    let victim = w.victim.root.display().to_string();
    let cases = [
        ("message folder ../victim", Forgery::Message("folder", "../victim".into())),
        ("message folder /<victim>", Forgery::Message("folder", victim.clone())),
        ("message folder ..", Forgery::Message("folder", "..".into())),
        ("message folder .Work/../..", Forgery::Message("folder", ".Work/../..".into())),
        ("message name ../../secret", Forgery::Message("name", "../../secret".into())),
        ("message name a/b", Forgery::Message("name", "a/b".into())),
        ("message name with a NUL", Forgery::Message("name", "1700000000.M1P1.x\0y:2,S".into())),
        ("message name with a newline", Forgery::Message("name", "1700000000.M1P1.x\ny:2,S".into())),
        ("message unique a/b", Forgery::Message("unique", "a/b".into())),
        ("folder path ../x", Forgery::FolderPath("../x".into())),
        ("folder path absolute", Forgery::FolderPath(w.top.join("abs-x").display().to_string())),
        ("header: 10 messages, 3 records", Forgery::Counts),
        ("a 100 MiB line", Forgery::HugeLine),
    ];
    let names_in = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let top_at_start = names_in(&w.top);
    let mut results = Cases::new(&w.victim);
    for (i, (what, f)) in cases.iter().enumerate() {
        results.run(what, || {
            // Directly in the test dir, so that "../victim" from the snapshot is the real victim.
            let copy = w.top.join(format!("forged-{i}"));
            copy_tree(&snap, &copy);
            forge(&copy, f);
            let home_before = tree_listing(&w.home);
            let top_before = names_in(&w.top);
            for target in [&w.maildir, &fresh] {
                let what = format!("{what}, restore into {}", target.display());
                let o = restore(&copy, target);
                assert_eq!(o.code(), Some(EX_DATAERR), "{what}: must be refused as bad data:\n{}", o.show());
                assert!(o.elapsed < Duration::from_secs(10), "{what}: took {:.1?}", o.elapsed);
                assert!(o.maxrss_kib < RSS_LIMIT_KIB, "{what}: peak RSS {} KiB", o.maxrss_kib);
                assert_same_tree(&home_before, &tree_listing(&w.home), &format!("{what}: her home"));
                assert_eq!(names_in(&w.top), top_before, "{what}: something was created beside the targets");
                w.victim.check(&what);
            }
            let v = verify(&copy);
            assert!(!v.ok(), "{what}: verify of the forged snapshot passed:\n{}", v.show());
            remove_any(&copy);
        });
        // Whatever a failed case left (its copy, a created target, a changed Maildir) must not fail the next.
        for name in names_in(&w.top).into_iter().filter(|n| !top_at_start.contains(n)) {
            remove_any(&w.top.join(name));
        }
        w.her_maildir(HERS);
    }
    results.finish();
}

#[test]
fn forged_snapshot_with_symlinked_messages_is_refused() {
    let w = World::new();
    let (snap, _) = w.clean_plain_backup("clean", &[("", 4), (".Work", 5)]);
    let copy = w.top.join("forged");
    copy_tree(&snap, &copy);
    let secret_hash = blake3::hash(w.victim.secret_text.as_bytes()).to_hex().to_string();
    let mut lines = read_lines(&copy);
    for v in lines.iter_mut().filter(|v| v["kind"] == "message") {
        let file = copy.join(v["folder"].as_str().unwrap()).join(v["dir"].as_str().unwrap()).join(v["name"].as_str().unwrap());
        fs::remove_file(&file).unwrap();
        symlink(&w.victim.secret, &file).unwrap();
        v["size"] = w.victim.secret_text.len().into();
        v["blake3"] = secret_hash.clone().into();
    }
    let total: u64 = lines.iter().filter(|v| v["kind"] == "message").map(|v| v["size"].as_u64().unwrap()).sum();
    lines[0]["bytes"] = total.into();
    write_lines(&copy, &lines);
    let fresh = w.top.join("fresh").join("Maildir");
    let mut cases = Cases::new(&w.victim);
    for full in [false, true] {
        let target = if full { &fresh } else { &w.maildir };
        let what = format!("{} from a snapshot of symlinks to the secret", mode_name(full));
        cases.run(&what.clone(), || {
            w.her_maildir(HERS);
            let before = mail_hashes(&w.maildir);
            let o = restore(&copy, target);
            assert!(!o.ok(), "{what}: restore succeeded:\n{}", o.show());
            w.victim.check(&what);
            w.victim.assert_not_leaked(Some(&o), &[&w.home, &w.top.join("fresh")], &what);
            assert_mail_kept(&before, &mail_hashes(&w.maildir), &format!("{what}: the mail she had"));
        });
    }
    cases.run("verify", || {
        let v = verify(&copy);
        assert!(!v.ok(), "verify of the forged snapshot passed:\n{}", v.show());
    });
    cases.finish();
}
