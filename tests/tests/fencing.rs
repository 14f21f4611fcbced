//! Fencing (issue 12): two copies of a task never run at once, without relying on the
//! provider to end a lost machine. The local provider is told to leave lost workers running
//! (`CEDANA_LOCAL_LEAVE_LOST=1`, standing for a cloud API that fails or a machine cut off),
//! so only the lease keeps the old copy from running: real CRIU, a real nats-server, workers
//! in their own network namespaces.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cedana_tests::*;

fn counter_job(sb: &Sandbox, n: u32) -> PathBuf {
    let p = sb.path().join("count.rhai");
    std::fs::write(
        &p,
        format!(
            r#"
fn instance_specs() {{ #{{ cpu_cores: 1, memory_gb: 1 }} }}
fn setup(w) {{ }}
fn work(w) {{
    w.spawn("i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo $i >> counter.txt; sleep 0.1; done; echo '--- counter.txt'; cat counter.txt")
}}
fn restored_task(w, task) {{ }}
"#
        ),
    )
    .unwrap();
    p
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Ends what the job left of a worker it abandoned: its agent, tasks and namespace.
struct Leftover {
    daemon: i32,
    netns: Option<String>,
}

impl Drop for Leftover {
    fn drop(&mut self) {
        for p in children_of(self.daemon)
            .into_iter()
            .chain(std::iter::once(self.daemon))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(ns) = &self.netns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// How a worker is taken away from the job.
enum Cut {
    /// Its namespace's link goes down, and comes back after the recovery.
    Link,
    /// Its agent and its task are stopped (a paused machine), and continued after.
    Pause,
}

fn old_copy_is_fenced(cut: Cut) {
    let sb = Sandbox::new();
    let script = counter_job(&sb, 400);
    let mut d = BackgroundDriver::start_env(
        sb.path(),
        None,
        &["--checkpoint-every", "2"],
        &script,
        &[("CEDANA_LOCAL_LEAVE_LOST", std::ffi::OsStr::new("1"))],
    );
    let r = d.wait_record(Duration::from_secs(60), "two checkpoints", |r| {
        r["checkpoints"].as_array().map(Vec::len).unwrap_or(0) >= 2
    });
    let daemon = r["workers"][0]["pid"].as_i64().unwrap() as i32;
    let task = r["task"]["pid"].as_i64().unwrap() as i32;
    let netns = r["workers"][0]["netns"].as_str().map(String::from);
    let _leftover = Leftover {
        daemon,
        netns: netns.clone(),
    };
    let old = PathBuf::from(r["workers"][0]["dir"].as_str().unwrap()).join("counter.txt");
    let tree: Vec<i32> = std::iter::once(task).chain(children_of(task)).collect();
    match cut {
        Cut::Link => {
            let ns = netns.as_deref().expect("the worker has a namespace");
            let ok = std::process::Command::new("ip")
                .args(["-n", ns, "link", "set", "eth0", "down"])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        Cut::Pause => {
            for p in std::iter::once(daemon).chain(tree.iter().copied()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGSTOP,
                );
            }
        }
    }
    // Watch both copies: when the old one last grew, when the new one first grew.
    let started = Instant::now();
    let mut old_size = size(&old);
    let mut old_last_growth = started;
    let mut new_first_growth = None;
    let mut new: Option<(PathBuf, u64)> = None;
    while new_first_growth.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the task was not recovered: {:?}\n{}",
            d.record(),
            d.stderr()
        );
        let s = size(&old);
        if s != old_size {
            old_size = s;
            old_last_growth = Instant::now();
        }
        if new.is_none() {
            if let Some(r) = d.record() {
                if r["task"]["worker"] == "w2" {
                    let p =
                        PathBuf::from(r["workers"][1]["dir"].as_str().unwrap()).join("counter.txt");
                    let s = size(&p);
                    new = Some((p, s));
                }
            }
        }
        if let Some((p, s0)) = &new {
            if size(p) > *s0 {
                new_first_growth = Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let new_first_growth = new_first_growth.unwrap();
    if let Cut::Link = cut {
        assert!(
            old_last_growth < new_first_growth,
            "the old copy grew at {:?}, after the new one started at {:?}",
            old_last_growth - started,
            new_first_growth - started
        );
        // Frozen, not killed.
        assert!(is_alive(task), "the old copy was killed, not frozen");
        let state = std::fs::read_to_string(format!("/proc/{task}/stat")).unwrap();
        assert!(
            state
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('T'),
            "the old copy is not stopped: {state}"
        );
    }
    // The old machine comes back.
    match cut {
        Cut::Link => {
            std::process::Command::new("ip")
                .args(["-n", netns.as_deref().unwrap(), "link", "set", "eth0", "up"])
                .status()
                .unwrap();
        }
        Cut::Pause => {
            for p in std::iter::once(daemon).chain(tree.iter().copied()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
        }
    }
    let back = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the old copy to be killed once its agent saw the revoked lease",
        || !is_alive(task),
    );
    let ended_in = back.elapsed();
    let grown_after = size(&old);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(size(&old), grown_after, "the old copy still writes");
    let code = d.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{}", d.stderr());
    let nums = numbers_after(&d.stdout(), "--- counter.txt");
    assert_eq!(nums.len(), 400, "{}", d.stdout());
    assert_unbroken(&nums, "the job's count");
    eprintln!("old copy ended {ended_in:?} after the worker came back");
}

#[test]
fn a_worker_cut_off_from_nats_freezes_its_task_before_it_runs_elsewhere() {
    if !criu_ready("a_worker_cut_off_from_nats_freezes_its_task") {
        return;
    }
    old_copy_is_fenced(Cut::Link);
}

#[test]
fn a_paused_worker_that_comes_back_ends_its_old_copy() {
    if !criu_ready("a_paused_worker_that_comes_back_ends_its_old_copy") {
        return;
    }
    old_copy_is_fenced(Cut::Pause);
}
