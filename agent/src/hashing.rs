//! Checksums on a second core: chunks go to a hashing thread while the caller writes them, so
//! checksums cost no wall time on a machine with two cores or more. An archive entry carries
//! a SHA-256 (archives before BLAKE3) or a BLAKE3 ([`Alg`]), several times faster on one core.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Size of the chunks callers fill.
pub const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 4;

/// The checksum of an archive entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Sha256,
    Blake3,
}

impl Alg {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Sha256 => "SHA-256",
            Alg::Blake3 => "BLAKE3",
        }
    }
}

/// An incremental hash of either kind.
pub enum Hasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn new(alg: Alg) -> Self {
        match alg {
            Alg::Sha256 => Hasher::Sha256(Sha256::new()),
            Alg::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Blake3(h) => {
                h.update(b);
            }
        }
    }

    /// The lowercase hex digest.
    pub fn hex(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// The `alg` digest of `len` bytes of `file` at `start` (read, not mapped: a file cut short
/// meanwhile is an error, not a fault).
pub fn digest_range(
    file: &std::fs::File,
    start: u64,
    len: u64,
    alg: Alg,
) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut h = Hasher::new(alg);
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let n = file.read_at(&mut buf[..want], start + done)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.hex())
}

/// Hashes the chunks handed to it on its own thread; [`HashPipe::finish`] gives the hex digest.
pub struct HashPipe {
    tx: Option<SyncSender<Vec<u8>>>,
    back: Receiver<Vec<u8>>,
    /// Buffers handed to the hashing thread and not yet seen back.
    in_flight: usize,
    handle: Option<JoinHandle<String>>,
}

impl HashPipe {
    /// Starts a SHA-256 hashing thread.
    pub fn new() -> Self {
        Self::with(Alg::Sha256)
    }

    /// Starts a hashing thread computing `alg`.
    pub fn with(alg: Alg) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (back_tx, back) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
        let handle = std::thread::spawn(move || {
            let mut h = Hasher::new(alg);
            for chunk in rx {
                h.update(&chunk);
                let _ = back_tx.send(chunk);
            }
            h.hex()
        });
        HashPipe {
            tx: Some(tx),
            back,
            in_flight: 0,
            handle: Some(handle),
        }
    }

    /// An empty buffer of [`CHUNK`] capacity: a recycled one if the hashing thread has
    /// returned one, a new one while fewer than a few are out, else the next one it returns.
    /// It blocks only while buffers are in flight, so callers may drop buffers freely.
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut b = match self.back.try_recv() {
            Ok(b) => {
                self.in_flight -= 1;
                b
            }
            Err(_) if self.in_flight < IN_FLIGHT => Vec::with_capacity(CHUNK),
            Err(_) => match self.back.recv() {
                Ok(b) => {
                    self.in_flight -= 1;
                    b
                }
                Err(_) => Vec::with_capacity(CHUNK),
            },
        };
        b.clear();
        b
    }

    /// Hands a filled buffer over to be hashed.
    pub fn hash(&mut self, chunk: Vec<u8>) {
        if let Some(tx) = &self.tx {
            if tx.send(chunk).is_ok() {
                self.in_flight += 1;
            }
        }
    }

    /// Waits for every chunk to be hashed; returns the lowercase hex digest.
    pub fn finish(mut self) -> String {
        drop(self.tx.take());
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Default for HashPipe {
    fn default() -> Self {
        Self::new()
    }
}

/// SHA-256 of shared byte buffers ([`Bytes`]) on a thread of its own: the caller keeps using
/// (or passes on) the same bytes while they are hashed.
pub struct BytesHasher {
    tx: Option<SyncSender<Vec<Bytes>>>,
    /// Bytes not yet handed over (they go a few together: fewer wake-ups).
    pending: Vec<Bytes>,
    pending_len: usize,
    handle: Option<JoinHandle<[u8; 32]>>,
}

impl BytesHasher {
    /// Starts the hashing thread.
    pub fn new() -> Self {
        Self::continuing(Sha256::new())
    }

    /// Starts the hashing thread from a hash already fed with earlier bytes.
    pub fn continuing(mut h: Sha256) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Vec<Bytes>>(IN_FLIGHT);
        let handle = std::thread::spawn(move || {
            for batch in rx {
                for chunk in batch {
                    h.update(&chunk);
                }
            }
            h.finalize().into()
        });
        BytesHasher {
            tx: Some(tx),
            pending: Vec::new(),
            pending_len: 0,
            handle: Some(handle),
        }
    }

    /// Hands bytes over to be hashed, [`CHUNK`] or more at a time (waits while a few are
    /// queued).
    pub fn hash(&mut self, b: Bytes) {
        self.pending_len += b.len();
        self.pending.push(b);
        if self.pending_len >= CHUNK {
            self.hand_over();
        }
    }

    fn hand_over(&mut self) {
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        if let Some(tx) = &self.tx {
            let _ = tx.send(batch);
        }
    }

    /// Waits for everything handed over to be hashed; returns the SHA-256.
    pub fn finish(mut self) -> [u8; 32] {
        if !self.pending.is_empty() {
            self.hand_over();
        }
        drop(self.tx.take());
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Default for BytesHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads into `buf` (emptied first) until it holds [`CHUNK`] bytes or the input ends; returns
/// the bytes read. Files are read straight into the spare capacity, without zeroing it first.
pub fn fill(r: &mut impl std::io::Read, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::io::Read;
    buf.clear();
    buf.reserve(CHUNK);
    r.by_ref().take(CHUNK as u64).read_to_end(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_never_block() {
        let mut pipe = HashPipe::new();
        for _ in 0..(IN_FLIGHT * 3) {
            drop(pipe.buffer());
        }
        let mut b = pipe.buffer();
        b.extend_from_slice(b"abc");
        pipe.hash(b);
        assert_eq!(pipe.finish(), hex::encode(Sha256::digest(b"abc")));
    }

    #[test]
    fn matches_a_plain_sha256_over_many_chunks() {
        let data: Vec<u8> = (0..(3 * CHUNK + 12345)).map(|i| (i % 251) as u8).collect();
        let mut pipe = HashPipe::new();
        let mut r = &data[..];
        loop {
            let mut b = pipe.buffer();
            if fill(&mut r, &mut b).unwrap() == 0 {
                break;
            }
            pipe.hash(b);
        }
        assert_eq!(pipe.finish(), hex::encode(Sha256::digest(&data)));
    }

    #[test]
    fn blake3_matches_the_reference() {
        let data: Vec<u8> = (0..(2 * CHUNK + 7)).map(|i| (i % 253) as u8).collect();
        let mut pipe = HashPipe::with(Alg::Blake3);
        for part in data.chunks(CHUNK) {
            let mut b = pipe.buffer();
            b.extend_from_slice(part);
            pipe.hash(b);
        }
        assert_eq!(pipe.finish(), blake3::hash(&data).to_hex().to_string());
    }
}
