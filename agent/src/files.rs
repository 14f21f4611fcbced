//! The job's files inside a checkpoint. A task's open files must be where, and as large as,
//! they were at the dump, or CRIU refuses to restore it; and a task that writes files must find
//! them after moving to a machine that never saw them. So a checkpoint can carry a folder (the
//! job's work folder) as of the dump: regular files as `files/<path>` entries, folders and
//! symbolic links in the manifest.
//!
//! Invariants: item paths are plain relative paths (no `..`, not absolute); no item lies under
//! a symbolic link the checkpoint itself creates; nothing is written before the archive was
//! verified; each file is put in place by a rename, so a reader sees the old file or the new
//! one, never half of one.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Folder of carried files inside the archive.
pub const FILES_DIR: &str = "files";

/// The carried folder as the manifest records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFiles {
    /// The folder as the task saw it.
    pub root: PathBuf,
    /// Everything under it, each folder before what it holds.
    pub items: Vec<FileItem>,
}

/// One file, folder or link of a carried folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileItem {
    /// Relative to the root, `/`-separated.
    pub path: String,
    pub kind: ItemKind,
    /// Permission bits.
    pub mode: u32,
    /// Where a symbolic link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What an item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemKind {
    File,
    Dir,
    Symlink,
}

/// Errors reading or putting back a carried folder.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot read {path} to carry it in the checkpoint: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot put back {path} from the checkpoint: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} was written in place while the checkpoint was being stored, so its copy would not match the task's state; this checkpoint was not kept (the previous one stays); the next one tries again")]
    Changed { path: PathBuf },
    #[error("the checkpoint lists an unsafe file path {0:?} (absolute, `..`, a name the agent reserves, or under a link it creates); refusing to restore its files")]
    Unsafe(String),
    #[error("the checkpoint's file {item:?} would be written through the symbolic link {link} already in the target folder; refusing (nothing outside the folder is written): remove or replace the link, or restore to another folder")]
    ThroughLink { item: String, link: PathBuf },
}

/// The permission bits a carried item gets: setuid, setgid and sticky bits never come from an
/// archive.
pub const MODE_MASK: u32 = 0o777;

/// A folder's listing and, for each regular file, the entry name it gets and where to read it.
pub struct Collected {
    pub files: ManifestFiles,
    pub sources: Vec<(String, PathBuf)>,
}

/// Lists `root` (skipping top-level names in `exclude` and anything named `.cedana-*`).
/// Sockets, pipes and devices are skipped: they cannot be carried.
pub fn collect(root: &Path, exclude: &[&str]) -> Result<Collected, FilesError> {
    let mut out = Collected {
        files: ManifestFiles {
            root: root.to_path_buf(),
            items: Vec::new(),
        },
        sources: Vec::new(),
    };
    walk(root, "", exclude, &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, rel: &str, exclude: &[&str], out: &mut Collected) -> Result<(), FilesError> {
    let rerr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FilesError::Read { path, source }
    };
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(rerr(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(rerr(dir))?;
    names.sort();
    for name in names {
        let name_s = name.to_string_lossy().into_owned();
        if name_s.starts_with(".cedana-") || (rel.is_empty() && exclude.contains(&name_s.as_str()))
        {
            continue;
        }
        let path = dir.join(&name);
        let item_path = if rel.is_empty() {
            name_s
        } else {
            format!("{rel}/{name_s}")
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed while listing (a temporary file of a running task): not part of it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(rerr(&path)(e)),
        };
        let mode = meta.mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.files.items.push(FileItem {
                path: item_path.clone(),
                kind: ItemKind::Dir,
                mode,
                target: None,
            });
            walk(&path, &item_path, exclude, out)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(rerr(&path))?;
            out.files.items.push(FileItem {
                path: item_path,
                kind: ItemKind::Symlink,
                mode,
                target: Some(target.to_string_lossy().into_owned()),
            });
        } else if ft.is_file() {
            out.sources
                .push((format!("{FILES_DIR}/{item_path}"), path.clone()));
            out.files.items.push(FileItem {
                path: item_path,
                kind: ItemKind::File,
                mode,
                target: None,
            });
        } else {
            tracing::debug!(path = %path.display(), "not carried: not a file, folder or link");
        }
    }
    Ok(())
}

/// A carried folder as of a freeze, kept while the task runs on (see [`snapshot`]): which
/// files were linked rather than copied, and how they were then.
#[derive(Debug, Default)]
pub struct Snapshot {
    linked: Vec<(PathBuf, PathBuf, Stamp)>,
    /// Files copied (open for writing, or on another filesystem) and linked.
    pub copied: usize,
    pub linked_count: usize,
}

/// What says a file is unchanged: inode, size and modification time. (Not the change time:
/// linking and unlinking change it. A write changes the modification time: the tree was
/// stopped for CRIU's whole dump, longer than a timestamp's granularity, between its last
/// write before and its first after.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

/// Files smaller than this are copied while the tree is stopped (cheap, and small files are
/// what tasks rewrite without keeping them open: an append per line, a status file).
pub const LINK_FROM: u64 = 1 << 20;

/// Keeps the collected files as they are now, while the tree `pid` is stopped, so that the task
/// may run on while they are archived, and points the sources at what was kept in `dest`:
/// files under [`LINK_FROM`], files the tree has open for writing (or maps shared and
/// writable) and files in `copy` are copied (the kernel's copy, a reflink where the filesystem
/// has them); the others (large files the task only reads: datasets, weights) are hard-linked,
/// instant whatever their size, and [`Snapshot::check`] later tells whether one of them was
/// written in place meanwhile. Where a link cannot be made (another filesystem) the file is
/// copied.
pub fn snapshot(
    c: &mut Collected,
    dest: &Path,
    pid: Option<i32>,
    copy: &[PathBuf],
) -> Result<Snapshot, FilesError> {
    let writing = pid.map(open_for_writing).unwrap_or_default();
    let mut out = Snapshot::default();
    for (i, (_, src)) in c.sources.iter_mut().enumerate() {
        let kept = dest.join(format!("{i}"));
        let rerr = |source| FilesError::Read {
            path: src.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&*src).map_err(rerr)?;
        let must_copy = meta.size() < LINK_FROM
            || writing.contains(&(meta.dev(), meta.ino()))
            || copy.contains(src);
        if !must_copy && std::fs::hard_link(&*src, &kept).is_ok() {
            out.linked
                .push((src.clone(), kept.clone(), Stamp::of(&meta)));
            out.linked_count += 1;
        } else {
            std::fs::copy(&*src, &kept).map_err(rerr)?;
            out.copied += 1;
        }
        *src = kept;
    }
    Ok(out)
}

impl Snapshot {
    /// Fails, naming the file, if a linked file was written in place since [`snapshot`] (its
    /// contents are then not those of the freeze): the checkpoint must not be kept.
    pub fn check(&self) -> Result<(), FilesError> {
        for (src, kept, then) in &self.linked {
            let now = std::fs::symlink_metadata(kept).map(|m| Stamp::of(&m));
            if now.as_ref().ok() != Some(then) {
                return Err(FilesError::Changed { path: src.clone() });
            }
        }
        Ok(())
    }
}

/// (device, inode) of every file the tree under `pid` has open for writing or maps shared and
/// writable.
fn open_for_writing(pid: i32) -> std::collections::HashSet<(u64, u64)> {
    let mut out = std::collections::HashSet::new();
    for p in crate::process::descendants(pid) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let name = fd.file_name();
            let info =
                std::fs::read_to_string(format!("/proc/{p}/fdinfo/{}", name.to_string_lossy()))
                    .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            if flags & 0o3 == 0 {
                continue; // O_RDONLY
            }
            if let Ok(m) = std::fs::metadata(fd.path()) {
                out.insert((m.dev(), m.ino()));
            }
        }
        let maps = std::fs::read_to_string(format!("/proc/{p}/maps")).unwrap_or_default();
        for l in maps.lines() {
            let mut parts = l.split_whitespace();
            let perms = parts.nth(1).unwrap_or("");
            if perms.as_bytes().get(1) == Some(&b'w') && perms.as_bytes().get(3) == Some(&b's') {
                if let Some(path) = l.split_whitespace().nth(5).filter(|p| p.starts_with('/')) {
                    if let Ok(m) = std::fs::metadata(path) {
                        out.insert((m.dev(), m.ino()));
                    }
                }
            }
        }
    }
    out
}

/// Whether a listed path is a plain relative path.
pub fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".cedana-"))
}

/// The first symbolic link among the folders `rel` lies in under `root` (not `rel` itself),
/// if any.
fn link_on_the_way(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Some(at);
        }
    }
    None
}

/// Checks every item path, and that nothing is listed under a link the listing creates.
pub fn check(files: &ManifestFiles) -> Result<(), FilesError> {
    let links: Vec<&str> = files
        .items
        .iter()
        .filter(|i| i.kind == ItemKind::Symlink)
        .map(|i| i.path.as_str())
        .collect();
    for item in &files.items {
        if !safe_path(&item.path)
            || links
                .iter()
                .any(|l| item.path.len() > l.len() && item.path.starts_with(&format!("{l}/")))
            || (item.kind == ItemKind::Symlink && item.target.is_none())
        {
            return Err(FilesError::Unsafe(item.path.clone()));
        }
    }
    Ok(())
}

/// Puts the carried folder back under `root`, from `extracted` (the verified `files/` folder of
/// the archive, on the same filesystem as `root` ideally: files are renamed into place, else
/// copied). Items already there are replaced; other files under `root` are left alone.
pub fn put_back(files: &ManifestFiles, extracted: &Path, root: &Path) -> Result<(), FilesError> {
    check(files)?;
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FilesError::Write { path, source }
    };
    std::fs::create_dir_all(root).map_err(werr(root))?;
    // Nothing is written through a link already in the target (links the listing makes
    // have nothing under them: `check`). Looked at before anything is written.
    for item in &files.items {
        if let Some(link) = link_on_the_way(root, &item.path) {
            return Err(FilesError::ThroughLink {
                item: item.path.clone(),
                link,
            });
        }
    }
    for item in &files.items {
        let dest = root.join(&item.path);
        let existing = std::fs::symlink_metadata(&dest).ok();
        let mode = item.mode & MODE_MASK;
        match item.kind {
            ItemKind::Dir => {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        std::fs::remove_file(&dest).map_err(werr(&dest))?;
                        std::fs::create_dir(&dest).map_err(werr(&dest))?;
                    }
                    None => std::fs::create_dir(&dest).map_err(werr(&dest))?,
                }
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                    .map_err(werr(&dest))?;
            }
            ItemKind::File => {
                if existing.as_ref().is_some_and(|m| m.is_dir()) {
                    std::fs::remove_dir_all(&dest).map_err(werr(&dest))?;
                }
                let src = extracted.join(&item.path);
                std::fs::set_permissions(&src, std::fs::Permissions::from_mode(mode))
                    .map_err(werr(&src))?;
                if std::fs::rename(&src, &dest).is_err() {
                    // Another filesystem: copied next to the destination into a new file
                    // (never through a link: created, not opened), then renamed.
                    let tmp = dest.with_file_name(format!(
                        ".cedana-put-{}-{}",
                        cedana_protocol::random_hex(6).unwrap_or_default(),
                        dest.file_name().unwrap_or_default().to_string_lossy()
                    ));
                    copy_new(&src, &tmp, mode).map_err(werr(&tmp))?;
                    if let Err(e) = std::fs::rename(&tmp, &dest) {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(werr(&dest)(e));
                    }
                }
            }
            ItemKind::Symlink => {
                match existing {
                    Some(m) if m.is_dir() => std::fs::remove_dir_all(&dest).map_err(werr(&dest))?,
                    Some(_) => std::fs::remove_file(&dest).map_err(werr(&dest))?,
                    None => {}
                }
                let target = item.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &dest).map_err(werr(&dest))?;
            }
        }
    }
    Ok(())
}

/// Copies `src` into a new file `to` (which must not exist: no link is followed) with `mode`.
fn copy_new(src: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(to)?;
    let copied = std::io::copy(&mut std::fs::File::open(src)?, &mut out)
        .and_then(|_| out.set_permissions(std::fs::Permissions::from_mode(mode)));
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str, kind: ItemKind, target: Option<&str>) -> FileItem {
        FileItem {
            path: path.into(),
            kind,
            mode: 0o755,
            target: target.map(String::from),
        }
    }

    #[test]
    fn collects_and_puts_back_a_folder() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/data.txt"), "hello").unwrap();
        std::fs::write(src.path().join("top.log"), "1\n2\n").unwrap();
        std::fs::create_dir(src.path().join(".checkpoints")).unwrap();
        std::fs::write(src.path().join(".checkpoints/x.zip"), "zip").unwrap();
        std::os::unix::fs::symlink("a/b/data.txt", src.path().join("link")).unwrap();
        let mut c = collect(src.path(), &[".checkpoints"]).unwrap();
        let paths: Vec<&str> = c.files.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["a", "a/b", "a/b/data.txt", "link", "top.log"]);
        let snap = tempfile::tempdir().unwrap();
        // Small files are copied; large ones linked.
        std::fs::write(
            src.path().join("a/b/data.txt"),
            vec![b'h'; LINK_FROM as usize],
        )
        .unwrap();
        std::fs::write(src.path().join("top.log"), vec![b'1'; LINK_FROM as usize]).unwrap();
        let kept = snapshot(&mut c, snap.path(), None, &[]).unwrap();
        assert_eq!((kept.linked_count, kept.copied), (2, 0));
        // Replaced by a rename (as editors and most writers do): what is carried stays.
        std::fs::write(src.path().join("top.log.new"), "changed").unwrap();
        std::fs::rename(src.path().join("top.log.new"), src.path().join("top.log")).unwrap();
        kept.check().unwrap();
        // Written in place: the check names it.
        std::fs::write(src.path().join("a/b/data.txt"), "HELLO").unwrap();
        let e = kept.check().unwrap_err().to_string();
        assert!(
            e.contains("data.txt") && e.contains("previous one stays"),
            "{e}"
        );
        // Named to be copied (a file seen written in place before): copied, as the small.
        let mut c = collect(src.path(), &[".checkpoints"]).unwrap();
        let snap2 = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("top.log"), vec![b'1'; LINK_FROM as usize]).unwrap();
        let again = snapshot(
            &mut c,
            snap2.path(),
            None,
            &[src.path().join("a/b/data.txt")],
        )
        .unwrap();
        assert_eq!((again.linked_count, again.copied), (1, 1));
        std::fs::write(src.path().join("a/b/data.txt"), "hello").unwrap();
        std::fs::write(src.path().join("top.log"), "1\n2\n").unwrap();
        let mut c = collect(src.path(), &[".checkpoints"]).unwrap();
        let snap = tempfile::tempdir().unwrap();
        snapshot(&mut c, snap.path(), None, &[]).unwrap();
        // Small files were copied: written in place now, what is carried stays.
        std::fs::write(src.path().join("top.log"), "changed").unwrap();

        // What an archive's verified `files/` folder looks like.
        let extracted = tempfile::tempdir().unwrap();
        for (name, from) in &c.sources {
            let to = extracted.path().join(name.strip_prefix("files/").unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(from, to).unwrap();
        }
        let dest = tempfile::tempdir().unwrap();
        std::fs::write(dest.path().join("top.log"), "stale and longer").unwrap();
        std::fs::write(dest.path().join("other"), "kept").unwrap();
        put_back(&c.files, extracted.path(), dest.path()).unwrap();
        let read = |p: &str| std::fs::read_to_string(dest.path().join(p)).unwrap();
        assert_eq!(read("top.log"), "1\n2\n");
        assert_eq!(read("a/b/data.txt"), "hello");
        assert_eq!(read("link"), "hello");
        assert_eq!(read("other"), "kept");
        assert!(!dest.path().join(".checkpoints").exists());
    }

    #[test]
    fn refuses_paths_that_escape() {
        for bad in [
            vec![item("../x", ItemKind::File, None)],
            vec![item("/etc/passwd", ItemKind::File, None)],
            vec![item("a/./b", ItemKind::File, None)],
            vec![
                item("l", ItemKind::Symlink, Some("/etc")),
                item("l/passwd", ItemKind::File, None),
            ],
        ] {
            let files = ManifestFiles {
                root: "/w".into(),
                items: bad.clone(),
            };
            let dest = tempfile::tempdir().unwrap();
            let err = put_back(&files, dest.path(), dest.path()).unwrap_err();
            assert!(matches!(err, FilesError::Unsafe(_)), "{bad:?}: {err}");
            assert_eq!(std::fs::read_dir(dest.path()).unwrap().count(), 0);
        }
    }

    /// Hostile listings (issue 15, item 2): a name the agent reserves, a file written through
    /// a link already in the target, setuid and 07777 modes; also across filesystems, where
    /// files are copied rather than renamed.
    #[test]
    fn hostile_listings_write_nothing_outside_and_no_special_modes() {
        let across = Path::new("/dev/shm").is_dir();
        for cross_fs in [false, across] {
            let extracted = if cross_fs {
                tempfile::tempdir_in("/dev/shm").unwrap()
            } else {
                tempfile::tempdir().unwrap()
            };
            let target = tempfile::tempdir().unwrap();
            let outside = tempfile::tempdir().unwrap();
            let root = target.path().join("work");
            std::fs::create_dir_all(&root).unwrap();
            // A reserved name.
            let reserved = ManifestFiles {
                root: root.clone(),
                items: vec![item(".cedana-put-x", ItemKind::Symlink, Some("/etc"))],
            };
            assert!(matches!(
                put_back(&reserved, extracted.path(), &root),
                Err(FilesError::Unsafe(_))
            ));
            // A link already in the target, pointing outside.
            std::os::unix::fs::symlink(outside.path(), root.join("logs")).unwrap();
            std::fs::write(extracted.path().join("x"), "evil").unwrap();
            std::fs::create_dir_all(extracted.path().join("logs")).unwrap();
            std::fs::write(extracted.path().join("logs/planted"), "evil").unwrap();
            let through = ManifestFiles {
                root: root.clone(),
                items: vec![
                    item("x", ItemKind::File, None),
                    item("logs/planted", ItemKind::File, None),
                ],
            };
            let err = put_back(&through, extracted.path(), &root).unwrap_err();
            assert!(matches!(err, FilesError::ThroughLink { .. }), "{err}");
            assert!(!outside.path().join("planted").exists(), "written outside");
            assert!(
                !root.join("x").exists(),
                "something was written before the refusal"
            );
            std::fs::remove_file(root.join("logs")).unwrap();
            // Modes are masked.
            std::fs::write(extracted.path().join("suid"), "s").unwrap();
            let mut f = item("suid", ItemKind::File, None);
            f.mode = 0o4755;
            let mut d = item("open", ItemKind::Dir, None);
            d.mode = 0o7777;
            let modes = ManifestFiles {
                root: root.clone(),
                items: vec![d, f],
            };
            put_back(&modes, extracted.path(), &root).unwrap();
            let m = |p: &str| {
                std::fs::metadata(root.join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!(m("suid"), 0o755, "cross_fs {cross_fs}");
            assert_eq!(m("open"), 0o777, "cross_fs {cross_fs}");
            assert!(std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".cedana-put-")));
        }
    }
}
