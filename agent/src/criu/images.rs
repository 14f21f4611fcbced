//! Reading and writing the few CRIU image files the agent looks into.
//!
//! An image file is a magic header (CRIU's common magic, then the image's own magic) followed by
//! entries, each a little-endian `u32` length and that many bytes of protobuf.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};

use super::proto::{CpuinfoEntry, CpuinfoX86Entry, PstreeEntry};

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
