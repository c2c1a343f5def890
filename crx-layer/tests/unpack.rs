//! Layer unpacking against tarballs built here: regular content, compression, whiteouts,
//! cloning, and hostile layers that try to write outside the root.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crx_layer::{clone_tree, unpack_layer, LayerError, UnpackOptions};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// Builds tar streams entry by entry, writing names raw so hostile paths survive.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn entry(
        mut self,
        kind: EntryType,
        path: &str,
        mode: u32,
        link: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_000_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn dir(self, path: &str) -> Self {
        self.entry(EntryType::Directory, path, 0o755, None, b"")
    }
    fn file(self, path: &str, data: &[u8]) -> Self {
        self.entry(EntryType::Regular, path, 0o644, None, data)
    }
    fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(EntryType::Symlink, path, 0o777, Some(target), b"")
    }
    fn hardlink(self, path: &str, target: &str) -> Self {
        self.entry(EntryType::Link, path, 0o644, Some(target), b"")
    }
    fn build(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn apply(root: &Path, tar: &[u8]) -> Result<crx_layer::Unpacked, LayerError> {
    unpack_layer(tar, root, &UnpackOptions::default())
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// A scratch area with `root/` to unpack into and `outside/` holding a file that must survive.
fn sandbox() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"untouched").unwrap();
    (tmp, root, outside)
}

fn assert_outside_untouched(outside: &Path) {
    let names: Vec<_> = fs::read_dir(outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec!["secret"],
        "something was written outside the root"
    );
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"untouched");
}

#[test]
fn unpacks_files_dirs_links_and_metadata() {
    let (_tmp, root, _) = sandbox();
    let tar = Layer::new()
        .dir("./bin/")
        .entry(
            EntryType::Regular,
            "./bin/tool",
            0o4755,
            None,
            b"#!/bin/sh\n",
        )
        .symlink("bin/sh", "tool")
        .hardlink("bin/tool2", "./bin/tool")
        .file("etc/implicit/parent.conf", b"x=1\n")
        .entry(EntryType::Fifo, "run/fifo", 0o600, None, b"")
        .build();
    let out = apply(&root, &tar).unwrap();
    assert_eq!(out.diff_id, sha256(&tar));
    assert_eq!(out.entries, 6);

    let tool = fs::metadata(root.join("bin/tool")).unwrap();
    assert_eq!(
        tool.permissions().mode() & 0o7777,
        0o4755,
        "setuid kept after chown"
    );
    assert_eq!(tool.mtime(), 1_000_000_000);
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        fs::metadata(root.join("bin/tool2")).unwrap().ino(),
        tool.ino()
    );
    assert_eq!(
        fs::read(root.join("etc/implicit/parent.conf")).unwrap(),
        b"x=1\n"
    );
    assert!(fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::metadata(root.join("bin")).unwrap().mtime(),
        1_000_000_000,
        "dir mtime set after children"
    );
    if UnpackOptions::default().privileged {
        assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
    }
}

#[test]
fn gzip_zstd_and_plain_give_the_same_tree_and_diff_id() {
    let tar = Layer::new()
        .dir("d/")
        .file("d/f", &vec![7u8; 300_000])
        .build();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for blob in [&tar, &gz, &zst] {
        let (_tmp, root, _) = sandbox();
        let out = apply(&root, blob).unwrap();
        assert_eq!(out.diff_id, sha256(&tar));
        assert_eq!(fs::read(root.join("d/f")).unwrap().len(), 300_000);
    }
}

#[test]
fn whiteouts_hide_lower_layers_only() {
    let (_tmp, root, _) = sandbox();
    let lower = Layer::new()
        .file("a/x", b"x")
        .file("a/y", b"y")
        .file("b/deep/z", b"z")
        .file("c/p", b"p")
        .file("c/sub/q", b"q")
        .build();
    apply(&root, &lower).unwrap();
    let upper = Layer::new()
        .file("a/.wh.x", b"")
        .file(".wh.b", b"")
        .dir("c/sub/")
        .file("c/sub/new", b"n")
        .file("c/.wh..wh..opq", b"")
        .file("a/fresh", b"f")
        .file("a/.wh.fresh", b"")
        .build();
    apply(&root, &upper).unwrap();
    assert!(!root.join("a/x").exists());
    assert!(root.join("a/y").exists());
    assert!(
        !root.join("b").exists(),
        "whiteout removes a whole directory"
    );
    assert!(!root.join("c/p").exists(), "opaque dir hides lower files");
    assert!(
        !root.join("c/sub/q").exists(),
        "opaque dir hides lower files below this layer's own dirs"
    );
    assert_eq!(fs::read(root.join("c/sub/new")).unwrap(), b"n");
    assert!(
        root.join("a/fresh").exists(),
        "a whiteout never hides its own layer's entries"
    );
    assert!(!root.join("a/.wh.x").exists() && !root.join("c/.wh..wh..opq").exists());
}

#[test]
fn later_entries_replace_earlier_ones_without_following_symlinks() {
    let (_tmp, root, outside) = sandbox();
    let secret = outside.join("secret");
    let lower = Layer::new()
        .symlink("victim", secret.to_str().unwrap())
        .build();
    apply(&root, &lower).unwrap();
    let upper = Layer::new().file("victim", b"replaced").build();
    apply(&root, &upper).unwrap();
    assert_eq!(fs::read(root.join("victim")).unwrap(), b"replaced");
    assert!(!fs::symlink_metadata(root.join("victim"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_outside_untouched(&outside);
}

#[test]
fn hostile_layers_are_rejected_and_write_nothing_outside() {
    let (_tmp, root, outside) = sandbox();
    let out = outside.to_str().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot path",
            Layer::new().file("../outside/pwned", b"!").build(),
        ),
        (
            "nested dot-dot",
            Layer::new().file("a/../../outside/pwned", b"!").build(),
        ),
        (
            "absolute path",
            Layer::new().file(&format!("{out}/pwned"), b"!").build(),
        ),
        (
            "write through absolute symlink",
            Layer::new()
                .symlink("evil", out)
                .file("evil/pwned", b"!")
                .build(),
        ),
        (
            "write through relative symlink",
            Layer::new()
                .symlink("evil", "../outside")
                .file("evil/pwned", b"!")
                .build(),
        ),
        (
            "write through chained symlinks",
            Layer::new()
                .symlink("a", "b")
                .symlink("b", "../outside")
                .dir("a/sub/")
                .build(),
        ),
        (
            "hard link to outside",
            Layer::new().hardlink("hl", "../outside/secret").build(),
        ),
        (
            "hard link through symlink",
            Layer::new()
                .symlink("evil", out)
                .hardlink("hl", "evil/secret")
                .build(),
        ),
        (
            "absolute hard link",
            Layer::new()
                .hardlink("hl", &format!("{out}/secret"))
                .build(),
        ),
        (
            "whiteout through symlink",
            Layer::new()
                .symlink("evil", "../outside")
                .file("evil/.wh.secret", b"")
                .build(),
        ),
        (
            "opaque through symlink",
            Layer::new()
                .symlink("evil", out)
                .file("evil/.wh..wh..opq", b"")
                .build(),
        ),
    ];
    for (what, tar) in cases {
        let err = apply(&root, &tar).expect_err(what);
        assert!(
            matches!(err, LayerError::Escape { .. }),
            "{what}: expected an escape error, got {err}"
        );
        assert!(
            err.to_string().contains("escapes the root"),
            "{what}: unclear error: {err}"
        );
        assert_outside_untouched(&outside);
        fs::remove_dir_all(&root).unwrap();
        fs::create_dir(&root).unwrap();
    }
}

#[test]
fn symlinks_inside_the_root_may_be_written_through() {
    let (_tmp, root, _) = sandbox();
    let tar = Layer::new()
        .dir("usr/lib/")
        .symlink("lib", "usr/lib")
        .file("lib/libc.so", b"elf")
        .build();
    apply(&root, &tar).unwrap();
    assert_eq!(fs::read(root.join("usr/lib/libc.so")).unwrap(), b"elf");
}

#[test]
fn clone_tree_shares_files_and_isolates_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, next) = (tmp.path().join("base"), tmp.path().join("next"));
    fs::create_dir(&base).unwrap();
    apply(
        &base,
        &Layer::new()
            .file("etc/a", b"a")
            .file("etc/b", b"b")
            .symlink("l", "etc/a")
            .build(),
    )
    .unwrap();
    clone_tree(&base, &next).unwrap();
    assert_eq!(
        fs::metadata(base.join("etc/a")).unwrap().ino(),
        fs::metadata(next.join("etc/a")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(next.join("etc")).unwrap().mtime(),
        fs::metadata(base.join("etc")).unwrap().mtime()
    );
    apply(
        &next,
        &Layer::new()
            .file("etc/.wh.a", b"")
            .file("etc/b", b"changed")
            .build(),
    )
    .unwrap();
    assert!(!next.join("etc/a").exists());
    assert_eq!(fs::read(next.join("etc/b")).unwrap(), b"changed");
    assert_eq!(
        fs::read(base.join("etc/a")).unwrap(),
        b"a",
        "parent snapshot untouched"
    );
    assert_eq!(
        fs::read(base.join("etc/b")).unwrap(),
        b"b",
        "parent snapshot untouched"
    );
}

#[test]
fn device_nodes_only_as_root() {
    let (_tmp, root, _) = sandbox();
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Char);
    h.set_path("dev/null").unwrap();
    h.set_mode(0o666);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b""[..]).unwrap();
    let tar = b.into_inner().unwrap();
    apply(&root, &tar).unwrap();
    let exists = fs::symlink_metadata(root.join("dev/null")).is_ok();
    assert_eq!(exists, UnpackOptions::default().privileged);
    if exists {
        let m = fs::symlink_metadata(root.join("dev/null")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), rustix::fs::makedev(1, 3));
    }
}
