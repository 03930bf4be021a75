mod support;
use support::*;

#[test]
fn plugin_backs_up_a_user() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent", "Archive"], 30);
    let out = tempdir();
    chown_vmail_recursive(out.path());
    let dest = out.path().join("alice-backup");
    let o = plugin::doveadm_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", dest.to_str().unwrap()]);
    eprintln!("stdout: {}\nstderr: {}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    let v = maildir_backup::verify::verify(&dest, 2).unwrap();
    assert!(v.is_whole(), "{:?}", v.problems);
    assert_eq!(v.messages, 90);
}
