//! A full restore's images served to CRIU as it asks for them (CRIU's image-streamer protocol,
//! `criu restore --stream`; see [`crate::criu::Criu::restore_streamed`]).
//!
//! The small images come from the staging folder they were verified into; the page images
//! come straight from the archive, where they lie, spliced into the pipe CRIU reads: no copy
//! on disk, no second pass. A page image's last bytes are held back until its checksum over the
//! whole of it (read by a second thread while CRIU takes the rest) matches the manifest, so
//! CRIU cannot finish restoring a process, and the process never runs, before every byte of
//! its memory was verified. On a mismatch the pipe is closed short, CRIU's restore fails and
//! kills what it had built, and the error names the entry.
//!
//! The bytes hashed and the bytes spliced are read apart, so the archive must not change in
//! between: the restore holds a read lease on it ([`lease`]), which the kernel grants only
//! while nobody has the file open for writing (a writable mapping included) and breaks as soon
//! as someone opens it for writing; that opener then waits until the restore is over (up to
//! the kernel's lease-break time, 45 s by default). A page image whose lease was broken before
//! its last bytes went is refused. Where no lease can be had (a writer, a filesystem without
//! leases) the restore copies the images out and checks them first instead.
//!
//! A checkpoint in chunks (a store's, a chunked archive's) is served the same way, each page
//! image chunk after chunk, fetched ahead by a few threads: a chunk goes into the pipe only
//! once it was checked against its name (the caller's `fetch`), and one that cannot be had
//! ends the pipe there, naming the chunk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags};
use prost::Message;
use tracing::debug;

use cedana_store::ChunkRef;

use crate::archive::{ArchiveError, Entry};
use crate::criu::proto::{StreamerReply, StreamerRequest};
use crate::hashing;
use crate::progress::Progress;

/// Bytes of a page image held back until it is verified: CRIU reads a page at a time.
const HOLD: u64 = 4096;
/// Longest request taken from CRIU (an image file's name).
const MAX_REQUEST: usize = 4096;
/// Size asked for the pipes CRIU reads (the default is 64 KiB).
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Threads fetching one page image's chunks ahead of the pipe, each two chunks ahead at most.
const LANES: usize = 3;

/// A page image left in the archive: its manifest entry and where its bytes start.
#[derive(Clone, Debug)]
pub struct InPlace {
    pub entry: Entry,
    pub start: u64,
}

/// A chunk by name, checked against it, or the refusal (`E`) naming it.
pub type Fetch<'a, E> = dyn Fn(&ChunkRef) -> Result<Vec<u8>, E> + Sync + 'a;

/// Serves one restore's images: see the module's documentation. `E`: why an image was
/// refused.
pub struct ImageServer<'a, E> {
    images: PathBuf,
    /// The archive whose page images are served in place, if any.
    archive: Option<InArchive<'a>>,
    /// Page images in chunks, by their file name in the images folder, and their source.
    chunked: HashMap<String, Vec<ChunkRef>>,
    fetch: Option<&'a Fetch<'a, E>>,
    failure: Mutex<Option<E>>,
    progress: &'a dyn Progress,
}

/// An archive and the page images it holds in place.
struct InArchive<'a> {
    path: &'a Path,
    file: File,
    /// Page images in the archive, by their file name in the images folder.
    pages: HashMap<String, InPlace>,
}

/// `images/pages-1.img` → `pages-1.img`.
fn file_name(entry: &str) -> Option<String> {
    entry.rsplit('/').next().map(str::to_string)
}

impl<'a, E: From<ArchiveError> + std::fmt::Display + Send> ImageServer<'a, E> {
    /// Serves the files in `images` and `pages` of `archive` (by the name after `images/`),
    /// read from `file`: the archive, open with its read lease held ([`lease`]).
    pub fn new(
        archive: &'a Path,
        file: File,
        images: PathBuf,
        pages: Vec<InPlace>,
        progress: &'a dyn Progress,
    ) -> Self {
        let pages = pages
            .into_iter()
            .filter_map(|p| Some((file_name(&p.entry.name)?, p)))
            .collect();
        ImageServer {
            archive: Some(InArchive {
                path: archive,
                file,
                pages,
            }),
            ..ImageServer::of_chunks(images, None, Vec::new(), progress)
        }
    }

    /// Serves the files in `images`, and page images (entry name, chunks) through `fetch`.
    pub fn of_chunks(
        images: PathBuf,
        fetch: Option<&'a Fetch<'a, E>>,
        pages: Vec<(String, Vec<ChunkRef>)>,
        progress: &'a dyn Progress,
    ) -> Self {
        ImageServer {
            images,
            archive: None,
            chunked: pages
                .into_iter()
                .filter_map(|(name, chunks)| Some((file_name(&name)?, chunks)))
                .collect(),
            fetch,
            failure: Mutex::new(None),
            progress,
        }
    }

    /// The bytes of the page images served from the archive or from chunks.
    pub fn page_bytes(&self) -> u64 {
        let in_place: u64 = self
            .archive
            .iter()
            .flat_map(|a| a.pages.values())
            .map(|p| p.entry.size)
            .sum();
        let chunked: u64 = self.chunked.values().flatten().map(|c| c.size).sum();
        in_place + chunked
    }

    /// Why a page image was refused, if one was: the restore failed for that reason.
    pub fn failure(&self) -> Option<E> {
        self.failure.lock().expect("not poisoned").take()
    }

    fn refuse(&self, e: E) {
        self.failure.lock().expect("not poisoned").get_or_insert(e);
    }

    /// Answers CRIU's requests on `conn` until it closes, each file on a thread of its own.
    pub fn serve(&self, conn: UnixStream) {
        std::thread::scope(|s| loop {
            let name = match read_request(&conn) {
                Ok(Some(name)) => name,
                Ok(None) => return,
                Err(e) => {
                    debug!(error = %e, "image streamer connection ends");
                    return;
                }
            };
            let source = self.source(&name);
            debug!(name, found = source.is_some(), "CRIU asks for an image");
            if let Err(e) = write_reply(&conn, source.is_some()) {
                debug!(error = %e, "image streamer connection ends");
                return;
            }
            let Some(source) = source else { continue };
            let pipe = match recv_pipe(&conn) {
                Ok(p) => p,
                Err(e) => {
                    debug!(error = %e, "no pipe from CRIU");
                    return;
                }
            };
            s.spawn(move || self.send(name, source, pipe));
        });
    }

    fn source(&self, name: &str) -> Option<Source<'_>> {
        if !plain_name(name) {
            return None;
        }
        if let Some(p) = self.archive.as_ref().and_then(|a| a.pages.get(name)) {
            return Some(Source::Archive(p));
        }
        if let Some(c) = self.chunked.get(name) {
            return Some(Source::Chunks(c));
        }
        let path = self.images.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => Some(Source::Staged(path)),
            _ => None,
        }
    }

    fn send(&self, name: String, source: Source<'_>, pipe: OwnedFd) {
        // SAFETY: a plain fcntl on a descriptor we own; a smaller pipe only costs calls.
        unsafe {
            libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
        }
        match source {
            Source::Staged(path) => {
                let sent = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .and_then(|f| {
                        let len = f.metadata()?.len();
                        splice_to(&f, 0, len, &pipe, &|_| {})
                    });
                if let Err(e) = sent {
                    debug!(name, error = %e, "image not sent whole");
                }
            }
            Source::Archive(p) => self.send_page_image(p, &pipe),
            Source::Chunks(c) => self.send_chunks(&name, c, &pipe),
        }
    }

    /// The chunks in order, each checked before it goes, fetched ahead by [`LANES`] threads.
    fn send_chunks(&self, name: &str, chunks: &[ChunkRef], pipe: &OwnedFd) {
        let Some(fetch) = self.fetch else {
            return;
        };
        let mut out = match pipe.try_clone() {
            Ok(fd) => File::from(fd),
            Err(e) => {
                debug!(name, error = %e, "image not sent");
                return;
            }
        };
        std::thread::scope(|s| {
            let lanes: Vec<std::sync::mpsc::Receiver<_>> = (0..LANES)
                .map(|lane| {
                    let (tx, rx) = std::sync::mpsc::sync_channel(2);
                    s.spawn(move || {
                        for c in chunks.iter().skip(lane).step_by(LANES) {
                            let got = fetch(c);
                            let failed = got.is_err();
                            // The receiver gone: the pipe ended, nothing more is wanted.
                            if tx.send(got).is_err() || failed {
                                return;
                            }
                        }
                    });
                    rx
                })
                .collect();
            for i in 0..chunks.len() {
                match lanes[i % LANES].recv() {
                    Ok(Ok(bytes)) => {
                        if let Err(e) = out.write_all(&bytes) {
                            debug!(name, error = %e, "CRIU stopped reading");
                            return;
                        }
                        self.progress.advance(bytes.len() as u64);
                    }
                    Ok(Err(e)) => {
                        // The pipe closes short: CRIU fails and the process never runs.
                        debug!(name, error = %e, "page image cut short");
                        self.refuse(e);
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
    }

    /// All but the last [`HOLD`] bytes at once, the rest once the whole was verified.
    fn send_page_image(&self, p: &InPlace, pipe: &OwnedFd) {
        let Some(a) = &self.archive else { return };
        let size = p.entry.size;
        let hold = size.min(HOLD);
        let (alg, want) = p.entry.checksum();
        let advance = |n: u64| self.progress.advance(n);
        let (sum, sent) = std::thread::scope(|s| {
            let hasher = s.spawn(|| hashing::digest_range(&a.file, p.start, size, alg));
            let sent = splice_to(&a.file, p.start, size - hold, pipe, &advance);
            (hasher.join().expect("hashing does not panic"), sent)
        });
        let refused = match sum {
            Err(e) => Some(ArchiveError::Corrupt {
                path: a.path.to_path_buf(),
                reason: format!("entry {:?} cannot be read: {e}", p.entry.name),
            }),
            Ok(sum) if sum != want => Some(crate::archive::mismatch(
                a.path,
                &p.entry,
                alg.name(),
                want.to_string(),
                sum,
            )),
            // The bytes hashed and those spliced were read apart: someone opening the archive
            // for writing meanwhile broke the lease.
            Ok(_) if !lease_held(&a.file) => Some(ArchiveError::Corrupt {
                path: a.path.to_path_buf(),
                reason: format!(
                    "it was opened for writing while entry {:?} was being restored from it; restore it again once nothing writes to it",
                    p.entry.name
                ),
            }),
            Ok(_) => None,
        };
        if let Some(e) = refused {
            // The pipe closes short: CRIU fails and the process never runs.
            debug!(entry = p.entry.name, error = %e, "page image refused");
            self.refuse(E::from(e));
            return;
        }
        if let Err(e) = sent {
            debug!(entry = p.entry.name, error = %e, "CRIU stopped reading");
            return;
        }
        let tail = splice_to(&a.file, p.start + size - hold, hold, pipe, &advance);
        if let Err(e) = tail {
            debug!(entry = p.entry.name, error = %e, "CRIU stopped reading");
        }
    }
}

/// Takes a read lease on `file` (`F_SETLEASE F_RDLCK`): granted only while nobody has it
/// open for writing, broken when someone opens it for writing (see the module's
/// documentation). Fails where the filesystem has no leases. The lease ends when `file` is
/// closed. The break's signal (SIGIO, whose default is to end the process) is ignored here
/// unless something handles it already: [`lease_held`] is how a break is seen.
pub fn lease(file: &File) -> std::io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_IGN (no handler code runs), and putting back what was there if
    // it was not the default.
    unsafe {
        if let Ok(old) = sigaction(Signal::SIGIO, &ignore) {
            if !matches!(old.handler(), SigHandler::SigDfl | SigHandler::SigIgn) {
                let _ = sigaction(Signal::SIGIO, &old);
            }
        }
    }
    // SAFETY: plain fcntl on a descriptor we hold.
    match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether the read lease [`lease`] took is still held, not broken by a writer.
fn lease_held(file: &File) -> bool {
    // SAFETY: plain fcntl on a descriptor we hold.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) == libc::F_RDLCK }
}

enum Source<'s> {
    Staged(PathBuf),
    Archive(&'s InPlace),
    Chunks(&'s [ChunkRef]),
}

/// A file name CRIU gives an image: no folders, nothing hidden.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Moves `len` bytes of `file` at `at` into `pipe` by the kernel, page references and no copy.
fn splice_to(
    file: &File,
    at: u64,
    len: u64,
    pipe: &OwnedFd,
    advance: &dyn Fn(u64),
) -> std::io::Result<()> {
    let mut off = at as libc::loff_t;
    let end = at + len;
    while (off as u64) < end {
        let want = ((end - off as u64) as usize).min(PIPE_SIZE as usize);
        // SAFETY: plain syscall on descriptors we hold; `off` is ours.
        let n = unsafe {
            libc::splice(
                file.as_raw_fd(),
                &mut off,
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
            )
        };
        match n {
            n if n > 0 => advance(n as u64),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // A filesystem that cannot splice: copied through a buffer instead.
                    Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                        return copy_to(file, off as u64, end - off as u64, pipe, advance)
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// [`splice_to`] through a buffer.
fn copy_to(
    file: &File,
    at: u64,
    len: u64,
    pipe: &OwnedFd,
    advance: &dyn Fn(u64),
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut out = File::from(pipe.try_clone()?);
    let mut buf = vec![0u8; hashing::CHUNK];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = file.read_at(&mut buf[..want], at + done)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.write_all(&buf[..n])?;
        advance(n as u64);
        done += n as u64;
    }
    Ok(())
}

/// One request: a 32-bit length, then an `img_streamer_request_entry`. `None` at the end.
fn read_request(mut conn: &UnixStream) -> std::io::Result<Option<String>> {
    let mut len = [0u8; 4];
    match conn.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_ne_bytes(len) as usize;
    if len > MAX_REQUEST {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a request of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf)?;
    let req = StreamerRequest::decode(&buf[..])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some(req.filename))
}

fn write_reply(mut conn: &UnixStream, exists: bool) -> std::io::Result<()> {
    let body = StreamerReply { exists }.encode_to_vec();
    let mut msg = (body.len() as u32).to_ne_bytes().to_vec();
    msg.extend_from_slice(&body);
    conn.write_all(&msg)
}

/// The pipe CRIU sends for the file it asked for (one byte, with the descriptor).
fn recv_pipe(conn: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: descriptors just received, owned by nobody else.
            got.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    match got.len() {
        1 => Ok(got.remove(0)),
        n => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{n} descriptors instead of one pipe"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    /// CRIU's side of the protocol: asks for `name`; the bytes that came through its pipe,
    /// or `None` if the server said there is no such file.
    fn ask(conn: &UnixStream, name: &str) -> Option<Vec<u8>> {
        let body = StreamerRequest {
            filename: name.into(),
        }
        .encode_to_vec();
        let mut msg = (body.len() as u32).to_ne_bytes().to_vec();
        msg.extend_from_slice(&body);
        (&*conn).write_all(&msg).unwrap();
        let mut len = [0u8; 4];
        (&*conn).read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u32::from_ne_bytes(len) as usize];
        (&*conn).read_exact(&mut buf).unwrap();
        if !StreamerReply::decode(&buf[..]).unwrap().exists {
            return None;
        }
        let (r, w) = nix::unistd::pipe().unwrap();
        let fds = [w.as_raw_fd()];
        let cmsg = [socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(&[0u8])];
        socket::sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        drop(w);
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        Some(got)
    }

    #[test]
    fn page_images_come_whole_only_when_they_match_their_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("core-1.img"), b"small image").unwrap();
        // An "archive": a header, then two page images of 3 MiB and a bit.
        let good: Vec<u8> = (0..3 * 1024 * 1024 + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut bad = good.clone();
        bad[1_000_000] ^= 1;
        let archive = dir.path().join("a.zip");
        let mut bytes = vec![7u8; 4096];
        bytes.extend_from_slice(&good);
        bytes.extend_from_slice(&bad);
        std::fs::write(&archive, &bytes).unwrap();
        let entry = |n: &str| Entry {
            name: format!("images/{n}"),
            size: good.len() as u64,
            sha256: String::new(),
            blake3: blake3::hash(&good).to_hex().to_string(),
            chunks: None,
        };
        let pages = vec![
            InPlace {
                entry: entry("pages-1.img"),
                start: 4096,
            },
            InPlace {
                entry: entry("pages-2.img"),
                start: 4096 + good.len() as u64,
            },
        ];
        let file = File::open(&archive).unwrap();
        lease(&file).expect("a read lease on a file nobody writes");
        let server: ImageServer<ArchiveError> =
            ImageServer::new(&archive, file, images, pages, &NoProgress);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let writer = std::thread::scope(|s| {
            s.spawn(|| server.serve(theirs));
            assert_eq!(ask(&ours, "core-1.img").unwrap(), b"small image");
            assert_eq!(ask(&ours, "pages-1.img").unwrap(), good);
            assert!(server.failure().is_none());
            // The altered one stops short of its last page: CRIU cannot finish with it.
            let cut = ask(&ours, "pages-2.img").unwrap();
            assert_eq!(cut.len() as u64, good.len() as u64 - HOLD);
            let err = server.failure().expect("refused").to_string();
            assert!(
                err.contains("images/pages-2.img") && err.contains("BLAKE3"),
                "{err}"
            );
            for name in ["missing.img", "../a.zip", "images/core-1.img"] {
                assert!(ask(&ours, name).is_none(), "{name}");
            }
            // Someone opens the archive for writing (and waits, the lease held): from then
            // on even a sound image is cut short.
            let path = archive.clone();
            let writer = std::thread::spawn(move || {
                std::fs::OpenOptions::new().append(true).open(path).is_ok()
            });
            let a = server.archive.as_ref().unwrap();
            let t0 = std::time::Instant::now();
            while lease_held(&a.file) {
                assert!(t0.elapsed().as_secs() < 10, "the lease is never broken");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let cut = ask(&ours, "pages-1.img").unwrap();
            assert_eq!(cut.len() as u64, good.len() as u64 - HOLD);
            let err = server.failure().expect("refused").to_string();
            assert!(err.contains("opened for writing"), "{err}");
            ours.shutdown(std::net::Shutdown::Both).unwrap();
            writer
        });
        // The restore over (the lease gone with the file), the writer goes on.
        drop(server);
        assert!(writer.join().unwrap());
    }

    #[test]
    fn a_request_larger_than_a_name_ends_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.zip");
        std::fs::write(&archive, b"x").unwrap();
        let server: ImageServer<ArchiveError> = ImageServer::new(
            &archive,
            File::open(&archive).unwrap(),
            dir.path().into(),
            vec![],
            &NoProgress,
        );
        let (ours, theirs) = UnixStream::pair().unwrap();
        (&ours).write_all(&(1u32 << 30).to_ne_bytes()).unwrap();
        server.serve(theirs);
        let mut rest = Vec::new();
        (&ours).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn only_plain_image_names_are_served() {
        for ok in [
            "pages-1.img",
            "core-1643.img",
            "inventory.img",
            "irmap-cache",
        ] {
            assert!(plain_name(ok), "{ok}");
        }
        for bad in ["", "../etc/passwd", "a/b.img", ".hidden", "x\0y", "é.img"] {
            assert!(!plain_name(bad), "{bad:?}");
        }
    }
}
