//! `cedana-driver run` end to end: the embedded NATS server, local workers, the Rhai host API,
//! and the sandbox's errors with file, line and column.

use cedana_tests::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn counter_example_migrates_with_an_unbroken_sequence() {
    if !criu_ready("counter_example_migrates_with_an_unbroken_sequence") {
        return;
    }
    let sb = Sandbox::new();
    let out = run_driver(
        &repo_root().join("scripts/examples/counter.rhai"),
        sb.path(),
    );
    assert!(
        out.status.success(),
        "driver failed ({}): {}",
        out.status,
        stderr(&out)
    );
    let nums: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(
        nums.len(),
        40,
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_unbroken(&nums, "counter printed by the driver");
    let e = stderr(&out);
    assert!(
        e.contains("moving the task from w1 to w2") && e.contains("ended with 0 on w2"),
        "{e}"
    );
}

fn script(sb: &Sandbox, name: &str, text: &str) -> std::path::PathBuf {
    let p = sb.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let sb = Sandbox::new();
    let p = script(&sb, "broken.rhai", "let a = 1;\nlet b = (a + ;\n");
    let out = run_driver(&p, sb.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains(&format!("{}:2:", p.display())) && e.contains("syntax error"),
        "{e}"
    );
}

#[test]
fn endless_loop_is_stopped_by_the_operation_limit() {
    let sb = Sandbox::new();
    let p = script(&sb, "loop.rhai", "let x = 0;\nloop {\n  x += 1;\n}\n");
    let out = run_driver(&p, sb.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("loop.rhai:3:") && e.contains("limit of") && e.contains("operations"),
        "{e}"
    );
}

#[test]
fn eval_and_modules_outside_the_folder_are_refused() {
    let sb = Sandbox::new();
    let p = script(&sb, "eval.rhai", "eval(\"1 + 1\")\n");
    let out = run_driver(&p, sb.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("eval.rhai:1:"), "{}", stderr(&out));
    let p = script(&sb, "escape.rhai", "import \"../../etc/passwd\" as x;\n");
    let out = run_driver(&p, sb.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only from the script's folder"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_spec_no_offer_fits_is_a_clear_error() {
    let sb = Sandbox::new();
    let p = script(
        &sb,
        "gpu.rhai",
        "let w = launch(#{gpu: \"A100\", gpu_count: 2});\n",
    );
    let out = run_driver(&p, sb.path());
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("gpu.rhai:1:") && e.contains("no offer fits") && e.contains("GPUs, 2 wanted"),
        "{e}"
    );
}
