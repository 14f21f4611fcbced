//! Reading a zip front to back as it arrives (from the object store), writing each entry's
//! data where the caller says while its size, CRC-32 and SHA-256 are computed: one pass over
//! the data, no copy of the archive first.
//!
//! Readable this way: stored entries whose local header carries their sizes, deflate or
//! Zstandard entries (their compressed data ends itself; a data descriptor may follow), and
//! stored entries with a data descriptor whose size the caller was told (by the archive's
//! writer, see [`super::Sink::commit`]). A stored entry with a data descriptor and no size
//! given has no findable end: the reader stops with [`ZipError::Unstreamable`] and the caller
//! reads the archive from a file instead (archives from agents before streaming have such
//! entries). After the last entry the central directory and end records are read into memory
//! (bounded) and checked against the entries read: same entries, offsets, methods, sizes and
//! CRC-32s, nothing after the end record. So what was extracted is exactly what a zip reader
//! going by the central directory would see.
//!
//! Nothing here decides what an entry may be called or where it goes: [`read`] (or
//! [`read_with`], whose caller's refusals keep their own error type) asks its caller for each
//! entry, which refuses or names a destination.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::{
    ChunkSource, ZipError, CENTRAL_SIG, DEFLATED, DESCRIPTOR_SIG, EOCD64_SIG, EOCD_SIG,
    EXTRA_ZIP64, FLAG_DESCRIPTOR, LOCAL_SIG, LOCATOR64_SIG, STORED, U32_MAX, ZSTD,
};
use crate::hashing::{BytesHasher, CHUNK};
use crate::progress::Progress;

const FLAG_ENCRYPTED: u16 = 1;
/// The central directory and end records are kept in memory; more than this is not an archive
/// of ours.
const MAX_TAIL: usize = 64 << 20;
/// Entries hashed on the reading thread up to this size, on a thread of their own beyond.
const INLINE_HASH: u64 = 4 << 20;

/// A [`ChunkSource`] over a reader (a file, in tests and fallbacks), in pieces of `size`.
pub struct ReadChunks<R> {
    pub reader: R,
    pub size: usize,
}

impl<R: Read> ReadChunks<R> {
    pub fn new(reader: R) -> Self {
        ReadChunks {
            reader,
            size: CHUNK,
        }
    }
}

impl<R: Read> ChunkSource for ReadChunks<R> {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let mut buf = vec![0u8; self.size];
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(n);
        Ok((n > 0).then(|| Bytes::from(buf)))
    }
}

/// A local header, as the caller is asked about it.
#[derive(Clone, Debug)]
pub struct LocalHeader {
    pub name: String,
    pub method: u16,
    pub offset: u64,
}

/// Where an entry's data goes.
pub enum Place {
    /// Into this file (created by the caller, empty).
    File(File, PathBuf),
    /// Into memory, at most this many bytes (more is an error naming the entry).
    Memory(usize),
}

/// An entry read: what its headers said, checked against what its data turned out to be.
#[derive(Clone, Debug)]
pub struct ReadEntry {
    pub name: String,
    pub offset: u64,
    pub method: u16,
    pub crc: u32,
    pub csize: u64,
    pub usize: u64,
    /// Hex SHA-256 of the uncompressed data.
    pub sha256: String,
    /// The data, for [`Place::Memory`] entries.
    pub data: Option<Vec<u8>>,
}

/// A central directory record.
#[derive(Clone, Debug)]
struct CentralRecord {
    name: String,
    method: u16,
    crc: u32,
    csize: u64,
    usize: u64,
    offset: u64,
    made_by: u16,
    external: u32,
}

/// A whole archive read.
#[derive(Debug)]
pub struct Listing {
    pub entries: Vec<ReadEntry>,
    /// Names of entries the central directory marks as symbolic links or folders.
    pub not_files: Vec<String>,
    /// Bytes read.
    pub size: u64,
}

/// Reads the archive from `src` to its end. `place` is asked where each entry goes before any
/// of its data is read (an error refuses the archive there). `label` names the archive in
/// errors. On error, files already handed out may hold partial data: the caller removes them.
pub fn read(
    src: &mut dyn ChunkSource,
    label: &Path,
    stored_sizes: &BTreeMap<u64, u64>,
    place: &mut dyn FnMut(&LocalHeader) -> Result<Place, ZipError>,
    progress: &dyn Progress,
) -> Result<Listing, ZipError> {
    read_with(src, label, stored_sizes, place, u64::MAX, progress)
}

/// [`read`] for a caller whose `place` refuses entries with errors of its own, `E`: those come
/// back as they were, the reader's own errors converted into `E`.
pub fn read_with<E: From<ZipError>>(
    src: &mut dyn ChunkSource,
    label: &Path,
    stored_sizes: &BTreeMap<u64, u64>,
    place: &mut dyn FnMut(&LocalHeader) -> Result<Place, E>,
    max_in_files: u64,
    progress: &dyn Progress,
) -> Result<Listing, E> {
    let mut input = Input {
        src,
        cur: Bytes::new(),
        pos: 0,
        label,
    };
    let mut entries: Vec<ReadEntry> = Vec::new();
    // What the entries written to files so far took (entries kept in memory do not count).
    let mut in_files = 0u64;
    loop {
        let offset = input.pos;
        let sig = match input.u32_or_end()? {
            Some(sig) => sig,
            None => return Err(input.corrupt("it ends before its central directory").into()),
        };
        match sig {
            LOCAL_SIG => {
                let budget = Budget {
                    left: max_in_files.saturating_sub(in_files),
                    total: max_in_files,
                };
                let entry = read_entry(&mut input, offset, stored_sizes, place, budget, progress)?;
                if entry.data.is_none() {
                    in_files = in_files.saturating_add(entry.usize);
                }
                entries.push(entry);
            }
            CENTRAL_SIG | EOCD_SIG | EOCD64_SIG => {
                let records = read_tail(&mut input, sig, offset)?;
                let not_files = cross_check(&input, &entries, &records)?;
                return Ok(Listing {
                    entries,
                    not_files,
                    size: input.pos,
                });
            }
            other => {
                return Err(input
                    .corrupt(&format!(
                        "unexpected signature {other:#010x} at offset {offset}"
                    ))
                    .into())
            }
        }
    }
}

/// The archive as it is read: the current piece and the absolute offset of its first byte.
struct Input<'a> {
    src: &'a mut dyn ChunkSource,
    cur: Bytes,
    pos: u64,
    label: &'a Path,
}

impl Input<'_> {
    fn corrupt(&self, reason: &str) -> ZipError {
        ZipError::Corrupt {
            path: self.label.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    fn read_err(&self, e: io::Error) -> ZipError {
        ZipError::Corrupt {
            path: self.label.to_path_buf(),
            reason: format!("reading it failed at offset {}: {e}", self.pos),
        }
    }

    /// Makes `cur` non-empty; false at the end of the archive.
    fn fill(&mut self) -> Result<bool, ZipError> {
        while self.cur.is_empty() {
            match self.src.next_chunk() {
                Ok(Some(b)) => self.cur = b,
                Ok(None) => return Ok(false),
                Err(e) => return Err(self.read_err(e)),
            }
        }
        Ok(true)
    }

    /// Up to `max` bytes of the current piece (not consumed), `None` at the end.
    fn peek(&mut self, max: u64) -> Result<Option<Bytes>, ZipError> {
        if !self.fill()? {
            return Ok(None);
        }
        let n = (self.cur.len() as u64).min(max) as usize;
        Ok(Some(self.cur.slice(..n)))
    }

    fn advance(&mut self, n: usize) {
        let _ = self.cur.split_to(n);
        self.pos += n as u64;
    }

    /// Exactly `n` bytes, or an error saying the archive is truncated.
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, ZipError> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.peek((n - out.len()) as u64)? {
                Some(b) => {
                    out.extend_from_slice(&b);
                    self.advance(b.len());
                }
                None => return Err(self.corrupt("it is truncated")),
            }
        }
        Ok(out)
    }

    /// A little-endian u32, or `None` right at the end.
    fn u32_or_end(&mut self) -> Result<Option<u32>, ZipError> {
        if !self.fill()? {
            return Ok(None);
        }
        Ok(Some(le32(&self.bytes(4)?, 0)))
    }

    /// Everything up to the end, at most `limit` bytes.
    fn rest(&mut self, limit: usize) -> Result<Vec<u8>, ZipError> {
        let mut out = Vec::new();
        while let Some(b) = self.peek(u64::MAX)? {
            if out.len() + b.len() > limit {
                return Err(self.corrupt("its central directory is implausibly large"));
            }
            out.extend_from_slice(&b);
            self.advance(b.len());
        }
        Ok(out)
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The ZIP64 extra field's values for the 32-bit fields that are saturated, in APPNOTE order;
/// and whether the field is there at all.
fn zip64_extra(extra: &[u8], saturated: &mut [&mut u64]) -> Result<bool, String> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let (id, len) = (le16(extra, at), le16(extra, at + 2) as usize);
        let body = extra
            .get(at + 4..at + 4 + len)
            .ok_or("an extra field runs past its header")?;
        if id == EXTRA_ZIP64 {
            let mut k = 0;
            for v in saturated.iter_mut() {
                if **v == U32_MAX {
                    **v = le64(body.get(k..k + 8).ok_or("short ZIP64 extra field")?, 0);
                    k += 8;
                }
            }
            return Ok(true);
        }
        at += 4 + len;
    }
    Ok(false)
}

/// SHA-256 on this thread while the entry is small, on a thread of its own once it is not.
enum EntryHash {
    Inline(Sha256, u64),
    Thread(BytesHasher),
}

impl EntryHash {
    fn new() -> Self {
        EntryHash::Inline(Sha256::new(), 0)
    }

    fn update(&mut self, b: Bytes) {
        match self {
            EntryHash::Inline(h, n) => {
                h.update(&b);
                *n += b.len() as u64;
                if *n > INLINE_HASH {
                    let h = std::mem::take(h);
                    *self = EntryHash::Thread(BytesHasher::continuing(h));
                }
            }
            EntryHash::Thread(t) => t.hash(b),
        }
    }

    fn finish(self) -> String {
        match self {
            EntryHash::Inline(h, _) => hex::encode(h.finalize()),
            EntryHash::Thread(t) => hex::encode(t.finish()),
        }
    }
}

/// How many more bytes the entries written to files may take (`total`: in all).
#[derive(Clone, Copy)]
struct Budget {
    left: u64,
    total: u64,
}

/// Where an entry's uncompressed data is going, and its running size and checksums.
struct Out {
    place: Place,
    budget: Budget,
    memory: Vec<u8>,
    crc: crc32fast::Hasher,
    hash: EntryHash,
    size: u64,
    name: String,
}

impl Out {
    fn put(&mut self, b: Bytes, label: &Path) -> Result<(), ZipError> {
        match &mut self.place {
            Place::File(f, path) => {
                if self.size.saturating_add(b.len() as u64) > self.budget.left {
                    return Err(ZipError::TooLarge {
                        path: label.to_path_buf(),
                        name: self.name.clone(),
                        limit: self.budget.total,
                    });
                }
                f.write_all(&b).map_err(|source| ZipError::Write {
                    path: path.clone(),
                    source,
                })?
            }
            Place::Memory(limit) => {
                if self.memory.len() + b.len() > *limit {
                    return Err(ZipError::Corrupt {
                        path: label.to_path_buf(),
                        reason: format!("entry {:?} is larger than {limit} bytes", self.name),
                    });
                }
                self.memory.extend_from_slice(&b);
            }
        }
        self.crc.update(&b);
        self.size += b.len() as u64;
        self.hash.update(b);
        Ok(())
    }
}

fn read_entry<E: From<ZipError>>(
    input: &mut Input,
    offset: u64,
    stored_sizes: &BTreeMap<u64, u64>,
    place: &mut dyn FnMut(&LocalHeader) -> Result<Place, E>,
    budget: Budget,
    progress: &dyn Progress,
) -> Result<ReadEntry, E> {
    let h = input.bytes(26)?;
    let (flags, method) = (le16(&h, 2), le16(&h, 4));
    let mut crc = le32(&h, 10);
    let (mut csize, mut usize) = (le32(&h, 14) as u64, le32(&h, 18) as u64);
    let (nlen, xlen) = (le16(&h, 22) as usize, le16(&h, 24) as usize);
    let name_bytes = input.bytes(nlen)?;
    let extra = input.bytes(xlen)?;
    let name = String::from_utf8(name_bytes).map_err(|_| {
        input.corrupt(&format!(
            "the entry at offset {offset} has a name that is not UTF-8"
        ))
    })?;
    let zip64 = zip64_extra(&extra, &mut [&mut usize, &mut csize])
        .map_err(|e| input.corrupt(&format!("entry {name:?}: {e}")))?;
    if flags & FLAG_ENCRYPTED != 0 {
        return Err(input
            .corrupt(&format!("entry {name:?} is encrypted"))
            .into());
    }
    let descriptor = flags & FLAG_DESCRIPTOR != 0;
    if !matches!(method, STORED | DEFLATED | ZSTD) {
        return Err(input
            .corrupt(&format!(
                "entry {name:?} uses compression method {method}, which this agent does not read"
            ))
            .into());
    }
    // A stored entry with a data descriptor ends where its writer said it does, in the
    // archive's info or, for an archive read while it is written, in the piece where its data
    // descriptor starts (the data descriptor and the central directory then have to agree).
    let stored_len = match (method, descriptor) {
        (STORED, true) => match stored_sizes.get(&offset) {
            Some(n) => Some(*n),
            None if input.src.announces_sizes() => None,
            None => {
                return Err(ZipError::Unstreamable {
                    path: input.label.to_path_buf(),
                    name,
                }
                .into())
            }
        },
        (STORED, false) => {
            if csize != usize {
                return Err(input
                    .corrupt(&format!(
                        "stored entry {name:?} has compressed size {csize} and size {usize}"
                    ))
                    .into());
            }
            Some(csize)
        }
        _ => None,
    };
    let header = LocalHeader {
        name: name.clone(),
        method,
        offset,
    };
    let mut out = Out {
        place: place(&header)?,
        budget,
        memory: Vec::new(),
        crc: crc32fast::Hasher::new(),
        hash: EntryHash::new(),
        size: 0,
        name: name.clone(),
    };
    let label = input.label;
    let consumed = match method {
        STORED => {
            let mut done = 0u64;
            loop {
                // Known: up to that size. Not yet: all of the current piece (no size
                // announced with it, so its data descriptor starts in a later piece).
                let max = match stored_len.or_else(|| input.src.stored_size(offset)) {
                    Some(n) if n < done => {
                        return Err(input
                            .corrupt(&format!(
                        "stored entry {name:?} was announced {n} bytes long after {done} were read"
                    ))
                            .into())
                    }
                    Some(n) if n == done => break,
                    Some(n) => n - done,
                    None => {
                        if !input.fill()? {
                            return Err(input.corrupt("it is truncated").into());
                        }
                        // The piece just read may have announced it.
                        if input.src.stored_size(offset).is_some() {
                            continue;
                        }
                        u64::MAX
                    }
                };
                let b = input
                    .peek(max)?
                    .ok_or_else(|| input.corrupt("it is truncated"))?;
                input.advance(b.len());
                done += b.len() as u64;
                progress.advance(b.len() as u64);
                out.put(b, label)?;
            }
            done
        }
        _ => inflate(
            input,
            method,
            (!descriptor).then_some(csize),
            &mut out,
            progress,
        )?,
    };
    if descriptor {
        let mut d = input.bytes(4)?;
        if le32(&d, 0) == DESCRIPTOR_SIG {
            d = input.bytes(4)?;
        }
        crc = le32(&d, 0);
        if zip64 {
            let s = input.bytes(16)?;
            (csize, usize) = (le64(&s, 0), le64(&s, 8));
        } else {
            let s = input.bytes(8)?;
            (csize, usize) = (le32(&s, 0) as u64, le32(&s, 4) as u64);
        }
    }
    let actual_crc = out.crc.clone().finalize();
    if consumed != csize || out.size != usize || actual_crc != crc {
        return Err(input
            .corrupt(&format!(
            "entry {name:?} has {} bytes ({consumed} compressed) with CRC-32 {actual_crc:08x}, \
             its headers say {usize} bytes ({csize} compressed) with CRC-32 {crc:08x}",
            out.size
        ))
            .into());
    }
    let data = match out.place {
        Place::Memory(_) => Some(std::mem::take(&mut out.memory)),
        Place::File(..) => None,
    };
    Ok(ReadEntry {
        name,
        offset,
        method,
        crc,
        csize,
        usize,
        sha256: out.hash.finish(),
        data,
    })
}

/// Decompresses an entry's data until its compressed stream ends (or `csize` bytes, when the
/// header said so); returns the compressed bytes consumed.
fn inflate(
    input: &mut Input,
    method: u16,
    csize: Option<u64>,
    out: &mut Out,
    progress: &dyn Progress,
) -> Result<u64, ZipError> {
    let label = input.label;
    let entry = out.name.clone();
    let bad = |reason: String| ZipError::Corrupt {
        path: label.to_path_buf(),
        reason: format!("entry {entry:?}: {reason}"),
    };
    let mut zstd = match method {
        ZSTD => Some(zstd::stream::raw::Decoder::new().map_err(|e| bad(e.to_string()))?),
        _ => None,
    };
    let mut deflate = flate2::Decompress::new(false);
    let mut consumed = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut filled = 0usize;
    let mut ended = false;
    while !ended {
        let limit = csize.map_or(u64::MAX, |c| c - consumed);
        let slice = match input.peek(limit)? {
            Some(b) => b,
            // No more input: the stream must have ended (checked below).
            None if csize.is_some() && limit == 0 => Bytes::new(),
            None => return Err(bad("the archive ends inside it".into())),
        };
        let (used, made, end) = match &mut zstd {
            Some(d) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut i = InBuffer::around(&slice);
                let mut o = OutBuffer::around(&mut buf[filled..]);
                let hint = d.run(&mut i, &mut o).map_err(|e| bad(e.to_string()))?;
                (i.pos(), o.pos(), hint == 0)
            }
            None => {
                let (in0, out0) = (deflate.total_in(), deflate.total_out());
                let st = deflate
                    .decompress(&slice, &mut buf[filled..], flate2::FlushDecompress::None)
                    .map_err(|e| bad(e.to_string()))?;
                (
                    (deflate.total_in() - in0) as usize,
                    (deflate.total_out() - out0) as usize,
                    st == flate2::Status::StreamEnd,
                )
            }
        };
        input.advance(used);
        consumed += used as u64;
        filled += made;
        progress.advance(used as u64);
        if filled == buf.len() || (end && filled > 0) {
            let full = std::mem::replace(&mut buf, vec![0u8; CHUNK]);
            let mut full = Bytes::from(full);
            full.truncate(filled);
            filled = 0;
            out.put(full, label)?;
        }
        if end {
            // A Zstandard entry may hold several frames: another one may follow.
            let more = match (&mut zstd, csize) {
                (Some(_), Some(c)) => consumed < c,
                (Some(_), None) => {
                    matches!(input.peek(4)?, Some(b) if b.len() == 4 && le32(&b, 0) == 0xFD2F_B528)
                }
                _ => false,
            };
            if more {
                use zstd::stream::raw::Operation;
                if let Some(d) = &mut zstd {
                    d.reinit().map_err(|e| bad(e.to_string()))?;
                }
            } else {
                ended = true;
            }
        } else if used == 0 && made == 0 && slice.is_empty() {
            return Err(bad("its compressed data is cut short".into()));
        }
    }
    if let Some(c) = csize {
        if consumed != c {
            return Err(bad(format!(
                "its compressed data ends after {consumed} of {c} bytes"
            )));
        }
    }
    Ok(consumed)
}

/// Reads the central directory and end records (everything left) into memory; returns the
/// directory's records.
fn read_tail(input: &mut Input, sig: u32, start: u64) -> Result<Vec<CentralRecord>, ZipError> {
    let mut tail = sig.to_le_bytes().to_vec();
    tail.extend(input.rest(MAX_TAIL)?);
    let bad = |reason: String| input.corrupt(&reason);
    let mut at = 0usize;
    let mut records = Vec::new();
    while tail.len() >= at + 4 && le32(&tail, at) == CENTRAL_SIG {
        let h = tail
            .get(at..at + 46)
            .ok_or_else(|| bad("a central directory record is cut short".into()))?;
        let (nlen, xlen, clen) = (
            le16(h, 28) as usize,
            le16(h, 30) as usize,
            le16(h, 32) as usize,
        );
        let var = tail
            .get(at + 46..at + 46 + nlen + xlen + clen)
            .ok_or_else(|| bad("a central directory record is cut short".into()))?;
        let name = String::from_utf8(var[..nlen].to_vec())
            .map_err(|_| bad("a central directory name is not UTF-8".into()))?;
        let (mut usize, mut csize, mut offset) =
            (le32(h, 24) as u64, le32(h, 20) as u64, le32(h, 42) as u64);
        zip64_extra(
            &var[nlen..nlen + xlen],
            &mut [&mut usize, &mut csize, &mut offset],
        )
        .map_err(|e| bad(format!("central directory record {name:?}: {e}")))?;
        records.push(CentralRecord {
            name,
            method: le16(h, 10),
            crc: le32(h, 16),
            csize,
            usize,
            offset,
            made_by: le16(h, 4),
            external: le32(h, 38),
        });
        at += 46 + nlen + xlen + clen;
    }
    let cd_size = at as u64;
    // Optional ZIP64 end record and locator, then the end record.
    let (mut total, mut cd_len, mut cd_at) = (None, None, None);
    if tail.len() >= at + 4 && le32(&tail, at) == EOCD64_SIG {
        let r = tail
            .get(at..at + 56)
            .ok_or_else(|| bad("its ZIP64 end record is cut short".into()))?;
        let len = le64(r, 4) as usize;
        (total, cd_len, cd_at) = (Some(le64(r, 32)), Some(le64(r, 40)), Some(le64(r, 48)));
        let eocd64_at = start + at as u64;
        at = at
            .checked_add(12 + len)
            .filter(|e| *e <= tail.len())
            .ok_or_else(|| bad("its ZIP64 end record is cut short".into()))?;
        let l = tail
            .get(at..at + 20)
            .filter(|l| le32(l, 0) == LOCATOR64_SIG)
            .ok_or_else(|| bad("its ZIP64 end record has no locator".into()))?;
        if le64(l, 8) != eocd64_at {
            return Err(bad("its ZIP64 locator points elsewhere".into()));
        }
        at += 20;
    }
    let e = tail
        .get(at..at + 22)
        .filter(|e| le32(e, 0) == EOCD_SIG)
        .ok_or_else(|| bad("it has no end of central directory record where expected".into()))?;
    let comment = le16(e, 20) as usize;
    if at + 22 + comment != tail.len() {
        return Err(bad(
            "bytes follow its end of central directory record".into()
        ));
    }
    let pick = |v32: u64, v64: Option<u64>, sat: u64| if v32 == sat { v64 } else { Some(v32) };
    let total = pick(le16(e, 10) as u64, total, 0xFFFF);
    let cd_len = pick(le32(e, 12) as u64, cd_len, U32_MAX);
    let cd_at = pick(le32(e, 16) as u64, cd_at, U32_MAX);
    if total != Some(records.len() as u64) || cd_len != Some(cd_size) || cd_at != Some(start) {
        return Err(bad(
            "its end record does not describe the central directory found".into(),
        ));
    }
    Ok(records)
}

/// The central directory must list exactly the entries read, with the same values; returns the
/// names it marks as links or folders.
fn cross_check(
    input: &Input,
    entries: &[ReadEntry],
    records: &[CentralRecord],
) -> Result<Vec<String>, ZipError> {
    if records.len() != entries.len() {
        return Err(input.corrupt(&format!(
            "its central directory lists {} entries, {} were found",
            records.len(),
            entries.len()
        )));
    }
    let mut by_offset: BTreeMap<u64, &ReadEntry> = entries.iter().map(|e| (e.offset, e)).collect();
    let mut not_files = Vec::new();
    for r in records {
        let e = by_offset.remove(&r.offset).ok_or_else(|| {
            input.corrupt(&format!(
                "its central directory lists {:?} at offset {}, where no entry starts",
                r.name, r.offset
            ))
        })?;
        if e.name != r.name
            || e.method != r.method
            || e.crc != r.crc
            || e.csize != r.csize
            || e.usize != r.usize
        {
            return Err(input.corrupt(&format!(
                "its central directory describes entry {:?} differently from its local header",
                e.name
            )));
        }
        let unix = r.made_by >> 8 == 3;
        let kind = (r.external >> 16) & 0o170000;
        if r.name.ends_with('/') || (unix && (kind == 0o120000 || kind == 0o040000)) {
            not_files.push(r.name.clone());
        }
    }
    Ok(not_files)
}
