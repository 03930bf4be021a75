//! The Dovecot test harness itself (tests/support), with Dovecot 2.3 and 2.4.
//!
//! Against a real Dovecot 2.3 on this host and a real Dovecot 2.4.1 in the Debian 13 root
//! (scripts/trixie-root.sh; needs debootstrap and a Debian mirror the first time): start/stop, IMAP, doveadm, dovecot-lda, control/index split, fs layout, location
//! overrides, held uidlist locks, 2.4 path translation and process cleanup. Needs root.

mod support;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::procs::files_in;
use support::dovecot_common::pid_alive;
use support::trixie::{chown_vmail_recursive_root, location_overrides, processes_in_root, root};
use support::*;

fn message_files(mailbox_dir: &Path) -> usize {
    files_in(&mailbox_dir.join("cur")).len() + files_in(&mailbox_dir.join("new")).len()
}

fn doveconf(d: &Dovecot, key: &str) -> String {
    let out = Command::new("doveconf")
        .arg("-c")
        .arg(d.conf())
        .args(["-h", key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "doveconf -h {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// On a fresh instance, over `imap` (logged in as alice): UIDPLUS; an empty INBOX; two messages appended to
/// INBOX (message 1 `\\Seen`), TRYCREATE for a missing mailbox, one message in a new `Archive` (created
/// with doveadm); a flag change; IMAP and doveadm then agree on INBOX's and Archive's flags. Leaves INBOX
/// selected; returns message 1.
fn append_store_fetch<R: Release>(d: &Instance<R>, imap: &mut Imap) -> Vec<u8> {
    assert!(imap.has_capability("UIDPLUS"), "{:?}", imap.capabilities());
    assert_eq!(imap.select("INBOX").unwrap(), 0);
    let m1 = message(1, 1500);
    imap.append("INBOX", "\\Seen", &m1).unwrap();
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
    m1
}

// ---------------------------------------------------------------------------------------------------------
// Dovecot 2.3 on the host

#[test]
fn start_imap_append_fetch_deliver_stop() {
    let mut d = Dovecot::start(DovecotOptions::default());
    let pid = d.master_pid().expect("running");
    assert!(d.conf().exists());
    assert_eq!(d.separator(), '.');
    assert_eq!(
        d.mail_location("alice"),
        format!("maildir:{}/mail/alice/Maildir", d.dir().display())
    );

    let mut imap = d.imap("alice");
    let m1 = append_store_fetch(&d, &mut imap);
    assert_eq!(imap.uid_fetch_body(1).unwrap(), m1, "literal handling");

    // Local delivery, including autocreate of a nested folder.
    d.deliver("alice", None, &message(4, 200));
    d.deliver("alice", Some("Lists.rust"), &message(5, 200));
    imap.noop().unwrap();
    assert_eq!(imap.uid_search_all().unwrap(), vec![1, 2, 3]);
    assert_eq!(
        d.fetch_uid_flags("alice", "Lists.rust", None),
        vec![(1, String::new())]
    );
    let lists = d.mailbox_path("alice", "Lists.rust", "mailbox");
    assert_eq!(lists, d.maildir("alice").join(".Lists.rust"));
    assert_eq!(message_files(&lists), 1);
    assert_eq!(
        d.mailbox_path("alice", "INBOX", "control"),
        d.maildir("alice")
    );

    // MOVE and EXPUNGE.
    imap.uid_move("1", "Archive").unwrap();
    imap.uid_expunge("2").unwrap();
    assert_eq!(imap.uid_search_all().unwrap(), vec![3]);
    assert_eq!(d.fetch_uid_flags("alice", "Archive", None).len(), 2);

    // Raw send/read.
    let tag = imap.send_raw("NOOP");
    imap.read_tagged(&tag).unwrap();
    assert!(imap.command("FOO").is_err());
    imap.logout();

    // doveadm failures are visible.
    let out = d.doveadm(&["mailbox", "status", "-u", "alice", "messages", "NoSuchBox"]);
    assert!(!out.status.success());

    let port = d.port();
    d.assert_clean_log();
    d.stop();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "master {pid} still there after stop"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
    d.stop(); // idempotent
}

#[test]
fn control_and_index_dirs() {
    let d = Dovecot::start(DovecotOptions {
        control: true,
        ..Default::default()
    });
    let dir = d.dir().display().to_string();
    assert_eq!(
        d.mail_location("alice"),
        format!(
            "maildir:{dir}/mail/alice/Maildir:CONTROL={dir}/control/alice:INDEX={dir}/index/alice"
        )
    );
    populate(&d, "alice", &["INBOX", "Archive", "Archive.2024"], 25);

    for (mbox, dirname) in [
        ("INBOX", ".INBOX"),
        ("Archive", ".Archive"),
        ("Archive.2024", ".Archive.2024"),
    ] {
        let mail = d.mailbox_path("alice", mbox, "mailbox");
        let control = d.mailbox_path("alice", mbox, "control");
        let index = d.mailbox_path("alice", mbox, "index");
        assert_eq!(control, d.control_root("alice").join(dirname), "{mbox}");
        assert!(
            index.starts_with(d.index_root("alice")),
            "{mbox}: {}",
            index.display()
        );
        assert!(
            control.join("dovecot-uidlist").is_file(),
            "{mbox}: no uidlist in {}",
            control.display()
        );
        assert!(
            !mail.join("dovecot-uidlist").exists(),
            "{mbox}: uidlist in mail dir"
        );
        assert!(
            index.join("dovecot.index.log").is_file(),
            "{mbox}: {:?}",
            files_in(&index)
        );
        assert_eq!(message_files(&mail), 25, "{mbox}");

        let got = d.fetch_uid_flags("alice", mbox, None);
        let want: Vec<(u32, String)> = (0..25)
            .map(|j| (j as u32 + 1, normalize_flags(&populate_flags(j))))
            .collect();
        assert_eq!(got, want, "{mbox}");
    }
    d.assert_clean_log();
}

#[test]
fn layout_fs() {
    let d = Dovecot::start(DovecotOptions {
        layout_fs: true,
        ..Default::default()
    });
    assert_eq!(d.separator(), '/');
    assert!(d
        .mail_location("alice")
        .ends_with("/mail/alice/Maildir:LAYOUT=fs"));
    d.create_mailbox("alice", "Archive/2024");
    d.deliver("alice", Some("Archive/2024"), &message(1, 300));
    d.deliver("alice", Some("Lists/rust"), &message(2, 300));
    let p = d.mailbox_path("alice", "Archive/2024", "mailbox");
    assert_eq!(p, d.maildir("alice").join("Archive/2024"));
    assert_eq!(message_files(&p), 1);
    assert_eq!(message_files(&d.maildir("alice").join("Lists/rust")), 1);

    let mut imap = d.imap("alice");
    assert_eq!(imap.select("Archive/2024").unwrap(), 1);
    imap.uid_store("1", "FLAGS", "\\Seen \\Draft").unwrap();
    imap.logout();
    assert_eq!(
        d.fetch_uid_flags("alice", "Archive/2024", None),
        vec![(1, "\\Draft \\Seen".to_string())]
    );
    d.assert_clean_log();
}

/// A plain copy of an idle Maildir is read back by Dovecot (mail_location override) with the same
/// UIDs and flags — the check the backup tests rely on.
#[test]
fn fetch_with_mail_location_override() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Work"], 30);
    d.create_mailbox("alice", "Entwürfe");
    d.deliver("alice", Some("Entwürfe"), &message(7, 100));
    let mut imap = d.imap("alice");
    assert_eq!(imap.select("Entwürfe").unwrap(), 1);
    imap.select("Work").unwrap();
    imap.uid_expunge("3:5").unwrap();
    imap.uid_store("10", "+FLAGS", "\\Deleted").unwrap();
    imap.logout();

    let dest = tempdir();
    let copy = dest.path().join("Maildir");
    let st = Command::new("cp")
        .arg("-a")
        .arg(d.maildir("alice"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    chown_vmail_recursive(&copy);
    let loc = format!("maildir:{}:INDEX=MEMORY", copy.display());
    for mbox in ["INBOX", "Work", "Entwürfe"] {
        let orig = d.fetch_uid_flags("alice", mbox, None);
        assert!(!orig.is_empty());
        assert_eq!(d.fetch_uid_flags("alice", mbox, Some(&loc)), orig, "{mbox}");
    }
    let work = d.fetch_uid_flags("alice", "Work", None);
    assert_eq!(work.len(), 27);
    assert!(work
        .iter()
        .any(|(u, f)| *u == 10 && f.contains("\\Deleted")));
}

/// A dovecot-uidlist.lock held (the way Dovecot writes it) makes SELECT wait; releasing it lets it finish.
#[test]
fn select_blocks_on_held_uidlist_lock() {
    let d = Dovecot::start(DovecotOptions::default());
    d.deliver("alice", None, &message(1, 100));
    // An "external" delivery straight into new/: the next SELECT must sync, and syncing needs the lock.
    let new = d.maildir("alice").join("new");
    let f = new.join(format!(
        "1700000000.M1P{}.harness,S=100",
        std::process::id()
    ));
    std::fs::write(&f, message(2, 100)).unwrap();
    chown_vmail_recursive(&f);

    let control = d.mailbox_path("alice", "INBOX", "control");
    let lock = fake_uidlist_lock(&control);
    let mut imap = d.imap("alice");
    let tag = imap.send_raw("SELECT INBOX");
    assert!(
        imap.poll_tagged(&tag, Duration::from_secs(2)).is_none(),
        "SELECT did not wait for the lock"
    );
    lock.release();
    let lines = imap.read_tagged(&tag).unwrap();
    assert!(lines.iter().any(|l| l == "* 2 EXISTS"), "{lines:?}");
    assert_eq!(imap.uid_search_all().unwrap(), vec![1, 2]);
    imap.logout();
}

#[test]
fn parallel_instances_and_options() {
    let handles: Vec<_> = (0..3)
        .map(|k| {
            std::thread::spawn(move || {
                let opts = DovecotOptions {
                    nfs: k == 1,
                    excl: k != 2,
                    control: k == 2,
                    extra_conf: "mail_max_userip_connections = 20\n".into(),
                    ..Default::default()
                };
                let mut d = Dovecot::start(opts);
                assert_eq!(
                    doveconf(&d, "mail_nfs_storage"),
                    if k == 1 { "yes" } else { "no" }
                );
                assert_eq!(
                    doveconf(&d, "dotlock_use_excl"),
                    if k == 2 { "no" } else { "yes" }
                );
                assert_eq!(doveconf(&d, "mail_max_userip_connections"), "20");
                populate(&d, "alice", &["INBOX", "Sent"], 15);
                d.add_user("bob");
                d.deliver("bob", None, &message(1, 100));
                let mut imap = d.imap("bob");
                assert_eq!(imap.select("INBOX").unwrap(), 1);
                imap.logout();
                assert_eq!(d.fetch_uid_flags("alice", "Sent", None).len(), 15);
                let port = d.port();
                d.stop();
                port
            })
        })
        .collect();
    let mut ports: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
}

#[test]
fn message_shape() {
    let a = message(5, 2000);
    let b = message(5, 2000);
    let s = String::from_utf8(a.clone()).unwrap();
    assert!(s.contains("\r\nSubject: msg 5\r\n"));
    assert!(a.len() >= 2000 && a.len() < 2100, "{}", a.len());
    assert!(!s.replace("\r\n", "").contains('\n'), "bare LF");
    assert_ne!(a, b, "Message-IDs must differ");
    assert!(free_port() != free_port());
}

#[test]
#[should_panic(expected = "Unknown setting: no_such_setting")]
fn start_failure_reports_log() {
    Dovecot::start(DovecotOptions {
        extra_conf: "no_such_setting = 1\n".into(),
        ..Default::default()
    });
}

// ---------------------------------------------------------------------------------------------------------
// Dovecot 2.4 in the Debian 13 root

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
    append_store_fetch(&d, &mut imap);

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

    d.assert_clean_log();
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
    d.assert_clean_log();
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
    d.assert_clean_log();
    stop_and_check_gone(d);
}
