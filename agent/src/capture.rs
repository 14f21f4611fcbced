//! CRIU's page images straight into the archive, written once.
//!
//! Before CRIU dumps, the staging folder gets a FIFO under each name CRIU will give its page
//! images (`pages-1.img`, `pages-2.img`, … one per process and shared memory segment, numbered
//! from 1), each opened for reading by the agent. CRIU opens its images by name and splices the
//! pages from its page pipes into them, so a page image goes from the task's memory into the
//! pipe and on into the archive file with one copy, the one raw CRIU makes into its own image
//! file: [`crate::archive::Writer::add_from_fifo`] splices each FIFO into a stored entry as CRIU
//! writes it, while another thread reads the entry back from the page cache for its checksums.
//! Images CRIU writes beyond the FIFOs made (a larger tree than seen) are regular files and go
//! into the archive afterwards, as every other image does.
//!
//! CRIU writes one page image at a time, so the FIFOs are taken in the order CRIU starts them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;

/// The most FIFOs made for one dump.
pub const MAX_FIFOS: usize = 4096;
/// The pipe size asked for each FIFO (the kernel's default is 64 KiB).
const PIPE_SIZE: i32 = 1 << 20;

/// FIFOs for CRIU's page images, open for reading; removed when dropped.
pub struct Fifos {
    made: Vec<PathBuf>,
    open: Vec<(String, OwnedFd)>,
}

impl Fifos {
    /// FIFOs `pages-1.img` to `pages-<n>.img` in `dir` (at most [`MAX_FIFOS`]).
    pub fn make(dir: &Path, n: usize) -> nix::Result<Fifos> {
        let mut fifos = Fifos {
            made: Vec::new(),
            open: Vec::new(),
        };
        for id in 1..=n.clamp(1, MAX_FIFOS) {
            let name = format!("pages-{id}.img");
            let path = dir.join(&name);
            nix::unistd::mkfifo(&path, Mode::S_IRUSR | Mode::S_IWUSR)?;
            fifos.made.push(path.clone());
            let fd = open(
                &path,
                OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            // A larger pipe means fewer wake-ups; the default works too.
            let _ = fcntl(&fd, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
            fifos.open.push((name, fd));
        }
        Ok(fifos)
    }

    /// Hands each FIFO CRIU writes to `each` (its image name and read end), in the order CRIU
    /// starts them, until `done()` (CRIU has finished) and nothing is left in any of them.
    pub fn follow<E>(
        &mut self,
        done: &dyn Fn() -> bool,
        mut each: impl FnMut(&str, BorrowedFd<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        loop {
            // Read before looking: once CRIU is done, whatever it wrote is already there.
            let finished = done();
            let ready = {
                let mut fds: Vec<PollFd> = self
                    .open
                    .iter()
                    .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                    .collect();
                let wait = if finished { 0u16 } else { 20 };
                match poll(&mut fds, PollTimeout::from(wait)) {
                    Ok(_) => fds.iter().position(|p| {
                        p.revents()
                            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
                    }),
                    Err(_) => None,
                }
            };
            match ready {
                Some(i) => {
                    // A writer came (and maybe went): this image is CRIU's now.
                    let (name, fd) = self.open.remove(i);
                    each(&name, fd.as_fd())?;
                }
                None if finished => return Ok(()),
                None => {}
            }
        }
    }
}

impl Drop for Fifos {
    fn drop(&mut self) {
        self.open.clear();
        for path in &self.made {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn writers_are_followed_in_the_order_they_start_and_unused_fifos_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut fifos = Fifos::make(dir.path(), 3).unwrap();
        // Two writers, the second first, each closing before the next (as CRIU does); the
        // third FIFO is never opened.
        let d = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            for (id, text) in [(2, "second"), (1, "first")] {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join(format!("pages-{id}.img")))
                    .unwrap();
                f.write_all(text.as_bytes()).unwrap();
                drop(f);
                // Taken before the next starts (the follower looks every 20 ms).
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        });
        let finished = std::sync::atomic::AtomicBool::new(false);
        let mut seen = Vec::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                writer.join().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            fifos
                .follow(
                    &|| finished.load(std::sync::atomic::Ordering::SeqCst),
                    |name, fd| -> Result<(), std::io::Error> {
                        let mut text = Vec::new();
                        let mut f = std::fs::File::from(fd.try_clone_to_owned()?);
                        loop {
                            let mut b = [0u8; 64];
                            match std::io::Read::read(&mut f, &mut b) {
                                Ok(0) => break,
                                Ok(n) => text.extend_from_slice(&b[..n]),
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                    std::thread::sleep(std::time::Duration::from_millis(5))
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        seen.push((name.to_string(), String::from_utf8(text).unwrap()));
                        Ok(())
                    },
                )
                .unwrap();
        });
        assert_eq!(
            seen,
            [
                ("pages-2.img".to_string(), "second".to_string()),
                ("pages-1.img".to_string(), "first".to_string())
            ]
        );
        drop(fifos);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
