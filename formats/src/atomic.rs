//! Files that appear whole or not at all. Each is written under a temporary sibling name
//! (`<name>.tmp-<pid>`), flushed to disk, then renamed over its path: a crash leaves the previous file
//! (or none) beside a stray temporary, never a truncated file. Every writer of results, reports,
//! traces and checkpoints' small files goes through [`replace_with`].

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// An I/O failure of an atomic write, naming the file it concerns.
#[derive(Debug)]
pub struct AtomicWriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for AtomicWriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for AtomicWriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Where `path` is written before it is renamed into place: `<name>.tmp-<pid>` beside it.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Runs `write` on the temporary sibling of `path`, syncs it and renames it onto `path`. On failure the
/// temporary is removed and `path` is untouched.
pub fn replace_with(
    path: &Path,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<(), AtomicWriteError> {
    let tmp = temporary_sibling(path);
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AtomicWriteError { path: p, source }
    };
    let written = write(&tmp)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .map_err(at(&tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(at(path))
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    replace_with(path, |tmp| std::fs::write(tmp, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("v4-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = scratch("fail");
        let path = dir.join("out.json");
        write_bytes(&path, b"old").unwrap();
        let err = replace_with(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.path, temporary_sibling(&path));
        assert!(err.to_string().ends_with("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.json"]);
    }

    #[test]
    fn a_write_replaces_the_file_whole() {
        let dir = scratch("ok");
        let path = dir.join("out.bin");
        write_bytes(&path, b"first").unwrap();
        write_bytes(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert!(!temporary_sibling(&path).exists());
    }
}
