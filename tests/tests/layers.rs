//! The crates' structure, checked: the driver's folders are layers, each using only the layers
//! below it, and no module of the driver, the agent or the protocol crate imports from a module
//! that imports it back (directly or around a loop).
//!
//! References are read from the source: every `crate::a::b` path (also inside `use crate::{…}`
//! groups) and `super::` path outside `#[cfg(test)]` code, resolved to the file of the
//! deepest module it names. Comments are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The driver's layers, lowest first: a module may use its own layer and those listed before
/// it. The binary (`main.rs`, `cli/`) sits above them all and is not read here.
const DRIVER_LAYERS: &[&[&str]] = &[
    &["util"],
    &["providers"],
    &["coord"],
    &["job"],
    &["jobfile"],
    &[
        "runner",
        "bootstrap",
        "bake",
        "price",
        "replay",
        "readiness",
    ],
];

/// A module path (`["job", "managed"]`) and the file that holds it.
type Modules = BTreeMap<Vec<String>, PathBuf>;

/// Every module file of a library under `src` (the binary's `main.rs` and `cli/` left out).
fn modules(src: &Path) -> Modules {
    fn walk(dir: &Path, prefix: &[String], out: &mut Modules) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if prefix.is_empty() && (name == "cli" || name == "bin") {
                    continue;
                }
                let mut sub = prefix.to_vec();
                sub.push(name);
                walk(&p, &sub, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut path = prefix.to_vec();
                match stem {
                    "mod" => {}
                    "lib" if prefix.is_empty() => {}
                    "main" if prefix.is_empty() => continue,
                    _ => path.push(stem.to_string()),
                }
                out.insert(path, p);
            }
        }
    }
    let mut out = Modules::new();
    walk(src, &[], &mut out);
    out
}

/// The code of a file without comments and without its `#[cfg(test)]` part.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            // A `//` inside a string ("https://…") is kept; good enough for paths.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The paths after `crate::` (groups `crate::{a::b, c}` give `a::b` and `c`).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    fn path_at(s: &str) -> Vec<String> {
        let mut parts = Vec::new();
        let mut rest = s;
        loop {
            let id = ident_at(rest);
            if id.is_empty() {
                break;
            }
            parts.push(id.to_string());
            rest = &rest[id.len()..];
            match rest.strip_prefix("::") {
                Some(r) if r.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') => rest = r,
                _ => break,
            }
        }
        parts
    }
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `cedana_crate::` or similar
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(path_at(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.push(path_at(item.trim()));
        } else {
            out.push(path_at(rest));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The module paths a file refers to (`crate::` and top-level `super::` paths), each resolved
/// to the deepest known module.
fn references(module: &[String], text: &str, all: &Modules) -> BTreeSet<Vec<String>> {
    let code = code(text);
    let mut paths = crate_paths(&code);
    // `super::x` at a file's top level: the parent's `x` (a `mod.rs` file's parent is its
    // folder's parent).
    let parent: Vec<String> = if module.is_empty() {
        vec![]
    } else {
        module[..module.len() - 1].to_vec()
    };
    for (i, _) in code.match_indices("super::") {
        if code[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let id = ident_at(&code[i + "super::".len()..]);
        let mut p = parent.clone();
        if !id.is_empty() {
            p.push(id.to_string());
        }
        paths.push(p);
    }
    // `child::x` where `child` is a module declared in this one (`pub mod child;`).
    for child in all
        .keys()
        .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
    {
        let c = child.last().unwrap();
        let pat = format!("{c}::");
        for (i, _) in code.match_indices(&pat) {
            if !code[..i].ends_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
            {
                paths.push(child.clone());
            }
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            (0..=p.len())
                .rev()
                .map(|n| p[..n].to_vec())
                .find(|cand| all.contains_key(cand))
        })
        .filter(|target| target.as_slice() != module)
        .collect()
}

/// Module → the modules it refers to.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let all = modules(src);
    all.iter()
        .map(|(m, f)| {
            let text = std::fs::read_to_string(f).unwrap();
            (m.clone(), references(m, &text, &all))
        })
        .collect()
}

/// Groups of modules that reach each other (strongly connected, more than one module), each
/// as `a -> b -> … -> a` edges found inside the group.
fn cycles(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<String> {
    // A module is in a cycle with every module it reaches that reaches it back.
    let reach = |from: &Vec<String>| -> BTreeSet<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for n in g.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    stack.push(n.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<_, _> = g.keys().map(|m| (m.clone(), reach(m))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for (m, r) in &reaches {
        if !r.contains(m) {
            continue;
        }
        let mut group: Vec<String> = r
            .iter()
            .filter(|n| reaches[*n].contains(m))
            .map(|n| name(n))
            .collect();
        group.sort();
        groups.insert(group);
    }
    groups.into_iter().map(|g| g.join(" <-> ")).collect()
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "(crate root)".into()
    } else {
        m.join("::")
    }
}

fn layer_of(m: &[String], layers: &[&[&str]]) -> Option<(usize, String)> {
    let top = m.first()?;
    layers
        .iter()
        .position(|l| l.contains(&top.as_str()))
        .map(|i| (i, top.clone()))
}

/// Every reference that goes up a layer, or sideways to another top module of the same
/// layer; and every top module that is in no layer.
fn layer_violations(
    g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    layers: &[&[&str]],
) -> Vec<String> {
    let mut out = Vec::new();
    for (m, refs) in g {
        if m.is_empty() {
            continue; // the crate root declares the layers
        }
        let Some((from, from_top)) = layer_of(m, layers) else {
            out.push(format!("{} is in no layer", name(m)));
            continue;
        };
        for r in refs {
            let Some((to, to_top)) = layer_of(r, layers) else {
                continue; // the crate root: its few helpers are for everyone
            };
            if to > from || (to == from && to_top != from_top) {
                out.push(format!(
                    "{} (layer {from}) uses {} (layer {to})",
                    name(m),
                    name(r)
                ));
            }
        }
    }
    out
}

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

#[test]
fn driver_modules_use_only_the_layers_below_them() {
    let g = graph(&src("driver"));
    assert!(g.len() > 20, "too few driver modules found: {:?}", g.keys());
    let bad = layer_violations(&g, DRIVER_LAYERS);
    assert!(bad.is_empty(), "layer rule broken:\n{}", bad.join("\n"));
}

#[test]
fn no_module_imports_from_one_that_imports_it_back() {
    for krate in ["driver", "agent", "protocol"] {
        let g = graph(&src(krate));
        let c = cycles(&g);
        assert!(c.is_empty(), "{krate}: import cycles:\n{}", c.join("\n"));
    }
}

/// The checks themselves find what they are for: a small tree with an upward reference, a
/// sideways one, a cycle through a `use crate::{…}` group and a `super::` path.
#[test]
fn the_checks_catch_upward_references_and_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    let write = |p: &str, text: &str| {
        let p = s.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "lib.rs",
        "pub mod util; pub mod job; pub mod runner; pub mod price;\n",
    );
    write(
        "util/mod.rs",
        "// crate::runner in a comment is not a use\npub mod ssh;\nuse crate::{job::Job, util::ssh};\n",
    );
    write("util/ssh.rs", "use super::helper;\n");
    write(
        "job/mod.rs",
        "pub mod record;\nuse crate::util::ssh::Session;\nfn f() { record::save() }\n",
    );
    write(
        "job/record.rs",
        "use crate::job::Job;\n#[cfg(test)]\nmod tests { use crate::runner::x; }\n",
    );
    write("runner.rs", "use crate::price::table;\n");
    write("price.rs", "use crate::job::Spec;\n");
    write("main.rs", "use crate::runner::run;\n");
    let g = graph(s);
    let layers: &[&[&str]] = &[&["util"], &["job"], &["runner", "price"]];
    let bad = layer_violations(&g, layers);
    assert_eq!(
        bad,
        [
            "runner (layer 2) uses price (layer 2)",
            "util (layer 0) uses job (layer 1)",
        ],
        "{bad:?}"
    );
    let c = cycles(&g);
    assert_eq!(c, ["job <-> job::record <-> util <-> util::ssh"], "{c:?}");
    // Without the upward reference there is no cycle and no violation.
    write("util/mod.rs", "pub mod ssh;\nuse crate::util::ssh;\n");
    write("util/ssh.rs", "pub fn connect() {}\n");
    write("runner.rs", "use crate::job::Job;\n");
    write("job/record.rs", "pub fn save() {}\n");
    let g = graph(s);
    assert!(layer_violations(&g, layers).is_empty());
    assert!(cycles(&g).is_empty(), "{:?}", cycles(&g));
}
