//! One chunk: its name ([`ChunkId`], the BLAKE3 of its bytes), how it is sealed for the store
//! (a zstd frame) and opened again (decompressed within its declared size, then checked against
//! its name).

use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};

/// The largest chunk this crate makes or reads. A manifest that declares a larger one is
/// refused before anything is fetched, so a hostile manifest cannot make a reader allocate
/// without bound.
pub const MAX_CHUNK: u64 = 8 << 20;

/// A chunk's name: the BLAKE3 hash of its uncompressed bytes, 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// The name of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    /// Parses 64 lowercase hex digits; anything else (a path, upper case) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)? as u8;
            let lo = (pair[1] as char).to_digit(16)? as u8;
            out[i] = hi << 4 | lo;
        }
        Some(ChunkId(out))
    }

    /// The stand-in a manifest published before all its chunks are named (post-copy) gives
    /// chunk `index` of entry `entry`: 24 bytes of 0xff, then the two indexes. A writer
    /// publishes the names later ([`crate::transfer::name_rest`]); a reader waits for them
    /// and never fetches a stand-in. (A BLAKE3 hash starting with 24 0xff bytes: 2^-192.)
    pub fn unnamed(entry: u32, index: u32) -> Self {
        let mut b = [0xffu8; 32];
        b[24..28].copy_from_slice(&entry.to_be_bytes());
        b[28..32].copy_from_slice(&index.to_be_bytes());
        ChunkId(b)
    }

    /// The entry's and chunk's indexes of a stand-in ([`ChunkId::unnamed`]), else `None`.
    pub fn unnamed_at(&self) -> Option<(u32, u32)> {
        if self.0[..24].iter().any(|b| *b != 0xff) {
            return None;
        }
        let entry = u32::from_be_bytes(self.0[24..28].try_into().expect("4 bytes"));
        let index = u32::from_be_bytes(self.0[28..32].try_into().expect("4 bytes"));
        Some((entry, index))
    }

    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.hex()[..12])
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkId::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not a chunk name (64 hex digits)"))
        })
    }
}

/// One chunk of a file, as a manifest lists it: its name and its uncompressed size. A file's
/// chunks, in order, are its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub size: u64,
}

/// A chunk sealed for the store: the zstd frame of `raw` at `level`, and its name.
pub fn seal(raw: &[u8], level: i32) -> (ChunkId, Vec<u8>) {
    (ChunkId::of(raw), seal_named(raw, level))
}

/// [`seal`] for a chunk already named: the zstd frame only.
pub fn seal_named(raw: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(raw, level).expect("zstd compresses into memory")
}

/// Why a stored chunk was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("it does not decompress: {0}")]
    Zstd(std::io::Error),
    #[error("it decompresses to {actual} bytes, the manifest says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("its bytes hash to {actual}, not to its name")]
    Hash { actual: ChunkId },
}

/// Opens a sealed chunk that the manifest lists as `expected`: decompressed to at most its
/// declared size (a frame that expands further is refused without being expanded), and
/// checked against its name.
pub fn open(expected: &ChunkRef, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    let limit = expected.size.min(MAX_CHUNK) as usize;
    // One call into zstd (a frame that would expand past the declared size is an error, not
    // an allocation); a frame that declares no size is read as a stream, held to the same.
    let out = match zstd::bulk::decompress(sealed, limit) {
        Ok(out) => out,
        Err(_) => {
            let mut out = Vec::with_capacity(limit);
            let decoder =
                zstd::stream::read::Decoder::with_buffer(sealed).map_err(OpenError::Zstd)?;
            decoder
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(OpenError::Zstd)?;
            out
        }
    };
    if out.len() as u64 != expected.size {
        return Err(OpenError::Size {
            expected: expected.size,
            actual: out.len() as u64,
        });
    }
    let actual = ChunkId::of(&out);
    if actual != expected.id {
        return Err(OpenError::Hash { actual });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_refuse_what_is_not_a_hash() {
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::parse(&id.hex()), Some(id));
        assert_eq!(
            id.hex(),
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        assert!(ChunkId::parse(&id.hex().to_uppercase()).is_none());
        assert!(ChunkId::parse("../../etc/passwd").is_none());
        assert!(ChunkId::parse(&id.hex()[..63]).is_none());
    }

    #[test]
    fn a_stand_in_tells_its_place_and_a_name_is_no_stand_in() {
        let u = ChunkId::unnamed(3, 70_000);
        assert_eq!(u.unnamed_at(), Some((3, 70_000)));
        assert_eq!(ChunkId::parse(&u.hex()), Some(u));
        assert_eq!(ChunkId::of(b"hello").unnamed_at(), None);
        assert_ne!(ChunkId::unnamed(0, 1), ChunkId::unnamed(1, 0));
    }

    #[test]
    fn a_sealed_chunk_opens_and_a_wrong_one_does_not() {
        let raw = vec![7u8; 100_000];
        let (id, sealed) = seal(&raw, 1);
        assert!(sealed.len() < 1000);
        let r = ChunkRef {
            id,
            size: raw.len() as u64,
        };
        assert_eq!(open(&r, &sealed).unwrap(), raw);
        // Another chunk's bytes under this name.
        let (_, other) = seal(&vec![8u8; 100_000], 1);
        assert!(matches!(open(&r, &other), Err(OpenError::Hash { .. })));
        // A frame that expands past its declared size is cut off there.
        let short = ChunkRef { id, size: 10 };
        assert!(matches!(
            open(&short, &sealed),
            Err(OpenError::Size { actual: 11, .. })
        ));
        // Damaged bytes.
        let mut bad = sealed.clone();
        bad.truncate(bad.len() / 2);
        assert!(open(&r, &bad).is_err());
    }
}
