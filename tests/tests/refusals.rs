//! Restore refuses a bad archive with exit code 3 and a message naming the archive and the
//! reason, and changes nothing on the system: no process appears, nothing is written outside
//! the private staging folder, and that folder is cleaned up.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_tests::*;

struct Fixture {
    sb: Sandbox,
    archive: PathBuf,
    marker: String,
}

/// A good archive of a small counter whose command line carries a unique marker.
fn fixture() -> Option<Fixture> {
    if !criu_ready("refusals") {
        return None;
    }
    let sb = Sandbox::new();
    let marker = format!(
        "refusal-marker-{}",
        std::process::id() as u64 * 1000 + rand_suffix()
    );
    let cmd = format!("i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done # {marker}");
    let task = sb.exec("fx.log", &["sh", "-c", &cmd]);
    wait_for_numbers(&sb.path().join("fx.log"), 3);
    let archive = sb.dump(task.pid, &[]);
    wait_until(Duration::from_secs(10), "fixture task gone", || {
        !task.alive()
    });
    Some(Fixture {
        sb,
        archive,
        marker,
    })
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        % 1000
}

/// Entries of an archive, in order.
fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().to_string(), b)
        })
        .collect()
}

/// Writes a zip with exactly these entries (stored).
fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

fn sha(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

/// Applies `edit` to the entries, then rewrites the manifest's list (names, sizes, SHA-256) to
/// match them unless `keep_manifest_sums`; `edit_manifest` may change the manifest after that.
fn forge(
    fx: &Fixture,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<u8>)>),
    keep_manifest_sums: bool,
    edit_manifest: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let mut es = entries(&fx.archive);
    edit(&mut es);
    let mi = es.iter().position(|(n, _)| n == "manifest.json").unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&es[mi].1).unwrap();
    if !keep_manifest_sums {
        let list: Vec<serde_json::Value> = es
            .iter()
            .filter(|(n, _)| n != "manifest.json")
            .map(|(n, b)| serde_json::json!({"name": n, "size": b.len(), "sha256": sha(b)}))
            .collect();
        manifest["entries"] = serde_json::Value::Array(list);
    }
    edit_manifest(&mut manifest);
    es[mi].1 = serde_json::to_vec(&manifest).unwrap();
    let out = fx.sb.path().join(name);
    write_zip(&out, &es);
    out
}

/// Restores `archive`, expects a refusal mentioning `reason`, and checks nothing happened.
fn assert_refused(fx: &Fixture, archive: &Path, reason: &str) {
    let out = fx
        .sb
        .agent([std::ffi::OsStr::new("restore"), archive.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "expected exit 3 (input refused), got {}: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(&archive.display().to_string()),
        "message names the archive: {stderr}"
    );
    let without_path = stderr.replace(&archive.display().to_string(), "");
    assert!(
        without_path.to_lowercase().contains(&reason.to_lowercase()),
        "message says {reason:?}: {stderr}"
    );
    assert!(
        fx.sb.staging_leftovers().is_empty(),
        "staging left behind: {:?}",
        fx.sb.staging_leftovers()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        processes_with(&fx.marker).is_empty(),
        "a process was restored from a refused archive"
    );
}

fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

fn pages_entry(es: &[(String, Vec<u8>)]) -> usize {
    es.iter()
        .position(|(n, b)| n.starts_with("images/pages-") && !b.is_empty())
        .expect("a pages image")
}

#[test]
fn the_fixture_itself_restores() {
    // Guards the other tests: their archives differ from a restorable one only in the flaw.
    let Some(fx) = fixture() else { return };
    let rebuilt = forge(&fx, "case-0.zip", |_| {}, false, |_| {});
    let task = fx.sb.restore(&rebuilt);
    assert!(task.alive());
    task.kill();
}

#[test]
fn truncated_archive() {
    let Some(fx) = fixture() else { return };
    let bytes = std::fs::read(&fx.archive).unwrap();
    let cut = fx.sb.path().join("case-1.zip");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&fx, &cut, "corrupt or truncated");
}

#[test]
fn corrupt_bytes_inside_an_entry() {
    let Some(fx) = fixture() else { return };
    // Flip bytes of a stored page image inside the zip file itself: the zip's CRC catches it.
    let mut bytes = std::fs::read(&fx.archive).unwrap();
    let es = entries(&fx.archive);
    let page = &es[pages_entry(&es)].1;
    // A distinctive run of page bytes (not, say, zeros that also pad a header), found once.
    let start = (0..page.len() - 64)
        .step_by(64)
        .find(|&i| {
            page[i..i + 64]
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 24
        })
        .expect("varied page bytes");
    let window = &page[start..start + 64];
    let hits: Vec<usize> = bytes
        .windows(64)
        .enumerate()
        .filter(|(_, w)| w == &window)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "the run is unique in the archive");
    let at = hits[0];
    for b in &mut bytes[at..at + 64] {
        *b ^= 0xff;
    }
    let bad = fx.sb.path().join("case-2.zip");
    std::fs::write(&bad, &bytes).unwrap();
    assert_refused(&fx, &bad, "BLAKE3");
}

#[test]
fn checksum_differs_from_manifest() {
    let Some(fx) = fixture() else { return };
    // A well-formed zip (valid CRCs) whose page image differs from what the manifest recorded.
    let bad = forge(
        &fx,
        "case-3.zip",
        |es| {
            let i = pages_entry(es);
            let mid = es[i].1.len() / 2;
            es[i].1[mid] ^= 0x01;
        },
        true,
        |_| {},
    );
    assert_refused(&fx, &bad, "BLAKE3");
}

#[test]
fn absolute_entry_name() {
    let Some(fx) = fixture() else { return };
    let target = fx.sb.path().join("escaped-absolute");
    let name = target.display().to_string();
    let bad = forge(
        &fx,
        "case-4.zip",
        |es| es.push((name.clone(), b"pwned".to_vec())),
        false,
        |_| {},
    );
    assert_refused(&fx, &bad, "unsafe entry name");
    assert!(!target.exists(), "the absolute entry was written");
}

#[test]
fn dot_dot_entry_name() {
    let Some(fx) = fixture() else { return };
    let bad = forge(
        &fx,
        "case-5.zip",
        |es| es.push(("images/../../../escaped-dotdot".into(), b"pwned".to_vec())),
        false,
        |_| {},
    );
    assert_refused(&fx, &bad, "unsafe entry name");
    assert!(!fx.sb.staging.join("../escaped-dotdot").exists());
    assert!(!fx.sb.path().join("escaped-dotdot").exists());
}

#[test]
fn entry_not_in_manifest() {
    let Some(fx) = fixture() else { return };
    let bad = forge(
        &fx,
        "case-6.zip",
        |es| es.push(("images/extra.img".into(), b"x".to_vec())),
        true,
        |_| {},
    );
    assert_refused(&fx, &bad, "does not list");
}

#[test]
fn unknown_manifest_version() {
    let Some(fx) = fixture() else { return };
    let bad = forge(
        &fx,
        "case-7.zip",
        |_| {},
        false,
        |m| m["format_version"] = 99.into(),
    );
    assert_refused(&fx, &bad, "format version 99");
}

#[test]
fn missing_manifest() {
    let Some(fx) = fixture() else { return };
    let mut es = entries(&fx.archive);
    es.retain(|(n, _)| n != "manifest.json");
    let bad = fx.sb.path().join("case-8.zip");
    write_zip(&bad, &es);
    assert_refused(&fx, &bad, "no manifest.json");
}

#[test]
fn checkpoint_without_its_cpu_description() {
    let Some(fx) = fixture() else { return };
    // Listed consistently, but without cpuinfo.img: an incomplete checkpoint, not a CPU this
    // machine lacks.
    let bad = forge(
        &fx,
        "case-9b.zip",
        |es| es.retain(|(n, _)| n != "images/cpuinfo.img"),
        false,
        |_| {},
    );
    assert_refused(&fx, &bad, "no cpuinfo.img");
    let out = fx
        .sb
        .agent([std::ffi::OsStr::new("restore"), bad.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("CPU features"), "{stderr}");
}

#[test]
fn cpu_this_machine_cannot_run() {
    let Some(fx) = fixture() else { return };
    // Claim every CPUID feature bit: no real CPU has them all, so CRIU's check must refuse.
    let bad = forge(
        &fx,
        "case-9.zip",
        |es| {
            let i = es
                .iter()
                .position(|(n, _)| n == "images/cpuinfo.img")
                .expect("cpuinfo image");
            es[i].1 = cedana_agent::criu::images::rewrite_cpuinfo(&es[i].1, |e| {
                for w in &mut e.capability {
                    *w = u32::MAX;
                }
                e.xfeatures_mask = Some(u64::MAX);
            })
            .unwrap();
        },
        false,
        |_| {},
    );
    assert_refused(&fx, &bad, "CPU");
}

#[test]
fn carried_file_under_a_link_out_of_the_folder() {
    let Some(fx) = fixture() else { return };
    let outside = fx.sb.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let bad = forge(
        &fx,
        "case-10.zip",
        |es| es.push(("files/l/pwned".into(), b"pwned".to_vec())),
        false,
        |m| {
            m["files"] = serde_json::json!({
                "root": "/job",
                "items": [
                    {"path": "l", "kind": "symlink", "mode": 511, "target": outside.display().to_string()},
                    {"path": "l/pwned", "kind": "file", "mode": 420},
                ]
            })
        },
    );
    assert_refused(&fx, &bad, "unsafe");
    // Also with a folder to put files into.
    let into = fx.sb.path().join("into");
    let out = fx.sb.agent([
        "restore",
        bad.to_str().unwrap(),
        "--files-to",
        into.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        !outside.join("pwned").exists(),
        "a file escaped through a link"
    );
    assert!(!into.exists(), "files were put back from a refused archive");
}

#[test]
fn carried_file_missing_from_the_listing() {
    let Some(fx) = fixture() else { return };
    let bad = forge(
        &fx,
        "case-11.zip",
        |es| es.push(("files/extra.txt".into(), b"x".to_vec())),
        false,
        |m| m["files"] = serde_json::json!({"root": "/job", "items": []}),
    );
    assert_refused(&fx, &bad, "does not list");
}

/// One stored entry as a hand-made zip holds it, where its parts may disagree.
struct Raw {
    /// The name in the central directory.
    name: String,
    /// The name in the local header (the same unless a test says otherwise).
    local_name: String,
    data: Vec<u8>,
    /// The CRC-32 both headers claim (the data's unless a test says otherwise).
    crc: u32,
}

impl Raw {
    fn of((name, data): (String, Vec<u8>)) -> Raw {
        Raw {
            local_name: name.clone(),
            crc: crc32fast::hash(&data),
            name,
            data,
        }
    }
}

/// Writes stored entries by hand (the zip crate's writer refuses the shapes tested here:
/// duplicate names, headers that disagree).
fn write_raw_zip(path: &Path, entries: &[Raw]) {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let size = e.data.len() as u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
        out.extend_from_slice(&e.crc.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(e.local_name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(e.local_name.as_bytes());
        out.extend_from_slice(&e.data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // made by, needed, flags, method, time, date
        central.extend_from_slice(&e.crc.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
        central.extend_from_slice(&(0o100600u32 << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

/// The fixture's entries, stored, with the manifest rewritten to match them.
fn raw_entries(fx: &Fixture) -> Vec<Raw> {
    let good = forge(fx, "raw-base.zip", |_| {}, false, |_| {});
    entries(&good).into_iter().map(Raw::of).collect()
}

#[test]
fn hand_made_zip_of_the_fixture_restores() {
    // The writer below is sound: its archive of the genuine entries restores (so the
    // refusals that follow come from their one defect).
    let Some(fx) = fixture() else { return };
    let good = fx.sb.path().join("raw-good.zip");
    write_raw_zip(&good, &raw_entries(&fx));
    let restored = fx.sb.restore(&good);
    assert!(restored.alive());
    restored.kill();
}

#[test]
fn stored_entry_with_a_wrong_crc() {
    let Some(fx) = fixture() else { return };
    let mut es = raw_entries(&fx);
    let i = es
        .iter()
        .position(|e| e.name == "images/pstree.img")
        .unwrap();
    es[i].crc ^= 0xdead_beef;
    let bad = fx.sb.path().join("case-crc.zip");
    write_raw_zip(&bad, &es);
    assert_refused(&fx, &bad, "CRC-32");
}

#[test]
fn an_entry_twice_in_the_zip() {
    let Some(fx) = fixture() else { return };
    let mut es = raw_entries(&fx);
    let i = es
        .iter()
        .position(|e| e.name == "images/pstree.img")
        .unwrap();
    // A decoy first, the genuine entry last: read by name, the last one would win.
    let decoy = Raw::of(("images/pstree.img".into(), b"decoy".to_vec()));
    es.insert(i, decoy);
    let bad = fx.sb.path().join("case-dup.zip");
    write_raw_zip(&bad, &es);
    assert_refused(&fx, &bad, "twice");
}

#[test]
fn local_header_disagrees_with_the_central_directory() {
    let Some(fx) = fixture() else { return };
    let mut es = raw_entries(&fx);
    let i = es
        .iter()
        .position(|e| e.name == "images/pstree.img")
        .unwrap();
    es[i].local_name = "images/pstree.imX".into();
    let bad = fx.sb.path().join("case-local.zip");
    write_raw_zip(&bad, &es);
    assert_refused(&fx, &bad, "local header");
}

#[test]
fn an_entry_listed_twice_in_the_manifest() {
    let Some(fx) = fixture() else { return };
    let bad = forge(
        &fx,
        "case-listed-twice.zip",
        |_| {},
        false,
        |m| {
            let first = m["entries"][0].clone();
            m["entries"].as_array_mut().unwrap().push(first);
        },
    );
    assert_refused(&fx, &bad, "listed twice");
}

#[test]
fn an_entry_name_too_long_for_a_file_name() {
    let Some(fx) = fixture() else { return };
    let long = format!("images/{}.img", "a".repeat(300));
    let bad = forge(
        &fx,
        "case-long-name.zip",
        |es| es.push((long.clone(), b"x".to_vec())),
        false,
        |_| {},
    );
    assert_refused(&fx, &bad, "unsafe");
}

#[test]
fn a_manifest_declaring_more_than_the_disk_holds() {
    let Some(fx) = fixture() else { return };
    // A small archive whose manifest says it expands to an exbibyte: refused before anything
    // is written (it used to be extracted until the sizes disagreed).
    let bad = forge(
        &fx,
        "case-huge.zip",
        |_| {},
        false,
        |m| m["entries"][0]["size"] = (1u64 << 60).into(),
    );
    let out = fx
        .sb
        .agent([std::ffi::OsStr::new("restore"), bad.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("expands to 11529215046") && stderr.contains("free"),
        "{stderr}"
    );
    assert!(fx.sb.staging_leftovers().is_empty());
    assert!(processes_with(&fx.marker).is_empty());
}

/// An archive read front to back (as the daemon reads one from the object store, its
/// manifest at the end, so nothing bounds its entries before they are written) that expands
/// past what the staging folder's filesystem has free is refused when it gets there, not
/// after filling the disk: 64 MiB of zeros (a few KiB compressed) into a 16 MiB tmpfs.
#[test]
fn a_streamed_archive_that_expands_past_the_free_space_is_refused_before_the_disk_fills() {
    use cedana_agent::archive::{self, Compression, Manifest, ManifestCriu, ManifestHost};
    use cedana_agent::progress::NoProgress;
    // Root, to mount the small filesystem.
    if !criu_ready(
        "a_streamed_archive_that_expands_past_the_free_space_is_refused_before_the_disk_fills",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let small = sb.path().join("small");
    let _mounted = Tmpfs::mount(&small, "16m");
    let zeros = sb.path().join("pages-1.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut w = archive::Writer::new(sb.path(), "bomb", Compression::Zstd).unwrap();
    w.add(
        &format!("{}/pages-1.img", archive::IMAGES_DIR),
        &zeros,
        None,
        &NoProgress,
    )
    .unwrap();
    let mut manifest = Manifest {
        format_version: archive::FORMAT_VERSION,
        created_at: String::new(),
        agent_version: String::new(),
        process: Default::default(),
        host: ManifestHost::default(),
        criu: ManifestCriu::default(),
        cpu: None,
        compression: Compression::Zstd,
        entries: vec![],
        files: None,
    };
    let bomb = match w.finish(&mut manifest, "bomb").unwrap() {
        archive::Finished::File(p) => p,
        other => panic!("a file archive, not {other:?}"),
    };
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size < 1 << 20, "the archive is small: {size} bytes");
    let mut src = cedana_agent::zipfmt::read::ReadChunks {
        reader: std::fs::File::open(&bomb).unwrap(),
        size: 1 << 16,
    };
    let e = archive::extract_stream(&mut src, &bomb, &Default::default(), &small, &NoProgress)
        .expect_err("the archive does not fit");
    let msg = e.to_string();
    assert!(
        msg.contains("expands past")
            && msg.contains("pages-1.img")
            && msg.contains("CEDANA_STAGING_DIR"),
        "{msg}"
    );
    assert!(
        std::fs::read_dir(&small).unwrap().next().is_none(),
        "nothing is left in the staging folder"
    );
}
