//! Exercises the integration-test harness itself (tests/support) against a real Dovecot 2.3.
//! Needs root and Dovecot installed; see tests/support/mod.rs.

mod support;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::procs::files_in;
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

fn assert_clean_log(d: &Dovecot) {
    let log = std::fs::read_to_string(d.dir().join("dovecot.log")).unwrap();
    for bad in ["Error:", "Panic:", "Fatal:"] {
        assert!(
            !log.contains(bad),
            "dovecot log has {bad}\n{}",
            d.log_tail()
        );
    }
}

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
    assert_clean_log(&d);
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
    assert_clean_log(&d);
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
    assert_clean_log(&d);
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
