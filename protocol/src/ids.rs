//! Ids: job and worker ids, object names, chunks ids, and the randomness they are made of.

use std::io::Read;

/// Whether a job or worker id is usable in a subject and a KV key.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A name safe in file names and ids: keeps `[A-Za-z0-9._-]`, replaces the rest with `_`,
/// drops leading dots (`process` when nothing is left).
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "process".into()
    } else {
        s
    }
}

/// Whether a chunks id ([`crate::Command::Checkpoint`], [`crate::Command::Prefetch`]) is usable as the last
/// token of `$O.<bucket>.C.<id>`: 16 to 64 ASCII letters and digits (a NUID has 22).
pub fn valid_chunks_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// 22 random letters and digits, as a NUID looks: a new chunks id (see [`valid_chunks_id`]).
pub fn new_chunks_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut raw = [0u8; 22];
    if random_bytes(&mut raw).is_err() {
        // Unique enough without randomness: time and PID.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = t ^ ((std::process::id() as u128) << 64);
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (seed >> ((i * 5) % 120)) as u8;
        }
    }
    raw.iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Where [`random_bytes`] reads from.
pub const RANDOM_SOURCE: &str = "/dev/urandom";

/// Fills `buf` with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open(RANDOM_SOURCE)?.read_exact(buf)
}

/// `n` random bytes from the kernel, hex-encoded (tokens, ids).
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut b = vec![0u8; n];
    random_bytes(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether one `/`-separated part of a checkpoint object name is usable (an id, or an archive
/// file name: letters, digits, `-`, `_`, `.`, not starting with a dot).
pub fn valid_object_part(part: &str) -> bool {
    !part.is_empty()
        && !part.starts_with('.')
        && part.len() <= 200
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_fit_subjects() {
        assert!(valid_id("job-1_a"));
        assert!(!valid_id("a.b") && !valid_id("a*") && !valid_id("") && !valid_id("a b"));
    }

    #[test]
    fn random_ids_look_as_documented() {
        let a = new_chunks_id();
        assert!(valid_chunks_id(&a), "{a}");
        assert_ne!(a, new_chunks_id());
        let h = random_hex(3).unwrap();
        assert_eq!(h.len(), 6);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()), "{h}");
    }
}
