//! Finds how to reach the target node without asking the operator: its name from the command
//! line, the host from this machine, the cookie from where Erlang itself looks.

use std::{fs, path::PathBuf};

use crate::vm::client::VmError;

/// Where the cookie came from (reported; the cookie itself never is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieSource {
    /// `--cookie`.
    Flag,
    /// `--cookie-file`.
    File,
    /// The node's `-setcookie`.
    CommandLine,
    /// `RELEASE_COOKIE` in the node's environment.
    Environment,
    /// `~/.erlang.cookie` of the node's user.
    HomeFile,
}

impl CookieSource {
    /// Human description.
    pub fn describe(self) -> &'static str {
        match self {
            CookieSource::Flag => "--cookie",
            CookieSource::File => "--cookie-file",
            CookieSource::CommandLine => "the node's -setcookie",
            CookieSource::Environment => "RELEASE_COOKIE in the node's environment",
            CookieSource::HomeFile => "~/.erlang.cookie of the node's user",
        }
    }
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Cookie(String);

impl Cookie {
    /// Wraps a cookie value.
    pub fn new(value: impl Into<String>) -> Cookie {
        Cookie(value.into().trim().to_owned())
    }

    /// The value, for the handshake only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cookie(<redacted>)")
    }
}

/// Node name from a beam command line: `-sname foo` -> `foo@<short hostname>`, `-name` as given
/// (`foo@host` kept as is).
pub fn node_from_cmdline(cmdline: &[String], hostname: &str) -> Option<String> {
    let value = |flag: &str| {
        cmdline
            .iter()
            .position(|a| a == flag)
            .and_then(|i| cmdline.get(i + 1))
            .cloned()
    };
    if let Some(sname) = value("-sname") {
        if sname.contains('@') {
            return Some(sname);
        }
        let short = hostname.split('.').next().unwrap_or(hostname);
        return Some(format!("{sname}@{short}"));
    }
    let name = value("-name")?;
    if name.contains('@') {
        Some(name)
    } else {
        Some(format!("{name}@{hostname}"))
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn environ(pid: u32) -> Vec<(String, String)> {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn home_of(pid: u32) -> Option<PathBuf> {
    if let Some((_, home)) = environ(pid).into_iter().find(|(k, _)| k == "HOME") {
        return Some(PathBuf::from(home));
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_owned();
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 5 && f[2] == uid).then(|| PathBuf::from(f[5]))
    })
}

/// Cookie for the node of `pid`, in Erlang's own order of precedence.
pub fn find_cookie(
    pid: u32,
    cmdline: &[String],
    flag: Option<&Cookie>,
    file: Option<&PathBuf>,
) -> Result<(Cookie, CookieSource), VmError> {
    if let Some(c) = flag {
        return Ok((c.clone(), CookieSource::Flag));
    }
    if let Some(path) = file {
        return fs::read_to_string(path)
            .map(|c| (Cookie::new(c), CookieSource::File))
            .map_err(|e| VmError::Call {
                call: format!("reading --cookie-file {}", path.display()),
                reason: e.to_string(),
            });
    }
    if let Some(i) = cmdline.iter().position(|a| a == "-setcookie")
        && let Some(c) = cmdline.get(i + 1)
    {
        return Ok((Cookie::new(c.clone()), CookieSource::CommandLine));
    }
    if let Some((_, c)) = environ(pid)
        .into_iter()
        .find(|(k, _)| k == "RELEASE_COOKIE")
    {
        return Ok((Cookie::new(c), CookieSource::Environment));
    }
    if let Some(home) = home_of(pid)
        && let Ok(c) = fs::read_to_string(home.join(".erlang.cookie"))
    {
        return Ok((Cookie::new(c), CookieSource::HomeFile));
    }
    Err(VmError::NoCookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn node_names() {
        assert_eq!(
            node_from_cmdline(&args(&["beam.smp", "-sname", "demo"]), "vm.example.com").as_deref(),
            Some("demo@vm")
        );
        assert_eq!(
            node_from_cmdline(&args(&["-sname", "a@b"]), "vm").as_deref(),
            Some("a@b")
        );
        assert_eq!(
            node_from_cmdline(&args(&["-name", "a@10.0.0.1"]), "vm").as_deref(),
            Some("a@10.0.0.1")
        );
        assert_eq!(node_from_cmdline(&args(&["-noshell"]), "vm"), None);
    }

    #[test]
    fn cookie_precedence_and_redaction() {
        let cmd = args(&["beam.smp", "-setcookie", "fromcmd"]);
        let (c, src) = find_cookie(std::process::id(), &cmd, None, None).unwrap();
        assert_eq!((c.expose(), src), ("fromcmd", CookieSource::CommandLine));
        let flag = Cookie::new("flagged");
        let (c, src) = find_cookie(1, &cmd, Some(&flag), None).unwrap();
        assert_eq!((c.expose(), src), ("flagged", CookieSource::Flag));
        assert!(!format!("{c:?}").contains("flagged"));
    }
}
