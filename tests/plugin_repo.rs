mod support;
use support::*;
#[test]
fn plugin_snapshots_into_a_repo_and_restores_from_it() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent"], 10);
    let out = tempdir();
    chown_vmail_recursive(out.path());
    let repo = out.path().join("repo");
    let o = plugin::doveadm_plugin(&d, &["maildir-backup", "-u", "alice", &format!("repo:{}", repo.display())]);
    eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    assert!(repo.join("alice/latest").exists());
    let mut imap = d.imap("alice"); imap.select("INBOX").unwrap(); imap.uid_expunge("1:3").unwrap(); imap.logout();
    let o = plugin::doveadm_plugin(&d, &["maildir-backup-restore", "-u", "alice", "-m", "INBOX", &format!("repo:{}", repo.display())]);
    eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    assert_eq!(d.fetch_uid_flags("alice", "INBOX", None).len(), 10);
}
