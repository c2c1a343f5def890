//! Lexical validation of tar entry paths: what a layer may name, before any filesystem access.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::LayerError;

/// Normalise a tar entry path (or hard-link target) to a relative path of plain components.
///
/// `./` prefixes, `.` components and repeated or trailing slashes are dropped. Absolute paths
/// and `..` components are rejected as escapes. Returns `None` for the root itself (`./`).
pub(crate) fn normalize(raw: &[u8]) -> Result<Option<PathBuf>, LayerError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.contains(&0) {
        return Err(LayerError::InvalidEntry {
            path: shown(),
            reason: "NUL byte in path".into(),
        });
    }
    let mut out = PathBuf::new();
    for comp in Path::new(OsStr::from_bytes(raw)).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(LayerError::Escape {
                    path: shown(),
                    reason: "absolute path",
                })
            }
            Component::ParentDir => {
                return Err(LayerError::Escape {
                    path: shown(),
                    reason: "`..` component",
                })
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Split a normalised path into its parent (possibly empty) and final component.
pub(crate) fn split(rel: &Path) -> (&Path, &OsStr) {
    let name = rel
        .file_name()
        .expect("normalized paths end in a normal component");
    (rel.parent().unwrap_or(Path::new("")), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_relative_paths() {
        assert_eq!(
            normalize(b"./a//b/./c/").unwrap(),
            Some(PathBuf::from("a/b/c"))
        );
        assert_eq!(normalize(b"./").unwrap(), None);
        assert_eq!(normalize(b"bin").unwrap(), Some(PathBuf::from("bin")));
    }

    #[test]
    fn rejects_escapes() {
        for bad in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/.."] {
            assert!(
                matches!(normalize(bad), Err(LayerError::Escape { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            normalize(b"a\0b"),
            Err(LayerError::InvalidEntry { .. })
        ));
    }
}
