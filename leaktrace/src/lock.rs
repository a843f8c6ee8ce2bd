//! One leaktrace per target: two tracers on one process would double the probe cost and
//! confuse each other's pending-call bookkeeping, so the second one is refused.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::PathBuf,
};

use crate::error::Error;

/// Directory of the per-target lock files.
const LOCK_DIR: &str = "/run/leaktrace";

/// Held while tracing a PID; released (file unlocked and removed) on drop.
#[derive(Debug)]
pub struct TargetLock {
    file: File,
    path: PathBuf,
}

impl TargetLock {
    /// Takes the lock for `pid`, or says which leaktrace holds it.
    pub fn acquire(pid: u32) -> Result<TargetLock, Error> {
        let path = PathBuf::from(LOCK_DIR).join(format!("{pid}.lock"));
        let lock_err = |source| Error::Lock {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(LOCK_DIR).map_err(lock_err)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        // flock, not a PID check: the kernel drops it when the holder dies, so a crashed
        // leaktrace never blocks the next one.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::AlreadyTraced {
                pid,
                holder: holder.trim().parse().unwrap_or(0),
            });
        }
        file.set_len(0).map_err(lock_err)?;
        file.seek(SeekFrom::Start(0)).map_err(lock_err)?;
        write!(file, "{}", std::process::id()).map_err(lock_err)?;
        Ok(TargetLock { file, path })
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}
