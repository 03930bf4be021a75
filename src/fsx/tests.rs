//! The file layer against the attacks it exists for: symlinks in every position, FIFOs and
//! sockets in place of files, names that climb out, sparse files.

use super::*;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn never_follows_or_escapes() {
    never_follows_or_escapes_once();
    // Kernels before 5.6 have no openat2: the component-by-component walk must hold too.
    // (Other tests running meanwhile take the walk as well, which is just as correct.)
    NO_OPENAT2.store(true, Ordering::Relaxed);
    never_follows_or_escapes_once();
    NO_OPENAT2.store(false, Ordering::Relaxed);
}

fn never_follows_or_escapes_once() {
    let t = tmp();
    let base = t.path();
    std::fs::create_dir_all(base.join("m/cur")).unwrap();
    std::fs::create_dir_all(base.join("outside")).unwrap();
    std::fs::write(base.join("outside/secret"), b"secret").unwrap();
    symlink(base.join("outside"), base.join("m/.Evil")).unwrap();
    symlink(base.join("outside/secret"), base.join("m/cur/msg")).unwrap();
    let m = Dir::open(&base.join("m")).unwrap();
    assert!(matches!(m.sub(".Evil"), Err(FsError::Symlink { .. })));
    assert!(matches!(m.sub(".Evil/x"), Err(FsError::Symlink { .. })));
    assert!(matches!(m.open_read(".Evil/secret"), Err(FsError::Symlink { .. })));
    assert!(matches!(m.open_read("cur/msg"), Err(FsError::Symlink { .. })));
    assert!(matches!(m.sub("../outside"), Err(FsError::BadName { .. })));
    assert!(matches!(m.open_read("/etc/passwd"), Err(FsError::BadName { .. })));
    assert!(m.create(".Evil/new", 0o600).is_err());
    assert!(m.create("cur/msg", 0o600).is_err(), "created over a symlink");
    assert!(!base.join("outside/new").exists());
    assert_eq!(m.lstat("cur/msg").unwrap().unwrap().kind(), Kind::Symlink);
    assert!(m.lstat("nothing").unwrap().is_none());
}

#[test]
fn admin_paths_follow_only_trusted_symlinks() {
    let t = tmp();
    let base = t.path();
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(base.join("real/Maildir")).unwrap();
    symlink(base.join("real"), base.join("alias")).unwrap();
    assert_eq!(Dir::open(&base.join("alias/Maildir")).unwrap().stat().unwrap().ino(), std::fs::metadata(base.join("real/Maildir")).unwrap().ino());
    // The same symlink in a directory others can write is refused.
    std::fs::create_dir(base.join("shared")).unwrap();
    std::fs::set_permissions(base.join("shared"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    symlink(base.join("real"), base.join("shared/alias")).unwrap();
    assert!(matches!(Dir::open(&base.join("shared/alias/Maildir")), Err(FsError::UntrustedSymlink { .. })));
    // Relative symlinks and `..` resolve like the kernel would.
    symlink("real/Maildir", base.join("rel")).unwrap();
    assert!(Dir::open(&base.join("rel/../Maildir")).is_ok());
}

#[test]
fn only_regular_files_are_read() {
    let t = tmp();
    let d = Dir::open(t.path()).unwrap();
    nix::unistd::mkfifo(&t.path().join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(t.path().join("sock")).unwrap();
    assert!(matches!(d.open_read("fifo"), Err(FsError::NotRegular { kind: Kind::Fifo, .. })));
    assert!(matches!(d.open_read("sock"), Err(FsError::NotRegular { kind: Kind::Socket, .. })));
    assert!(matches!(d.open_read(""), Err(FsError::NotRegular { kind: Kind::Dir, .. })));
    std::fs::write(t.path().join("big"), vec![b'x'; 100]).unwrap();
    assert!(matches!(d.read_small("big", 99, "a test file"), Err(FsError::TooBig { size: 100, .. })));
    assert_eq!(d.read_small("big", 100, "a test file").unwrap().unwrap().len(), 100);
    assert!(d.read_small("none", 1, "a test file").unwrap().is_none());
}

#[test]
fn sparse_files_are_refused_and_setid_bits_go() {
    let t = tmp();
    let d = Dir::open(t.path()).unwrap();
    let f = std::fs::File::create(t.path().join("sparse")).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(b"data in the middle", 1 << 29).unwrap();
    assert!(matches!(d.open_read("sparse"), Err(FsError::Sparse { size: 0x4000_0000, .. })));
    std::fs::write(t.path().join("plain"), vec![b'x'; 100_000]).unwrap();
    std::fs::set_permissions(t.path().join("plain"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let mut src = d.open_read("plain").unwrap();
    let out = d.create("copy", 0o600).unwrap();
    let c = copy::copy_file(&mut src, &out, None).unwrap_or_else(|_| panic!("copy"));
    let md = std::fs::metadata(t.path().join("copy")).unwrap();
    assert_eq!((md.len(), c.size), (100_000, 100_000));
    assert_eq!(md.mode() & 0o7777, 0o755);
    let mut again = d.open_read("copy").unwrap();
    assert_eq!(hash_file(&mut again).unwrap(), (c.size, c.blake3));
}

#[test]
fn renames_never_replace_unless_asked() {
    let t = tmp();
    let d = Dir::open(t.path()).unwrap();
    std::fs::write(t.path().join("a"), b"a").unwrap();
    std::fs::write(t.path().join("b"), b"b").unwrap();
    assert!(d.rename("a", &d, "b", Replace::Never).is_err());
    assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"b");
    d.rename("a", &d, "b", Replace::Allowed).unwrap();
    assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"a");
    let (name, _) = d.create_temp(".x", 0o600).unwrap();
    assert!(name.starts_with(".x.") && name.len() > 10);
}

#[test]
fn remove_tree_stays_inside() {
    let t = tmp();
    std::fs::create_dir_all(t.path().join("tree/a/b/c")).unwrap();
    std::fs::create_dir_all(t.path().join("keep")).unwrap();
    std::fs::write(t.path().join("keep/file"), b"x").unwrap();
    std::fs::write(t.path().join("tree/a/b/c/f"), b"x").unwrap();
    symlink(t.path().join("keep"), t.path().join("tree/a/link")).unwrap();
    let d = Dir::open(t.path()).unwrap();
    d.remove_tree("tree").unwrap();
    assert!(!t.path().join("tree").exists());
    assert!(t.path().join("keep/file").exists());
}

#[test]
fn link_file_links_the_open_file_and_knows_its_mount() {
    let t = tmp();
    std::fs::create_dir_all(t.path().join("src")).unwrap();
    std::fs::create_dir_all(t.path().join("dst")).unwrap();
    std::fs::write(t.path().join("src/msg"), b"hello").unwrap();
    let (src, dst) = (Dir::open(&t.path().join("src")).unwrap(), Dir::open(&t.path().join("dst")).unwrap());
    let opened = src.open_read("msg").unwrap();
    // Renamed after it was opened: the link is still the file we opened.
    std::fs::rename(t.path().join("src/msg"), t.path().join("src/moved")).unwrap();
    dst.link_file(&opened.file, "copy").unwrap();
    let ino = |p: &str| std::fs::metadata(t.path().join(p)).unwrap().ino();
    assert_eq!(ino("dst/copy"), ino("src/moved"));
    assert_eq!(dst.link_file(&opened.file, "copy").unwrap_err().errno(), Some(libc::EEXIST));
    // Unlinked everywhere: a file with no name left cannot get one back (the engine counts it gone).
    std::fs::remove_file(t.path().join("src/moved")).unwrap();
    std::fs::remove_file(t.path().join("dst/copy")).unwrap();
    assert_eq!(dst.link_file(&opened.file, "again").unwrap_err().errno(), Some(libc::ENOENT));
    assert_eq!(src.mount_id().unwrap(), dst.mount_id().unwrap());
    assert_ne!(src.mount_id().unwrap(), Dir::open(Path::new("/proc")).unwrap().mount_id().unwrap());
}
