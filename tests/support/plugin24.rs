//! The doveadm plugin with Dovecot **2.4** (tests/d24.rs): building it against the trixie root's headers,
//! installing it (and the settings module) into that root, running the root's `doveadm` with it, running
//! either release's `doveadm` with a module dir of our choosing (cross-release checks), users with their
//! own userdb fields, and reading a backup back through Dovecot 2.4.
//!
//! What is reused from the 2.3 side and why that is sound: [`Run`], [`LockHolder`], [`folder_view`],
//! [`compare_view`] and [`Msg`] (tests/support/plugin_users.rs) never call Dovecot; they read files or
//! wrap a finished process. Everything that does call Dovecot is here again for [`Dovecot24`]
//! (paths inside the chroot, `-o` settings instead of `mail_location`).
//!
//! Environment: `MB_PLUGIN24_SO` / `MB_SETTINGS24_SO` name prebuilt 2.4 builds of the plugin and the
//! settings module (both or either); otherwise they are built once per test process with
//! `DOVECOT_CONFIG=ROOT/usr/lib/dovecot/dovecot-config cargo build --lib --features doveadm-plugin
//! --target-dir target/plugin24-test`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::dovecot::{tempdir, Dovecot, PASSWORD};
use super::dovecot24::{chown_vmail_recursive_root, location_overrides, root, root_path, Dovecot24, DOVEADM24_BIN};
use super::plugin::{MODULE_DIR, PLUGIN_FILE};
use super::plugin_users::{compare_view, folder_view, parse_uid_guid_flags, read_manifest, FolderView, Msg};
use super::run::Run;

/// File name of the 2.4 settings module in `$moduledir/settings`.
pub const SETTINGS_FILE: &str = "libmaildir_backup_settings.so";
/// doveadm's module dir inside the root (relative to ROOT).
pub const MODULE_DIR24_REL: &str = "usr/lib/dovecot/modules/doveadm";
/// config's settings-module dir inside the root (relative to ROOT).
pub const SETTINGS_DIR24_REL: &str = "usr/lib/dovecot/modules/settings";

// ---------------------------------------------------------------------------------------------------------
// Building and installing

/// `(plugin .so, settings .so)` built against the 2.4 headers of the root (see the module docs).
pub fn plugin24_build() -> (PathBuf, PathBuf) {
    static SO: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    SO.get_or_init(|| {
        let env_plugin = std::env::var_os("MB_PLUGIN24_SO").map(PathBuf::from);
        let env_settings = std::env::var_os("MB_SETTINGS24_SO").map(PathBuf::from);
        if let (Some(p), Some(s)) = (&env_plugin, &env_settings) {
            return (p.clone(), s.clone());
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = manifest.join("target").join("plugin24-test");
        let config = root().join("usr/lib/dovecot/dovecot-config");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--lib", "--features", "doveadm-plugin", "--target-dir"])
            .arg(&target)
            .env("DOVECOT_CONFIG", &config)
            .current_dir(manifest)
            .stdin(Stdio::null())
            .output()
            .expect("run cargo build for the 2.4 plugin");
        assert!(
            out.status.success(),
            "building the plugin against {} failed:\n{}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = target.join("debug");
        (
            env_plugin.unwrap_or_else(|| dir.join("libmaildir_backup.so")),
            env_settings.unwrap_or_else(|| dir.join(SETTINGS_FILE)),
        )
    })
    .clone()
}

/// Copies `from` to `dir/name` atomically (a temp name unique to this call, starting with '.', which
/// Dovecot's module loader skips, then rename), unless an identical file is already there.
fn install_file(from: &Path, dir: &Path, name: &str) {
    let to = dir.join(name);
    let new = fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    if fs::read(&to).map(|old| old == new).unwrap_or(false) {
        return;
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let tmp = dir.join(format!(".{name}.tmp.{}.{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    fs::write(&tmp, &new).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, &to).unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), to.display()));
}

/// Installs the 2.4 plugin as `ROOT/usr/lib/dovecot/modules/doveadm/lib20_doveadm_maildir_backup_plugin.so`
/// and the settings module as `ROOT/usr/lib/dovecot/modules/settings/libmaildir_backup_settings.so`
/// (once per test process). Call before starting an instance whose dovecot.conf has `maildir_backup_*`
/// keys: without the settings module the config process rejects them ("Unknown setting").
pub fn install_plugin24() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let (plugin, settings) = plugin24_build();
        let r = root();
        install_file(&plugin, &r.join(MODULE_DIR24_REL), PLUGIN_FILE);
        install_file(&settings, &r.join(SETTINGS_DIR24_REL), SETTINGS_FILE);
    });
}

/// A private directory (host path, a [`tempdir`]) holding just `so` under the plugin's file name: a module
/// dir to bind-mount over a doveadm's own. Removed on drop.
pub fn module_dir_with(so: &Path) -> tempfile::TempDir {
    let dir = tempdir();
    install_file(so, dir.path(), PLUGIN_FILE);
    dir
}

// ---------------------------------------------------------------------------------------------------------
// Running doveadm

/// `chroot ROOT doveadm -c CONF ARGS...` with our 2.4 plugin installed ([`install_plugin24`]). Paths in ARGS
/// are chroot paths.
pub fn run24(d: &Dovecot24, args: &[&str]) -> Run {
    install_plugin24();
    let started = Instant::now();
    let out = d.doveadm(args);
    Run::finish(format!("chroot doveadm -c {} {}", d.conf_in_root().display(), args.join(" ")), started, out)
}

/// 2.4's doveadm with `module_dir` (a host dir) bind-mounted over ROOT's doveadm module dir, in a private
/// mount namespace (`unshare -m`), so nothing of the root changes for anyone else.
pub fn run24_with_module_dir(d: &Dovecot24, module_dir: &Path, args: &[&str]) -> Run {
    let r = root();
    let script = format!("mount --bind \"$0\" \"$1/{MODULE_DIR24_REL}\" && r=\"$1\" && shift && exec chroot \"$r\" {DOVEADM24_BIN} \"$@\"");
    let started = Instant::now();
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .arg(module_dir)
        .arg(&r)
        .arg("-c")
        .arg(d.conf_in_root())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare chroot doveadm");
    Run::finish(
        format!("[module dir {}] chroot doveadm -c {} {}", module_dir.display(), d.conf_in_root().display(), args.join(" ")),
        started,
        out,
    )
}

/// 2.3's (the host's) doveadm with `module_dir` bind-mounted over its module dir (private mount namespace).
pub fn run23_with_module_dir(d: &Dovecot, module_dir: &Path, args: &[&str]) -> Run {
    let script = format!("mount --bind \"$0\" {MODULE_DIR} && exec doveadm \"$@\"");
    let started = Instant::now();
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .arg(module_dir)
        .arg("-c")
        .arg(d.conf())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare doveadm");
    Run::finish(format!("[module dir {}] doveadm -c {} {}", module_dir.display(), d.conf().display(), args.join(" ")), started, out)
}

// ---------------------------------------------------------------------------------------------------------
// Users and directories

/// Appends `user:{PLAIN}secret::::::<extra>` to the 2.4 instance's passwd file. `extra` is the 8th field:
/// space-separated `userdb_<setting>=<value>` (2.4 takes setting names, e.g. `userdb_mail_path=…`,
/// `userdb_mail_control_path=…`, `userdb_mailbox_list_layout=fs`; passwd-file expands `%{user}` in them).
/// Waits until `doveadm user` returns every one of those settings with its (expanded) value.
pub fn add_userdb_user24(d: &Dovecot24, user: &str, extra: &str) {
    let passwd = d.dir().join("passwd");
    let mut f = fs::OpenOptions::new().append(true).open(&passwd).unwrap();
    writeln!(f, "{user}:{{PLAIN}}{PASSWORD}::::::{extra}").unwrap();
    drop(f);
    let want: Vec<String> = extra
        .split_whitespace()
        .filter_map(|kv| kv.strip_prefix("userdb_"))
        .map(|kv| kv.replace("%{user}", user).replacen('=', "\t", 1))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.doveadm(&["user", user]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && want.iter().all(|w| text.lines().any(|l| l == w)) {
            return;
        }
        if Instant::now() > deadline {
            d.command_failed(&format!("doveadm user {user} (waiting for {want:?})"), &out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A directory (host path, inside ROOT) owned by the root's vmail (mode 0755), created with its parents.
pub fn vmail_dir24(path: &Path) -> PathBuf {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    chown_vmail_recursive_root(path);
    path.to_path_buf()
}

// ---------------------------------------------------------------------------------------------------------
// Reading through Dovecot 2.4

/// 2.4 `-o` settings that read `backup` (host path) as a Maildir without writing index files into it,
/// resetting the instance's (or userdb's) control/index/layout settings: the 2.4 form of 2.3's
/// `maildir:BACKUP:INDEX=MEMORY[:LAYOUT=fs]`.
pub fn backup_overrides24(backup: &Path, layout_fs: bool) -> Vec<String> {
    location_overrides(&format!("maildir:{}:INDEX=MEMORY{}", backup.display(), if layout_fs { ":LAYOUT=fs" } else { "" }))
}

fn doveadm24_with(d: &Dovecot24, overrides: &[String], args: &[&str]) -> String {
    let mut all: Vec<&str> = Vec::new();
    for o in overrides {
        all.extend_from_slice(&["-o", o]);
    }
    all.extend_from_slice(args);
    d.doveadm_ok(&all)
}

/// Selectable mailboxes of `user` → their mail directory (host path), with optional `-o` overrides.
pub fn mailboxes24(d: &Dovecot24, user: &str, overrides: &[String]) -> BTreeMap<String, PathBuf> {
    let out = doveadm24_with(d, overrides, &["-f", "tab", "mailbox", "list", "-u", user]);
    let mut m = BTreeMap::new();
    for (i, name) in out.lines().enumerate() {
        if (i == 0 && name == "mailbox") || name.is_empty() {
            continue;
        }
        let path = doveadm24_with(d, overrides, &["mailbox", "path", "-u", user, "-t", "mailbox", name]);
        let path = root_path(Path::new(path.trim_end_matches('\n')));
        if path.join("cur").is_dir() {
            m.insert(name.to_string(), path);
        }
    }
    m
}

/// `doveadm [-o …] -f tab fetch -u user 'uid guid flags' mailbox MAILBOX`, sorted by uid.
pub fn fetch24(d: &Dovecot24, user: &str, mailbox: &str, overrides: &[String]) -> Vec<Msg> {
    parse_uid_guid_flags(&doveadm24_with(d, overrides, &["-f", "tab", "fetch", "-u", user, "uid guid flags", "mailbox", mailbox]))
}

/// `doveadm mailbox status -u USER FIELD MAILBOX` → the number.
pub fn mailbox_status24(d: &Dovecot24, user: &str, field: &str, mailbox: &str) -> u64 {
    let out = d.doveadm_ok(&["-f", "tab", "mailbox", "status", "-u", user, field, mailbox]);
    let line = out.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or("");
    line.rsplit('\t')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("mailbox status {field} {mailbox}: unexpected output {out:?}"))
}

/// Dovecot 2.4 (as `reader`) reads `backup` (host path): for every folder of its manifest, uids, GUIDs and
/// flags agree with the backup's own uidlist and file names, and Dovecot finds exactly the manifest's
/// folders. Returns the problems (empty: consistent). The backup must be vmail-accessible and inside ROOT.
pub fn check_dovecot24_reads_backup(d: &Dovecot24, reader: &str, backup: &Path, layout_fs: bool) -> Vec<String> {
    let manifest = read_manifest(backup);
    let norm = |p: &Path| PathBuf::from(p.to_string_lossy().trim_end_matches('/'));
    let want: BTreeSet<PathBuf> = manifest.folders.iter().map(|f| norm(&backup.join(&f.path))).collect();
    // Views first: Dovecot may write to the folders it opens.
    let views: BTreeMap<PathBuf, FolderView> = want.iter().map(|p| (p.clone(), folder_view(p))).collect();
    let ov = backup_overrides24(backup, layout_fs);
    let boxes = mailboxes24(d, reader, &ov);
    let mut problems = Vec::new();
    let found: BTreeSet<PathBuf> = boxes.values().map(|p| norm(p)).collect();
    if found != want {
        problems.push(format!("{}: Dovecot 2.4 sees folders {found:?}, the manifest has {want:?}", backup.display()));
    }
    for (name, path) in &boxes {
        let Some(view) = views.get(&norm(path)) else { continue };
        let got = fetch24(d, reader, name, &ov);
        for p in compare_view(view, &got) {
            problems.push(format!("{} mailbox {name}: {p}", backup.display()));
        }
    }
    problems
}

/// `user`'s own mail and `backup` read through Dovecot 2.4 (the backup as `reader`): same mailboxes, and in
/// each the same (uid, guid, flags). Returns the problems.
pub fn compare_source_and_backup24(d: &Dovecot24, user: &str, reader: &str, backup: &Path, layout_fs: bool) -> Vec<String> {
    let ov = backup_overrides24(backup, layout_fs);
    let src = mailboxes24(d, user, &[]);
    let bak = mailboxes24(d, reader, &ov);
    let mut problems = Vec::new();
    let (sn, bn): (BTreeSet<&String>, BTreeSet<&String>) = (src.keys().collect(), bak.keys().collect());
    if sn != bn {
        problems.push(format!("{user}: source mailboxes {sn:?}, backup {bn:?}"));
    }
    for name in sn.intersection(&bn) {
        let a = fetch24(d, user, name, &[]);
        let b = fetch24(d, reader, name, &ov);
        if a != b {
            let only_a: Vec<&Msg> = a.iter().filter(|m| !b.contains(m)).take(5).collect();
            let only_b: Vec<&Msg> = b.iter().filter(|m| !a.contains(m)).take(5).collect();
            problems.push(format!(
                "{user} mailbox {name}: {} messages in the source, {} in the backup; only in source {only_a:?}; only in backup {only_b:?}",
                a.len(),
                b.len()
            ));
        }
    }
    problems
}

/// Rows of `-f json` grouped: user → mailbox → messages.
pub fn rows_by_user(rows: &[BTreeMap<String, String>]) -> HashMap<String, BTreeMap<String, u64>> {
    let mut m: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    for r in rows {
        m.entry(r["user"].clone())
            .or_default()
            .insert(r["mailbox"].clone(), r["messages"].parse().unwrap_or_else(|_| panic!("row {r:?}: messages")));
    }
    m
}
