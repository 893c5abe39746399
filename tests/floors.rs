//! The house rules of `src/`, checked on the source: no module imports one on a floor above
//! its own, and no two modules import each other, directly or around a longer cycle.
//!
//! Floors, top to bottom (a module may import its own floor and those below):
//!
//! | floor | modules | why there |
//! | --- | --- | --- |
//! | 9 | cli | arguments in, a library call, output out |
//! | 8 | sweep, plot | run and read many trainings |
//! | 7 | train | the loop, its step and what it reports |
//! | 6 | losses | functions of embeddings and labels |
//! | 5 | model | encoders, pooling, folders |
//! | 4 | engine | the device primitives the model is written over; knows no model |
//! | 3 | memory | budget, OOM recognition, the pure backoff policy and the planner |
//! | 2 | config | the keys, typed |
//! | 1 | data | rows, readers, tokenized sets, batches |
//! | 0 | atomic, device, lock | leaf helpers: atomic writes, device names, folder locks |
//! | -1 | error | the error type everything returns |
//!
//! A module here is a file. A reference is any `crate::…`, `super::…`, `self::…` or child path
//! outside comments, strings and `#[cfg(test)]` items: a test may compare against code
//! on any floor. A folder's `mod.rs` is its shared room: its children may read what it defines
//! (losses' `distance`, the cli's `say!`) while it calls them, so a child naming an ancestor is
//! not an edge; a cycle through the folder from outside still is. `testing.rs` is test-only and `lib.rs`/`main.rs` are the roots, so they are
//! left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const FLOORS: &[(&str, i32)] = &[
    ("cli", 9),
    ("sweep", 8),
    ("plot", 8),
    ("train", 7),
    ("losses", 6),
    ("model", 5),
    ("engine", 4),
    ("memory", 3),
    ("config", 2),
    ("data", 1),
    ("atomic", 0),
    ("device", 0),
    ("lock", 0),
    ("error", -1),
];

/// Modules (`train::step`) -> their file, for every `.rs` under `src/`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if !matches!(name.as_str(), "lib" | "main" | "testing") {
                out.insert(name, path);
            }
        }
    }
    out
}

/// The text with comments, string and char literals blanked (newlines kept).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (next == Some('"') || next == Some('#'))
            && !ident(c.get(i.wrapping_sub(1)))
        {
            // A raw string: r"…" or r#"…"# with any number of #.
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            j += 1;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|h| c.get(j + h) == Some(&'#')))
            {
                blank(&mut out, c[j]);
                j += 1;
            }
            i = j + 1 + hashes;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = c.get(i) {
                    blank(&mut out, ch);
                }
                i += 1;
            }
            i += 1;
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\''); a lifetime ('a) has no closing quote.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// `code` without the items marked `#[cfg(test)]` (up to their `;` or matching `}`).
fn without_tests(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        let semi = rest.find(';');
        let open = rest.find('{');
        let end = match (semi, open) {
            (Some(s), Some(o)) if s < o => at + s + 1,
            (Some(s), None) => at + s + 1,
            (_, Some(o)) => {
                let mut depth = 0;
                let mut end = out.len();
                for (k, ch) in out[at + o..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = at + o + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => out.len(),
        };
        out.replace_range(at..end, "");
    }
    out
}

/// Every path a use or an expression names from `start` (`crate::a::{b, c::d}` gives
/// `a::b` and `a::c::d`), segment lists without the leading keyword.
fn paths_after(code: &str, start: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(k) = code[from..].find(start) {
        let at = from + k;
        from = at + start.len();
        if at > 0
            && (bytes[at - 1].is_ascii_alphanumeric()
                || bytes[at - 1] == b'_'
                || bytes[at - 1] == b':')
        {
            continue;
        }
        expand(&code[from..], Vec::new(), &mut out);
    }
    out
}

/// Reads `a::b::{c, d::e}` at the start of `s`, each full path appended to `prefix`.
fn expand(s: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let s = s.trim_start();
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 0;
        let mut item = String::new();
        for ch in group.chars() {
            match ch {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&item, prefix.clone(), out);
                    item.clear();
                    continue;
                }
                _ => {}
            }
            item.push(ch);
        }
        expand(&item, prefix, out);
        return;
    }
    let name: String = s
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if name.is_empty() {
        // `*`, or the end of a group: the path so far.
        out.push(prefix);
        return;
    }
    let mut path = prefix;
    path.push(name.clone());
    match s[name.len()..].strip_prefix("::") {
        Some(rest) => expand(rest, path, out),
        None => out.push(path),
    }
}

/// The deepest module `path` lies in.
fn resolve(path: &[String], mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

/// Module -> the other modules it references.
fn references(mods: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (name, file) in mods {
        let code = without_tests(&code_only(&std::fs::read_to_string(file).unwrap()));
        let own: Vec<String> = name.split("::").map(String::from).collect();
        let mut paths: Vec<Vec<String>> = paths_after(&code, "crate::");
        for p in paths_after(&code, "super::") {
            // `super` is the parent module; `super::super` climbs once more.
            let ups = 1 + p.iter().take_while(|s| *s == "super").count();
            let base = &own[..own.len().saturating_sub(ups)];
            paths.push(
                base.iter()
                    .cloned()
                    .chain(p.into_iter().skip(ups - 1))
                    .collect(),
            );
        }
        for p in paths_after(&code, "self::") {
            paths.push(own.iter().cloned().chain(p).collect());
        }
        // A module names its own children by their bare names.
        let children = mods
            .keys()
            .filter(|m| m.rsplit_once("::").map(|(p, _)| p) == Some(name.as_str()));
        for child in children {
            let bare = child.rsplit("::").next().unwrap();
            for p in paths_after(&code, &format!("{bare}::")) {
                paths.push(
                    own.iter()
                        .cloned()
                        .chain([bare.to_string()])
                        .chain(p)
                        .collect(),
                );
            }
        }
        let targets: BTreeSet<String> = paths
            .iter()
            .filter_map(|p| resolve(p, mods))
            // A module naming its own items, or one of its folder's (see the module doc).
            .filter(|m| m != name && !name.starts_with(&format!("{m}::")))
            .collect();
        graph.insert(name.clone(), targets);
    }
    graph
}

fn floor(module: &str) -> i32 {
    let top = module.split("::").next().unwrap();
    FLOORS
        .iter()
        .find(|(m, _)| *m == top)
        .unwrap_or_else(|| panic!("src/{top} has no floor: add it to FLOORS in tests/floors.rs"))
        .1
}

/// Each import running upward, as "a -> b (floor x -> y)".
fn upward(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for (a, targets) in graph {
        for b in targets {
            if floor(b) > floor(a) {
                out.push(format!("{a} -> {b} (floor {} -> {})", floor(a), floor(b)));
            }
        }
    }
    out
}

/// The cycles (strongly connected groups of more than one module), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules are in one cycle when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for n in graph.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for (m, r) in &reaches {
        if !r.contains(*m) || out.iter().any(|c| c.contains(m)) {
            continue;
        }
        let group: Vec<String> = r
            .iter()
            .filter(|n| reaches[n].contains(*m))
            .cloned()
            .collect();
        out.push(group);
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_one_on_a_floor_above_it() {
    let mods = modules(&src());
    let up = upward(&references(&mods));
    assert!(up.is_empty(), "imports running upward:\n{}", up.join("\n"));
}

#[test]
fn no_modules_import_each_other_around_a_cycle() {
    let mods = modules(&src());
    let found = cycles(&references(&mods));
    let text: Vec<String> = found.iter().map(|c| c.join(" <-> ")).collect();
    assert!(found.is_empty(), "import cycles:\n{}", text.join("\n"));
}

/// The checker itself: it sees a `use` group, a `super::` path and an inline path, ignores
/// comments, strings and tests, and reports a cycle and an upward import planted in a copy.
#[test]
fn the_checker_catches_a_planted_cycle_and_upward_import() {
    let dir = tempfile::TempDir::new().unwrap();
    let write = |rel: &str, text: &str| {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("error.rs", "// crate::train is only named in a comment\n");
    write("data/mod.rs", "pub mod batch;\nuse batch::Batch;\n");
    write(
        "data/batch.rs",
        "use super::super::error::E;\nfn f() { let s = \"crate::cli::x\"; }\n\
         #[cfg(test)]\nmod tests { use crate::cli::Cli; }\n",
    );
    write(
        "config/mod.rs",
        "use crate::{error::E, data::batch::{Batch, self}};\n",
    );
    let mods = modules(dir.path());
    let graph = references(&mods);
    assert_eq!(graph["data"], BTreeSet::from(["data::batch".to_string()]));
    assert_eq!(graph["data::batch"], BTreeSet::from(["error".to_string()]));
    assert_eq!(
        graph["config"],
        BTreeSet::from(["data::batch".to_string(), "error".to_string()])
    );
    assert!(graph["error"].is_empty());
    assert!(upward(&graph).is_empty() && cycles(&graph).is_empty());

    // data/batch.rs now reads the config (upward) and a sibling that reads it back (a cycle).
    write(
        "data/batch.rs",
        "fn f() { crate::config::Config::x(); super::rows::Rows::new(); }\n",
    );
    write("data/rows.rs", "use super::batch::Batch;\n");
    write("config/mod.rs", "use crate::error::E;\n");
    let graph = references(&modules(dir.path()));
    assert_eq!(upward(&graph), ["data::batch -> config (floor 1 -> 2)"]);
    assert_eq!(cycles(&graph), [["data::batch", "data::rows"]]);
}
