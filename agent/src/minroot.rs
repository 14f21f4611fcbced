//! A minimal mount tree: what a task of `exec --userns` runs in, and what CRIU restores such a
//! task from.
//!
//! A new mount namespace (owned by the caller's user namespace, root's) holding only the root
//! filesystem, `/dev`, `/proc`, the mounts the task's folders are on (a worker's folder
//! bind-mounted on the job's work path) and, for a task, a fresh tmpfs on `/dev/shm`; each
//! bound without what is mounted under it, then pivoted into. A user namespace made after it
//! finds nothing to unmount and nothing overmounted, which CRIU's mount restore needs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The mount point of the mount `path` is on (the deepest one above it in this process's
/// mount namespace), from `/proc/self/mountinfo`.
pub fn mount_point_of(path: &Path) -> Option<PathBuf> {
    mounts_above(path).pop()
}

/// The mount points above `path` in this process's mount namespace, `/` first, `path`'s own
/// mount last.
fn mounts_above(path: &Path) -> Vec<PathBuf> {
    let Ok(path) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut above: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .filter(|m| path.starts_with(m))
        .collect();
    sort_outermost_first(&mut above);
    above
}

/// Sorts mount points outermost first (a mount before those under it), each once.
fn sort_outermost_first(v: &mut Vec<PathBuf>) {
    v.sort_by(|a, b| {
        (a.components().count(), a.as_os_str()).cmp(&(b.components().count(), b.as_os_str()))
    });
    v.dedup();
}

/// A mountinfo field with its `\ooo` escapes (space, tab, newline, backslash) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts every minimal tree binds.
const ALWAYS: [&str; 3] = ["/", "/dev", "/proc"];

/// The mounts of process `pid`'s minimal tree besides the ones every such tree binds (`/`,
/// `/dev`, `/proc`): the folders `exec` bound, outermost first. Those are the task's mounts
/// that are this process's mount at the same path (same device, same root); mounts the task
/// made itself (its fresh `/dev/shm` too) are not.
pub fn extra_mounts_of(pid: i32) -> Vec<PathBuf> {
    let read = |p: &str| -> Vec<(PathBuf, String, String)> {
        std::fs::read_to_string(format!("/proc/{p}/mountinfo"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                Some((
                    PathBuf::from(unescape(f.get(4)?)),
                    f.get(2)?.to_string(),
                    unescape(f.get(3)?),
                ))
            })
            .collect()
    };
    let ours = read("self");
    let mut out: Vec<PathBuf> = read(&pid.to_string())
        .into_iter()
        .filter(|m| !ALWAYS.contains(&m.0.to_str().unwrap_or("")) && ours.contains(m))
        .map(|(m, _, _)| m)
        .collect();
    sort_outermost_first(&mut out);
    out
}

/// The mounts besides `/` that `paths` are on, with every mount above them (so that each
/// has a folder to go on in a tree bound without what is under it), once each, outermost
/// first.
pub fn extra_mounts<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = paths
        .into_iter()
        .flat_map(mounts_above)
        .filter(|m| !ALWAYS.contains(&m.to_str().unwrap_or("")))
        .collect();
    sort_outermost_first(&mut out);
    out
}

/// A minimal mount tree: the folder it is built on (removed on drop) and its [`Plan`].
pub struct MinimalRoot {
    yard: tempfile::TempDir,
    plan: Plan,
}

/// Every path of a minimal tree, made before the fork (no allocation after it), for
/// [`Plan::enter`] in the forked child.
#[derive(Clone, Debug)]
pub struct Plan {
    root: CString,
    /// (source in the current tree, target under the new root), in mount order.
    binds: Vec<(CString, CString)>,
    /// Where a fresh tmpfs goes (the new root's `/dev/shm`), for a task.
    shm: Option<CString>,
}

impl MinimalRoot {
    /// A tree with `/`, `/dev`, `/proc` and `extra` (mount points, outermost first), and a
    /// fresh `/dev/shm` if `fresh_shm`. The folder it is built on is removed on drop.
    pub fn new(extra: &[PathBuf], fresh_shm: bool) -> std::io::Result<Self> {
        // What agents killed while they built one (or CRIU restored under them) left: ours
        // in the temporary folder, CRIU's in /tmp.
        let tmp = std::env::temp_dir();
        crate::staging::sweep_yards(&tmp, crate::staging::YARD_AGE);
        if tmp != Path::new("/tmp") {
            crate::staging::sweep_yards(Path::new("/tmp"), crate::staging::YARD_AGE);
        }
        let yard = tempfile::Builder::new().prefix(".cedana-root-").tempdir()?;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
        };
        let under = |p: &Path| yard.path().join(p.strip_prefix("/").unwrap_or(p));
        let mut binds = Vec::new();
        for p in [Path::new("/"), Path::new("/dev"), Path::new("/proc")]
            .into_iter()
            .chain(extra.iter().map(PathBuf::as_path))
        {
            binds.push((c(p)?, c(&under(p))?));
        }
        let shm = match fresh_shm {
            true => Some(c(&under(Path::new("/dev/shm")))?),
            false => None,
        };
        Ok(MinimalRoot {
            plan: Plan {
                root: c(yard.path())?,
                binds,
                shm,
            },
            yard,
        })
    }

    /// The folder the tree is built on.
    pub fn yard(&self) -> &Path {
        self.yard.path()
    }

    /// What the forked child enters.
    pub fn plan(&self) -> Plan {
        self.plan.clone()
    }
}

impl Plan {
    /// Makes this process's mount namespace the minimal tree: a new one, private, with only
    /// the bound mounts, pivoted into, the rest detached. Returns which step failed.
    ///
    /// # Safety
    /// For a forked child before exec: only async-signal-safe system calls on what [`Self::new`]
    /// made.
    pub unsafe fn enter(&self) -> Result<(), &'static str> {
        let null = std::ptr::null::<libc::c_char>();
        let none = std::ptr::null::<libc::c_void>();
        // SAFETY: raw system calls on NUL-terminated strings made before the fork.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err("unshare(CLONE_NEWNS)");
            }
            if libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                none,
            ) != 0
            {
                return Err("making the mounts private");
            }
            for (from, to) in &self.binds {
                if libc::mount(from.as_ptr(), to.as_ptr(), null, libc::MS_BIND, none) != 0 {
                    return Err("bind-mounting /, /dev, /proc and the task's folders");
                }
            }
            if let Some(shm) = &self.shm {
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    shm.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=1777".as_ptr().cast(),
                ) != 0
                {
                    return Err("mounting a fresh /dev/shm");
                }
            }
            if libc::chdir(self.root.as_ptr()) != 0
                || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
                || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
                || libc::chdir(c"/".as_ptr()) != 0
            {
                return Err("pivot_root into the new root");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_the_mount_of_a_plain_folder_and_escapes_are_undone() {
        assert_eq!(mount_point_of(Path::new("/")), Some(PathBuf::from("/")));
        assert_eq!(
            mount_point_of(Path::new("/proc/self")),
            Some(PathBuf::from("/proc"))
        );
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(
            extra_mounts([
                Path::new("/proc/self"),
                Path::new("/dev/shm"),
                Path::new("/dev/shm")
            ]),
            [PathBuf::from("/dev/shm")],
            "what every tree binds is left out, and each mount comes once"
        );
    }
}
