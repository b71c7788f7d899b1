//! Architecture invariants of the daemon library, checked on its source text (see
//! "Architecture invariants" in ARCHITECTURE.md):
//! - the modules of `daemon/src` import each other without a cycle;
//! - only the gRPC edge (`server`, `auth`, `app`, `sila/`, `bin/`) mentions tonic: the core
//!   returns domain errors and the edges alone map them (to gRPC codes, to SiLA errors).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files (relative to `daemon/src`) that may name tonic; a trailing `/` is a whole folder.
/// `sila/` is the SiLA 2 endpoint, an edge like `server.rs` (its own listener and mapping of
/// the core's errors to SiLA errors).
const TONIC_EDGE: &[&str] = &["server.rs", "auth.rs", "app.rs", "sila/", "bin/"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, as (path relative to `src`, text), sorted.
fn sources(dir: &Path) -> Vec<(String, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let rel = path
                    .strip_prefix(root)
                    .expect("under src")
                    .to_string_lossy()
                    .replace('\\', "/");
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                out.push((rel, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// The text without `//` comments (doc comments included): a doc link is not an import.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    &s[..end]
}

/// The first path segment of every item in a `{ ... }` use group starting at `s[0] == '{'`.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                item_start = depth == 1;
                continue;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                item_start = true;
                continue;
            }
            c if c.is_whitespace() => continue,
            _ => {}
        }
        if item_start && depth == 1 {
            let head = ident_at(&s[i..]);
            if !head.is_empty() && head != "self" {
                heads.push(head.to_owned());
            }
            item_start = false;
        }
    }
    heads
}

/// Crate-level modules a file's code names: `crate::X`, `crate::{X, Y::Z}`, and `super::`
/// chains that climb out of the file's own top-level module (`super::super::X` from
/// `a/b.rs`). A `super::` that stays inside it (a child module, an inline `mod tests`) names
/// the module itself.
fn references(file_module: &[String], code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let prev_ok = |i: usize| {
        code[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !is_ident(c) && c != '$')
    };
    for (i, _) in code.match_indices("crate::") {
        if !prev_ok(i) {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest));
        } else {
            out.insert(ident_at(rest).to_owned());
        }
    }
    for (i, _) in code.match_indices("super::") {
        if !prev_ok(i) || code[..i].ends_with("super::") {
            continue;
        }
        let mut rest = &code[i..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        // Inline modules are invisible here, so only a climb past the crate root of a nested
        // file is certain to leave its top-level module.
        if ups >= file_module.len() && file_module.len() > 1 {
            if rest.starts_with('{') {
                out.extend(group_heads(rest));
            } else {
                out.insert(ident_at(rest).to_owned());
            }
        }
    }
    out
}

/// The top-level modules declared in `lib.rs`.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    code_only(lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_owned())
        })
        .collect()
}

/// The module graph of `daemon/src` at the level of its top-level modules.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources(&src_dir());
    let lib = &files
        .iter()
        .find(|(p, _)| p == "lib.rs")
        .expect("src/lib.rs")
        .1;
    let modules = declared_modules(lib);
    assert!(
        modules.len() > 5,
        "lib.rs declares too few modules: {modules:?}"
    );
    // Files brought in with `#[path = "..."]` belong to the module that includes them.
    let mut included_by: BTreeMap<String, String> = BTreeMap::new();
    for (p, text) in &files {
        for (i, _) in text.match_indices("#[path = \"") {
            let rest = &text[i + "#[path = \"".len()..];
            if let Some(end) = rest.find('"') {
                let dir = Path::new(p)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let target = dir.join(&rest[..end]).to_string_lossy().replace('\\', "/");
                included_by.insert(target, top_module(p));
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (p, text) in &files {
        if p == "lib.rs" || p.starts_with("bin/") {
            continue;
        }
        let node = included_by.get(p).cloned().unwrap_or_else(|| top_module(p));
        assert!(
            modules.contains(&node),
            "{p}: module {node} is not declared in lib.rs"
        );
        let file_module: Vec<String> = p
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .split('/')
            .map(str::to_owned)
            .collect();
        let edges = graph.entry(node.clone()).or_default();
        for r in references(&file_module, &code_only(text)) {
            if r != node && modules.contains(&r) {
                edges.insert(r);
            }
        }
    }
    graph
}

fn top_module(path: &str) -> String {
    path.split('/')
        .next()
        .unwrap_or(path)
        .trim_end_matches(".rs")
        .to_owned()
}

/// A cycle of `graph` as the path that closes it (`a -> b -> a`), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n.to_owned(), Mark::Open);
        stack.push(n.to_owned());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn render(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(n, to)| {
            format!(
                "  {n} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn daemon_modules_import_each_other_without_a_cycle() {
    let graph = module_graph();
    // The graph is real: the scheduler uses the store, the server uses the scheduler.
    assert!(graph["scheduler"].contains("store"), "{}", render(&graph));
    assert!(graph["server"].contains("scheduler"), "{}", render(&graph));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module import cycle in daemon/src: {}\nfull graph:\n{}",
            cycle.join(" -> "),
            render(&graph)
        );
    }
}

#[test]
fn only_the_grpc_edge_mentions_tonic() {
    let mut offenders = Vec::new();
    for (p, text) in sources(&src_dir()) {
        if TONIC_EDGE.iter().any(|e| {
            if e.ends_with('/') {
                p.starts_with(e)
            } else {
                p == *e
            }
        }) {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let mentions = line.match_indices("tonic").any(|(i, _)| {
                let before = line[..i].chars().next_back();
                let after = line[i + "tonic".len()..].chars().next();
                !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
            });
            if mentions {
                offenders.push(format!("daemon/src/{p}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "tonic outside the gRPC edge ({TONIC_EDGE:?}); return a domain error \
         (ppu_daemon::error) and map it in server.rs instead:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_reference_parser_and_cycle_finder_see_what_they_must() {
    let top = vec!["scheduler".to_owned(), "submit".to_owned()];
    let code = "use crate::{board::{Board, Need}, self, store::Store};\n\
                use super::Scheduler;\nuse super::super::metrics;\nfn f() { crate::queue::x(); \
                $crate::ignored::y(); my_crate::nope(); }";
    let refs = references(&top, code);
    let want: BTreeSet<String> = ["board", "store", "metrics", "queue"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(refs, want);
    // A comment is not an import.
    assert!(references(&["a".into()], &code_only("// crate::board")).is_empty());

    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

/// Words that name a device family, its commands, its drivers or their results. The core is
/// generic over the family schema (`ppu_drivers::registry`, `daemon/src/schema.rs`), so none of
/// these may appear in its code.
const FAMILY_WORDS: &[&str] = &[
    "furnace",
    "dispenser",
    "dispense",
    "balance",
    "analyser",
    "degas",
    "isotherm",
    "weigh",
    "refill",
    "segment",
    "eurotherm",
    "ne1000",
    "sics",
    "sorption",
    "alicat",
    "mfc",
];

/// Where a family may be named in `daemon/src`: `dev.rs` composes the simulated lab of
/// `ppud dev` (the dev lab's own wiring), and `[limits]` keys that predate the schema keep their
/// names for existing configuration files (a family's schema refers to them by name). The SiLA
/// server type `PhysicsProcessingUnit` names no family (it only contains `sics`).
const FAMILY_ALLOWED: &[&str] = &["dev.rs", "bin/"];
const FAMILY_ALLOWED_WORDS: &[&str] = &[
    "max_program_segments",
    "max_isotherm_points",
    "physicsprocessingunit",
];

/// The text before the file's `#[cfg(test)]` module: tests may name whatever they exercise.
fn without_tests(code: &str) -> &str {
    code.find("#[cfg(test)]").map_or(code, |i| &code[..i])
}

#[test]
fn the_core_names_no_device_family() {
    let mut found = Vec::new();
    for (path, text) in sources(&src_dir()) {
        if FAMILY_ALLOWED
            .iter()
            .any(|a| path == *a || (a.ends_with('/') && path.starts_with(a)))
            || path.ends_with("tests.rs")
        {
            continue;
        }
        let code = code_only(&text);
        for (n, line) in without_tests(&code).lines().enumerate() {
            let mut lower = line.to_lowercase();
            for allowed in FAMILY_ALLOWED_WORDS {
                lower = lower.replace(allowed, "");
            }
            if let Some(word) = FAMILY_WORDS.iter().find(|w| lower.contains(*w)) {
                found.push(format!(
                    "daemon/src/{path}:{}: {word}: {}",
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the daemon core names a device family; go through the family schema instead:\n{}",
        found.join("\n")
    );
}
