//! A minimal epmd client: the NAMES request, on 127.0.0.1 only.
//!
//! Request: 2-byte big-endian length (1), then `n` (110). Reply: 4-byte big-endian epmd port,
//! then text lines `name foo at port 12345` until EOF.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

/// epmd's port when `ERL_EPMD_PORT` does not say otherwise.
pub const DEFAULT_PORT: u16 = 4369;
/// Connect, write and read timeout.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes read from epmd.
pub const MAX_REPLY: u64 = 64 * 1024;
const NAMES_REQ: u8 = 110;

/// One registered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpmdName {
    /// Alive part of the node name (before the `@`).
    pub name: String,
    /// Its distribution listen port.
    pub port: u16,
}

/// The NAMES reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The port epmd says it listens on.
    pub epmd_port: u32,
    /// Registered nodes, in epmd's order.
    pub names: Vec<EpmdName>,
}

impl Names {
    /// The entry for `alive`, if registered.
    pub fn find(&self, alive: &str) -> Option<&EpmdName> {
        self.names.iter().find(|n| n.name == alive)
    }

    /// Names for a message, printable characters only; past 10, a last `… and N more`.
    pub fn listing(&self) -> Vec<String> {
        const MAX: usize = 10;
        let mut l: Vec<String> = self
            .names
            .iter()
            .take(MAX)
            .map(|n| printable(&n.name))
            .collect();
        if self.names.len() > MAX {
            l.push(format!("… and {} more", self.names.len() - MAX));
        }
        l
    }
}

/// Replaces anything but printable ASCII, so a hostile name cannot mess up a terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Parses a NAMES reply. Lines that do not read `name N at port P` are skipped.
pub fn parse_names(reply: &[u8]) -> Result<Names, String> {
    let Some((head, text)) = reply.split_first_chunk::<4>() else {
        return Err(format!(
            "reply of {} bytes is too short for the 4-byte port",
            reply.len()
        ));
    };
    let epmd_port = u32::from_be_bytes(*head);
    let text = String::from_utf8_lossy(text);
    let names = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("name ")?;
            let (name, port) = rest.rsplit_once(" at port ")?;
            let port = port.trim().parse::<u16>().ok()?;
            (!name.is_empty()).then(|| EpmdName {
                name: name.to_owned(),
                port,
            })
        })
        .collect();
    Ok(Names { epmd_port, names })
}

/// Asks the epmd listening on 127.0.0.1:`port` for its names. Never contacts another host.
pub fn names(port: u16) -> std::io::Result<Names> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(&[0, 1, NAMES_REQ])?;
    let mut reply = Vec::new();
    stream.take(MAX_REPLY).read_to_end(&mut reply)?;
    parse_names(&reply).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn reply(port: u32, text: &str) -> Vec<u8> {
        let mut r = port.to_be_bytes().to_vec();
        r.extend_from_slice(text.as_bytes());
        r
    }

    #[test]
    fn parses_names() {
        let r = reply(
            4369,
            "name lt_x at port 41235\nname other at port 5\ngarbage\nname bad at port 99999\n",
        );
        let n = parse_names(&r).unwrap();
        assert_eq!(n.epmd_port, 4369);
        assert_eq!(
            n.names,
            vec![
                EpmdName {
                    name: "lt_x".into(),
                    port: 41235
                },
                EpmdName {
                    name: "other".into(),
                    port: 5
                },
            ]
        );
        assert_eq!(n.find("other").map(|e| e.port), Some(5));
        assert!(n.find("bad").is_none());
        assert!(parse_names(&reply(4369, "")).unwrap().names.is_empty());
        assert!(parse_names(&[0, 0]).is_err());
        assert_eq!(printable("a\x1b[2Jb c"), "a?[2Jb?c");
        let many: String = (0..12)
            .map(|i| format!("name n{i} at port {i}\n"))
            .collect();
        let l = parse_names(&reply(4369, &many)).unwrap().listing();
        assert_eq!((l.len(), l[10].as_str()), (11, "… and 2 more"));
    }

    #[test]
    fn client_speaks_the_protocol() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 3];
            s.read_exact(&mut req).unwrap();
            s.write_all(&reply(port.into(), "name a at port 1234\n"))
                .unwrap();
            req
        });
        let n = names(port).unwrap();
        assert_eq!(server.join().unwrap(), [0, 1, b'n']);
        assert_eq!(n.epmd_port, u32::from(port));
        assert_eq!(n.find("a").map(|e| e.port), Some(1234));
    }

    #[test]
    fn client_caps_the_reply() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 3];
            s.read_exact(&mut req).unwrap();
            let line = "name x at port 1\n".repeat(1024);
            // Far more than the cap; the client stops reading and closes.
            for _ in 0..64 {
                if s.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
        let n = names(port).unwrap();
        assert!(n.names.len() <= (MAX_REPLY as usize) / 16);
        server.join().unwrap();
    }
}
