//! `exec`: start a task the way CRIU likes it: PID 1 of its own PID namespace, leader of its own
//! session, stdin from `/dev/null`, stdout and stderr to a log file. Such a task can be dumped
//! and restored on a machine where its PIDs are taken, and restored several times side by side.
//!
//! With [`ExecOptions::userns`] the task also gets a user namespace (an identity map of every
//! id, owned by root) and a mount tree of its own: only the root filesystem, `/dev`, `/proc`
//! and a fresh `/dev/shm`. A task that drops root (`setpriv`, `su`, a database switching to
//! its own user) can then be checkpointed where CRIU lacks `CAP_SYS_RESOURCE` (a container):
//! root owns the task's user namespace, so CRIU holds every capability in it. Such a task's
//! checkpoint records it, and its restore runs CRIU in the same minimal mount tree
//! ([`crate::criu`]).

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
    /// A user namespace and a minimal mount tree of its own (see the module's docs).
    pub userns: bool,
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
    #[error("{path} is under /dev or /proc, which a task with its own user namespace (--userns) gets fresh or bound whole; put its log and working folder elsewhere")]
    UsernsFolder { path: PathBuf },
    #[error("cannot give {program} its own user namespace and mount tree ({step}): {source}")]
    Userns {
        program: String,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
}

/// Starts the task and returns its PID (in this machine's PID namespace). The task is not
/// waited for: it outlives the caller, reparented to init (or the nearest subreaper).
pub fn spawn(opts: &ExecOptions) -> Result<Pid, ExecError> {
    if opts.userns {
        return spawn_userns(opts);
    }
    let p = Prepared::new(opts)?;
    let program_name = p.name.clone();
    let (program, argv, cwd) = (&p.program, &p.argv, &p.cwd);
    let (log, devnull) = (&p.log, &p.devnull);
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

/// What both ways of starting a task prepare: the program, its argv (NUL-terminated pointers
/// into `argv`), its working directory, its log and `/dev/null`.
struct Prepared {
    name: String,
    program: CString,
    argv: Vec<CString>,
    cwd: Option<CString>,
    log: std::fs::File,
    devnull: std::fs::File,
}

impl Prepared {
    fn new(opts: &ExecOptions) -> Result<Self, ExecError> {
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
        let name = opts.program.to_string_lossy().into_owned();
        let devnull = OpenOptions::new()
            .read(true)
            .open("/dev/null")
            .map_err(|source| ExecError::Start {
                program: name.clone(),
                source,
            })?;
        Ok(Prepared {
            name,
            program,
            argv,
            cwd,
            log,
            devnull,
        })
    }
}

/// The identity map of the ids this process has (`/proc/self/uid_map` or `gid_map`: each
/// range it sees, mapped to itself), written into the task's user namespace: every id where
/// the agent runs in the machine's own namespace, only its own ranges in a container's.
fn identity_map(file: &str) -> std::io::Result<String> {
    let ours = std::fs::read_to_string(format!("/proc/self/{file}"))?;
    let map: String = ours
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (inside, _, count) = (f.next()?, f.next()?, f.next()?);
            Some(format!("{inside} {inside} {count}\n"))
        })
        .collect();
    match map.is_empty() {
        true => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/self/{file} maps no ids"),
        )),
        false => Ok(map),
    }
}

/// [`spawn`] with a user namespace and a minimal mount tree of its own.
///
/// A helper process (forked here) makes a mount namespace (still root's), bind-mounts `/`,
/// `/dev` and `/proc` (and a fresh tmpfs on `/dev/shm`) onto a folder, pivots into it and drops
/// the rest; then makes the user namespace, which this process maps (identity, every id);
/// then PID, mount and IPC namespaces owned by it, and forks the task as their PID 1: it
/// mounts its own `/proc` and execs. The helper reports the task's PID and exits; the task is
/// reparented as with [`spawn`].
fn spawn_userns(opts: &ExecOptions) -> Result<Pid, ExecError> {
    use std::io::Write as _;
    let program_name = opts.program.to_string_lossy().into_owned();
    let step_err = |step: &'static str| {
        let name = program_name.clone();
        move |source: std::io::Error| ExecError::Userns {
            program: name,
            step,
            source,
        }
    };
    // Its folder (the caller's when none is given) and log, absolute: the task starts in a
    // tree where nothing else resolves them.
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let cwd_dir = match &opts.cwd {
        Some(c) => abs(c),
        None => std::env::current_dir().map_err(step_err("the current folder"))?,
    };
    let log_file = abs(&opts.log);
    let maps = [identity_map("uid_map"), identity_map("gid_map")];
    let maps = match maps {
        [Ok(u), Ok(g)] => (u, g),
        [Err(e), _] | [_, Err(e)] => return Err(step_err("reading this process's id maps")(e)),
    };
    // The task's mount tree: /, /dev, /proc, the mounts its folder and log are on (and the
    // mounts above them), a fresh /dev/shm.
    let log_dir = log_file.parent().unwrap_or(Path::new("/"));
    let extra = crate::minroot::extra_mounts([log_dir, cwd_dir.as_path()]);
    // Its /dev/shm is a fresh one and /dev and /proc are bound whole: folders there would
    // not be the caller's.
    for path in [&log_file, &cwd_dir] {
        if path.starts_with("/dev") || path.starts_with("/proc") {
            return Err(ExecError::UsernsFolder { path: path.clone() });
        }
    }
    let p = Prepared::new(opts)?;
    let tree = crate::minroot::MinimalRoot::new(&extra, true)
        .map_err(step_err("a folder for the new root"))?;
    let plan = tree.plan();
    let c = |p: PathBuf| CString::new(p.into_os_string().into_vec()).expect("no NUL in a path");
    use std::os::unix::ffi::OsStringExt;
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| step_err("a pipe")(e.into()))
    };
    // helper -> here: "user namespace made" (1 byte), then the task's PID (4 bytes).
    let (up_r, up_w) = pipe()?;
    // here -> helper: "ids mapped".
    let (go_r, go_w) = pipe()?;
    // helper or task -> here: a failed step (tag and errno); closes on the task's exec.
    let (err_r, err_w) = pipe()?;
    // The task opens its log and /dev/null itself, in its own mount tree: descriptors opened
    // here would be on mounts it does not have, which CRIU cannot dump.
    let log_path = c(log_file);
    let cwd = c(cwd_dir);
    let (up_fd, go_fd, err_fd) = (up_w.as_raw_fd(), go_r.as_raw_fd(), err_w.as_raw_fd());
    // This process's ends, which the helper closes (it must see end-of-file when this
    // process gives up, and hold nothing that keeps this process waiting).
    let ours = [up_r.as_raw_fd(), go_w.as_raw_fd(), err_r.as_raw_fd()];
    let mut ptrs: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let program = &p.program;

    let mut stack = vec![0u8; 256 * 1024];
    let helper = move || -> isize {
        // SAFETY: as in `spawn`: a forked copy running only async-signal-safe calls (raw
        // system calls) on strings and descriptors made before the fork; it never returns to
        // Rust code another thread could have held state for.
        unsafe {
            let fail = |tag: u8| -> isize {
                report(err_fd, tag);
                libc::_exit(126)
            };
            for fd in ours {
                libc::close(fd);
            }
            if plan.enter().is_err() {
                return fail(b'm');
            }
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return fail(b'u');
            }
            let one = [1u8];
            let mut got = [0u8];
            if libc::write(up_fd, one.as_ptr().cast(), 1) != 1
                || libc::read(go_fd, got.as_mut_ptr().cast(), 1) != 1
            {
                libc::_exit(126);
            }
            if libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC) != 0 {
                return fail(b'q');
            }
            // A raw fork: glibc's `fork` would run its handlers and take the allocator's locks,
            // which a thread of the process this was cloned from may have held.
            let task = libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            );
            if task < 0 {
                return fail(b'f');
            }
            if task == 0 {
                libc::setsid();
                if libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) != 0
                {
                    return fail(b'r');
                }
                let null_fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                let log_fd = libc::open(
                    log_path.as_ptr(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
                    0o640,
                );
                if null_fd < 0 || log_fd < 0 {
                    return fail(b'o');
                }
                libc::dup2(null_fd, 0);
                libc::dup2(log_fd, 1);
                libc::dup2(log_fd, 2);
                // Nothing else this process holds reaches the task (closed on exec, the
                // error pipe too).
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 1u32 << 2);
                if libc::chdir(cwd.as_ptr()) != 0 {
                    return fail(b'c');
                }
                libc::execvp(program.as_ptr(), ptrs.as_ptr());
                return fail(b'e');
            }
            let pid = (task as i32).to_ne_bytes();
            libc::write(up_fd, pid.as_ptr().cast(), 4);
            libc::_exit(0)
        }
    };
    // SAFETY: the helper runs only async-signal-safe code (see above) in its own copy of
    // memory (no CLONE_VM).
    let helper_pid = unsafe {
        nix::sched::clone(
            Box::new(helper),
            &mut stack,
            CloneFlags::empty(),
            Some(nix::sys::signal::Signal::SIGCHLD as i32),
        )
    }
    .map_err(|e| step_err("forking a helper")(e.into()))?;
    drop((up_w, go_r, err_w));
    let mut up = std::fs::File::from(up_r);
    let mut go = std::fs::File::from(go_w);
    let finish = |result: Result<Pid, ExecError>| {
        let _ = nix::sys::wait::waitpid(helper_pid, None);
        result
    };
    let mut byte = [0u8];
    let mapped = up.read_exact(&mut byte).and_then(|()| {
        for (file, map) in [("uid_map", &maps.0), ("gid_map", &maps.1)] {
            OpenOptions::new()
                .write(true)
                .open(format!("/proc/{helper_pid}/{file}"))
                .and_then(|mut f| f.write_all(map.as_bytes()))?;
        }
        go.write_all(&[1])
    });
    drop(go);
    let mut pid = [0u8; 4];
    let started = mapped.and_then(|()| up.read_exact(&mut pid));
    let mut msg = Vec::new();
    let _ = std::fs::File::from(err_r).read_to_end(&mut msg);
    if !msg.is_empty() {
        let errno = if msg.len() >= 5 {
            i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]])
        } else {
            0
        };
        let source = std::io::Error::from_raw_os_error(errno);
        let step = match msg[0] {
            b'm' => {
                "a minimal mount tree (bind mounts of /, /dev, /proc and its folders, pivot_root)"
            }
            b'u' => "unshare(CLONE_NEWUSER)",
            b'q' => "unshare(CLONE_NEWPID|CLONE_NEWNS|CLONE_NEWIPC)",
            b'f' => "fork",
            b'r' => "mounting the task's /proc",
            b'o' => "opening its log and /dev/null in its own mount tree",
            b'c' => {
                return finish(Err(ExecError::Start {
                    program: format!(
                        "{} (in {})",
                        p.name,
                        opts.cwd.as_deref().unwrap_or(Path::new("?")).display()
                    ),
                    source,
                }))
            }
            _ => {
                return finish(Err(ExecError::Start {
                    program: p.name.clone(),
                    source,
                }))
            }
        };
        return finish(Err(step_err(step)(source)));
    }
    match started {
        Ok(()) => finish(Ok(Pid::from_raw(i32::from_ne_bytes(pid)))),
        Err(e) => finish(Err(step_err("starting the task")(e))),
    }
}
