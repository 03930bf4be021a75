//! Builds the doveadm plugin's C shim (feature `doveadm-plugin`) against a Dovecot's headers,
//! found through its `dovecot-config`: the system's, or the one named by `DOVECOT_CONFIG`
//! (e.g. a Debian 13 root's, to build a 2.4 plugin on a 2.3 host). Headers inside such a
//! root are found by prefixing `DOVECOT_SYSROOT` (derived from the config path if unset).

use std::collections::HashMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const DEFAULT_CONFIG: &str = "/usr/lib/dovecot/dovecot-config";

fn main() {
    println!("cargo:rerun-if-changed=c-shim");
    println!("cargo:rerun-if-env-changed=DOVECOT_CONFIG");
    println!("cargo:rerun-if-env-changed=DOVECOT_SYSROOT");
    if env::var_os("CARGO_FEATURE_DOVEADM_PLUGIN").is_none() {
        return;
    }
    let config = PathBuf::from(env::var("DOVECOT_CONFIG").unwrap_or_else(|_| DEFAULT_CONFIG.to_string()));
    println!("cargo:rerun-if-changed={}", config.display());
    let vars = read_dovecot_config(&config);
    let sysroot = env::var("DOVECOT_SYSROOT").map(PathBuf::from).unwrap_or_else(|_| {
        let s = config.to_string_lossy();
        PathBuf::from(s.strip_suffix(DEFAULT_CONFIG).unwrap_or(""))
    });

    let mut includes: Vec<PathBuf> = Vec::new();
    for key in ["LIBDOVECOT_INCLUDE", "LIBDOVECOT_STORAGE_INCLUDE", "LIBDOVECOT_DOVEADM_INCLUDE"] {
        for flag in vars.get(key).map(String::as_str).unwrap_or("").split_whitespace() {
            if let Some(dir) = flag.strip_prefix("-I") {
                includes.push(in_root(&sysroot, dir));
            }
        }
    }
    if let Some(dir) = vars.get("dovecot_pkgincludedir") {
        includes.push(in_root(&sysroot, dir));
    }
    includes.dedup();
    let config_h = includes
        .iter()
        .map(|d| d.join("config.h"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no config.h in the include dirs {includes:?} from {}; install dovecot-dev", config.display()));
    let abi = read_define(&config_h, "DOVECOT_ABI_VERSION")
        .unwrap_or_else(|| panic!("{} does not define DOVECOT_ABI_VERSION", config_h.display()));
    println!("cargo:rustc-env=MB_DOVECOT_ABI_VERSION={abi}");
    println!("cargo:rerun-if-changed={}", config_h.display());

    let major: u32 = read_define_raw(&config_h, "DOVECOT_VERSION_MAJOR").and_then(|v| v.parse().ok()).unwrap_or(2);
    let minor: u32 = read_define_raw(&config_h, "DOVECOT_VERSION_MINOR").and_then(|v| v.parse().ok()).unwrap_or(3);
    let is_24 = (major, minor) >= (2, 4);
    println!("cargo:rustc-env=MB_DOVECOT_RELEASE={major}.{minor}");

    let mut build = cc::Build::new();
    build.file("c-shim/doveadm-maildir-backup.c").include("c-shim").define("HAVE_CONFIG_H", None).flag_if_supported("-std=gnu99");
    build.flag_if_supported("-Wno-unused-parameter");
    // Where this Dovecot loads modules from, for messages that say where to install ours.
    let moduledir = vars.get("dovecot_moduledir").map(String::as_str).unwrap_or("/usr/lib/dovecot/modules");
    build.define("MB_MODULEDIR", Some(format!("\"{moduledir}\"").as_str()));
    if is_24 {
        build.file("c-shim/maildir-backup-settings.c");
    }
    for dir in &includes {
        build.include(dir);
    }
    build.compile("maildir_backup_shim");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));

    if is_24 {
        // Dovecot 2.4's config process learns our settings only from a module of its own.
        let so = out.join("libmaildir_backup_settings.so");
        let mut cmd = cc::Build::new().get_compiler().to_command();
        cmd.args(["-shared", "-fPIC", "-std=gnu99", "-DHAVE_CONFIG_H", "-Ic-shim"]);
        for dir in &includes {
            cmd.arg(format!("-I{}", dir.display()));
        }
        cmd.arg("c-shim/maildir-backup-settings.c").arg("-o").arg(&so);
        let status = cmd.status().expect("run the C compiler for the settings module");
        assert!(status.success(), "building libmaildir_backup_settings.so failed");
        // Next to the plugin (target/<profile>/), where the Makefile and the tests look.
        if let Some(profile_dir) = out.ancestors().nth(3) {
            let _ = fs::copy(&so, profile_dir.join("libmaildir_backup_settings.so"));
        }
    }

    let bindings = bindgen::Builder::default()
        .header("c-shim/maildir-backup-shim.h")
        .allowlist_type("mb_.*")
        .allowlist_function("mb_shim_.*")
        .generate()
        .expect("bindgen: c-shim/maildir-backup-shim.h");
    bindings.write_to_file(out.join("shim_bindings.rs")).expect("write shim_bindings.rs");
}

fn in_root(sysroot: &Path, dir: &str) -> PathBuf {
    if sysroot.as_os_str().is_empty() {
        PathBuf::from(dir)
    } else {
        sysroot.join(dir.trim_start_matches('/'))
    }
}

/// `KEY=value`, `KEY="value"`, `KEY='value'` lines of a dovecot-config file.
fn read_dovecot_config(path: &Path) -> HashMap<String, String> {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e} (install dovecot-dev, or set DOVECOT_CONFIG)", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches(|c| c == '"' || c == '\'').to_string()))
        .collect()
}

/// The raw value of `#define NAME value` in a header.
fn read_define_raw(path: &Path, name: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("#define ")?.trim_start().strip_prefix(name)?;
        rest.starts_with(char::is_whitespace).then(|| rest.trim().to_string())
    })
}

/// The string value of `#define NAME "value"` in a header.
fn read_define(path: &Path, name: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("#define ")?.trim_start().strip_prefix(name)?;
        let v = rest.trim();
        Some(v.strip_prefix('"')?.strip_suffix('"')?.to_string())
    })
}
