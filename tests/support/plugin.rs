//! Running real `doveadm` with our plugin loaded, without touching the system's module dir:
//! inside `unshare -m`, a private dir holding the plugin is bind-mounted over
//! /usr/lib/dovecot/modules/doveadm for that one doveadm process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use super::Dovecot;

pub const PLUGIN_FILE: &str = "lib20_doveadm_maildir_backup_plugin.so";
pub const MODULE_DIR: &str = "/usr/lib/dovecot/modules/doveadm";

/// The plugin .so: `MB_PLUGIN_SO` if set (CI builds it once), else built here with cargo.
pub fn plugin_so() -> PathBuf {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        if let Some(p) = std::env::var_os("MB_PLUGIN_SO") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("plugin-test");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--lib", "--features", "doveadm-plugin", "--target-dir"])
            .arg(&target)
            .current_dir(root)
            .output()
            .expect("run cargo build for the plugin");
        assert!(out.status.success(), "building the plugin failed:\n{}", String::from_utf8_lossy(&out.stderr));
        target.join("debug").join("libmaildir_backup.so")
    })
    .clone()
}

/// A module dir holding just our plugin (made once per test process).
fn module_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mb-plugin-mod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create module dir");
        std::fs::copy(plugin_so(), dir.join(PLUGIN_FILE)).expect("copy plugin");
        dir
    })
    .clone()
}

/// `doveadm -c CONF ARGS...` with our plugin loaded.
pub fn doveadm_plugin(d: &Dovecot, args: &[&str]) -> Output {
    let script = format!("mount --bind \"$0\" {MODULE_DIR} && exec doveadm \"$@\"");
    Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .arg(module_dir())
        .arg("-c")
        .arg(d.conf())
        .args(args)
        .output()
        .expect("run unshare doveadm")
}
