//! Our ZIP64 writer for checkpoint archives. General writers do not offer what checkpoints
//! need: entries whose data is already in place (CRIU's page image becomes the archive file
//! itself, see [`ZipOut::adopt`]), and compression on several cores.
//!
//! Layout written: local headers with UTF-8 names and fixed 1980-01-01 times; compressed (and
//! followed) entries carry a ZIP64 data descriptor (general purpose bit 3), stored entries of
//! complete data carry their sizes and CRC-32 in the local header, so that a reader going front
//! to back can find every entry's end (see [`super::read`]); the central directory and end
//! records use ZIP64 fields only where a value does not fit in 32 bits.
//!
//! The archive goes to a file, or to a [`Sink`] (the object store's uploader) that sees it
//! front to back and never seeks.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

use super::{
    Sink, ALIGN, CENTRAL_SIG, DESCRIPTOR_SIG, EOCD64_SIG, EOCD_SIG, EXTRA_ALIGN, EXTRA_ZIP64,
    FLAG_DESCRIPTOR, LOCAL_SIG, LOCATOR64_SIG, STORED, U32_MAX, ZSTD,
};

const FLAG_UTF8: u16 = 1 << 11;
const DOS_DATE_1980: u16 = (1 << 5) | 1;
/// ZIP64 (4.5); Zstandard entries need 6.3.
const VERSION_NEEDED: u16 = 45;
const VERSION_MADE_BY: u16 = (3 << 8) | 63; // Unix
/// Header id of the padding extra field that makes an adopted entry's header fill a block.
const EXTRA_PADDING: u16 = 0xCEDA;
/// An adopted file gets this much room in front of its data for the local header.
pub const ADOPT_HEADER: u64 = 4096;

struct Central {
    name: String,
    method: u16,
    flags: u16,
    crc: u32,
    csize: u64,
    usize: u64,
    offset: u64,
}

impl Central {
    /// A stored entry whose local header carries its sizes (no data descriptor).
    fn stored(name: &str, crc: u32, size: u64, offset: u64) -> Self {
        Central {
            name: name.into(),
            method: STORED,
            flags: FLAG_UTF8,
            crc,
            csize: size,
            usize: size,
            offset,
        }
    }
}

/// A file (buffered) or a [`Sink`].
pub enum Output {
    File(io::BufWriter<File>),
    Sink(Box<dyn Sink>),
}

impl Output {
    fn copy_from(
        &mut self,
        src: &mut File,
        len: u64,
        crc: Option<&mut crc32fast::Hasher>,
    ) -> io::Result<u64> {
        match self {
            Output::File(f) => {
                f.flush()?;
                match crc {
                    // std's copy uses copy_file_range where it can.
                    None => io::copy(&mut io::Read::take(&mut *src, len), f.get_mut()),
                    Some(crc) => copy_hashing(src, len, f.get_mut(), crc),
                }
            }
            Output::Sink(s) => s.copy_from(src, len, crc),
        }
    }
}

/// Copies `len` bytes from `src` to `out` through a buffer, feeding `crc`.
fn copy_hashing(
    src: &mut File,
    len: u64,
    out: &mut impl Write,
    crc: &mut crc32fast::Hasher,
) -> io::Result<u64> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = match io::Read::read(src, &mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        crc.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(done)
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::File(f) => f.write(buf),
            Output::Sink(s) => s.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::File(f) => f.write_all(buf),
            Output::Sink(s) => s.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::File(f) => f.flush(),
            Output::Sink(s) => s.flush(),
        }
    }
}

/// A zip being written front to back.
pub struct ZipOut {
    out: Output,
    pos: u64,
    central: Vec<Central>,
    open: Option<(String, u16, u64)>,
}

impl ZipOut {
    /// Starts an empty archive in `file` (which must be empty).
    pub fn new(file: File) -> Self {
        Self::to(Output::File(io::BufWriter::with_capacity(1 << 20, file)))
    }

    /// Starts an empty archive written to `out`.
    pub fn to(out: Output) -> Self {
        ZipOut {
            out,
            pos: 0,
            central: Vec::new(),
            open: None,
        }
    }

    /// Turns `file`, which holds exactly one entry's data (`size` bytes, CRC-32 `crc`), into an
    /// archive whose first entry is that data, without copying it: a block is inserted in front
    /// of the data (`FALLOC_FL_INSERT_RANGE`, a metadata operation on ext4 and XFS) and the
    /// local header written there. Fails with `Unsupported` where the filesystem cannot.
    pub fn adopt(file: File, name: &str, size: u64, crc: u32) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len != size {
            return Err(io::Error::other(format!(
                "adopted file has {len} bytes, expected {size}"
            )));
        }
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::FALLOC_FL_INSERT_RANGE,
            0,
            ADOPT_HEADER as i64,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL => {
                io::Error::from(io::ErrorKind::Unsupported)
            }
            e => e.into(),
        })?;
        let mut extra = zip64_sizes(size);
        let fixed = 30 + name.len() + extra.len() + 4;
        let pad = (ADOPT_HEADER as usize)
            .checked_sub(fixed)
            .ok_or_else(|| io::Error::other("entry name too long"))?;
        extra.extend_from_slice(&EXTRA_PADDING.to_le_bytes());
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.resize(extra.len() + pad, 0);
        let header = local_header(name, STORED, FLAG_UTF8, crc, size, size, &extra);
        debug_assert_eq!(header.len() as u64, ADOPT_HEADER);
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&header)?;
        out.seek(SeekFrom::Start(ADOPT_HEADER + size))?;
        let central = vec![Central::stored(name, crc, size, 0)];
        Ok(ZipOut {
            out: Output::File(out),
            pos: ADOPT_HEADER + size,
            central,
            open: None,
        })
    }

    /// Starts a streamed entry; its data follows through [`ZipOut::data`], then
    /// [`ZipOut::end_entry`].
    pub fn begin_entry(&mut self, name: &str, method: u16) -> io::Result<()> {
        assert!(self.open.is_none(), "previous entry not ended");
        let mut extra = Vec::with_capacity(20);
        extra.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
        extra.extend_from_slice(&16u16.to_le_bytes());
        extra.extend_from_slice(&[0u8; 16]);
        let header = local_header(name, method, FLAG_UTF8 | FLAG_DESCRIPTOR, 0, 0, 0, &extra);
        let offset = self.pos;
        self.out.write_all(&header)?;
        self.pos += header.len() as u64;
        self.open = Some((name.to_string(), method, offset));
        Ok(())
    }

    /// Starts a stored entry whose data the caller appends to the archive file itself
    /// ([`ZipOut::file`], then [`ZipOut::grown`]); [`ZipOut::end_in_place`] then writes its
    /// CRC-32 and sizes into its local header, so it reads like a complete file's entry (no
    /// data descriptor). Into a file only.
    pub fn begin_in_place(&mut self, name: &str) -> io::Result<()> {
        assert!(self.open.is_none(), "previous entry not ended");
        if !matches!(self.out, Output::File(_)) {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let mut extra = Vec::with_capacity(20);
        extra.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
        extra.extend_from_slice(&16u16.to_le_bytes());
        extra.extend_from_slice(&[0u8; 16]);
        // The data starts on a page boundary (the padding field `zipalign` writes): the pages
        // of a page image are then whole pages of the file, which a restore hands to CRIU
        // from the page cache as they are (see `crate::streamer`).
        let offset = self.pos;
        let unpadded = offset + 30 + name.len() as u64 + extra.len() as u64;
        let mut pad = (ALIGN - unpadded % ALIGN) % ALIGN;
        if pad < 6 {
            pad += ALIGN;
        }
        extra.extend_from_slice(&EXTRA_ALIGN.to_le_bytes());
        extra.extend_from_slice(&((pad - 4) as u16).to_le_bytes());
        extra.extend_from_slice(&(ALIGN as u16).to_le_bytes());
        extra.resize(extra.len() + pad as usize - 6, 0);
        let header = local_header(name, STORED, FLAG_UTF8, 0, U32_MAX, U32_MAX, &extra);
        self.out.write_all(&header)?;
        self.out.flush()?;
        self.pos += header.len() as u64;
        self.open = Some((name.to_string(), STORED, offset));
        Ok(())
    }

    /// The archive file, everything written flushed to it and its offset at the end: where an
    /// in-place entry's data goes ([`ZipOut::begin_in_place`]).
    pub fn file(&mut self) -> io::Result<&File> {
        match &mut self.out {
            Output::File(f) => {
                f.flush()?;
                Ok(f.get_ref())
            }
            Output::Sink(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
        }
    }

    /// Counts `n` bytes the caller appended to the file.
    pub fn grown(&mut self, n: u64) {
        self.pos += n;
    }

    /// Ends an in-place entry of `size` bytes with CRC-32 `crc`, written into its local header.
    pub fn end_in_place(&mut self, crc: u32, size: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (name, _, offset) = self.open.take().expect("an entry is open");
        let file = self.file()?;
        file.write_all_at(&crc.to_le_bytes(), offset + 14)?;
        let mut sizes = [0u8; 16];
        sizes[..8].copy_from_slice(&size.to_le_bytes());
        sizes[8..].copy_from_slice(&size.to_le_bytes());
        file.write_all_at(&sizes, offset + 30 + name.len() as u64 + 4)?;
        self.central.push(Central::stored(&name, crc, size, offset));
        Ok(())
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Adds a stored entry of `size` bytes copied from `src` (by the kernel, `copy_file_range`,
    /// into a file), its CRC-32 known beforehand. With `check`, the bytes copied are checksummed
    /// again and must have that CRC-32 (a file that changed since it was digested is an error).
    pub fn copy_stored(
        &mut self,
        name: &str,
        src: &mut File,
        size: u64,
        crc: u32,
        check: bool,
    ) -> io::Result<()> {
        assert!(self.open.is_none(), "previous entry not ended");
        let extra = zip64_sizes(size);
        let header = local_header(name, STORED, FLAG_UTF8, crc, size, size, &extra);
        let offset = self.pos;
        self.out.write_all(&header)?;
        self.pos += header.len() as u64;
        let mut again = check.then(crc32fast::Hasher::new);
        let copied = self.out.copy_from(src, size, again.as_mut())?;
        self.pos += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("copied {copied} of {size} bytes: the file shrank while archived"),
            ));
        }
        if again.is_some_and(|h| h.finalize() != crc) {
            return Err(io::Error::other("the file changed while it was archived"));
        }
        self.central.push(Central::stored(name, crc, size, offset));
        Ok(())
    }

    /// Adds a stored entry holding `data`, its sizes and CRC-32 in the local header.
    pub fn add_bytes(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        assert!(self.open.is_none(), "previous entry not ended");
        let size = data.len() as u64;
        let crc = crc32fast::hash(data);
        let header = local_header(name, STORED, FLAG_UTF8, crc, size, size, &zip64_sizes(size));
        let offset = self.pos;
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        self.pos += header.len() as u64 + size;
        self.central.push(Central::stored(name, crc, size, offset));
        Ok(())
    }

    /// Local header offset and size of each stored entry with a data descriptor (its size is
    /// not in its local header): what a reader going front to back needs to be told.
    pub fn stored_sizes(&self) -> Vec<(u64, u64)> {
        self.central
            .iter()
            .filter(|c| c.method == STORED && c.flags & FLAG_DESCRIPTOR != 0)
            .map(|c| (c.offset, c.csize))
            .collect()
    }

    /// Appends data of the open entry that a sink may keep rather than copy.
    pub fn data_bytes(&mut self, b: bytes::Bytes) -> io::Result<()> {
        assert!(self.open.is_some(), "an entry is open");
        let n = b.len() as u64;
        match &mut self.out {
            Output::File(f) => f.write_all(&b)?,
            Output::Sink(s) => s.write_bytes(b)?,
        }
        self.pos += n;
        Ok(())
    }

    /// A writer for the open entry's (already compressed) data.
    pub fn data(&mut self) -> DataWriter<'_> {
        DataWriter { zip: self }
    }

    /// Ends the open entry: `crc` and `usize` of the uncompressed data; the compressed size is
    /// what went through [`ZipOut::data`].
    pub fn end_entry(&mut self, crc: u32, usize: u64, csize: u64) -> io::Result<()> {
        let (name, method, offset) = self.open.take().expect("an entry is open");
        if let (STORED, Output::Sink(s)) = (method, &mut self.out) {
            s.note_stored_size(offset, csize);
        }
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
        d.extend_from_slice(&crc.to_le_bytes());
        d.extend_from_slice(&csize.to_le_bytes());
        d.extend_from_slice(&usize.to_le_bytes());
        self.out.write_all(&d)?;
        self.pos += d.len() as u64;
        self.central.push(Central {
            name,
            method,
            flags: FLAG_UTF8 | FLAG_DESCRIPTOR,
            crc,
            csize,
            usize,
            offset,
        });
        Ok(())
    }

    /// Writes the central directory and end records; returns the output, flushed, and the
    /// archive's size.
    pub fn finish(mut self) -> io::Result<(Output, u64)> {
        let cd_start = self.pos;
        let mut cd = Vec::new();
        for c in &self.central {
            let mut z64 = Vec::new();
            let (us, cs, off) = (c.usize >= U32_MAX, c.csize >= U32_MAX, c.offset >= U32_MAX);
            if us {
                z64.extend_from_slice(&c.usize.to_le_bytes());
            }
            if cs {
                z64.extend_from_slice(&c.csize.to_le_bytes());
            }
            if off {
                z64.extend_from_slice(&c.offset.to_le_bytes());
            }
            let mut extra = Vec::new();
            if !z64.is_empty() {
                extra.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
                extra.extend_from_slice(&(z64.len() as u16).to_le_bytes());
                extra.extend_from_slice(&z64);
            }
            cd.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            cd.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
            cd.extend_from_slice(&version_needed(c.method).to_le_bytes());
            cd.extend_from_slice(&c.flags.to_le_bytes());
            cd.extend_from_slice(&c.method.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&DOS_DATE_1980.to_le_bytes());
            cd.extend_from_slice(&c.crc.to_le_bytes());
            cd.extend_from_slice(&clamp32(c.csize, cs).to_le_bytes());
            cd.extend_from_slice(&clamp32(c.usize, us).to_le_bytes());
            cd.extend_from_slice(&(c.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes()); // comment
            cd.extend_from_slice(&0u16.to_le_bytes()); // disk
            cd.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            cd.extend_from_slice(&((0o100600u32) << 16).to_le_bytes());
            cd.extend_from_slice(&clamp32(c.offset, off).to_le_bytes());
            cd.extend_from_slice(c.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        self.out.write_all(&cd)?;
        let cd_size = cd.len() as u64;
        let n = self.central.len() as u64;
        let eocd64_at = cd_start + cd_size;
        let need64 = n >= 0xFFFF || cd_start >= U32_MAX || cd_size >= U32_MAX;
        let mut end = Vec::new();
        if need64 {
            end.extend_from_slice(&EOCD64_SIG.to_le_bytes());
            end.extend_from_slice(&44u64.to_le_bytes());
            end.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
            end.extend_from_slice(&VERSION_NEEDED.to_le_bytes());
            end.extend_from_slice(&0u32.to_le_bytes());
            end.extend_from_slice(&0u32.to_le_bytes());
            end.extend_from_slice(&n.to_le_bytes());
            end.extend_from_slice(&n.to_le_bytes());
            end.extend_from_slice(&cd_size.to_le_bytes());
            end.extend_from_slice(&cd_start.to_le_bytes());
            end.extend_from_slice(&LOCATOR64_SIG.to_le_bytes());
            end.extend_from_slice(&0u32.to_le_bytes());
            end.extend_from_slice(&eocd64_at.to_le_bytes());
            end.extend_from_slice(&1u32.to_le_bytes());
        }
        let n16 = if need64 { 0xFFFF } else { n as u16 };
        end.extend_from_slice(&EOCD_SIG.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&n16.to_le_bytes());
        end.extend_from_slice(&n16.to_le_bytes());
        end.extend_from_slice(&clamp32(cd_size, need64).to_le_bytes());
        end.extend_from_slice(&clamp32(cd_start, need64).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.out.write_all(&end)?;
        self.out.flush()?;
        Ok((self.out, eocd64_at + end.len() as u64))
    }
}

/// Writes an open entry's data, counting it.
pub struct DataWriter<'a> {
    zip: &'a mut ZipOut,
}

impl Write for DataWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.zip.out.write(buf)?;
        self.zip.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.zip.out.flush()
    }
}

/// The ZIP64 extra field of a local header for a stored entry of `size` bytes, if it needs one.
fn zip64_sizes(size: u64) -> Vec<u8> {
    let mut extra = Vec::new();
    if size >= U32_MAX {
        extra.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
        extra.extend_from_slice(&16u16.to_le_bytes());
        extra.extend_from_slice(&size.to_le_bytes());
        extra.extend_from_slice(&size.to_le_bytes());
    }
    extra
}

fn version_needed(method: u16) -> u16 {
    if method == ZSTD {
        63
    } else {
        VERSION_NEEDED
    }
}

fn clamp32(v: u64, overflow: bool) -> u32 {
    if overflow {
        u32::MAX
    } else {
        v as u32
    }
}

fn local_header(
    name: &str,
    method: u16,
    flags: u16,
    crc: u32,
    csize: u64,
    usize: u64,
    extra: &[u8],
) -> Vec<u8> {
    let big = csize >= U32_MAX || usize >= U32_MAX;
    let mut h = Vec::with_capacity(30 + name.len() + extra.len());
    h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
    h.extend_from_slice(&version_needed(method).to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&method.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&DOS_DATE_1980.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&clamp32(csize, big).to_le_bytes());
    h.extend_from_slice(&clamp32(usize, big).to_le_bytes());
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    h.extend_from_slice(name.as_bytes());
    h.extend_from_slice(extra);
    h
}

#[cfg(test)]
mod tests {
    use super::super::DEFLATED;
    use super::*;
    use std::io::Read;

    fn read_back(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let mut z = zip::ZipArchive::new(File::open(path).unwrap()).unwrap();
        (0..z.len())
            .map(|i| {
                let mut f = z.by_index(i).unwrap();
                let mut b = Vec::new();
                f.read_to_end(&mut b).unwrap();
                (f.name().to_string(), b)
            })
            .collect()
    }

    #[test]
    fn streamed_entries_read_back_with_every_method() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        let mut z = ZipOut::new(File::create(&path).unwrap());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 7) as u8).collect();
        let crc = crc32fast::hash(&data);
        for (name, method) in [
            ("images/s", STORED),
            ("images/d", DEFLATED),
            ("images/z", ZSTD),
        ] {
            z.begin_entry(name, method).unwrap();
            let before = z.pos;
            match method {
                STORED => z.data().write_all(&data).unwrap(),
                DEFLATED => {
                    let mut e =
                        flate2::write::DeflateEncoder::new(z.data(), flate2::Compression::new(6));
                    e.write_all(&data).unwrap();
                    e.finish().unwrap();
                }
                _ => {
                    let mut e = zstd::stream::write::Encoder::new(z.data(), 1).unwrap();
                    e.write_all(&data).unwrap();
                    e.finish().unwrap();
                }
            }
            let csize = z.pos - before;
            z.end_entry(crc, data.len() as u64, csize).unwrap();
        }
        z.finish().unwrap();
        let back = read_back(&path);
        assert_eq!(back.len(), 3);
        assert!(back.iter().all(|(_, b)| *b == data));
        // Debian's unzip (no Zstandard) checks the stored and deflated entries.
        let out = std::process::Command::new("unzip")
            .arg("-t")
            .arg(&path)
            .arg("images/s")
            .arg("images/d")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unzip -t: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn adopted_file_becomes_the_first_entry_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        let data: Vec<u8> = (0..(3 * 4096 + 100)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut z = match ZipOut::adopt(
            file,
            "images/pages-1.img",
            data.len() as u64,
            crc32fast::hash(&data),
        ) {
            Ok(z) => z,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                eprintln!(
                    "NOTE: this filesystem cannot insert ranges; the writer falls back to copying"
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        z.begin_entry("manifest.json", STORED).unwrap();
        z.data().write_all(b"{}").unwrap();
        z.end_entry(crc32fast::hash(b"{}"), 2, 2).unwrap();
        z.finish().unwrap();
        let back = read_back(&path);
        assert_eq!(back[0], ("images/pages-1.img".to_string(), data));
        assert_eq!(back[1].1, b"{}");
        let out = std::process::Command::new("unzip")
            .arg("-t")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unzip -t: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
