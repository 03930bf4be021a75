//! Exercises the Dovecot 2.4 harness (tests/support/dovecot24.rs): a real Dovecot 2.4.1 in a Debian 13
//! root built by scripts/trixie-root.sh. Needs root, debootstrap and a Debian mirror the first time.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::dovecot24::{
    chown_vmail_recursive_root, location_overrides, pid_alive, processes_in_root, root,
};
use support::procs::files_in;
use support::*;

fn message_files(mailbox_dir: &Path) -> usize {
    files_in(&mailbox_dir.join("cur")).len() + files_in(&mailbox_dir.join("new")).len()
}

fn assert_clean_log(d: &Dovecot24) {
    let log = fs::read_to_string(d.dir().join("dovecot.log")).unwrap();
    for bad in ["Error:", "Panic:", "Fatal:"] {
        assert!(
            !log.contains(bad),
            "dovecot log has {bad}\n{}",
            d.log_tail()
        );
    }
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Stop `d` and check that nothing of it is left: the master and every process it had are gone, and no
/// process running in the root refers to this instance's directory.
fn stop_and_check_gone(mut d: Dovecot24) {
    let pid = d.master_pid().expect("running");
    let procs = d.processes();
    assert!(procs.contains(&pid), "{procs:?}");
    assert!(procs.len() > 1, "master without children? {procs:?}");
    for p in &procs {
        // A child that exited since the listing has nothing left to check.
        let Ok(r) = fs::read_link(format!("/proc/{p}/root")) else { continue };
        assert_eq!(r, root(), "pid {p} ({}) is not chrooted", cmdline(*p));
    }
    d.stop();
    assert!(!pid_alive(pid), "master {pid} still alive");
    assert!(d.master_pid().is_none());
    let left: Vec<u32> = d
        .known_pids()
        .iter()
        .copied()
        .filter(|&p| pid_alive(p))
        .collect();
    assert!(left.is_empty(), "processes left after stop: {left:?}");
    let inst = d.dir_in_root().display().to_string();
    let strays: Vec<(u32, String)> = processes_in_root()
        .into_iter()
        .map(|p| (p, cmdline(p)))
        .filter(|(p, c)| procs.contains(p) || c.contains(&inst))
        .collect();
    assert!(
        strays.is_empty(),
        "processes of {inst} still in the root: {strays:?}"
    );
    d.stop(); // idempotent
}

/// Copy a directory tree (files, dirs; no special files) preserving names.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// Add `delta` to every UID (and to the next-UID header field) of a dovecot-uidlist, so that a fetch shows
/// whether *this* uidlist was used.
fn shift_uids(uidlist: &Path, delta: u32) {
    let text = fs::read_to_string(uidlist).unwrap();
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            let h: Vec<String> = line
                .split(' ')
                .map(
                    |f| match f.strip_prefix('N').and_then(|n| n.parse::<u32>().ok()) {
                        Some(n) => format!("N{}", n + delta),
                        None => f.to_string(),
                    },
                )
                .collect();
            out.push_str(&h.join(" "));
        } else {
            let (uid, rest) = line.split_once(' ').unwrap();
            out.push_str(&format!("{} {rest}", uid.parse::<u32>().unwrap() + delta));
        }
        out.push('\n');
    }
    fs::write(uidlist, out).unwrap();
}

fn index_files_below(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            v.extend(index_files_below(&e.path()));
        } else if e.file_name().to_string_lossy().starts_with("dovecot.index")
            || e.file_name()
                .to_string_lossy()
                .starts_with("dovecot.list.index")
        {
            v.push(e.path());
        }
    }
    v
}

#[test]
fn paths_translate() {
    let r = root();
    assert!(r.join(".maildir-backup-trixie-root").exists());
    assert_eq!(host_to_root(&r.join("srv/x/y")), PathBuf::from("/srv/x/y"));
    assert_eq!(root_path(Path::new("/srv/x/y")), r.join("srv/x/y"));
    assert_eq!(host_to_root(&r), PathBuf::from("/"));
    let proc_mounted = fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(r.join("proc").to_str().unwrap()));
    assert!(proc_mounted, "ROOT/proc not mounted");
    let ov = location_overrides(&format!(
        "maildir:{}:LAYOUT=fs:INDEX=MEMORY",
        r.join("srv/b/Maildir").display()
    ));
    assert_eq!(
        ov,
        [
            "mail_driver=maildir",
            "mail_path=/srv/b/Maildir",
            "mailbox_list_layout=fs",
            "mail_index_path=MEMORY",
            "mail_control_path="
        ]
    );
    let r2 = std::panic::catch_unwind(|| host_to_root(Path::new("/tmp/not-in-root")));
    assert!(r2.is_err());
}

#[test]
fn default_instance_imap_doveadm_lda_backup_fetch() {
    let d = Dovecot24::start(DovecotOptions::default());
    assert!(d.dir().starts_with(root()));
    assert_eq!(d.dir(), root_path(d.dir_in_root()));
    assert!(d.dir_in_root().starts_with("/srv"));
    assert_eq!(d.separator(), '.');
    let log = fs::read_to_string(d.dir().join("dovecot.log")).unwrap();
    assert!(log.contains("Dovecot v2.4."), "not a 2.4 master?\n{log}");
    let conf_out = d.doveadm_ok(&["config", "-h", "mail_path"]);
    assert_eq!(
        conf_out.trim(),
        format!("{}/mail/%{{user}}/Maildir", d.dir_in_root().display())
    );

    let mut imap = d.imap("alice");
    assert!(imap.greeting.contains("ready"), "{}", imap.greeting);
    assert!(imap.has_capability("UIDPLUS"), "{:?}", imap.capabilities());
    assert_eq!(imap.select("INBOX").unwrap(), 0);
    imap.append("INBOX", "\\Seen", &message(1, 1500)).unwrap();
    imap.append("INBOX", "", &message(2, 100)).unwrap();
    assert!(imap
        .append("NoSuchBox", "", &message(99, 100))
        .unwrap_err()
        .contains("TRYCREATE"));
    d.create_mailbox("alice", "Archive");
    imap.append("Archive", "\\Flagged $Work", &message(3, 300))
        .unwrap();
    assert_eq!(imap.select("INBOX").unwrap(), 2);
    imap.uid_store("2", "+FLAGS", "\\Answered $Later").unwrap();
    let want = vec![
        (1, "\\Seen".to_string()),
        (2, "$Later \\Answered".to_string()),
    ];
    assert_eq!(imap.uid_fetch_flags("1:*").unwrap(), want);
    assert_eq!(d.fetch_uid_flags("alice", "INBOX", None), want);
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive", None),
        vec![(1, "$Work \\Flagged".to_string())]
    );

    // Files on the host side, paths from doveadm translated to host paths.
    let md = d.maildir("alice");
    assert!(md.starts_with(d.dir()));
    assert_eq!(message_files(&md), 2);
    assert_eq!(message_files(&md.join(".Archive")), 1);
    assert!(md.join("dovecot-uidlist").exists());
    assert_eq!(d.mailbox_path("alice", "INBOX", "mailbox"), md);
    assert_eq!(
        d.mailbox_path("alice", "Archive", "mailbox"),
        md.join(".Archive")
    );
    assert_eq!(
        d.mailbox_path("alice", "Archive", "control"),
        md.join(".Archive")
    );
    assert_eq!(
        d.mailbox_path("alice", "Archive", "index"),
        md.join(".Archive")
    );

    // dovecot-lda in the root; mailboxes autocreated (Maildir++: "Lists.dev" → .Lists.dev).
    d.deliver("alice", None, &message(10, 200));
    d.deliver("alice", Some("Lists.dev"), &message(11, 200));
    assert_eq!(message_files(&md), 3);
    assert_eq!(message_files(&md.join(".Lists.dev")), 1);
    assert_eq!(
        d.fetch_uid_flags("alice", "Lists.dev", None),
        vec![(1, String::new())]
    );

    // add_user works while running.
    d.add_user("bob");
    let mut b = d.imap("bob");
    b.append("INBOX", "\\Draft", &message(20, 100)).unwrap();
    b.logout();
    assert_eq!(
        d.fetch_uid_flags("bob", "INBOX", None),
        vec![(1, "\\Draft".to_string())]
    );

    // A "backup": a plain copy of the Maildir inside the instance dir; then the live box changes.
    let backup = d.dir().join("backup/Maildir");
    copy_tree(&md, &backup);
    chown_vmail_recursive_root(&d.dir().join("backup"));
    for f in index_files_below(&backup) {
        fs::remove_file(f).unwrap();
    }
    imap.uid_store("1", "FLAGS", "\\Flagged").unwrap();
    imap.uid_expunge("2").unwrap();
    assert_eq!(
        d.fetch_uid_flags("alice", "INBOX", None),
        vec![(1, "\\Flagged".to_string()), (3, String::new())]
    );
    let loc = format!("maildir:{}:INDEX=MEMORY", backup.display());
    assert_eq!(
        d.fetch_uid_flags("alice", "INBOX", Some(&loc)),
        vec![
            (1, "\\Seen".to_string()),
            (2, "$Later \\Answered".to_string()),
            (3, String::new())
        ]
    );
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive", Some(&loc)),
        vec![(1, "$Work \\Flagged".to_string())]
    );
    assert!(
        index_files_below(&backup).is_empty(),
        "INDEX=MEMORY wrote index files: {:?}",
        index_files_below(&backup)
    );
    // Raw 2.4 form gives the same.
    let raw = vec![
        "mail_driver=maildir".to_string(),
        format!("mail_path={}", host_to_root(&backup).display()),
        "mail_index_path=MEMORY".to_string(),
    ];
    assert_eq!(d.fetch_uid_flags_with("alice", "INBOX", &raw).len(), 3);
    imap.logout();

    assert_clean_log(&d);
    stop_and_check_gone(d);
}

#[test]
fn control_variant_paths_lock_and_backup_fetch() {
    let d = Dovecot24::start(DovecotOptions {
        control: true,
        nfs: true,
        excl: false,
        ..Default::default()
    });
    let conf = fs::read_to_string(d.conf()).unwrap();
    let c = d.dir_in_root().display().to_string();
    for line in [
        format!("mail_control_path = {c}/control/%{{user}}"),
        format!("mail_index_path = {c}/index/%{{user}}"),
        "mail_nfs_storage = yes".to_string(),
        "dotlock_use_excl = no".to_string(),
    ] {
        assert!(conf.contains(&line), "{line} not in\n{conf}");
    }
    let mut imap = d.imap("alice");
    imap.append("INBOX", "\\Seen", &message(1, 500)).unwrap();
    imap.create("Archive").unwrap();
    imap.append("Archive", "$Work", &message(2, 500)).unwrap();
    imap.append("Archive", "", &message(3, 500)).unwrap();

    let ctl = d.mailbox_path("alice", "Archive", "control");
    assert_eq!(ctl, d.control_root("alice").join(".Archive"));
    // As in 2.3: with a control dir, INBOX's control (and index) dir is `.INBOX` below the root.
    assert_eq!(
        d.mailbox_path("alice", "INBOX", "control"),
        d.control_root("alice").join(".INBOX")
    );
    assert_eq!(
        d.mailbox_path("alice", "Archive", "index"),
        d.index_root("alice").join(".Archive")
    );
    assert_eq!(
        d.mailbox_path("alice", "Archive", "mailbox"),
        d.maildir("alice").join(".Archive")
    );
    assert!(ctl.join("dovecot-uidlist").exists());
    assert!(!d.maildir("alice").join(".Archive/dovecot-uidlist").exists());
    assert!(!index_files_below(&d.index_root("alice")).is_empty());
    assert!(index_files_below(&d.maildir("alice")).is_empty());

    // A dotlock made on the host (`<pid>:<hostname>`) is honoured by the chrooted 2.4 (shared pid and UTS
    // namespaces): a new message in new/ needs a UID, so SELECT must wait for the uidlist lock.
    let newmsg = d
        .maildir("alice")
        .join(".Archive/new/1700000000.M1P1.hostmade");
    fs::write(&newmsg, message(4, 200)).unwrap();
    chown_vmail_recursive_root(&newmsg);
    let lock = fake_uidlist_lock(&ctl);
    imap.logout();
    let mut imap = d.imap("alice");
    let tag = imap.send_raw("SELECT Archive");
    assert!(
        imap.poll_tagged(&tag, Duration::from_millis(1500))
            .is_none(),
        "SELECT did not wait for the host-made lock\n{}",
        d.log_tail()
    );
    lock.release();
    imap.poll_tagged(&tag, Duration::from_secs(30))
        .expect("SELECT still blocked after release")
        .unwrap();

    // Backup of a control/index-split box: Maildir + the uidlists from the control dir.
    let broot = d.dir().join("backup");
    let backup = broot.join("Maildir");
    copy_tree(&d.maildir("alice"), &backup);
    fs::copy(
        d.control_root("alice").join(".INBOX/dovecot-uidlist"),
        backup.join("dovecot-uidlist"),
    )
    .unwrap();
    for f in ["dovecot-uidlist", "dovecot-keywords"] {
        fs::copy(ctl.join(f), backup.join(".Archive").join(f)).unwrap();
    }
    // Mark the backup's uidlists so that the result shows which uidlist Dovecot read.
    shift_uids(&backup.join("dovecot-uidlist"), 100);
    shift_uids(&backup.join(".Archive/dovecot-uidlist"), 100);
    chown_vmail_recursive_root(&broot);
    imap.uid_store("1", "+FLAGS", "\\Flagged").unwrap();

    let loc = format!("maildir:{}:INDEX=MEMORY", backup.display());
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive", Some(&loc)),
        vec![
            (101, "$Work".to_string()),
            (102, String::new()),
            (103, String::new())
        ],
        "{:?}",
        location_overrides(&loc)
    );
    assert_eq!(
        d.fetch_uid_flags("alice", "INBOX", Some(&loc)),
        vec![(101, "\\Seen".to_string())]
    );
    assert!(index_files_below(&backup).is_empty());
    // Without clearing mail_control_path, the instance's *live* uidlist would be used: the trap that
    // location_overrides() avoids.
    let partial = vec![
        "mail_driver=maildir".to_string(),
        format!("mail_path={}", host_to_root(&backup).display()),
        "mail_index_path=MEMORY".to_string(),
    ];
    let wrong = d.fetch_uid_flags_with("alice", "Archive", &partial);
    assert_eq!(wrong.first().map(|r| r.0), Some(1), "{wrong:?}");
    // Live is unchanged by all that.
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive", None),
        vec![
            (1, "$Work \\Flagged".to_string()),
            (2, String::new()),
            (3, String::new())
        ]
    );
    imap.logout();
    assert_clean_log(&d);
    stop_and_check_gone(d);
}

#[test]
fn layout_fs_variant() {
    let d = Dovecot24::start(DovecotOptions {
        layout_fs: true,
        ..Default::default()
    });
    assert_eq!(d.separator(), '/');
    assert!(fs::read_to_string(d.conf())
        .unwrap()
        .contains("mailbox_list_layout = fs"));
    let mut imap = d.imap("alice");
    imap.create("Archive/2024").unwrap();
    imap.append("Archive/2024", "\\Seen $Work", &message(1, 400))
        .unwrap();
    imap.append("INBOX", "\\Answered", &message(2, 400))
        .unwrap();
    d.deliver("alice", Some("Lists/dev"), &message(3, 200));

    let md = d.maildir("alice");
    assert_eq!(message_files(&md.join("Archive/2024")), 1);
    assert_eq!(message_files(&md.join("Lists/dev")), 1);
    assert_eq!(
        message_files(&md),
        1,
        "INBOX is the Maildir root with layout fs too"
    );
    assert!(!md.join(".Archive.2024").exists());
    assert_eq!(
        d.mailbox_path("alice", "Archive/2024", "mailbox"),
        md.join("Archive/2024")
    );
    assert_eq!(
        d.mailbox_path("alice", "Archive/2024", "control"),
        md.join("Archive/2024")
    );
    assert_eq!(d.mailbox_path("alice", "INBOX", "mailbox"), md);
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive/2024", None),
        vec![(1, "$Work \\Seen".to_string())]
    );

    // fs-layout backup read with LAYOUT=fs; the same mails as a Maildir++ backup read without it.
    let fsb = d.dir().join("bfs/Maildir");
    copy_tree(&md, &fsb);
    let mpp = d.dir().join("bmpp/Maildir");
    fs::create_dir_all(&mpp).unwrap();
    for sub in ["cur", "new", "tmp"] {
        copy_tree(&md.join(sub), &mpp.join(sub));
        copy_tree(
            &md.join("Archive/2024").join(sub),
            &mpp.join(".Archive.2024").join(sub),
        );
    }
    fs::copy(md.join("dovecot-uidlist"), mpp.join("dovecot-uidlist")).unwrap();
    for f in ["dovecot-uidlist", "dovecot-keywords"] {
        fs::copy(
            md.join("Archive/2024").join(f),
            mpp.join(".Archive.2024").join(f),
        )
        .unwrap();
    }
    fs::write(mpp.join(".Archive.2024/maildirfolder"), "").unwrap();
    for p in [&fsb, &mpp] {
        for f in index_files_below(p) {
            fs::remove_file(f).unwrap();
        }
        chown_vmail_recursive_root(p.parent().unwrap());
    }
    imap.select("Archive/2024").unwrap();
    imap.uid_store("1", "-FLAGS", "\\Seen").unwrap();

    let want = vec![(1, "$Work \\Seen".to_string())];
    let fs_loc = format!("maildir:{}:LAYOUT=fs:INDEX=MEMORY", fsb.display());
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive/2024", Some(&fs_loc)),
        want
    );
    assert_eq!(
        d.fetch_uid_flags("alice", "INBOX", Some(&fs_loc)),
        vec![(1, "\\Answered".to_string())]
    );
    let mpp_loc = format!("maildir:{}:INDEX=MEMORY", mpp.display());
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive/2024", Some(&mpp_loc)),
        want
    );
    // Wrong layout: the mailbox is simply not found, and `fetch` then returns nothing (no error).
    let wrong = format!("maildir:{}:INDEX=MEMORY", fsb.display());
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive/2024", Some(&wrong)),
        vec![]
    );
    assert!(index_files_below(&fsb).is_empty() && index_files_below(&mpp).is_empty());
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive/2024", None),
        vec![(1, "$Work".to_string())]
    );
    imap.logout();
    assert_clean_log(&d);
    stop_and_check_gone(d);
}
