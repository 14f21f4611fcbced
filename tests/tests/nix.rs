//! The Nix files, as far as these machines can check them without Nix builds: tools/check-nix.sh
//! passes on the repository, and fails, naming the file and the problem, on copies broken in the
//! ways it is meant to catch.
//!
//! `nix-instantiate` (Debian's nix-bin) is required: without it these tests fail, they do not skip.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use cedana_tests::{agent_bin, repo_root};

fn require_nix_instantiate() {
    let found = Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "nix-instantiate is missing: install Debian's nix-bin (apt-get install -y nix-bin; tools/deps.sh does, CI installs it)"
    );
}

/// Runs tools/check-nix.sh on `root` (the repository when None).
fn check_nix(root: Option<&Path>) -> Output {
    require_nix_instantiate();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tools/check-nix.sh"))
        .env("CARGO", option_env!("CARGO").unwrap_or("cargo"));
    match root {
        Some(r) => cmd.env("CHECK_NIX_ROOT", r),
        None => cmd.env_remove("CHECK_NIX_ROOT"),
    };
    cmd.output().expect("run tools/check-nix.sh")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Copies the repository's sources (not target/ or .git/) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy");
    for entry in fs::read_dir(from).expect("read repository") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        if [".git", "target", "bench-results"].contains(&name.to_str().unwrap_or("")) {
            continue;
        }
        let kind = entry.file_type().expect("file type");
        let dest = to.join(&name);
        if kind.is_dir() {
            copy_tree(&entry.path(), &dest);
        } else if kind.is_file() {
            fs::copy(entry.path(), &dest).expect("copy file");
        }
    }
}

/// A fresh copy of the repository with `edit` applied; returns the check's output.
fn check_broken_copy(edit: impl FnOnce(&Path)) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("cedana-check-nix-")
        .tempdir()
        .expect("temp dir");
    let copy = dir.path().join("repo");
    copy_tree(&repo_root(), &copy);
    edit(&copy);
    check_nix(Some(&copy))
}

/// Replaces `from` by `to` in `file`, which must contain it.
fn replace(file: &Path, from: &str, to: &str) {
    let s = fs::read_to_string(file).expect("read file");
    assert!(
        s.contains(from),
        "{} no longer contains {from:?}: update this test",
        file.display()
    );
    fs::write(file, s.replacen(from, to, 1)).expect("write file");
}

fn assert_fails_with(out: &Output, what: &str, needles: &[&str]) {
    let t = text(out);
    assert!(!out.status.success(), "check-nix passed with {what}:\n{t}");
    for n in needles {
        assert!(
            t.contains(n),
            "check-nix's report on {what} lacks {n:?}:\n{t}"
        );
    }
}

#[test]
fn the_nix_files_parse_and_name_what_exists() {
    let out = check_nix(None);
    assert!(
        out.status.success(),
        "tools/check-nix.sh failed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("check-nix: OK"), "{}", text(&out));
}

#[test]
fn the_flake_has_the_promised_outputs() {
    let flake = fs::read_to_string(repo_root().join("flake.nix")).expect("read flake.nix");
    for output in [
        "packages = forAllSystems",
        "agent = pkgs.pkgsStatic.rustPlatform.buildRustPackage",
        "driver = pkgs.rustPlatform.buildRustPackage",
        "worker-image = pkgs.callPackage ./images/worker-image.nix",
        "ami = (workerAmi system).config.system.build.amazonImage",
        "devShells = forAllSystems",
        "nixosModules.agent",
        "nixosConfigurations",
    ] {
        assert!(flake.contains(output), "flake.nix lacks {output:?}");
    }
    if !repo_root().join("flake.lock").exists() {
        assert!(
            flake.contains("nix flake lock"),
            "without a flake.lock, flake.nix must say how to make one"
        );
    }
}

/// The words in `text` that start with `prefix` and go on with `[A-Za-z0-9_-]`.
fn words_starting(text: &str, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices(prefix) {
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            continue;
        }
        let rest = &text[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(rest.len());
        if end > 0 {
            found.push(format!("{prefix}{}", &rest[..end]));
        }
    }
    found
}

#[test]
fn the_module_and_image_use_flags_and_variables_the_daemon_has() {
    // The agent's own help is the reference: a renamed flag or variable must not leave the
    // NixOS module or the image passing something the daemon ignores or rejects.
    let out = Command::new(agent_bin())
        .args(["daemon", "--help"])
        .output()
        .expect("run cedana-agent daemon --help");
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let module = fs::read_to_string(repo_root().join("images/nixos-module.nix")).expect("read");
    let image = fs::read_to_string(repo_root().join("images/worker-image.nix")).expect("read");

    // Flags the module passes: quoted list items, and those on the ExecStart line.
    let mut flags: Vec<String> = words_starting(&module, "\"--")
        .into_iter()
        .map(|w| w[1..].to_string())
        .collect();
    for line in module.lines().filter(|l| l.contains("ExecStart")) {
        flags.extend(words_starting(line, "--"));
    }
    assert!(
        flags.len() >= 5,
        "too few flags found in the module: {flags:?}"
    );
    for f in &flags {
        assert!(
            help.contains(&format!("{f} ")),
            "images/nixos-module.nix passes {f}, which `cedana-agent daemon --help` does not list:\n{help}"
        );
    }

    for (file, src) in [
        ("images/nixos-module.nix", &module),
        ("images/worker-image.nix", &image),
    ] {
        let vars = words_starting(src, "CEDANA_");
        assert!(!vars.is_empty(), "{file} names no CEDANA_ variable");
        for v in vars {
            assert!(
                help.contains(&v),
                "{file} uses {v}, which `cedana-agent daemon --help` does not mention:\n{help}"
            );
        }
    }
}

#[test]
fn an_unmodified_copy_passes() {
    // The broken copies below fail because of their one edit, not because of the copying.
    let out = check_broken_copy(|_| {});
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_nix_syntax_error_fails_the_check() {
    let out = check_broken_copy(|r| {
        fs::write(r.join("images/broken.nix"), "{ a = ; }\n").expect("write broken.nix")
    });
    assert_fails_with(
        &out,
        "a syntax error",
        &["images/broken.nix", "does not parse"],
    );
}

#[test]
fn an_unbound_variable_fails_the_check() {
    let out = check_broken_copy(|r| replace(&r.join("flake.nix"), "inherit src;", "inherit srcs;"));
    assert_fails_with(
        &out,
        "an unbound variable",
        &["flake.nix", "undefined variable 'srcs'"],
    );
}

#[test]
fn a_crate_left_out_of_the_source_fails_the_check() {
    let out =
        check_broken_copy(|r| replace(&r.join("flake.nix"), " ./protocol ./store", " ./store"));
    assert_fails_with(
        &out,
        "a crate left out of the source fileset",
        &[
            "flake.nix",
            "leaves out the workspace crate cedana-protocol",
        ],
    );
}

#[test]
fn a_missing_binary_fails_the_check() {
    let out = check_broken_copy(|r| {
        replace(
            &r.join("flake.nix"),
            "mainProgram = \"cedana-agent\"",
            "mainProgram = \"cedana-agentd\"",
        )
    });
    assert_fails_with(&out, "a missing binary", &["flake.nix", "cedana-agentd"]);

    let out = check_broken_copy(|r| {
        replace(
            &r.join("images/worker-image.nix"),
            "/bin/cedana-agent\"",
            "/bin/cedana-worker\"",
        )
    });
    assert_fails_with(
        &out,
        "a missing binary path",
        &["images/worker-image.nix", "bin/cedana-worker"],
    );
}

#[test]
fn a_missing_package_fails_the_check() {
    let out = check_broken_copy(|r| {
        replace(
            &r.join("flake.nix"),
            "\"-p\" \"cedana-driver\"",
            "\"-p\" \"cedana-drivers\"",
        )
    });
    assert_fails_with(
        &out,
        "a missing cargo package",
        &["flake.nix", "-p cedana-drivers", "no such package"],
    );
}

#[test]
fn a_missing_local_path_fails_the_check() {
    let out = check_broken_copy(|r| fs::remove_file(r.join("images/ami.nix")).expect("remove"));
    assert_fails_with(&out, "a missing import", &["flake.nix", "images/ami.nix"]);

    let out = check_broken_copy(|r| fs::remove_file(r.join("Cargo.lock")).expect("remove"));
    assert_fails_with(
        &out,
        "a missing Cargo.lock",
        &["flake.nix", "cargoLock.lockFile Cargo.lock does not exist"],
    );
}

#[test]
fn an_undeclared_flake_input_fails_the_check() {
    let out = check_broken_copy(|r| {
        replace(
            &r.join("flake.nix"),
            "outputs = { self, nixpkgs }:",
            "outputs = { self, nixpkgs, flake-utils }:",
        )
    });
    assert_fails_with(&out, "an undeclared input", &["flake.nix", "flake-utils"]);
}
