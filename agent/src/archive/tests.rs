//! Round trips of whole archives: written by [`Writer`] to a file or a sink, read back by
//! [`extract`] and [`extract_stream`], and every way a stream can go wrong.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::*;
use crate::progress::NoProgress;
use crate::zipfmt::read::ReadChunks;
use crate::zipfmt::{ChunkSource, Sink};

/// Where the first entry's data starts in a sink archive: after its local header (with a
/// ZIP64 extra field, as followed entries have).
const FIRST_DATA: usize = 30 + "images/pages-1.img".len() + 20;
use std::sync::atomic::{AtomicBool, Ordering};

fn empty_manifest() -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        created_at: String::new(),
        agent_version: String::new(),
        process: ManifestProcess::default(),
        host: ManifestHost::default(),
        criu: ManifestCriu::default(),
        cpu: None,
        compression: Compression::None,
        entries: vec![],
        files: None,
    }
}

/// A sink writing into a file, committed under the file's name.
struct FileSink(File, PathBuf);

impl Write for FileSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Sink for FileSink {
    fn copy_from(
        &mut self,
        src: &mut File,
        len: u64,
        crc: Option<&mut crc32fast::Hasher>,
    ) -> std::io::Result<u64> {
        let mut b = Vec::new();
        src.take(len).read_to_end(&mut b)?;
        if let Some(c) = crc {
            c.update(&b);
        }
        self.0.write_all(&b)?;
        Ok(b.len() as u64)
    }
    fn commit(self: Box<Self>, _stem: &str, sizes: &[(u64, u64)]) -> std::io::Result<String> {
        let list: Vec<String> = sizes.iter().map(|(o, s)| format!("{o}:{s}")).collect();
        std::fs::write(self.1.with_extension("sizes"), list.join(","))?;
        Ok(self.1.display().to_string())
    }
}

/// Pseudo-random bytes (incompressible enough).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Images as a dump has them: large page images, small ones, an empty one.
fn images(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let imgs = vec![
        ("pages-1.img".to_string(), noise(5 << 20, 1)),
        ("core-1.img".to_string(), b"core".repeat(1000)),
        ("empty.img".to_string(), Vec::new()),
        ("pagemap-1.img".to_string(), noise(70_000, 2)),
        ("pages-2.img".to_string(), noise(300_000, 3)),
    ];
    for (n, b) in &imgs {
        std::fs::write(dir.join(n), b).unwrap();
    }
    imgs
}

/// An archive of `images` written to a sink as the object store path writes them (the
/// first page image followed as if CRIU were writing it, the second digested first), or to
/// a file as `cedana-agent dump` writes them. Returns it and the stored sizes the sink was
/// given.
fn archive_of(dir: &Path, c: Compression, to_sink: bool) -> (PathBuf, BTreeMap<u64, u64>) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let imgs = images(&src);
    let out = dir.join(format!("a-{c:?}-{to_sink}.zip"));
    let mut w = if to_sink {
        let f = File::create(&out).unwrap();
        Writer::to_sink(Box::new(FileSink(f, out.clone())), "a", c)
    } else {
        Writer::new(dir, "a", c).unwrap()
    };
    for (n, _) in &imgs {
        let name = format!("{IMAGES_DIR}/{n}");
        let path = src.join(n);
        match n.as_str() {
            "pages-1.img" => {
                let done = || true;
                w.add(&name, &path, Some(&done), &NoProgress).unwrap();
            }
            "pages-2.img" if c == Compression::None => {
                let d = digest_following(&path, &|| true, false, &NoProgress).unwrap();
                w.add_digested(&name, &path, &d, &NoProgress).unwrap();
            }
            _ => {
                w.add(&name, &path, None, &NoProgress).unwrap();
            }
        }
    }
    match w.finish(&mut empty_manifest(), "a").unwrap() {
        Finished::File(p) => {
            std::fs::rename(&p, &out).unwrap();
            (out, BTreeMap::new())
        }
        Finished::Committed { name, bytes } => {
            assert_eq!(std::fs::metadata(&name).unwrap().len(), bytes);
            let text = std::fs::read_to_string(out.with_extension("sizes")).unwrap();
            let sizes = text
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (o, n) = p.split_once(':').unwrap();
                    (o.parse().unwrap(), n.parse().unwrap())
                })
                .collect();
            (out, sizes)
        }
    }
}

fn staging_is_empty(staging: &Path) -> bool {
    std::fs::read_dir(staging).unwrap().next().is_none()
}

/// Archives written to a sink read back front to back, in pieces of any size, with the same
/// result as reading them from a file; and stay readable by the zip crate and `extract`.
#[test]
fn sink_archives_stream_back_in_any_piece_size() {
    for c in [Compression::None, Compression::Zstd, Compression::Deflate] {
        let dir = tempfile::tempdir().unwrap();
        let (path, sizes) = archive_of(dir.path(), c, true);
        assert_eq!(sizes.len(), usize::from(c == Compression::None), "{c:?}");
        let want = images(&dir.path().join("src"));
        let staging = tempfile::tempdir().unwrap();
        let from_file = extract(&path, staging.path(), &NoProgress).unwrap();
        for piece in [1usize, 7, 4096, 1 << 20] {
            let mut src = ReadChunks {
                reader: File::open(&path).unwrap(),
                size: piece,
            };
            let x = extract_stream(&mut src, &path, &sizes, staging.path(), &NoProgress)
                .unwrap_or_else(|e| panic!("{c:?} in pieces of {piece}: {e}"));
            assert_eq!(x.manifest, from_file.manifest);
            for (n, b) in &want {
                let got = std::fs::read(x.images_dir().join(n)).unwrap();
                assert!(got == *b, "{c:?}, pieces of {piece}: {n} differs");
            }
        }
    }
}

/// A stored entry of unknown size cannot be read front to back: not in a file archive
/// (stored entries with data descriptors), nor in a sink archive whose sizes were lost. The
/// reader says so (the caller then reads it from a file) and leaves nothing behind.
#[test]
fn stored_entries_of_unknown_size_are_unstreamable() {
    let dir = tempfile::tempdir().unwrap();
    for (path, first) in [
        (
            archive_of(dir.path(), Compression::None, false).0,
            "images/pages-1.img",
        ),
        (
            archive_of(dir.path(), Compression::None, true).0,
            "images/pages-1.img",
        ),
    ] {
        let staging = tempfile::tempdir().unwrap();
        let mut src = ReadChunks::new(File::open(&path).unwrap());
        match extract_stream(
            &mut src,
            &path,
            &BTreeMap::new(),
            staging.path(),
            &NoProgress,
        ) {
            Err(ArchiveError::Unstreamable { name, .. }) => assert_eq!(name, first),
            other => panic!("{:?}", other.map(|x| x.manifest)),
        }
        assert!(staging_is_empty(staging.path()));
        // The same archive reads from its file.
        extract(&path, staging.path(), &NoProgress).unwrap();
    }
}

/// Gives `pieces` of the archive, then fails (as a broken connection or a failed digest
/// check does).
struct FailingAfter(ReadChunks<File>, usize);

impl ChunkSource for FailingAfter {
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        if self.1 == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "wrong digest",
            ));
        }
        self.1 -= 1;
        self.0.next_chunk()
    }
}

/// Every way a stream can go wrong is refused, and the private staging folder is gone
/// afterwards (nothing else was written).
#[test]
fn bad_streams_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, sizes) = archive_of(dir.path(), Compression::None, true);
    let good = std::fs::read(&path).unwrap();
    let at = |needle: &[u8]| {
        good.windows(needle.len())
            .position(|w| w == needle)
            .expect("present")
    };
    let run_with = |bytes: &[u8], sizes: &BTreeMap<u64, u64>| {
        let staging = tempfile::tempdir().unwrap();
        let mut src = ReadChunks {
            reader: std::io::Cursor::new(bytes.to_vec()),
            size: 64 << 10,
        };
        let r = extract_stream(
            &mut src,
            Path::new("obj.zip"),
            sizes,
            staging.path(),
            &NoProgress,
        );
        assert!(staging_is_empty(staging.path()), "staging left behind");
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let run = |bytes: &[u8]| run_with(bytes, &sizes);
    // A wrong size for the followed page image: its data descriptor disagrees.
    let wrong: BTreeMap<u64, u64> = sizes.iter().map(|(o, n)| (*o, n - 4096)).collect();
    let msg = run_with(&good, &wrong);
    assert!(msg.contains("corrupt") || msg.contains("CRC-32"), "{msg}");
    // A byte of the page image flipped (the local CRC-32 catches it first).
    let mut b = good.clone();
    b[FIRST_DATA + 1000] ^= 1;
    assert!(run(&b).contains("CRC-32"), "{}", run(&b));
    // Truncated, at several places.
    for cut in [10, 3 << 20, good.len() - 30] {
        assert!(
            run(&good[..cut]).contains("corrupt or truncated"),
            "cut {cut}"
        );
    }
    // Bytes after the end record.
    let mut b = good.clone();
    b.extend_from_slice(b"junk");
    assert!(run(&b).contains("follow its end"), "{}", run(&b));
    // An entry name escaping its folder: refused before anything is written for it.
    let mut b = good.clone();
    let i = at(b"images/core-1.img");
    b[i..i + 17].copy_from_slice(b"images/../../x.im");
    let msg = run(&b);
    assert!(msg.contains("unsafe entry name"), "{msg}");
    // The central directory disagreeing with a local header.
    let mut b = good.clone();
    let name = b"images/pagemap-1.img";
    let last = good
        .windows(name.len())
        .rposition(|w| w == name)
        .expect("central record");
    b[last + 7] = b'P';
    let msg = run(&b);
    assert!(msg.contains("central directory"), "{msg}");
    // The source failing part way (the object store's digest check, a lost connection).
    let staging = tempfile::tempdir().unwrap();
    let mut src = FailingAfter(
        ReadChunks {
            reader: File::open(&path).unwrap(),
            size: 1 << 20,
        },
        3,
    );
    let e = extract_stream(&mut src, &path, &sizes, staging.path(), &NoProgress).unwrap_err();
    assert!(e.to_string().contains("wrong digest"), "{e}");
    assert!(staging_is_empty(staging.path()));
}

/// A file that grows in bursts while the writer follows it, as CRIU's page images do:
/// the writer waits at each end of file and still gets every byte.
#[test]
fn follows_a_growing_file_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("pages-1.img");
    std::fs::write(&src, b"").unwrap();
    let chunk: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let done = AtomicBool::new(false);
    let mut w = Writer::new(dir.path(), "t", Compression::Zstd).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
            for _ in 0..20 {
                f.write_all(&chunk).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(15));
            }
            done.store(true, Ordering::SeqCst);
        });
        let complete = || done.load(Ordering::SeqCst);
        let n = w
            .add("images/pages-1.img", &src, Some(&complete), &NoProgress)
            .unwrap();
        assert_eq!(n, 20 * chunk.len() as u64);
    });
    let Finished::File(path) = w.finish(&mut empty_manifest(), "t").unwrap() else {
        panic!("a file archive")
    };
    let staging = tempfile::tempdir().unwrap();
    let x = extract(&path, staging.path(), &NoProgress).unwrap();
    let back = std::fs::read(x.images_dir().join("pages-1.img")).unwrap();
    assert_eq!(back, chunk.repeat(20));
    assert_eq!(x.manifest.compression, Compression::Zstd);
}

/// Adds `data` to `w` as `images/pages-1.img` the way a dump does: written into a FIFO (in
/// `bursts`, with pauses) by another thread while the writer splices it in.
fn fifo_in(w: &mut Writer, data: &[u8], bursts: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut fifos = crate::capture::Fifos::make(dir.path(), 1).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("pages-1.img"))
                .unwrap();
            for part in data.chunks(data.len().div_ceil(bursts).max(1)) {
                f.write_all(part).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(15));
            }
            drop(f);
            done.store(true, Ordering::SeqCst);
        });
        let finished = || done.load(Ordering::SeqCst);
        let mut n = 0;
        fifos
            .follow(&finished, |name, fd| -> Result<(), ArchiveError> {
                assert_eq!(name, "pages-1.img");
                n = w.add_from_fifo(&format!("{IMAGES_DIR}/{name}"), fd, &finished, &NoProgress)?;
                Ok(())
            })
            .unwrap();
        assert_eq!(n, data.len() as u64);
    });
}

/// A page image spliced in from a FIFO (as a dump takes it from CRIU) reads back exactly,
/// through our reader and the `zip` crate (sizes and CRC-32 in its local header), carries a
/// BLAKE3 and no SHA-256, and one changed byte of it is refused naming the BLAKE3.
#[test]
fn a_page_image_spliced_from_a_fifo_reads_back_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = noise(9 << 20, 3);
    let mut w = Writer::new(dir.path(), "f", Compression::None).unwrap();
    fifo_in(&mut w, &data, 40);
    let mut m = empty_manifest();
    let Finished::File(path) = w.finish(&mut m, "f").unwrap() else {
        panic!("a file archive")
    };
    let e = &m.entries[0];
    assert_eq!(e.blake3, blake3::hash(&data).to_hex().to_string());
    assert!(e.sha256.is_empty());
    let staging = tempfile::tempdir().unwrap();
    let x = extract(&path, staging.path(), &NoProgress).unwrap();
    assert_eq!(
        std::fs::read(x.images_dir().join("pages-1.img")).unwrap(),
        data
    );
    let mut z = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
    let mut back = Vec::new();
    z.by_name("images/pages-1.img")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);
    // Info-ZIP reads it too, the padding field before its data included.
    let tested = std::process::Command::new("unzip")
        .arg("-tq")
        .arg(&path)
        .output()
        .expect("unzip is installed");
    assert!(
        tested.status.success(),
        "{}",
        String::from_utf8_lossy(&tested.stdout)
    );
    drop(x);
    // One byte of the page image changed, its CRC-32 mended too: the BLAKE3 catches it.
    // The entry is the archive's first: its local header at 0 (30 bytes, the name, a ZIP64
    // field, padding), its data at the first page boundary, the central directory after it.
    let mut bytes = std::fs::read(&path).unwrap();
    let start = 4096;
    assert_eq!(
        &bytes[30 + 18 + 20..30 + 18 + 22],
        &[0x35, 0xd9],
        "the padding field"
    );
    assert_eq!(bytes[start..start + 64], data[..64]);
    bytes[start + 4096] ^= 1;
    let mut changed = data.clone();
    changed[4096] ^= 1;
    let crc = crc32fast::hash(&changed).to_le_bytes();
    bytes[14..18].copy_from_slice(&crc);
    let cd = start
        + data.len()
        + bytes[start + data.len()..]
            .windows(4)
            .position(|w| w == b"PK\x01\x02")
            .unwrap();
    bytes[cd + 16..cd + 20].copy_from_slice(&crc);
    std::fs::write(&path, &bytes).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let err = extract(&path, staging.path(), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("BLAKE3"), "{err}");
    assert!(staging_is_empty(staging.path()));
}

/// Images by name, with their bytes.
type Images = Vec<(String, Vec<u8>)>;

/// A small archive (the images a tiny process has), to mutate many times over.
fn small_archive(
    dir: &Path,
    c: Compression,
    to_sink: bool,
) -> (Vec<u8>, BTreeMap<u64, u64>, Images) {
    let src = dir.join("small-src");
    std::fs::create_dir_all(&src).unwrap();
    let imgs = vec![
        ("pages-1.img".to_string(), noise(12_000, 7)),
        ("core-1.img".to_string(), b"core".repeat(300)),
        ("empty.img".to_string(), Vec::new()),
    ];
    for (n, b) in &imgs {
        std::fs::write(src.join(n), b).unwrap();
    }
    let out = dir.join(format!("small-{c:?}-{to_sink}.zip"));
    let mut w = if to_sink {
        Writer::to_sink(
            Box::new(FileSink(File::create(&out).unwrap(), out.clone())),
            "s",
            c,
        )
    } else {
        Writer::new(dir, "s", c).unwrap()
    };
    for (n, b) in &imgs {
        let path = src.join(n);
        if n == "pages-1.img" && c == Compression::None && !to_sink {
            // As a dump does: through a FIFO, spliced in.
            fifo_in(&mut w, b, 3);
        } else if n == "pages-1.img" && c == Compression::None {
            let d = digest_following(&path, &|| true, false, &NoProgress).unwrap();
            w.add_digested(&format!("{IMAGES_DIR}/{n}"), &path, &d, &NoProgress)
                .unwrap();
        } else {
            w.add(&format!("{IMAGES_DIR}/{n}"), &path, None, &NoProgress)
                .unwrap();
        }
    }
    let sizes = match w.finish(&mut empty_manifest(), "s").unwrap() {
        Finished::File(p) => {
            std::fs::rename(&p, &out).unwrap();
            BTreeMap::new()
        }
        Finished::Committed { .. } => std::fs::read_to_string(out.with_extension("sizes"))
            .unwrap()
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (o, n) = p.split_once(':').unwrap();
                (o.parse().unwrap(), n.parse().unwrap())
            })
            .collect(),
    };
    (std::fs::read(&out).unwrap(), sizes, imgs)
}

/// The archive readers against mutated archives, a bounded number of seeded cases (a fuzz
/// run CI can afford; the seed of a failing case is in the message): flipped bytes, cuts,
/// repeated and zeroed stretches, size fields set to their largest value, over archives of
/// every compression, from a file and as a stream. Neither reader panics; each either
/// refuses or extracts exactly the original images; the staging folder is empty afterwards.
#[test]
fn mutated_archives_are_refused_or_read_exactly() {
    let cases: u64 = std::env::var("CEDANA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let (mut refused, mut tried) = (0u64, 0u64);
    let dir = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    for (c, to_sink) in [
        (Compression::None, false),
        (Compression::None, true),
        (Compression::Zstd, true),
        (Compression::Deflate, false),
    ] {
        let (good, sizes, imgs) = small_archive(dir.path(), c, to_sink);
        let mutated = dir.path().join("m.zip");
        for case in 0..cases {
            let seed = case * 7919 + c as u64 * 104_729 + u64::from(to_sink);
            let mut rng = noise(64, seed).into_iter().map(u64::from).cycle();
            let mut next = |n: usize| -> usize {
                let r = (0..4).fold(0u64, |a, _| a << 8 | rng.next().unwrap());
                (r % n.max(1) as u64) as usize
            };
            let mut b = good.clone();
            match next(5) {
                0 => {
                    for _ in 0..1 + next(4) {
                        let i = next(b.len());
                        b[i] ^= 1 << next(8);
                    }
                }
                1 => b.truncate(next(b.len())),
                2 => {
                    let (from, len) = (next(b.len()), 1 + next(64));
                    let piece: Vec<u8> = b[from..(from + len).min(b.len())].to_vec();
                    let at = next(b.len());
                    b.splice(at..at, piece);
                }
                3 => {
                    let (from, len) = (next(b.len()), 1 + next(256));
                    let end = (from + len).min(b.len());
                    b[from..end].fill(0);
                }
                _ => {
                    let i = next(b.len().saturating_sub(4));
                    b[i..i + 4].copy_from_slice(&[0xff; 4]);
                }
            }
            if b == good {
                continue;
            }
            std::fs::write(&mutated, &b).unwrap();
            let what = format!("{c:?}, sink {to_sink}, case {case} (seed {seed})");
            let check = |x: Result<Extracted, ArchiveError>, how: &str| -> bool {
                let ok = x.is_ok();
                if let Ok(x) = x {
                    for (n, want) in &imgs {
                        let got = std::fs::read(x.images_dir().join(n))
                            .unwrap_or_else(|e| panic!("{what}, {how}: {n}: {e}"));
                        assert!(got == *want, "{what}, {how}: {n} extracted wrong");
                    }
                }
                assert!(
                    staging_is_empty(staging.path()),
                    "{what}, {how}: staging left behind"
                );
                ok
            };
            let from_file = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                extract(&mutated, staging.path(), &NoProgress)
            }))
            .unwrap_or_else(|_| panic!("{what}: extract panicked"));
            tried += 2;
            refused += u64::from(!check(from_file, "from a file"));
            let streamed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut src = ReadChunks {
                    reader: File::open(&mutated).unwrap(),
                    size: 1 + next(5000),
                };
                extract_stream(&mut src, &mutated, &sizes, staging.path(), &NoProgress)
            }))
            .unwrap_or_else(|_| panic!("{what}: extract_stream panicked"));
            refused += u64::from(!check(streamed, "as a stream"));
        }
    }
    // The mutations matter: most are refused (what is read exactly is a change the readers
    // may ignore, such as a byte of an unused field).
    assert!(
        refused * 2 > tried,
        "only {refused} of {tried} reads refused"
    );
}
