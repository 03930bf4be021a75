mod support;
use support::*;

#[test]
#[ignore]
fn explore() {
    let d = Dovecot::start(DovecotOptions { users: vec!["alice".into(), "bob".into()], ..Default::default() });
    let dir = d.dir().to_path_buf();
    for sub in ["ctl", "idx", "mdbox"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    chown_vmail_recursive(&dir.join("ctl"));
    chown_vmail_recursive(&dir.join("idx"));
    chown_vmail_recursive(&dir.join("mdbox"));
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("passwd")).unwrap();
    use std::io::Write;
    writeln!(f, "carol:{{PLAIN}}secret::::::userdb_mail=maildir:{0}/mail/%u/Maildir:CONTROL={0}/ctl/%u:INDEX={0}/idx/%u", dir.display()).unwrap();
    writeln!(f, "dan:{{PLAIN}}secret::::::userdb_mail=maildir:{0}/mail/%u/Maildir:LAYOUT=fs", dir.display()).unwrap();
    writeln!(f, "mdb:{{PLAIN}}secret::::::userdb_mail=mdbox:{0}/mdbox/%u", dir.display()).unwrap();
    drop(f);
    std::thread::sleep(std::time::Duration::from_secs(2));
    for u in ["alice", "bob", "carol", "dan", "mdb"] {
        populate(&d, u, &["INBOX", "Sent", "Archive.2024", "Entwürfe"], 5);
    }
    std::fs::write("/tmp/explore/info", format!("{}\n{}\n", d.conf().display(), super_so())).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(900));
}
fn super_so() -> String { let _ = plugin::doveadm_plugin; String::new() }
