//! Private files written atomically and durably, and read back only when
//! nobody else could have written them: the one implementation behind the
//! mesh's files of trusted state.
//!
//! Three crates keep such files: mesh-control its data directory (the last
//! good config, the leases, the version ceiling), mesh-xds-client the xDS
//! cache a workload starts from while the control plane is down, and
//! mesh-tower the workload certificate cache next to it. Each must survive
//! a crash at any instant (a reader sees the old file or the new one, never
//! a part) and must not be readable or writable by other users (a cached
//! private key, config the workload trusts).
//!
//! # Why a crate of its own
//!
//! The three crates share only mesh-core, and mesh-core is pure: no I/O, so
//! that every decision in it can be tested without a file system or a
//! runtime. mesh-control does not depend on mesh-xds-client (and should not:
//! the control server has no use for the ADS client, its tonic channel and
//! its rustls connector), so the helper cannot live in mesh-xds-client
//! either. A crate with no dependencies but std (and no `unsafe`: unix
//! permissions come from `std::os::unix::fs`) costs nothing to build and
//! leaves one copy to get right, where there were three that had drifted
//! (one reused a fixed temporary name that a crash left behind, opened
//! without `O_EXCL`).
//!
//! # What a write does
//!
//! [`write_private_file`]: the missing parent directories are created 0700;
//! a temporary file is created next to the target (same directory, so the
//! rename cannot cross file systems), exclusively (`O_EXCL`: a file or a
//! symlink someone planted under that name is never opened) and mode 0600,
//! under a name no other write uses ([`write_private_file`] says which); it
//! is written and fsynced, renamed over the target, and the directory is
//! fsynced so that the rename itself survives a power loss. A failed write
//! removes its temporary file; a crash may leave one behind, under a name
//! no later write reuses, and the target stays as it was.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` so that a reader sees the old file or the
/// new one, never a part, and a crash leaves one of them (see the crate
/// docs). The file is mode 0600, and so is what it replaces from now on:
/// the rename puts a new inode in place.
///
/// The temporary file is `.<file name>.<pid>.<16 hex digits>.tmp` in the
/// target's directory: hidden, unique per write (a process-wide counter and
/// a per-process random key), so concurrent writers and the leftovers of a
/// crash never collide with it.
///
/// # Errors
/// The error keeps the [`io::ErrorKind`] of the step that failed and says
/// which step and which path: `cannot create the directory /var/cache/app:
/// Permission denied (os error 13)`. `InvalidInput` when `path` names no
/// file (`/`, `..`).
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    create_private_dir(dir).map_err(|e| step(e, "cannot create the directory", dir))?;
    let (tmp, mut file) = create_temporary(dir, name)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| step(e, "cannot write", &tmp));
    drop(file);
    let renamed = written.and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| {
            let what = format!("cannot rename {} to", tmp.display());
            step(e, &what, path)
        })
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir).map_err(|e| step(e, "cannot sync the directory", dir))
}

/// Reads a file written by [`write_private_file`]: `Ok(None)` when there is
/// none. Refuses (an `InvalidData` or `PermissionDenied` error saying why,
/// of "it": the caller names the file) what is not a regular file, what is
/// larger than `limit` bytes, and, on Unix, a file others may write or
/// (where `/proc` tells this process's user) that another user owns: these
/// files are trusted state, so one that someone else could have written is
/// not used.
pub fn read_private_file(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if !meta.is_file() {
        return Err(invalid("it is not a regular file".to_owned()));
    }
    if meta.len() > limit {
        return Err(invalid(format!(
            "it is {} bytes, more than the {limit} it may have",
            meta.len()
        )));
    }
    check_private(&meta)?;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(invalid(format!(
            "it grew past the {limit} bytes it may have while being read"
        )));
    }
    Ok(Some(bytes))
}

/// Creates `dir` and its missing parents, mode 0700 on Unix (what already
/// exists keeps its mode: changing an operator's directory is not ours to
/// do). Succeeds when it exists.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// `e` with its kind, saying what failed on which path.
fn step(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// How many temporary names are tried before giving up: each is unique
/// already (see [`temporary_name`]), so a clash means a planted file.
const TEMPORARY_ATTEMPTS: usize = 8;

/// Creates a fresh temporary file for `name` in `dir` (exclusively, 0600).
fn create_temporary(dir: &Path, name: &OsStr) -> io::Result<(PathBuf, std::fs::File)> {
    let mut last = None;
    for _ in 0..TEMPORARY_ATTEMPTS {
        let tmp = dir.join(temporary_name(name));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((e, tmp)),
            Err(e) => return Err(step(e, "cannot create the temporary file", &tmp)),
        }
    }
    let (e, tmp) = last.unwrap_or_else(|| {
        (
            io::Error::from(io::ErrorKind::AlreadyExists),
            dir.join(name),
        )
    });
    Err(step(e, "cannot create the temporary file", &tmp))
}

/// `.<name>.<pid>.<16 hex digits>.tmp`: hidden, and never the same twice
/// (a process-wide counter hashed with std's per-process random key, so
/// two processes with the same pid, one after a crash of the other, do not
/// collide either).
fn temporary_name(name: &OsStr) -> OsString {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".{}.{:016x}.tmp",
        std::process::id(),
        hasher.finish()
    ));
    tmp
}

#[cfg(unix)]
fn check_private(meta: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let denied = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(denied(format!(
            "its mode {mode:o} lets others write it (it is written 0600)"
        )));
    }
    // /proc/self belongs to this process's user (Linux).
    if let Ok(me) = std::fs::metadata("/proc/self")
        && me.uid() != meta.uid()
    {
        return Err(denied(format!(
            "it belongs to uid {}, not to this process's uid {}",
            meta.uid(),
            me.uid()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_meta: &std::fs::Metadata) -> io::Result<()> {
    Ok(())
}

/// Makes a rename in `dir` durable (Unix: fsync the directory; elsewhere
/// the rename is as durable as the platform makes it).
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop (std only: no tempfile crate).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            let name = temporary_name(OsStr::new("mesh-fs-test"));
            let dir = std::env::temp_dir().join(name);
            std::fs::create_dir(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_file_is_written_in_new_private_directories() {
        let scratch = Scratch::new();
        let path = scratch.0.join("a").join("b").join("state.json");
        write_private_file(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(
            read_private_file(&path, 3).unwrap().as_deref(),
            Some(&b"one"[..])
        );
        #[cfg(unix)]
        {
            assert_eq!(mode(&path), 0o600, "the file");
            assert_eq!(mode(path.parent().unwrap()), 0o700, "the new directory");
            assert_eq!(mode(&scratch.0.join("a")), 0o700, "its new parent");
        }
    }

    #[test]
    fn a_file_is_replaced_in_place_and_no_temporary_file_stays() {
        let scratch = Scratch::new();
        let path = scratch.0.join("state.json");
        std::fs::write(&path, b"old, and world-readable").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_private_file(&path, b"new").unwrap();
        write_private_file(&path, b"newer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        assert_eq!(names(&scratch.0), ["state.json"]);
        #[cfg(unix)]
        assert_eq!(
            mode(&path),
            0o600,
            "the replacement is private, not the old mode"
        );
    }

    #[test]
    fn temporary_names_are_hidden_siblings_never_reused() {
        let a = temporary_name(OsStr::new("leases.json"));
        let b = temporary_name(OsStr::new("leases.json"));
        assert_ne!(a, b);
        let a = a.to_string_lossy().into_owned();
        let prefix = format!(".leases.json.{}.", std::process::id());
        assert!(a.starts_with(&prefix) && a.ends_with(".tmp"), "{a}");
        assert_eq!(a.len(), prefix.len() + 16 + ".tmp".len(), "{a}");
    }

    /// What a crash (or someone else) left where a temporary file goes
    /// does not stop or redirect a write: leftovers stay untouched, and a
    /// symlink at a predictable name is never followed.
    #[cfg(unix)]
    #[test]
    fn leftovers_and_planted_links_are_not_written_through() {
        let scratch = Scratch::new();
        let path = scratch.0.join("leases.json");
        let leftover = scratch.0.join(".leases.json.1.0000000000000000.tmp");
        std::fs::write(&leftover, b"half a write before a crash").unwrap();
        let victim = scratch.0.join("victim");
        std::fs::write(&victim, b"not yours").unwrap();
        std::os::unix::fs::symlink(&victim, scratch.0.join(".leases.json.tmp")).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
        assert_eq!(
            std::fs::read(&leftover).unwrap(),
            b"half a write before a crash"
        );
    }

    #[test]
    fn errors_name_the_step_and_the_path() {
        let scratch = Scratch::new();
        // A parent that is a file.
        let file = scratch.0.join("file");
        std::fs::write(&file, b"").unwrap();
        let e = write_private_file(&file.join("state.json"), b"x").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("cannot create the directory {}: ", file.display())),
            "{msg}"
        );
        // The target is a directory: the rename fails, nothing is left.
        let dir = scratch.0.join("dir");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("inside"), b"").unwrap();
        let e = write_private_file(&dir, b"x").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("cannot rename "), "{msg}");
        assert!(msg.contains(&format!(" to {}: ", dir.display())), "{msg}");
        assert_eq!(names(&scratch.0), ["dir", "file"], "no temporary file left");
        // No file name at all.
        let e = write_private_file(Path::new("/"), b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(e.to_string(), "/ names no file");
    }

    #[test]
    fn what_is_missing_too_big_or_not_a_file_is_told_apart() {
        let scratch = Scratch::new();
        let path = scratch.0.join("state.json");
        assert!(read_private_file(&path, 10).unwrap().is_none());
        write_private_file(&path, b"0123456789x").unwrap();
        let e = read_private_file(&path, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("11 bytes, more than the 10"), "{e}");
        let e = read_private_file(&scratch.0, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(e.to_string(), "it is not a regular file");
    }

    #[cfg(unix)]
    #[test]
    fn a_file_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = Scratch::new();
        let path = scratch.0.join("state.json");
        write_private_file(&path, b"x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = read_private_file(&path, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string().contains("mode 666 lets others write it"),
            "{e}"
        );
    }
}
