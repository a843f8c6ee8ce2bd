//! The one way leaktrace opens a file whose path the target controls.
//!
//! leaktrace runs as root beside a node whose owner may be hostile, and that owner names many
//! of the files leaktrace reads: `-root DIR`, `-args_file`, the cookie in its home, the NIF
//! libraries it maps, its JIT's `/tmp/perf-PID.map`. Each is opened here, for plain and
//! container targets alike:
//! - a path the target names is resolved inside its own root (`/proc/PID/root`) by `openat2`
//!   with `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: no symlink anywhere,
//!   no escape to the host's tree ([`open_in_root`], [`read_in_root`]);
//! - a file the target maps is opened through `/proc/PID/map_files/START-END` of an actual
//!   mapping ([`map_files_link`]): the kernel resolves it to the very inode mapped, which the
//!   node can neither swap for a FIFO nor point elsewhere by a symlink ([`open_resolved`]);
//! - every file is first opened `O_PATH` (which opens nothing: a FIFO does not block, a device
//!   is not touched), checked to be a regular file of an accepted owner and size, and only then
//!   reopened for reading, non-blocking, through `/proc/self/fd`, and checked again;
//! - every read is capped.

use std::{
    ffi::CString,
    fs::{self, File},
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt, fs::OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

/// Why a file named by the target was not used.
pub type Refusal = String;

/// Largest ELF object read (beam.smp with symbols is ~30 MiB; libc ~2 MiB).
pub const ELF_CAP: u64 = 512 << 20;

fn errno_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "does not exist".into(),
        Some(libc::ELOOP) => "is reached through a symlink: refused".into(),
        Some(libc::EXDEV) => "points outside the node's root: refused".into(),
        Some(libc::ENOSYS) => "cannot be opened safely (openat2 needs Linux 5.6+): refused".into(),
        Some(libc::ENOTDIR) => "has a path component that is not a directory".into(),
        _ => format!("cannot be opened ({e})"),
    }
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat2(dirfd: &OwnedFd, path: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: valid NUL-terminated path and a properly sized open_how that outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            cpath.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn open_dir(dir: &Path) -> Result<OwnedFd, Refusal> {
    Ok(fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| format!("cannot be looked up: cannot open {} ({e})", dir.display()))?
        .into())
}

/// Opens the directory `path` as named by the target, inside `root` (normally
/// `/proc/PID/root`), with no symlink followed; for listing it (`/proc/self/fd/N`).
pub fn open_dir_in_root(root: &Path, path: &Path) -> Result<OwnedFd, Refusal> {
    let dirfd = open_dir(root)?;
    openat2(
        &dirfd,
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    )
    .map_err(|e| errno_reason(&e))
}

/// Which files may be read: who must own them, and how large they may be.
#[derive(Clone, Copy, Debug)]
pub struct FileRule<'a> {
    /// Acceptable owners (uids).
    pub owners: &'a [u32],
    /// The uid named in messages ("not the node's uid N").
    pub node_uid: u32,
    /// Largest size accepted; at most this many bytes are read.
    pub cap: u64,
}

/// Like [`FileRule`], for files whose owner does not matter (the objects a process maps:
/// whoever owns them, the kernel resolved the very file mapped).
#[derive(Clone, Copy, Debug)]
pub struct AnyOwner {
    /// Largest size accepted.
    pub cap: u64,
}

/// The checks a file must pass before it is opened for reading.
trait Rule {
    fn check(&self, meta: &fs::Metadata) -> Result<(), Refusal>;
}

impl Rule for FileRule<'_> {
    fn check(&self, meta: &fs::Metadata) -> Result<(), Refusal> {
        check_meta(meta, *self)
    }
}

impl Rule for AnyOwner {
    fn check(&self, meta: &fs::Metadata) -> Result<(), Refusal> {
        check_kind_and_size(meta, self.cap)
    }
}

/// Reopens the inode behind the `O_PATH` descriptor `pathfd` for reading, non-blocking,
/// after checking it with `rule`, and checks it again (same inode, still acceptable).
fn reopen_checked(pathfd: OwnedFd, rule: &dyn Rule) -> Result<File, Refusal> {
    let meta = File::from(pathfd.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map_err(|e| format!("cannot be examined ({e})"))?;
    rule.check(&meta)?;
    // Re-open the very inode found, for reading, through our own descriptor.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", pathfd.as_raw_fd()))
        .map_err(|e| format!("cannot be opened ({e})"))?;
    let again = file
        .metadata()
        .map_err(|e| format!("cannot be examined ({e})"))?;
    if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
        return Err("changed while being opened: refused".into());
    }
    rule.check(&again)?;
    Ok(file)
}

/// Opens `path` as named by the target, resolved inside `root` (a directory standing for the
/// target's `/`, normally `/proc/PID/root`; a relative `path` is resolved the same way inside
/// `base`, normally `/proc/PID/cwd`). Symlinks anywhere in the path are refused; the file must
/// be a regular file owned by one of `rule.owners`, readable by its owner, and no larger than
/// `rule.cap`. The path is opened `O_PATH` first, so a device or FIFO is never opened.
pub fn open_in_root(
    root: &Path,
    base: Option<&Path>,
    path: &Path,
    rule: FileRule<'_>,
) -> Result<File, Refusal> {
    let dir = if path.is_absolute() {
        root
    } else {
        base.unwrap_or(root)
    };
    let dirfd = open_dir(dir)?;
    let pathfd = openat2(
        &dirfd,
        path,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    )
    .map_err(|e| errno_reason(&e))?;
    reopen_checked(pathfd, &rule)
}

/// Reads `path` as [`open_in_root`] opens it: at most `rule.cap` bytes.
pub fn read_in_root(
    root: &Path,
    base: Option<&Path>,
    path: &Path,
    rule: FileRule<'_>,
) -> Result<Vec<u8>, Refusal> {
    let file = open_in_root(root, base, path, rule)?;
    read_capped(file, rule.cap)
}

/// Opens a path the kernel resolves to one inode, not the target
/// (`/proc/PID/map_files/START-END`, `/proc/PID/exe`, or a file the operator named): the last
/// link is followed, but nothing is opened for reading before `rule` accepted a regular file.
pub fn open_resolved(path: &Path, rule: AnyOwner) -> Result<File, Refusal> {
    let pathfd: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| errno_reason(&e))?
        .into();
    reopen_checked(pathfd, &rule)
}

/// Reads at most `cap` bytes of `file`; more is a refusal.
pub fn read_capped(file: File, cap: u64) -> Result<Vec<u8>, Refusal> {
    let mut buf = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot be read ({e})"))?;
    if buf.len() as u64 > cap {
        return Err(format!("is larger than {cap} bytes: refused"));
    }
    Ok(buf)
}

fn check_kind_and_size(meta: &fs::Metadata, cap: u64) -> Result<(), Refusal> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err("is a symlink: refused".into());
    }
    if !ft.is_file() {
        return Err("is not a regular file: refused".into());
    }
    if meta.len() > cap {
        return Err(format!(
            "is {} bytes, more than the {cap} a file of this kind may have: refused",
            meta.len(),
        ));
    }
    Ok(())
}

fn check_meta(meta: &fs::Metadata, rule: FileRule<'_>) -> Result<(), Refusal> {
    check_kind_and_size(meta, rule.cap)?;
    if !rule.owners.contains(&meta.uid()) {
        return Err(format!(
            "is owned by uid {}, not the node's uid {}: refused",
            meta.uid(),
            rule.node_uid
        ));
    }
    if meta.mode() & 0o400 == 0 {
        return Err("is not readable by its owner: refused".into());
    }
    Ok(())
}

/// Reads a file the operator named (`--cookie-file`): a regular file, at most `cap` bytes.
pub fn read_operator_file(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > cap {
        return Err(format!("{} bytes, more than {cap}", meta.len()));
    }
    let mut buf = Vec::new();
    file.take(cap)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// `/proc/PID/map_files/START-END` of a mapping of `path` (as `/proc/PID/maps` names it,
/// " (deleted)" included) in `maps`, when the link can be followed (it needs CAP_SYS_ADMIN).
pub fn map_files_link(pid: u32, maps: &[crate::native::Mapping], path: &str) -> Option<PathBuf> {
    maps.iter()
        .filter(|m| m.path == path)
        .map(|m| PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)))
        .find(|link| fs::metadata(link).is_ok())
}

/// Opens the object file `path` that `pid` maps (`path` as `/proc/PID/maps` names it) for
/// reading its ELF: through the map_files link of one of its mappings when there is one, else
/// inside the target's root with no symlink followed and owned by root or the node's user.
/// Returns the file and the path the kernel should be given for it (uprobes).
pub fn open_mapped_object(
    pid: u32,
    maps: &[crate::native::Mapping],
    path: &str,
) -> Result<(File, PathBuf), Refusal> {
    if let Some(link) = map_files_link(pid, maps, path) {
        let file = open_resolved(&link, AnyOwner { cap: ELF_CAP })?;
        return Ok((file, link));
    }
    if path.ends_with(" (deleted)") {
        return Err("was deleted since it was mapped and its mapping cannot be opened".into());
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let uid = crate::vm::discover::target_uid(pid).ok_or("has no readable owner uid")?;
    let file = open_in_root(
        &root,
        None,
        Path::new(path),
        FileRule {
            owners: &[0, uid],
            node_uid: uid,
            cap: ELF_CAP,
        },
    )?;
    // The kernel attaches uprobes to the inode behind this very descriptor.
    let via = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok((file, via))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn rule(cap: u64) -> FileRule<'static> {
        FileRule {
            owners: &[0],
            node_uid: 0,
            cap,
        }
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn refuses_symlinks_fifos_and_big_files_in_root() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: files must be owned by uid 0 for this rule");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("ok"), b"25\n").unwrap();
        symlink("/etc/shadow", root.join("link")).unwrap();
        mkfifo(&root.join("fifo"));
        fs::write(root.join("big"), vec![b'x'; 100]).unwrap();
        assert_eq!(
            read_in_root(root, None, Path::new("/ok"), rule(64)).unwrap(),
            b"25\n"
        );
        let e = read_in_root(root, None, Path::new("/link"), rule(64)).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        let e = read_in_root(root, None, Path::new("/fifo"), rule(64)).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_in_root(root, None, Path::new("/big"), rule(64)).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        let e = read_in_root(root, None, Path::new("/../../etc/passwd"), rule(1 << 20));
        // RESOLVE_IN_ROOT: `..` stops at the root, so this is root/etc/passwd, absent.
        assert_eq!(e.unwrap_err(), "does not exist");
    }

    #[test]
    fn resolved_open_follows_the_last_link_but_checks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let started = std::time::Instant::now();
        let e = open_resolved(&fifo, AnyOwner { cap: 1 << 20 }).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(started.elapsed().as_secs() < 5);
        let e = open_resolved(Path::new("/dev/zero"), AnyOwner { cap: 1 << 20 }).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let sparse = dir.path().join("sparse");
        File::create(&sparse).unwrap().set_len(8 << 30).unwrap();
        let e = open_resolved(&sparse, AnyOwner { cap: ELF_CAP }).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        let exe = open_resolved(Path::new("/proc/self/exe"), AnyOwner { cap: ELF_CAP }).unwrap();
        assert!(exe.metadata().unwrap().len() > 0);
    }

    #[test]
    fn own_libc_opens_through_its_mapping() {
        let pid = std::process::id();
        let maps = crate::native::read_maps(pid);
        let Some(libc) = crate::native::find_libc(&maps) else {
            eprintln!("skipped: this test binary maps no libc");
            return;
        };
        let (file, via) = open_mapped_object(pid, &maps, &libc).unwrap();
        assert!(file.metadata().unwrap().is_file());
        assert!(via.exists(), "{}", via.display());
    }
}
