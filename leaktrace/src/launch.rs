//! Starting the command of `leaktrace run`: find the beam.smp it will exec, hold it before its
//! exec until the probes are live (as memleak's `-c` does), then wait for the exec.

use std::{
    fs,
    io::Write,
    os::{fd::FromRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::{config::RunAs, error::Error, target};

/// How long `run` waits for the command to exec beam.smp.
const BEAM_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the beam.smp an `erl`-style command will exec: `ROOT/bin/erl` -> `ROOT/erts-*/bin/beam.smp`.
pub fn find_beam(command: &[String]) -> Result<PathBuf, Error> {
    let not_found = |reason: String| Error::BeamNotFound {
        command: command.join(" "),
        reason,
    };
    let program = command
        .first()
        .ok_or_else(|| not_found("empty command".into()))?;
    let path = which::which(program).map_err(|e| not_found(format!("{program}: {e}")))?;
    let path =
        fs::canonicalize(&path).map_err(|e| not_found(format!("{}: {e}", path.display())))?;
    if target::is_beam(&path) {
        return Ok(path);
    }
    let root = path
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| not_found(format!("{} has no Erlang root above it", path.display())))?;
    let mut found: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| not_found(format!("{}: {e}", root.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("erts-"))
        .map(|e| e.path().join("bin/beam.smp"))
        .filter(|p| p.exists())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(not_found(format!(
            "no erts-*/bin/beam.smp under {}",
            root.display()
        ))),
        _ => Err(not_found(format!(
            "several erts-*/bin/beam.smp under {}",
            root.display()
        ))),
    }
}

/// A command started but held before its exec until the probes are attached (as memleak's
/// `-c` does), through a shell that waits on a pipe.
pub struct HeldChild {
    /// The shell that will exec the command.
    pub child: Child,
    go: Option<fs::File>,
}

impl HeldChild {
    /// With `json_on_stdout`, the command's stdout goes to stderr so that stdout stays JSON.
    /// With `user`, the command runs as that user, with its groups, `HOME`, `USER` and
    /// `LOGNAME`, and none of leaktrace's capabilities.
    pub fn spawn(
        command: &[String],
        json_on_stdout: bool,
        user: Option<&RunAs>,
    ) -> Result<HeldChild, Error> {
        let spawn_err = |reason: String| Error::Spawn {
            command: command.join(" "),
            reason,
        };
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(spawn_err(std::io::Error::last_os_error().to_string()));
        }
        let (read_fd, write_fd) = (fds[0], fds[1]);
        let mut cmd = Command::new("/bin/sh");
        // The shell exits without running the command if the pipe closes without a "go" line:
        // a leaktrace that fails to attach never lets the command run untraced.
        cmd.arg("-c")
            .arg(r#"read -r go <&3 && [ "$go" = go ] || exit 125; exec 3<&-; exec "$@""#)
            .arg("leaktrace-run")
            .args(command);
        if json_on_stdout {
            cmd.stdout(std::io::stderr());
        }
        let identity = match user {
            Some(u) => {
                cmd.env("HOME", &u.home)
                    .env("USER", &u.name)
                    .env("LOGNAME", &u.name);
                let name = std::ffi::CString::new(u.name.as_str())
                    .map_err(|_| spawn_err(format!("user name {:?}", u.name)))?;
                // Looked up here: between fork and exec only async-signal-safe calls are made.
                let mut groups: Vec<libc::gid_t> = vec![0; 256];
                let mut n = groups.len() as libc::c_int;
                // SAFETY: groups holds n entries; getgrouplist writes at most n and sets n.
                let r = unsafe {
                    libc::getgrouplist(name.as_ptr(), u.gid, groups.as_mut_ptr(), &mut n)
                };
                if r < 0 {
                    return Err(spawn_err(format!(
                        "user {} is in more than {} groups",
                        u.name,
                        groups.len()
                    )));
                }
                groups.truncate(n.max(0) as usize);
                Some((groups, u.uid, u.gid))
            }
            None => None,
        };
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(read_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The user's groups, then its gid, then its uid: after setuid nothing else can
                // be changed, and a uid other than 0 ends every capability of the command.
                if let Some((groups, uid, gid)) = &identity
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Own process group: Ctrl-C meant for leaktrace must not reach the node
                // (it would open the BREAK menu or kill it).
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        unsafe { libc::close(read_fd) };
        let go = unsafe { fs::File::from_raw_fd(write_fd) };
        let child = child.map_err(|e| spawn_err(e.to_string()))?;
        Ok(HeldChild {
            child,
            go: Some(go),
        })
    }

    /// Lets the command exec.
    pub fn release(mut self) -> Result<Child, Error> {
        let mut go = self.go.take().expect("released once");
        go.write_all(b"go\n").map_err(|e| Error::Spawn {
            command: "held command".into(),
            reason: e.to_string(),
        })?;
        drop(go);
        Ok(self.child)
    }

    /// Never lets the command run: closing the pipe makes the shell exit.
    pub fn abort(mut self) {
        self.go.take();
        let _ = self.child.wait();
    }
}

pub async fn wait_for_beam(pid: u32, probed: &std::path::Path) -> Result<(), Error> {
    let deadline = Instant::now() + BEAM_START_TIMEOUT;
    loop {
        match fs::read_link(format!("/proc/{pid}/exe")) {
            Ok(exe) if target::is_beam(&exe) => return same_file(pid, &exe, probed),
            Ok(_) => {}
            Err(_) => {
                return Err(Error::Spawn {
                    command: format!("PID {pid}"),
                    reason: "the command exited before starting beam.smp".into(),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Spawn {
                command: format!("PID {pid}"),
                reason: format!(
                    "it did not exec beam.smp within {}s (is it an erl command?)",
                    BEAM_START_TIMEOUT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The emulator PID runs must be the very file the probes are on (device and inode, not the
/// name): uprobes sit on an inode, so another beam.smp (another OTP install, a copy, a file
/// replaced since) would run unseen and every carrier would look like memory outside them.
fn same_file(pid: u32, exe: &std::path::Path, probed: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |m: fs::Metadata| (m.dev(), m.ino());
    let running = fs::metadata(format!("/proc/{pid}/exe")).map(id);
    let ours = fs::metadata(probed).map(id);
    match (running, ours) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Ok((dev, ino)), Ok((pdev, pino))) => Err(Error::Spawn {
            command: format!("PID {pid}"),
            reason: format!(
                "it runs {} (device {dev:#x}, inode {ino}), not the file the probes are on, {} (device {pdev:#x}, inode {pino}): its allocations would go unseen, so the command was stopped; pass --beam {}",
                exe.display(),
                probed.display(),
                exe.display()
            ),
        }),
        (Err(e), _) | (_, Err(e)) => Err(Error::Spawn {
            command: format!("PID {pid}"),
            reason: format!("cannot tell which beam.smp it runs: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_beam_refuses_non_erlang_commands() {
        let err = find_beam(&["true".to_string()]).unwrap_err().to_string();
        assert!(err.contains("--beam"), "{err}");
        let err = find_beam(&["no-such-program-xyz".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-program-xyz"), "{err}");
    }
}
