//! A small Dovecot cluster on loopback, as a mail provider runs one, configured as the README's Clusters
//! section says (its blocks are read from README.md; only addresses and paths are the test's): backends,
//! each with its own users, Maildirs and repository (`maildir_backup_dest = repo:B/backups`) and a
//! doveadm server (TCP and HTTP API) on an address of its own, and a proxy whose passdb sends each user
//! to its backend (`proxy=y host=…` with `doveadm_port`). All are real Dovecot instances of one release
//! ([`Instance`]), each with its own base_dir; the doveadm servers load our plugin (2.3: each master runs
//! in a mount namespace with the plugin's module dir; 2.4: the plugin is installed in the root).
//!
//! Addresses: every cluster gets `127.A.B.0/24` of its own (A from the pid, B a counter), so the fixed
//! doveadm ports never meet another test's; backend `i` is `127.A.B.(10+i)`, the proxy `127.A.B.2`. IMAP
//! stays on 127.0.0.1 (each instance's own port), where the churn and the readback tools expect it.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::dovecot::{release_command, DovecotOptions, Instance, Release, BIND_THEN_EXEC, V23};
use super::dovecot_common::{chown_vmail_recursive, tempdir};
use super::plugin::{run_plugin, PluginRelease};
use super::run::{cli_bin, Run};
use super::trixie::{chown_vmail_recursive_root, V24};

/// The README's: the tests use its configuration as written.
pub const DOVEADM_PASSWORD: &str = "change-this-doveadm-secret";
pub const API_KEY: &str = "change-this-api-key";
/// Every doveadm server's TCP port (the proxy's `doveadm_port`) and HTTP API port, on its own address.
pub const DOVEADM_PORT: u16 = 24245;
pub const HTTP_PORT: u16 = 24246;

/// The README's address for a backend, replaced by each backend's own.
const README_BACKEND: &str = "10.0.0.11";
/// The README's repository, replaced by each backend's own.
const README_REPO: &str = "/var/backups/maildir-backup";

/// The README's nightly run on the proxy.
const README_NIGHTLY: &str = "maildir-backup all-users -j 8 --user-timeout 2h -- maildir-backup -t 60";

pub fn readme() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The README's fenced block that starts with the line `first` (up to its closing fence).
pub fn readme_block(first: &str) -> String {
    let readme = readme();
    let start = readme.find(&format!("\n{first}\n")).unwrap_or_else(|| panic!("README.md has no block starting {first:?}")) + 1;
    let len = readme[start..].find("\n```").expect("the block ends");
    readme[start..start + len + 1].to_string()
}

/// The README's curl call of the HTTP API, for the backend at `address` with repository `repo` (as
/// the backend sees it), run by sh: its output.
pub fn readme_curl(address: Ipv4Addr, repo: &Path) -> Run {
    let block = readme_block("curl -H \"Authorization: X-Dovecot-API $(printf %s change-this-api-key | base64)\" \\");
    let script: String = block.lines().take_while(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    let script = script.replace(README_BACKEND, &address.to_string()).replace(README_REPO, &repo.display().to_string());
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("set -e\n{script}"));
    Run::of(c)
}

/// What the cluster needs of a release beyond the plugin.
pub trait ClusterRelease: PluginRelease {
    /// The README's backend configuration as this release takes it (2.3: as written).
    fn backend_conf(readme: String) -> String;
    /// Makes a host dir the mail user's, as the release's processes see it.
    fn chown_vmail(path: &Path);
}

impl ClusterRelease for V23 {
    fn backend_conf(readme: String) -> String {
        readme
    }
    fn chown_vmail(path: &Path) {
        chown_vmail_recursive(path)
    }
}

impl ClusterRelease for V24 {
    /// As the README says for 2.4: `listen` for `address`, our setting outside `plugin { }`.
    fn backend_conf(readme: String) -> String {
        let conf = readme.replace("    address = ", "    listen = ");
        let start = conf.find("plugin {\n").expect("a plugin block");
        let end = start + conf[start..].find("}\n").expect("the plugin block ends") + 2;
        let settings: String = conf[start..end].lines().skip(1).filter(|l| *l != "}").map(|l| format!("{}\n", l.trim())).collect();
        format!("{}{settings}{}", &conf[..start], &conf[end..])
    }
    fn chown_vmail(path: &Path) {
        chown_vmail_recursive_root(path)
    }
}

/// The doveadm service with a TCP and an HTTP listener on `addr` (on the proxy, for its HTTP API).
fn doveadm_service<R: Release>(addr: Ipv4Addr) -> String {
    let a = R::LISTENER_ADDRESS;
    format!("service doveadm {{\n  inet_listener doveadm {{\n    {a} = {addr}\n    port = {DOVEADM_PORT}\n  }}\n  inet_listener http {{\n    {a} = {addr}\n    port = {HTTP_PORT}\n  }}\n}}\n")
}

/// One backend: its Dovecot, address, users and repository (host path).
pub struct Backend<R: Release> {
    pub dovecot: Instance<R>,
    pub address: Ipv4Addr,
    pub users: Vec<String>,
    pub repo: PathBuf,
    _repo_dir: tempfile::TempDir,
}

impl<R: Release> Backend<R> {
    /// `host:port` of its doveadm server, for `doveadm -S`.
    pub fn doveadm_server(&self) -> String {
        format!("{}:{DOVEADM_PORT}", self.address)
    }
    pub fn http_url(&self) -> String {
        format!("http://{}:{HTTP_PORT}/doveadm/v1", self.address)
    }
}

pub struct Cluster<R: Release> {
    pub backends: Vec<Backend<R>>,
    pub proxy: Instance<R>,
    pub proxy_address: Ipv4Addr,
    /// A script that runs the release's doveadm with our plugin loaded (for `all-users --doveadm`).
    pub doveadm: PathBuf,
    _scripts: tempfile::TempDir,
}

/// This cluster's 127.A.B.0/24.
fn subnet() -> (u8, u8) {
    static N: AtomicUsize = AtomicUsize::new(0);
    (100 + (std::process::id() % 100) as u8, (N.fetch_add(1, Ordering::Relaxed) % 250) as u8 + 1)
}

impl<R: ClusterRelease> Cluster<R> {
    /// Backend `i` gets `users[i]`; the proxy knows them all, in the order `order` gives (default: backend
    /// by backend), each routed to its backend.
    pub fn start(users: &[&[&str]], order: Option<&[&str]>) -> Cluster<R> {
        let (a, b) = subnet();
        let master_bind = R::plugin_dir().map(|dir| (dir, R::module_dir()));
        let mut backends = Vec::new();
        for (i, names) in users.iter().enumerate() {
            let address = Ipv4Addr::new(127, a, b, 10 + i as u8);
            let repo_dir = R::tempdir();
            let repo = repo_dir.path().join("backups");
            fs::create_dir(&repo).unwrap();
            fs::set_permissions(&repo, fs::Permissions::from_mode(0o700)).unwrap();
            R::chown_vmail(&repo);
            let extra = R::backend_conf(readme_block("# Each backend (2.3): /etc/dovecot/conf.d/96-maildir-backup-cluster.conf"))
                .replace(README_BACKEND, &address.to_string())
                .replace(README_REPO, &R::inside(&repo).display().to_string());
            let opts = DovecotOptions { users: names.iter().map(|u| u.to_string()).collect(), extra_conf: extra, master_bind: master_bind.clone(), ..Default::default() };
            backends.push(Backend { dovecot: Instance::start(opts), address, users: opts_users(names), repo, _repo_dir: repo_dir });
        }
        let proxy_address = Ipv4Addr::new(127, a, b, 2);
        let extra = format!(
            "{}{}doveadm_api_key = {API_KEY}\n",
            readme_block("# The proxy: /etc/dovecot/conf.d/96-maildir-backup-cluster.conf"),
            doveadm_service::<R>(proxy_address)
        );
        let proxy = Instance::start(DovecotOptions { users: Vec::new(), extra_conf: extra, master_bind, ..Default::default() });
        let all: Vec<&str> = order.map(<[&str]>::to_vec).unwrap_or_else(|| users.concat());
        let routes: Vec<(String, String)> = all
            .iter()
            .map(|user| {
                let b = backends.iter().find(|b| b.users.iter().any(|u| u == user)).unwrap_or_else(|| panic!("{user} is on no backend"));
                (user.to_string(), format!("proxy=y host={}", b.address))
            })
            .collect();
        proxy.add_userdb_users(&routes);
        let scripts = tempdir();
        let doveadm = scripts.path().join("doveadm");
        fs::write(&doveadm, format!("#!/bin/sh\nexec {} \"$@\"\n", doveadm_words::<R>().join(" "))).unwrap();
        fs::set_permissions(&doveadm, fs::Permissions::from_mode(0o755)).unwrap();
        Cluster { backends, proxy, proxy_address, doveadm, _scripts: scripts }
    }

    /// The backend holding `user`.
    pub fn backend_of(&self, user: &str) -> &Backend<R> {
        self.backends.iter().find(|b| b.users.iter().any(|u| u == user)).unwrap()
    }

    /// doveadm (with our plugin) on the proxy.
    pub fn front(&self, args: &[&str]) -> Run {
        run_plugin(&self.proxy, args)
    }

    /// `maildir-backup all-users --doveadm <plugin doveadm> -c <proxy conf> OPTIONS -- COMMAND…`.
    pub fn all_users(&self, options: &[&str], command: &[&str]) -> Run {
        let mut c = Command::new(cli_bin());
        c.arg("all-users").arg("--doveadm").arg(&self.doveadm).arg("-c").arg(self.proxy.conf_in_root()).args(options).arg("--").args(command);
        Run::of(c)
    }

    /// The README's nightly command, with only `--doveadm` and `-c` added for this cluster.
    pub fn readme_all_users(&self) -> Run {
        assert!(readme().contains(&format!("\n{README_NIGHTLY}\n")), "the README's nightly command is not {README_NIGHTLY:?}");
        let words: Vec<&str> = README_NIGHTLY.split_whitespace().collect();
        let dashes = words.iter().position(|w| *w == "--").unwrap();
        self.all_users(&words[2..dashes], &words[dashes + 1..])
    }
}

fn opts_users(names: &[&str]) -> Vec<String> {
    names.iter().map(|u| u.to_string()).collect()
}

/// The words that run the release's doveadm with our plugin loaded (shell-quoted).
fn doveadm_words<R: PluginRelease>() -> Vec<String> {
    let mut words = Vec::new();
    if let Some(dir) = R::plugin_dir() {
        words.push(format!("unshare -m sh -c '{BIND_THEN_EXEC}' {} {}", dir.display(), R::module_dir().display()));
    }
    let cmd = release_command::<R>(R::DOVEADM_BIN);
    words.push(cmd.get_program().to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words
}

/// `curl` POSTing `body` (a doveadm HTTP API request) to `url` with `auth` as the Authorization header
/// (None: none): the status code and the body.
pub fn http_post(url: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "--data-binary", body]);
    if let Some(a) = auth {
        c.args(["-H", &format!("Authorization: {a}")]);
    }
    c.arg(url);
    let r = Run::of(c);
    r.expect_ok();
    let (text, code) = r.stdout.rsplit_once('\n').unwrap_or(("", r.stdout.as_str()));
    (code.trim().parse().unwrap_or_else(|_| panic!("no status code from {}", r.show())), text.to_string())
}

/// The Authorization header for a doveadm API key.
pub fn api_key_auth(key: &str) -> String {
    use base64::Engine;
    format!("X-Dovecot-API {}", base64::engine::general_purpose::STANDARD.encode(key))
}
