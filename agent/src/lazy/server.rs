//! CRIU's page-server protocol, the side that answers: `criu lazy-pages --page-server` asks
//! for pages (`PS_IOV_GET`: a task, an address, a number of pages) and is answered with a
//! header and the pages; it ends with `PS_IOV_CLOSE`, answered with a status word.
//!
//! The header is CRIU's `struct page_server_iov` in the machine's byte order: `u32 cmd`, then
//! (CRIU 4.2 and later) `u64 nr_pages` after 4 bytes of padding, or (before 4.2) `u32
//! nr_pages`; then `u64 vaddr` and `u64 dst_id` (the task's id shifted left by 8 bits over
//! the type, 1 for a task's memory, when a dump sends pages; the task's id alone in the
//! requests of a lazy-pages daemon).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub(crate) const PS_IOV_ADD_F: u32 = 6;
pub(crate) const PS_IOV_GET: u32 = 7;
pub(crate) const PS_IOV_CLOSE: u32 = 0x1023;
pub(crate) const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
/// `PE_PRESENT`, the flag sent with pages.
const PE_PRESENT: u32 = 1 << 2;

/// One request or answer header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Iov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

/// The header's layout, which CRIU 4.2 changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `u32 nr_pages`: 24 bytes (CRIU before 4.2).
    Narrow,
    /// `u64 nr_pages`: 32 bytes (CRIU 4.2 and later).
    Wide,
}

impl Layout {
    pub fn for_criu(major: i32, minor: i32) -> Layout {
        if (major, minor) >= (4, 2) {
            Layout::Wide
        } else {
            Layout::Narrow
        }
    }

    pub fn size(self) -> usize {
        match self {
            Layout::Narrow => 24,
            Layout::Wide => 32,
        }
    }

    pub fn decode(self, b: &[u8]) -> Iov {
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        match self {
            Layout::Narrow => Iov {
                cmd: u32_at(0),
                nr_pages: u64::from(u32_at(4)),
                vaddr: u64_at(8),
                dst_id: u64_at(16),
            },
            Layout::Wide => Iov {
                cmd: u32_at(0),
                nr_pages: u64_at(8),
                vaddr: u64_at(16),
                dst_id: u64_at(24),
            },
        }
    }

    pub fn encode(self, i: &Iov) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size());
        out.extend_from_slice(&i.cmd.to_ne_bytes());
        match self {
            Layout::Narrow => out.extend_from_slice(&(i.nr_pages as u32).to_ne_bytes()),
            Layout::Wide => {
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&i.nr_pages.to_ne_bytes());
            }
        }
        out.extend_from_slice(&i.vaddr.to_ne_bytes());
        out.extend_from_slice(&i.dst_id.to_ne_bytes());
        out
    }
}

/// A request the page server understands.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// Pages of task `pid` from `vaddr`.
    Get {
        pid: u64,
        vaddr: u64,
        nr_pages: u64,
    },
    Close,
}

impl Iov {
    pub fn request(&self) -> Result<Request, String> {
        match self.cmd & ((1 << PS_CMD_BITS) - 1) {
            // A lazy-pages daemon names the task by its id alone (the page reader's image id),
            // not by a type and id as a dump's page server is sent.
            PS_IOV_GET => Ok(Request::Get {
                pid: self.dst_id,
                vaddr: self.vaddr,
                nr_pages: self.nr_pages,
            }),
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => Ok(Request::Close),
            other => Err(format!("an unknown page-server command {other:#x}")),
        }
    }

    /// The header sent before `nr_pages` pages answering a request for `vaddr` of `dst_id`.
    pub fn pages(nr_pages: u64, vaddr: u64, dst_id: u64) -> Iov {
        Iov {
            cmd: PE_PRESENT << PS_CMD_BITS | PS_IOV_ADD_F,
            nr_pages,
            vaddr,
            dst_id,
        }
    }
}

/// Waits up to `timeout` for the connection of process `peer` (CRIU's lazy-pages daemon) on
/// `listener`; connections from anyone else are closed unanswered (another process on this
/// machine must not read the task's memory by connecting first). `alive` says whether the
/// daemon still runs.
pub(crate) fn accept_from(
    listener: &TcpListener,
    peer: u32,
    timeout: Duration,
    alive: &dyn Fn() -> bool,
) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let ours = listener.local_addr()?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, from)) => {
                if connected_from(peer, from, ours) {
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                tracing::warn!(%from, "a connection to the page server from another process was refused");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline || !alive() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "CRIU's lazy-pages daemon did not connect to the page server",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the TCP connection from `from` to `to` is a socket process `pid` holds: its row in
/// `/proc/net/tcp` gives the socket's inode, which must be one of the process's descriptors.
fn connected_from(pid: u32, from: SocketAddr, to: SocketAddr) -> bool {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let hex = |a: &std::net::SocketAddrV4| {
        format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )
    };
    let (local, remote) = (hex(&from), hex(&to));
    let Some(inode) = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[2] == remote).then(|| f[9].to_string())
    }) else {
        return false;
    };
    let want = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
}

/// Reads one header; `None` at a clean end of the stream.
pub(crate) fn read_iov(s: &mut TcpStream, layout: Layout) -> std::io::Result<Option<Iov>> {
    let mut b = vec![0u8; layout.size()];
    let mut got = 0;
    while got < b.len() {
        match s.read(&mut b[got..])? {
            0 if got == 0 => return Ok(None),
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a request",
                ))
            }
            n => got += n,
        }
    }
    Ok(Some(layout.decode(&b)))
}

/// Sends a header and its pages in one write.
pub(crate) fn send_pages(
    s: &mut TcpStream,
    layout: Layout,
    iov: &Iov,
    pages: &[u8],
) -> std::io::Result<()> {
    let mut out = layout.encode(iov);
    out.extend_from_slice(pages);
    s.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_both_layouts_and_requests_decode() {
        for layout in [Layout::Narrow, Layout::Wide] {
            let get = Iov {
                cmd: PS_IOV_GET,
                nr_pages: 16,
                vaddr: 0x7f00_1234_5000,
                dst_id: 4242,
            };
            let b = layout.encode(&get);
            assert_eq!(b.len(), layout.size());
            assert_eq!(layout.decode(&b), get);
            assert_eq!(
                get.request().unwrap(),
                Request::Get {
                    pid: 4242,
                    vaddr: 0x7f00_1234_5000,
                    nr_pages: 16
                }
            );
        }
        // CRIU 4.2's header: cmd, 4 bytes of padding, then three u64.
        let wide = Layout::Wide.encode(&Iov::pages(3, 0x1000, 7 << 8 | 1));
        assert_eq!(&wide[0..4], &(4u32 << 16 | 6).to_ne_bytes());
        assert_eq!(&wide[8..16], &3u64.to_ne_bytes());
        assert_eq!(Layout::for_criu(4, 2), Layout::Wide);
        assert_eq!(Layout::for_criu(4, 1), Layout::Narrow);
        let close = Iov {
            cmd: PS_IOV_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        };
        assert_eq!(close.request().unwrap(), Request::Close);
        // Unknown commands are refused, not guessed at.
        assert!(Iov { cmd: 99, ..close }.request().is_err());
    }
}
