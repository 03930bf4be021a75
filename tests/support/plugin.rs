//! The doveadm plugin in a real doveadm of either release, without touching anything anyone else uses:
//! building it (2.3: against the host's headers; 2.4: against the trixie root's, with its settings
//! module), and running doveadm with it — 2.3 in a private mount namespace (`unshare -m`) where a dir
//! holding the plugin is bind-mounted over the module dir for that one doveadm process; 2.4 with the
//! plugin installed into the root (which only the tests use). [`run_with_module_dir`] runs either
//! release's doveadm with a module dir of the test's choosing (cross-release checks).
//!
//! Environment: `MB_PLUGIN_SO` (2.3) and `MB_PLUGIN24_SO` / `MB_SETTINGS24_SO` (2.4) name prebuilt plugins
//! (scripts/test.sh builds them once); otherwise each is built once per test process with
//! `[DOVECOT_CONFIG=ROOT/usr/lib/dovecot/dovecot-config] cargo build --lib --features doveadm-plugin
//! --target-dir target/plugin{,24}-test`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::dovecot::{bind_mounted, release_command, Instance, Release, V23};
use super::run::Run;
use super::dovecot_common::tempdir;
use super::trixie::{root, V24};

/// File name of the plugin in doveadm's module dir.
pub const PLUGIN_FILE: &str = "lib20_doveadm_maildir_backup_plugin.so";
/// The host's (2.3) doveadm module dir.
pub const MODULE_DIR: &str = "/usr/lib/dovecot/modules/doveadm";
/// File name of the 2.4 settings module in `$moduledir/settings`.
pub const SETTINGS_FILE: &str = "libmaildir_backup_settings.so";
/// doveadm's module dir inside the 2.4 root (relative to ROOT).
pub const MODULE_DIR24_REL: &str = "usr/lib/dovecot/modules/doveadm";
/// config's settings-module dir inside the 2.4 root (relative to ROOT).
pub const SETTINGS_DIR24_REL: &str = "usr/lib/dovecot/modules/settings";

// ---------------------------------------------------------------------------------------------------------
// Building and installing

/// A cargo build profile of the plugin.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

/// `cargo build [--release] --lib --features doveadm-plugin --target-dir target/TARGET` (with
/// `DOVECOT_CONFIG` if given); returns the build's output dir (`debug` or `release`).
pub fn build(target: &str, dovecot_config: Option<&Path>, profile: Profile) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = manifest.join("target").join(target);
    let mut c = Command::new(env!("CARGO"));
    c.arg("build");
    if profile == Profile::Release {
        c.arg("--release");
    }
    c.args(["--lib", "--features", "doveadm-plugin", "--target-dir"]).arg(&target);
    if let Some(config) = dovecot_config {
        c.env("DOVECOT_CONFIG", config);
    }
    let out = c.current_dir(manifest).stdin(Stdio::null()).output().expect("run cargo build for the plugin");
    assert!(
        out.status.success(),
        "building the plugin (DOVECOT_CONFIG {dovecot_config:?}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join(if profile == Profile::Release { "release" } else { "debug" })
}

/// The 2.3 plugin .so: `MB_PLUGIN_SO` if set, else built here with cargo.
pub fn plugin_so() -> PathBuf {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| match std::env::var_os("MB_PLUGIN_SO") {
        Some(p) => PathBuf::from(p),
        None => build("plugin-test", None, Profile::Debug).join("libmaildir_backup.so"),
    })
    .clone()
}

/// `(plugin .so, settings .so)` built against the 2.4 headers of the root (see the module docs).
pub fn plugin24_build() -> (PathBuf, PathBuf) {
    static SO: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    SO.get_or_init(|| {
        let env_plugin = std::env::var_os("MB_PLUGIN24_SO").map(PathBuf::from);
        let env_settings = std::env::var_os("MB_SETTINGS24_SO").map(PathBuf::from);
        if let (Some(p), Some(s)) = (&env_plugin, &env_settings) {
            return (p.clone(), s.clone());
        }
        let dir = build("plugin24-test", Some(&root().join("usr/lib/dovecot/dovecot-config")), Profile::Debug);
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

/// A module dir holding just our 2.3 plugin: beside the plugin's build, shared by every test process
/// (a temporary one per process was never removed, as statics are not dropped).
fn module_dir23() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let so = plugin_so();
        let dir = so.parent().expect("the plugin's directory").join("module-dir-23");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        install_file(&so, &dir, PLUGIN_FILE);
        dir
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------------------
// Running doveadm with the plugin

/// How a release's doveadm finds our plugin.
pub trait PluginRelease: Release {
    /// doveadm's module dir (host path).
    fn module_dir() -> PathBuf;
    /// Makes our plugin available: a module dir to bind-mount over [`Self::module_dir`], or None when the
    /// plugin has been installed into it.
    fn plugin_dir() -> Option<PathBuf>;
}

impl PluginRelease for V23 {
    fn module_dir() -> PathBuf {
        PathBuf::from(MODULE_DIR)
    }
    fn plugin_dir() -> Option<PathBuf> {
        Some(module_dir23())
    }
}

impl PluginRelease for V24 {
    fn module_dir() -> PathBuf {
        root().join(MODULE_DIR24_REL)
    }
    fn plugin_dir() -> Option<PathBuf> {
        install_plugin24();
        None
    }
}

/// `doveadm -c CONF ARGS...` with our plugin loaded (2.4: paths in ARGS are chroot paths).
pub fn run_plugin<R: PluginRelease>(d: &Instance<R>, args: &[&str]) -> Run {
    run_plugin_in(d, None, args)
}

/// [`run_plugin`] in `cwd` (default: this process's cwd).
pub fn run_plugin_in<R: PluginRelease>(d: &Instance<R>, cwd: Option<&Path>, args: &[&str]) -> Run {
    doveadm(d, R::plugin_dir().as_deref(), cwd, args)
}

/// The release's doveadm with `module_dir` (a host dir) bind-mounted over its own module dir, in a private
/// mount namespace (`unshare -m`), so nothing changes for anyone else.
pub fn run_with_module_dir<R: PluginRelease>(d: &Instance<R>, module_dir: &Path, args: &[&str]) -> Run {
    doveadm(d, Some(module_dir), None, args)
}

fn doveadm<R: PluginRelease>(d: &Instance<R>, module_dir: Option<&Path>, cwd: Option<&Path>, args: &[&str]) -> Run {
    let mut c = match module_dir {
        Some(m) => {
            let mut c = bind_mounted(m, &R::module_dir());
            c.args(R::command_words(R::DOVEADM_BIN));
            c
        }
        None => release_command::<R>(R::DOVEADM_BIN),
    };
    c.arg("-c").arg(d.conf_in_root()).args(args).stdin(Stdio::null());
    if let Some(dir) = cwd {
        c.current_dir(dir);
    }
    let cmdline = format!(
        "{}{} -c {} {}",
        module_dir.map(|m| format!("[module dir {}] ", m.display())).unwrap_or_default(),
        R::command_words(R::DOVEADM_BIN).join(" "),
        d.conf_in_root().display(),
        args.join(" ")
    );
    let started = Instant::now();
    let out = c.output().unwrap_or_else(|e| panic!("run {cmdline}: {e}"));
    Run::finish(cmdline, started, out)
}
