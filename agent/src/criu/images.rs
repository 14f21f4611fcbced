//! Reading and writing the few CRIU image files the agent looks into.
//!
//! An image file is a magic header (CRIU's common magic, then the image's own magic) followed by
//! entries, each a little-endian `u32` length and that many bytes of protobuf.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};

use super::proto::{
    CoreEntry, CpuinfoEntry, CpuinfoX86Entry, PagemapEntry, PagemapHead, PstreeEntry,
};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// Name of CRIU's CPU description image.
pub const CPUINFO_IMG: &str = "cpuinfo.img";

/// Errors reading an image file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read CRIU image {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("CRIU image {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
}

/// The CPU a checkpoint was taken on, as CRIU recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub model_name: String,
    /// CPUID feature words CRIU compares on restore.
    pub capability_words: usize,
    pub xfeatures_mask: u64,
    pub xsave_size: u32,
}

impl From<&CpuinfoX86Entry> for CpuInfo {
    fn from(e: &CpuinfoX86Entry) -> Self {
        CpuInfo {
            vendor: match e.vendor_id {
                1 => "GenuineIntel".into(),
                2 => "AuthenticAMD".into(),
                _ => "unknown".into(),
            },
            family: e.cpu_family,
            model: e.model,
            stepping: e.stepping,
            model_name: e.model_id.clone().unwrap_or_default(),
            capability_words: e.capability.len(),
            xfeatures_mask: e.xfeatures_mask.unwrap_or(0),
            xsave_size: e.xsave_size.unwrap_or(0),
        }
    }
}

/// A parsed image file: its magic words and the raw entries.
pub struct Image {
    pub magics: Vec<u32>,
    pub entries: Vec<Vec<u8>>,
}

impl Image {
    /// Parses an image file's bytes.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self, ImageError> {
        let bad = |reason: &str| ImageError::Malformed {
            path: name.to_string(),
            reason: reason.to_string(),
        };
        let mut pos = 0;
        let word = |pos: &mut usize| -> Option<u32> {
            let b = bytes.get(*pos..*pos + 4)?;
            *pos += 4;
            Some(u32::from_le_bytes(b.try_into().ok()?))
        };
        let first = word(&mut pos).ok_or_else(|| bad("shorter than its magic"))?;
        let mut magics = vec![first];
        if first == IMG_COMMON_MAGIC || first == IMG_SERVICE_MAGIC {
            magics.push(word(&mut pos).ok_or_else(|| bad("shorter than its magic"))?);
        }
        let mut entries = Vec::new();
        while pos < bytes.len() {
            let len = word(&mut pos).ok_or_else(|| bad("truncated entry length"))? as usize;
            let body = bytes
                .get(pos..pos + len)
                .ok_or_else(|| bad("truncated entry"))?;
            entries.push(body.to_vec());
            pos += len;
        }
        Ok(Image { magics, entries })
    }

    /// Serializes back to the file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for m in &self.magics {
            out.extend_from_slice(&m.to_le_bytes());
        }
        for e in &self.entries {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out
    }
}

/// Decodes `cpuinfo.img`'s first x86 entry.
pub fn read_cpuinfo_entry(bytes: &[u8]) -> Result<CpuinfoX86Entry, ImageError> {
    let img = Image::parse(bytes, CPUINFO_IMG)?;
    let bad = |reason: String| ImageError::Malformed {
        path: CPUINFO_IMG.into(),
        reason,
    };
    let first = img.entries.first().ok_or_else(|| bad("no entry".into()))?;
    let entry = CpuinfoEntry::decode(first.as_slice()).map_err(|e| bad(e.to_string()))?;
    entry
        .x86_entry
        .into_iter()
        .next()
        .ok_or_else(|| bad("no x86 entry (only x86-64 is supported)".into()))
}

/// Reads the CPU description of a dump directory.
pub fn read_cpuinfo(images_dir: &Path) -> Result<CpuInfo, ImageError> {
    let path = images_dir.join(CPUINFO_IMG);
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(CpuInfo::from(&read_cpuinfo_entry(&bytes)?))
}

/// Name of CRIU's process tree image.
pub const PSTREE_IMG: &str = "pstree.img";

/// The processes of a dump, as CRIU recorded them (root first).
pub fn read_pstree(images_dir: &Path) -> Result<Vec<PstreeEntry>, ImageError> {
    let path = images_dir.join(PSTREE_IMG);
    let name = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Read {
        path: name.clone(),
        source,
    })?;
    Image::parse(&bytes, &name)?
        .entries
        .iter()
        .map(|e| {
            PstreeEntry::decode(e.as_slice()).map_err(|e| ImageError::Malformed {
                path: name.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Rewrites the first x86 entry of a `cpuinfo.img` (tests use it to forge foreign CPUs).
pub fn rewrite_cpuinfo(
    bytes: &[u8],
    edit: impl FnOnce(&mut CpuinfoX86Entry),
) -> Result<Vec<u8>, ImageError> {
    let mut img = Image::parse(bytes, CPUINFO_IMG)?;
    let first = img.entries.first().ok_or_else(|| ImageError::Malformed {
        path: CPUINFO_IMG.into(),
        reason: "no entry".into(),
    })?;
    let mut entry = CpuinfoEntry::decode(first.as_slice()).map_err(|e| ImageError::Malformed {
        path: CPUINFO_IMG.into(),
        reason: e.to_string(),
    })?;
    if let Some(x) = entry.x86_entry.first_mut() {
        edit(x);
    }
    img.entries[0] = entry.encode_to_vec();
    Ok(img.to_bytes())
}

/// `pagemap_entry` flags: the pages are in the parent's images, or served lazily, or here.
const PE_PARENT: u32 = 1 << 0;
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// Where the page images of a dump are best cut into chunks: for each `pages-<id>.img`, the
/// sizes of its chunks in order. A chunk holds the pages of one 1 MiB-aligned window of a
/// process's address space (windows holding less than 256 KiB are merged with the next, up to
/// 2 MiB), so memory rewritten in one place changes the chunks of that place only, also when
/// pages appear or go elsewhere (which shifts every later offset in the file). A page image
/// whose pagemap cannot be read or does not add up to its size gets no cuts (fixed-size
/// chunks then).
pub fn page_image_cuts(images_dir: &Path) -> std::collections::HashMap<String, Vec<u64>> {
    let mut out = std::collections::HashMap::new();
    let page = page_size();
    for (name, bytes) in pagemap_files(images_dir) {
        let Some((pages_id, cuts)) = pagemap_cuts(&bytes, &name, page) else {
            continue;
        };
        let pages = format!("pages-{pages_id}.img");
        let size = std::fs::metadata(images_dir.join(&pages)).map_or(u64::MAX, |m| m.len());
        if cuts.iter().sum::<u64>() == size {
            out.insert(pages, cuts);
        }
    }
    out
}

/// For each pages image (`pages-<id>.img`) in `images_dir`, the byte ranges CRIU reads itself
/// on a lazy restore (the runs that are not private anonymous memory): what a restore needs
/// before the process runs, the rest being fetched as it is touched.
pub fn page_image_eager_ranges(
    images_dir: &Path,
) -> std::collections::HashMap<String, Vec<(u64, u64)>> {
    let mut out = std::collections::HashMap::new();
    let page = page_size();
    for (name, bytes) in pagemap_files(images_dir) {
        let Ok(map) = read_pagemap(&bytes, &name, page) else {
            continue;
        };
        let ranges: &mut Vec<(u64, u64)> = out
            .entry(format!("pages-{}.img", map.pages_id))
            .or_default();
        ranges.extend(
            map.runs
                .iter()
                .filter(|r| !r.lazy)
                .map(|r| (r.offset, r.pages.saturating_mul(page))),
        );
    }
    out
}

/// Bytes around each hot address ([`hot_addresses`]) taken as hot: a stack's frames above its
/// pointer, a thread's control block and TLS on either side of its base.
const HOT_SPAN: u64 = 64 << 10;

/// The addresses each thread of the dump touches first, as it resumes and even before (the
/// kernel writes a thread's rseq area as CRIU re-registers it): its stack pointer,
/// instruction pointer, thread pointer (`fs_base`), rseq area and `clear_child_tid`. From the
/// `core-<tid>.img` images; unreadable ones are left out (only an order depends on this).
fn hot_addresses(images_dir: &Path) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(images_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("core-") && name.ends_with(".img")) {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(img) = Image::parse(&bytes, &name) else {
            continue;
        };
        for entry in &img.entries {
            let Ok(core) = CoreEntry::decode(entry.as_slice()) else {
                continue;
            };
            if let Some(ti) = &core.thread_info {
                out.extend(ti.clear_tid_addr);
                if let Some(r) = &ti.gpregs {
                    out.extend([r.sp, r.ip, r.fs_base].into_iter().flatten());
                }
            }
            let rseq = core.thread_core.and_then(|t| t.rseq_entry);
            out.extend(rseq.and_then(|r| r.rseq_abi_pointer));
        }
    }
    out.retain(|a| *a != 0);
    out
}

/// For each pages image, the byte ranges holding the pages the tree touches first
/// ([`hot_addresses`], [`HOT_SPAN`] on either side), merged: stored first after a move and
/// fetched before CRIU restores, so that neither CRIU nor the resumed task waits on them.
pub fn page_image_hot_ranges(
    images_dir: &Path,
) -> std::collections::HashMap<String, Vec<(u64, u64)>> {
    let page = page_size();
    let hot = hot_addresses(images_dir);
    let mut out: std::collections::HashMap<String, Vec<(u64, u64)>> =
        std::collections::HashMap::new();
    if hot.is_empty() {
        return out;
    }
    for (name, bytes) in pagemap_files(images_dir) {
        let Ok(map) = read_pagemap(&bytes, &name, page) else {
            continue;
        };
        let ranges = out
            .entry(format!("pages-{}.img", map.pages_id))
            .or_default();
        for a in &hot {
            let (lo, hi) = (a.saturating_sub(HOT_SPAN), a.saturating_add(HOT_SPAN));
            for r in &map.runs {
                let end = r.vaddr.saturating_add(r.pages.saturating_mul(page));
                let (from, to) = (lo.max(r.vaddr), hi.min(end));
                if from < to {
                    let first = (from - r.vaddr) / page * page;
                    let last = (to - r.vaddr).div_ceil(page) * page;
                    ranges.push((r.offset + first, last - first));
                }
            }
        }
    }
    out
}

/// This machine's page size.
fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
}

/// The pagemap images (`pagemap-*.img`) in `images_dir`: name and bytes; unreadable ones left
/// out.
fn pagemap_files(images_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(dir) = std::fs::read_dir(images_dir) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with("pagemap-") && name.ends_with(".img"))
                .then(|| std::fs::read(e.path()).ok().map(|b| (name, b)))
                .flatten()
        })
        .collect()
}

/// The pages id and the cuts of one pagemap (see [`page_image_cuts`]).
fn pagemap_cuts(bytes: &[u8], name: &str, page: u64) -> Option<(u32, Vec<u64>)> {
    const WINDOW: u64 = 1 << 20;
    const MIN: u64 = 256 << 10;
    const MAX: u64 = 2 << 20;
    let img = Image::parse(bytes, name).ok()?;
    let mut entries = img.entries.iter();
    let head = PagemapHead::decode(entries.next()?.as_slice()).ok()?;
    let mut cuts = Vec::new();
    let mut cur = 0u64;
    let mut cur_window = u64::MAX;
    for e in entries {
        let e = PagemapEntry::decode(e.as_slice()).ok()?;
        let flags = e.flags.unwrap_or(match e.in_parent {
            Some(true) => PE_PARENT,
            _ => PE_PRESENT,
        });
        // Pages in this dump's `pages-*.img`: present and not the parent's. (CRIU marks
        // private anonymous memory PE_LAZY as well, pages written here all the same.)
        if flags & PE_PRESENT == 0 || flags & PE_PARENT != 0 {
            continue;
        }
        let pages = e.pages.unwrap_or(u64::from(e.nr_pages));
        for i in 0..pages {
            let window = (e.vaddr + i * page) / WINDOW;
            if cur > 0 && ((window != cur_window && cur >= MIN) || cur + page > MAX) {
                cuts.push(cur);
                cur = 0;
            }
            cur += page;
            cur_window = window;
        }
    }
    if cur > 0 {
        cuts.push(cur);
    }
    Some((head.pages_id, cuts))
}

/// A run of pages of one task with its bytes in the dump's pages image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Address of its first page in the task.
    pub vaddr: u64,
    pub pages: u64,
    /// Where its bytes start in the pages image.
    pub offset: u64,
    /// CRIU may restore it lazily (private anonymous memory): `criu restore --lazy-pages`
    /// leaves it to the lazy-pages daemon; the other runs it reads from the image itself.
    pub lazy: bool,
}

/// A task's pagemap (`pagemap-<pid>.img`): the id of its pages image (`pages-<id>.img`) and
/// the runs stored there, in the image's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMap {
    pub pages_id: u32,
    pub runs: Vec<PageRun>,
}

impl PageMap {
    /// The bytes in the pages image.
    pub fn size(&self, page: u64) -> u64 {
        self.runs.iter().map(|r| r.pages * page).sum()
    }

    /// The run holding the page at `vaddr`, if any.
    pub fn find(&self, vaddr: u64, page: u64) -> Option<&PageRun> {
        // Runs are in address order in CRIU's images; not trusted to be, a miss is a miss.
        self.runs
            .iter()
            .find(|r| vaddr >= r.vaddr && (vaddr - r.vaddr) / page < r.pages)
    }
}

/// Reads a pagemap image's bytes (`name` for errors). Runs whose sizes overflow are refused:
/// the image is read from a checkpoint, not trusted.
pub fn read_pagemap(bytes: &[u8], name: &str, page: u64) -> Result<PageMap, ImageError> {
    let bad = |reason: String| ImageError::Malformed {
        path: name.to_string(),
        reason,
    };
    let img = Image::parse(bytes, name)?;
    let mut entries = img.entries.iter();
    let head = entries
        .next()
        .ok_or_else(|| bad("no pagemap head".into()))?;
    let head = PagemapHead::decode(head.as_slice()).map_err(|e| bad(e.to_string()))?;
    let mut runs = Vec::new();
    let mut offset = 0u64;
    for e in entries {
        let e = PagemapEntry::decode(e.as_slice()).map_err(|e| bad(e.to_string()))?;
        let flags = e.flags.unwrap_or(match e.in_parent {
            Some(true) => PE_PARENT,
            _ => PE_PRESENT,
        });
        if flags & PE_PRESENT == 0 || flags & PE_PARENT != 0 {
            continue;
        }
        let pages = e.pages.unwrap_or(u64::from(e.nr_pages));
        let len = pages
            .checked_mul(page)
            .filter(|l| e.vaddr.checked_add(*l).is_some())
            .ok_or_else(|| {
                bad(format!(
                    "a run of {pages} pages at {:#x} overflows",
                    e.vaddr
                ))
            })?;
        runs.push(PageRun {
            vaddr: e.vaddr,
            pages,
            offset,
            lazy: flags & PE_LAZY != 0,
        });
        offset = offset
            .checked_add(len)
            .ok_or_else(|| bad("its runs add up past 2^64 bytes".into()))?;
    }
    Ok(PageMap {
        pages_id: head.pages_id,
        runs,
    })
}

#[cfg(test)]
mod cut_tests {
    use super::*;

    fn pagemap(entries: &[(u64, u32)]) -> Vec<u8> {
        pagemap_as(entries, false)
    }

    /// CRIU 4 writes the run's length as `pages` (field 5), `nr_pages` 0.
    fn pagemap_as(entries: &[(u64, u32)], criu4: bool) -> Vec<u8> {
        let mut img = Image {
            magics: vec![IMG_COMMON_MAGIC, 0x56084025],
            entries: vec![PagemapHead { pages_id: 7 }.encode_to_vec()],
        };
        for (vaddr, nr_pages) in entries {
            img.entries.push(
                PagemapEntry {
                    vaddr: *vaddr,
                    nr_pages: if criu4 { 0 } else { *nr_pages },
                    pages: criu4.then_some(u64::from(*nr_pages)),
                    in_parent: None,
                    // As CRIU writes private anonymous memory.
                    flags: Some(PE_PRESENT | PE_LAZY),
                }
                .encode_to_vec(),
            );
        }
        img.to_bytes()
    }

    #[test]
    fn pagemap_runs_have_their_offsets_and_lazy_flags() {
        let mut bytes = pagemap(&[(0x1000, 2), (0x10000, 3)]);
        // A non-lazy run (file-backed private memory) after them.
        let mut img = Image::parse(&bytes, "p").unwrap();
        img.entries.push(
            PagemapEntry {
                vaddr: 0x20000,
                nr_pages: 1,
                pages: None,
                in_parent: None,
                flags: Some(PE_PRESENT),
            }
            .encode_to_vec(),
        );
        bytes = img.to_bytes();
        let m = read_pagemap(&bytes, "pagemap-1.img", 4096).unwrap();
        assert_eq!(m.pages_id, 7);
        let offsets: Vec<(u64, u64, bool)> =
            m.runs.iter().map(|r| (r.vaddr, r.offset, r.lazy)).collect();
        assert_eq!(
            offsets,
            vec![
                (0x1000, 0, true),
                (0x10000, 8192, true),
                (0x20000, 20480, false)
            ]
        );
        assert_eq!(m.size(4096), 6 * 4096);
        assert_eq!(m.find(0x12000, 4096).unwrap().vaddr, 0x10000);
        assert!(m.find(0x13000, 4096).is_none());
        assert!(m.find(0x3000, 4096).is_none());
        // A run whose length overflows is refused.
        let huge = pagemap_as(&[(u64::MAX - 4095, 2)], true);
        assert!(read_pagemap(&huge, "pagemap-1.img", 4096).is_err());
    }

    #[test]
    fn chunks_follow_address_windows_so_new_pages_elsewhere_shift_nothing() {
        let mib = 1u64 << 20;
        // 3 MiB at 0x7f00_0000_0000 (window-aligned): three 1 MiB chunks.
        let base = 0x7f00_0000_0000u64;
        let (id, cuts) = pagemap_cuts(&pagemap(&[(base, 768)]), "pagemap-1.img", 4096).unwrap();
        assert_eq!(id, 7);
        assert_eq!(cuts, vec![mib, mib, mib]);
        let (_, cuts4) =
            pagemap_cuts(&pagemap_as(&[(base, 768)], true), "pagemap-1.img", 4096).unwrap();
        assert_eq!(cuts4, cuts);
        // A page added below shifts every offset in the file; the windows' chunks stay the
        // same, only the first (now merged with the new page) changes.
        let (_, cuts2) =
            pagemap_cuts(&pagemap(&[(0x1000, 1), (base, 768)]), "pagemap-1.img", 4096).unwrap();
        assert_eq!(cuts2, vec![mib + 4096, mib, mib]);
        // Sparse pages: merged until 256 KiB, and no chunk past 2 MiB.
        let sparse: Vec<(u64, u32)> = (0..100).map(|i| (i * mib, 1)).collect();
        let (_, cuts3) = pagemap_cuts(&pagemap(&sparse), "pagemap-1.img", 4096).unwrap();
        assert!(cuts3.iter().all(|c| *c <= 2 * mib), "{cuts3:?}");
        assert_eq!(cuts3.iter().sum::<u64>(), 100 * 4096);
        assert!(
            cuts3[..cuts3.len() - 1].iter().all(|c| *c >= 256 << 10),
            "{cuts3:?}"
        );
    }
}
