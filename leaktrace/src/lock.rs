//! One leaktrace per target: two tracers on one process would double the probe cost and
//! confuse each other's pending-call bookkeeping, so the second one is refused.
//!
//! The lock is an flock(2) on `/run/leaktrace/PID.lock`, held for the whole run. leaktrace runs
//! as root, so the directory and file are handled as an attacker could have prepared them:
//! - the directory is created 0700; an existing one must be a real directory (not a symbolic
//!   link) owned by root or by the user running leaktrace, and writable by its owner only;
//! - the lock file is opened relative to that directory with `O_NOFOLLOW` and must be a
//!   regular file;
//! - release unlinks the file while still holding its flock, and whoever takes a lock checks
//!   afterwards that the file it locked is still the one at the path, starting over if not: a
//!   tracer that opened the file just before it was unlinked would otherwise hold a lock on a
//!   dead inode while a third one locks the new file, and both would trace.

use std::{
    ffi::CString,
    fs::{DirBuilder, File},
    io::{self, Read, Seek, SeekFrom, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::DirBuilderExt},
    },
    path::Path,
};

use crate::error::Error;

/// Directory of the per-target lock files.
const LOCK_DIR: &str = "/run/leaktrace";

/// How many times a lock file replaced under us is retried before giving up.
const ATTEMPTS: usize = 16;

/// Held while tracing a PID; released (file unlinked, then unlocked) on drop.
#[derive(Debug)]
pub struct TargetLock {
    dir: OwnedFd,
    name: CString,
    file: File,
}

impl TargetLock {
    /// Takes the lock for `pid`, or says which leaktrace holds it.
    pub fn acquire(pid: u32) -> Result<TargetLock, Error> {
        acquire_in(Path::new(LOCK_DIR), pid)
    }
}

fn acquire_in(dir_path: &Path, pid: u32) -> Result<TargetLock, Error> {
    let dir = open_lock_dir(dir_path)?;
    let file_name = format!("{pid}.lock");
    let path = dir_path.join(&file_name);
    let lock_err = |source| Error::Lock {
        path: path.clone(),
        source,
    };
    let name = CString::new(file_name).expect("no NUL in a number");
    for _ in 0..ATTEMPTS {
        let mut file = open_lock_file(&dir, &name).map_err(lock_err)?;
        // flock, not a PID check: the kernel drops it when the holder dies, so a crashed
        // leaktrace never blocks the next one.
        if !try_flock(&file) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::AlreadyTraced {
                pid,
                holder: holder.trim().parse().unwrap_or(0),
            });
        }
        if !is_current(&dir, &name, &file).map_err(lock_err)? {
            // Unlinked by its holder between our open and our flock: that lock guards nothing.
            continue;
        }
        file.set_len(0).map_err(lock_err)?;
        file.seek(SeekFrom::Start(0)).map_err(lock_err)?;
        write!(file, "{}", std::process::id()).map_err(lock_err)?;
        return Ok(TargetLock { dir, name, file });
    }
    Err(lock_err(io::Error::other(
        "the lock file kept being replaced while taking it: is another leaktrace starting and stopping in a loop?",
    )))
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Unlinked while still locked, and only if it is still ours at the path; then unlocked
        // (closing the file would do it too).
        if is_current(&self.dir, &self.name, &self.file).unwrap_or(false) {
            // SAFETY: valid descriptor and C string.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        }
        // SAFETY: valid descriptor.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Why a lock directory with `st_mode` `mode` owned by `uid` is unsafe for a process of
/// effective uid `euid`, or None when it is fine.
fn lock_dir_problem(mode: u32, uid: u32, euid: u32) -> Option<String> {
    let kind = mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Some("it is a symbolic link".into());
    }
    if kind != libc::S_IFDIR {
        return Some(format!(
            "it is {}, not a directory",
            crate::report::file_kind(mode)
        ));
    }
    if uid != 0 && uid != euid {
        return Some(format!(
            "it is owned by uid {uid}, not by root (or uid {euid}, running leaktrace)"
        ));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "it is writable by {} (mode {:04o})",
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    None
}

fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer; a bad descriptor is an error return.
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens the lock directory, creating it (0700) when missing; refuses it unless it is a real
/// directory owned by root (or us) and writable by its owner only.
fn open_lock_dir(path: &Path) -> Result<OwnedFd, Error> {
    let refuse = |reason: String| Error::LockDir {
        path: path.to_path_buf(),
        reason,
    };
    let io_err = |source| Error::Lock {
        path: path.to_path_buf(),
        source,
    };
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: valid C string; the descriptor returned is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // Say what is there instead of a directory, when something is.
        return Err(match std::fs::symlink_metadata(path) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                lock_dir_problem(m.mode(), m.uid(), euid).map_or_else(|| io_err(e), refuse)
            }
            Err(_) => io_err(e),
        });
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    // Checked on what was opened, not on the path: nothing can be swapped in between.
    let st = fstat(dir.as_raw_fd()).map_err(io_err)?;
    if let Some(reason) = lock_dir_problem(st.st_mode, st.st_uid, euid) {
        return Err(refuse(reason));
    }
    Ok(dir)
}

/// Opens (creating, 0600) `name` in `dir`, not following a symbolic link; it must be a regular
/// file.
fn open_lock_file(dir: &OwnedFd, name: &CString) -> io::Result<File> {
    // SAFETY: valid descriptor and C string; the descriptor returned is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::other("it is a symbolic link, which leaktrace does not follow: remove it")
        } else {
            e
        });
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let st = fstat(file.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other(format!(
            "it is {}, not a regular file: remove it",
            crate::report::file_kind(st.st_mode)
        )));
    }
    Ok(file)
}

/// Takes the exclusive flock without waiting: false when someone holds it.
fn try_flock(file: &File) -> bool {
    // SAFETY: valid descriptor.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether `file` is still the file at `name` in `dir`.
fn is_current(dir: &OwnedFd, name: &CString, file: &File) -> io::Result<bool> {
    let ours = fstat(file.as_raw_fd())?;
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out-pointer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(st.st_dev == ours.st_dev && st.st_ino == ours.st_ino)
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::{PermissionsExt, symlink},
    };

    use std::path::PathBuf;

    use super::*;

    /// Path of the lock file of `pid` under `dir`.
    fn lock_path(dir: &Path, pid: u32) -> PathBuf {
        dir.join(format!("{pid}.lock"))
    }

    fn euid() -> u32 {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() }
    }

    /// A fresh lock directory (0700, ours) inside a temporary directory.
    fn lock_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("leaktrace");
        (tmp, dir)
    }

    #[test]
    fn lock_dir_rules() {
        let dir = libc::S_IFDIR;
        assert_eq!(lock_dir_problem(dir | 0o700, 0, 1000), None);
        assert_eq!(lock_dir_problem(dir | 0o755, 0, 0), None);
        assert_eq!(lock_dir_problem(dir | 0o700, 1000, 1000), None);
        let why = |mode, uid, euid| lock_dir_problem(mode, uid, euid).unwrap();
        assert!(why(dir | 0o700, 1000, 0).contains("owned by uid 1000"));
        assert!(why(dir | 0o777, 0, 0).contains("writable by everyone (mode 0777)"));
        assert!(why(dir | 0o770, 0, 0).contains("writable by its group (mode 0770)"));
        assert!(why(dir | 0o1777, 0, 0).contains("writable by everyone"));
        assert!(why(libc::S_IFLNK | 0o777, 0, 0).contains("symbolic link"));
        assert!(why(libc::S_IFREG | 0o600, 0, 0).contains("a regular file, not a directory"));
    }

    #[test]
    fn the_directory_is_created_private() {
        let (_tmp, dir) = lock_dir();
        let lock = acquire_in(&dir, 42).unwrap();
        let meta = fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "{:o}",
            meta.permissions().mode()
        );
        assert_eq!(
            fs::read_to_string(lock_path(&dir, 42)).unwrap(),
            std::process::id().to_string()
        );
        drop(lock);
        assert!(!lock_path(&dir, 42).exists(), "removed on release");
    }

    #[test]
    fn a_second_tracer_is_refused_naming_the_holder_until_the_first_releases() {
        let (_tmp, dir) = lock_dir();
        let first = acquire_in(&dir, 7).unwrap();
        match acquire_in(&dir, 7) {
            Err(Error::AlreadyTraced { pid: 7, holder }) => {
                assert_eq!(holder, std::process::id())
            }
            other => panic!("{other:?}"),
        }
        // Another PID is another lock.
        let other = acquire_in(&dir, 8).unwrap();
        drop(first);
        let again = acquire_in(&dir, 7).unwrap();
        drop((other, again));
    }

    #[test]
    fn a_lock_on_the_released_file_is_not_taken_for_the_lock() {
        // B opens the lock file while A holds it; A releases (unlink, unlock); B's flock on the
        // old file then succeeds, but it is no longer the file at the path.
        let (_tmp, dir) = lock_dir();
        let a = acquire_in(&dir, 9).unwrap();
        let fd = open_lock_dir(&dir).unwrap();
        let name = CString::new("9.lock").unwrap();
        let b = open_lock_file(&fd, &name).unwrap();
        assert!(!try_flock(&b), "A holds it");
        drop(a);
        assert!(try_flock(&b), "the old file is unlocked");
        assert!(
            !is_current(&fd, &name, &b).unwrap(),
            "but no longer the lock"
        );
        // Taking the lock properly gets the new file, which B's stale flock does not cover.
        let c = acquire_in(&dir, 9).unwrap();
        assert!(is_current(&fd, &name, &c.file).unwrap());
        // And while C holds it, nobody else gets it.
        assert!(matches!(
            acquire_in(&dir, 9),
            Err(Error::AlreadyTraced { .. })
        ));
        drop(b);
        drop(c);
    }

    #[test]
    fn unsafe_lock_directories_are_refused() {
        let (tmp, dir) = lock_dir();
        let refused = |dir: &Path, expect: &str| match acquire_in(dir, 1) {
            Err(e @ Error::LockDir { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(expect), "{msg}");
            }
            other => panic!("{}: {other:?}", dir.display()),
        };
        // A symbolic link to a perfectly good directory.
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        symlink(&real, &dir).unwrap();
        refused(&dir, "symbolic link");
        assert_eq!(
            fs::read_dir(&real).unwrap().count(),
            0,
            "nothing created through it"
        );
        fs::remove_file(&dir).unwrap();
        // A file.
        fs::write(&dir, "").unwrap();
        refused(&dir, "not a directory");
        fs::remove_file(&dir).unwrap();
        // World- and group-writable.
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        refused(&dir, "writable by everyone");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        refused(&dir, "writable by its group");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        acquire_in(&dir, 1).unwrap();
        // Owned by someone else (only root can give it away).
        if euid() == 0 {
            // SAFETY: valid C string.
            let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            refused(&dir, "owned by uid 65534");
        }
    }

    #[test]
    fn a_symbolic_link_as_lock_file_is_not_followed() {
        let (tmp, dir) = lock_dir();
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        symlink(&victim, lock_path(&dir, 5)).unwrap();
        let err = acquire_in(&dir, 5).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        // Nor a FIFO.
        fs::remove_file(lock_path(&dir, 5)).unwrap();
        let c = CString::new(lock_path(&dir, 5).as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = acquire_in(&dir, 5).unwrap_err().to_string();
        assert!(err.contains("a FIFO, not a regular file"), "{err}");
    }
}
