//! The workspace's shape, checked: no import cycle between the files of any crate (a file
//! refers to another with a `crate::`, `super::` or `self::` path; `mod` declarations and test
//! modules do not count), and the end-to-end tests link no server library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every crate of the workspace with a `src/`.
const CRATES: &[&str] = &[
    "ca",
    "ca/api",
    "workload-api",
    "proxy",
    "proxy/policy",
    "tests",
    "tests/bench",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `text` without comments, string and character literals (so that a path in a doc comment or
/// a message is not a reference).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // A raw string: r"..." or r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                i = j + close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|&c| c == b'\'')
                        .map(|p| i + 2 + p)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 2)
                } else {
                    None
                };
                match end {
                    Some(e) => {
                        out.push_str("' '");
                        i = e + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            c => {
                // Multi-byte UTF-8 passes through whole.
                let len = match c {
                    0..=0x7f => 1,
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    _ => 4,
                };
                out.push_str(std::str::from_utf8(&b[i..(i + len).min(b.len())]).unwrap_or(" "));
                i += len;
            }
        }
    }
    out
}

/// The module files of a crate root (`lib.rs` or `main.rs`, and the `src/bin/` binaries),
/// by module path (`""` is the root), with their code.
struct Graph {
    files: BTreeMap<String, (PathBuf, String)>,
}

/// The `mod x;` declarations (not inline `mod x { }`, not `#[cfg(test)]` ones) of `code`.
fn declared_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut test_next = false;
    for line in code.lines() {
        let l = line.trim();
        if l.starts_with("#[cfg(test)]") {
            test_next = true;
            continue;
        }
        // `mod x;`, `pub mod x;`, `pub(crate) mod x;`, `pub(in a::b) mod x;`...
        let unvis = match l.strip_prefix("pub") {
            Some(r) if r.starts_with('(') => r.split_once(')').map_or("", |(_, r)| r.trim_start()),
            Some(r) => r.trim_start(),
            None => l,
        };
        let rest = unvis.strip_prefix("mod ");
        if let Some(name) = rest.and_then(|r| r.strip_suffix(';')) {
            if !test_next {
                out.push(name.trim().to_owned());
            }
        }
        if !l.starts_with("#[") {
            test_next = false;
        }
    }
    out
}

/// The file of module `name` declared in `parent_file` (`foo.rs` + `foo/`).
fn module_file(parent_file: &Path, name: &str, is_root: bool) -> Option<PathBuf> {
    let dir = parent_file.parent()?;
    let base = if is_root {
        dir.to_path_buf()
    } else {
        dir.join(parent_file.file_stem()?)
    };
    let file = base.join(format!("{name}.rs"));
    if file.exists() {
        return Some(file);
    }
    let mod_rs = base.join(name).join("mod.rs");
    mod_rs.exists().then_some(mod_rs)
}

fn graph_of(root: &Path) -> Graph {
    let mut files = BTreeMap::new();
    let mut todo = vec![(String::new(), root.to_path_buf())];
    while let Some((path, file)) = todo.pop() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let is_root = path.is_empty();
        let raw_decls = declared_modules(&text);
        let mut code = code_only(&text);
        // Inline test modules (`#[cfg(test)] mod tests { .. }`, at the end of a file by
        // convention) are not part of the module's imports.
        while let Some(at) = code.find("#[cfg(test)]\nmod tests {") {
            let open = at + "#[cfg(test)]\nmod tests ".len();
            let mut depth = 0;
            let mut end = code.len();
            for (k, c) in code[open..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            code.replace_range(at..end, "");
        }
        for name in raw_decls {
            if name == "tests" || name == "gen" {
                continue;
            }
            if let Some(child) = module_file(&file, &name, is_root) {
                let child_path = if is_root {
                    name.clone()
                } else {
                    format!("{path}::{name}")
                };
                todo.push((child_path, child));
            }
        }
        files.insert(path, (file, code));
    }
    Graph { files }
}

/// The paths of a `use` tree starting at `at` (`a::b`, `a::{b, c::{d}}`, `a::*`), and where it
/// ends. Whitespace and newlines may separate its parts.
fn use_tree(code: &[u8], mut at: usize) -> (Vec<Vec<String>>, usize) {
    let skip_ws = |at: &mut usize| {
        while *at < code.len() && code[*at].is_ascii_whitespace() {
            *at += 1;
        }
    };
    let mut prefix: Vec<String> = Vec::new();
    loop {
        skip_ws(&mut at);
        if code.get(at) == Some(&b'{') {
            at += 1;
            let mut out = Vec::new();
            loop {
                skip_ws(&mut at);
                match code.get(at) {
                    None => return (out, at),
                    Some(b'}') => return (out, at + 1),
                    Some(b',') => at += 1,
                    _ => {
                        let (paths, end) = use_tree(code, at);
                        for p in paths {
                            let mut full = prefix.clone();
                            full.extend(p);
                            out.push(full);
                        }
                        if end == at {
                            at += 1;
                        } else {
                            at = end;
                        }
                    }
                }
            }
        }
        let start = at;
        while at < code.len() && (code[at].is_ascii_alphanumeric() || code[at] == b'_') {
            at += 1;
        }
        if at == start {
            // `*`, or the end of the path.
            return (vec![prefix], at);
        }
        prefix.push(String::from_utf8_lossy(&code[start..at]).into_owned());
        let mut next = at;
        skip_ws(&mut next);
        if code[next..].starts_with(b"::") {
            at = next + 2;
        } else {
            return (vec![prefix], at);
        }
    }
}

/// The module a path names: its longest prefix that is a module file, else the crate root
/// (an item of `lib.rs`/`main.rs`), except that an item the root re-exports from a module
/// (`pub use error::PolicyError`) is that module's.
fn resolve(graph: &Graph, reexports: &BTreeMap<String, String>, segs: &[String]) -> String {
    for n in (1..=segs.len()).rev() {
        let p = segs[..n].join("::");
        if graph.files.contains_key(&p) {
            return p;
        }
    }
    segs.first()
        .and_then(|first| reexports.get(first))
        .cloned()
        .unwrap_or_default()
}

/// The edges (from, to, the text around the reference) of a graph: every `crate::`,
/// `super::` (any number of them), `self::` or child-module path, in `use` lines (with nested
/// groups, over several lines) and in code.
fn edges(graph: &Graph) -> BTreeMap<(String, String), String> {
    // What the root re-exports from its modules: `pub use a::{X, Y}` maps X and Y to `a`.
    let mut reexports = BTreeMap::new();
    if let Some((_, code)) = graph.files.get("") {
        let b = code.as_bytes();
        for (i, _) in code.match_indices("pub use ") {
            let (paths, _) = use_tree(b, i + "pub use ".len());
            for p in paths {
                if let (Some(module), Some(item)) = (p.first(), p.last()) {
                    if graph.files.contains_key(module) && p.len() > 1 {
                        reexports.insert(item.clone(), module.clone());
                    }
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for (from, (_, code)) in &graph.files {
        let b = code.as_bytes();
        let own: Vec<String> = if from.is_empty() {
            Vec::new()
        } else {
            from.split("::").map(str::to_owned).collect()
        };
        // This file's child modules, by name.
        let children: BTreeSet<String> = graph
            .files
            .keys()
            .filter_map(|m| {
                let name = if from.is_empty() {
                    m.as_str()
                } else {
                    m.strip_prefix(from.as_str())?.strip_prefix("::")?
                };
                (!name.is_empty() && !name.contains("::")).then(|| name.to_owned())
            })
            .collect();
        let mut i = 0;
        while i < b.len() {
            let boundary = i == 0 || {
                let p = b[i - 1];
                !(p.is_ascii_alphanumeric() || p == b'_' || p == b':')
            };
            if !boundary || !(b[i].is_ascii_alphabetic() || b[i] == b'_') {
                i += 1;
                continue;
            }
            let rest = &b[i..];
            let (base, at): (Vec<String>, usize) = if rest.starts_with(b"crate::") {
                (Vec::new(), i + 7)
            } else if rest.starts_with(b"super::") {
                let mut base = own.clone();
                let mut at = i;
                while b[at..].starts_with(b"super::") {
                    base.pop();
                    at += 7;
                }
                (base, at)
            } else if rest.starts_with(b"self::") {
                (own.clone(), i + 6)
            } else {
                let end = rest
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .unwrap_or(rest.len());
                let word = String::from_utf8_lossy(&rest[..end]).into_owned();
                if children.contains(&word) && rest[end..].starts_with(b"::") {
                    (own.clone(), i)
                } else {
                    i += end.max(1);
                    continue;
                }
            };
            let (paths, end) = use_tree(b, at);
            for p in paths {
                let mut segs = base.clone();
                segs.extend(p);
                let to = resolve(graph, &reexports, &segs);
                if to != *from {
                    let text = String::from_utf8_lossy(&b[i..end.min(b.len()).min(i + 80)])
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    out.entry((from.clone(), to)).or_insert(text);
                }
            }
            i = end.max(i + 1);
        }
    }
    out
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<(String, String), String>,
) -> Vec<Vec<String>> {
    struct T<'a> {
        adj: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.adj.get(v).cloned().unwrap_or_default() {
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[w].min(t.low[v]);
                t.low.insert(v, l);
            } else if t.on.contains(w) {
                let l = t.index[w].min(t.low[v]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        adj: BTreeMap::new(),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for (a, b) in edges.keys() {
        t.adj.entry(a.as_str()).or_default().push(b.as_str());
    }
    for n in nodes {
        if !t.index.contains_key(n.as_str()) {
            visit(&mut t, n.as_str());
        }
    }
    t.out
}

/// Every crate root of the workspace: the library and each binary.
fn roots() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in CRATES {
        let src = workspace().join(c).join("src");
        for root in ["lib.rs", "main.rs"] {
            if src.join(root).exists() {
                out.push(src.join(root));
            }
        }
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            for b in bins.flatten() {
                let p = b.path();
                if p.extension().is_some_and(|e| e == "rs") {
                    out.push(p);
                } else if p.join("main.rs").exists() {
                    out.push(p.join("main.rs"));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn no_import_cycle_between_files() {
    let mut found = Vec::new();
    let mut checked = 0;
    for root in roots() {
        let graph = graph_of(&root);
        checked += graph.files.len();
        let edges = edges(&graph);
        let nodes: BTreeSet<String> = graph.files.keys().cloned().collect();
        for scc in cycles(&nodes, &edges) {
            let mut why = String::new();
            for ((a, b), line) in &edges {
                if scc.contains(a) && scc.contains(b) {
                    why.push_str(&format!("\n    {a} -> {b}: {line}"));
                }
            }
            found.push(format!("{}: {scc:?}{why}", root.display()));
        }
    }
    assert!(
        checked > 70,
        "only {checked} files found: is the walk broken?"
    );
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// The checker finds a cycle when there is one (it would pass on anything otherwise).
#[test]
fn the_cycle_check_sees_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(
        src.join("lib.rs"),
        "mod a;\nmod b;\nmod c;\nmod d;\npub(crate) mod f;\nmod g;\npub fn root() { f::F; }\n",
    )
    .unwrap();
    // Through the root: f uses an item of lib.rs, which uses f.
    std::fs::write(
        src.join("f.rs"),
        "pub struct F;\nfn x() { crate::root() }\n",
    )
    .unwrap();
    // A nested group over several lines, `super::super` and `self::`: g -> g::h -> g (cycle).
    std::fs::create_dir(src.join("g")).unwrap();
    std::fs::write(
        src.join("g.rs"),
        "pub(super) mod h;\nuse self::h::{\n    H,\n};\npub struct G;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("g/h.rs"),
        "pub struct H;\nuse super::super::g::G;\n",
    )
    .unwrap();
    // A parent that uses its child, which uses the parent back: a cycle too.
    std::fs::create_dir(src.join("d")).unwrap();
    std::fs::write(src.join("d.rs"), "mod e;\npub use e::E;\npub fn f() {}\n").unwrap();
    std::fs::write(src.join("d/e.rs"), "pub struct E;\nfn g() { super::f() }\n").unwrap();
    std::fs::write(
        src.join("a.rs"),
        "use crate::b::B; // crate::c in a comment\n",
    )
    .unwrap();
    std::fs::write(
        src.join("b.rs"),
        "pub struct B;\nfn f() { crate::a::g(); }\n",
    )
    .unwrap();
    std::fs::write(src.join("c.rs"), "const S: &str = \"crate::a::x\";\n").unwrap();
    let graph = graph_of(&src.join("lib.rs"));
    let edges = edges(&graph);
    let nodes: BTreeSet<String> = graph.files.keys().cloned().collect();
    let mut found = cycles(&nodes, &edges);
    found.sort();
    assert_eq!(
        found,
        vec![
            vec!["".to_owned(), "f".to_owned()],
            vec!["a".to_owned(), "b".to_owned()],
            vec!["d".to_owned(), "d::e".to_owned()],
            vec!["g".to_owned(), "g::h".to_owned()],
        ]
    );
    assert!(!edges.keys().any(|(from, _)| from == "c"), "{edges:?}");
}

/// The end-to-end tests run the binaries; they link no server library (the benchmarks,
/// which measure the CA's signing path directly, have their own package).
#[test]
fn end_to_end_tests_link_no_server_library() {
    let manifest = std::fs::read_to_string(workspace().join("tests/Cargo.toml")).unwrap();
    for server in ["meshid-ca", "meshid-agent", "meshid-proxy"] {
        assert!(
            !manifest.lines().any(|l| l.trim_start().starts_with(server)),
            "tests/Cargo.toml depends on {server}"
        );
    }
}
