//! `exec`: start a task the way CRIU likes it: PID 1 of its own PID namespace, leader of its own
//! session, stdin from `/dev/null`, stdout and stderr to a log file. Such a task can be dumped
//! and restored on a machine where its PIDs are taken, and restored several times side by side.

use std::ffi::{CString, OsString};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::unistd::Pid;

/// What to start and where its output goes.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The task's stdout and stderr (appended to); created if missing.
    pub log: PathBuf,
    /// Working directory; the caller's when `None`.
    pub cwd: Option<PathBuf>,
}

/// Errors starting a task.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("argument {arg:?} contains a NUL byte")]
    Nul { arg: String },
    #[error("cannot create a PID namespace for {program}: {source}; exec needs root (CAP_SYS_ADMIN), try sudo")]
    Clone { program: String, source: nix::Error },
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
}

/// Starts the task and returns its PID (in this machine's PID namespace). The task is not
/// waited for: it outlives the caller, reparented to init (or the nearest subreaper).
pub fn spawn(opts: &ExecOptions) -> Result<Pid, ExecError> {
    let program_name = opts.program.to_string_lossy().into_owned();
    let cstr = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).map_err(|_| ExecError::Nul {
            arg: s.to_string_lossy().into(),
        })
    };
    let program = cstr(&opts.program)?;
    let mut argv = vec![program.clone()];
    for a in &opts.args {
        argv.push(cstr(a)?);
    }
    let cwd = opts
        .cwd
        .as_deref()
        .map(|c| cstr(c.as_os_str()))
        .transpose()?;
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&opts.log)
        .map_err(|source| ExecError::Log {
            path: opts.log.clone(),
            source,
        })?;
    let devnull = OpenOptions::new()
        .read(true)
        .open("/dev/null")
        .map_err(|source| ExecError::Start {
            program: program_name.clone(),
            source,
        })?;
    // The child reports a failed exec through this pipe; it closes on a successful exec.
    let (err_r, err_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ExecError::Start {
            program: program_name.clone(),
            source: e.into(),
        })?;
    let (log_fd, null_fd, err_fd) = (log.as_raw_fd(), devnull.as_raw_fd(), err_w.as_raw_fd());
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());

    let mut stack = vec![0u8; 256 * 1024];
    let child = move || -> isize {
        // Only async-signal-safe calls from here to exec: this runs in a forked copy.
        // SAFETY: the descriptors and `ptrs` (NUL-terminated strings kept alive by `argv`,
        // ending in a null pointer) were made before the clone and are valid in the copy; only
        // async-signal-safe libc calls follow, and the function never returns to Rust code
        // that could touch state another thread held at the clone.
        unsafe {
            libc::setsid();
            libc::dup2(null_fd, 0);
            libc::dup2(log_fd, 1);
            libc::dup2(log_fd, 2);
            // Nothing else this process holds reaches the task: a leaked descriptor would be
            // part of every checkpoint (and may not be restorable elsewhere).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 1u32 << 2);
            if let Some(c) = &cwd {
                if libc::chdir(c.as_ptr()) != 0 {
                    report(err_fd, b'c');
                    libc::_exit(127);
                }
            }
            libc::execvp(program.as_ptr(), ptrs.as_ptr());
            report(err_fd, b'e');
            libc::_exit(127)
        }
    };
    // SAFETY: the child runs only async-signal-safe code (see above) and gets its own copy of
    // memory (no CLONE_VM), so the stack buffer may be freed by the parent afterwards.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(child),
            &mut stack,
            CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC,
            Some(nix::sys::signal::Signal::SIGCHLD as i32),
        )
    }
    .map_err(|source| ExecError::Clone {
        program: program_name.clone(),
        source,
    })?;
    drop(err_w);
    let mut msg = Vec::new();
    let _ = std::fs::File::from(err_r).read_to_end(&mut msg);
    if msg.is_empty() {
        return Ok(pid);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    let errno = if msg.len() >= 5 {
        i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]])
    } else {
        0
    };
    let source = std::io::Error::from_raw_os_error(errno);
    let program = match msg[0] {
        b'c' => format!(
            "{program_name} (in {})",
            opts.cwd.as_deref().unwrap_or(Path::new("?")).display()
        ),
        _ => program_name,
    };
    Err(ExecError::Start { program, source })
}

/// Writes a tag byte and `errno` to the error pipe (async-signal-safe).
///
/// # Safety
/// Called in the forked child before exec; `fd` is the pipe's write end.
unsafe fn report(fd: i32, tag: u8) {
    // SAFETY: `__errno_location` returns this thread's errno slot, always valid to read.
    let e = unsafe { *libc::__errno_location() };
    let mut b = [0u8; 5];
    b[0] = tag;
    b[1..].copy_from_slice(&e.to_ne_bytes());
    // SAFETY: `b` is a live buffer of `b.len()` bytes; a failed write is nothing to act on.
    unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}
