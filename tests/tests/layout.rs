//! The layout holds: no import circle between the files of any crate of the workspace.
//!
//! A circle (a.rs uses b.rs, which uses a.rs, perhaps through others) means neither file can be
//! read, tested or moved without the other: the split between them is not where the code's
//! concerns split. `cargo` already forbids circles between crates; this test finds them between
//! the files of one crate, from the source alone (no compiler plugin, nothing to install).
//!
//! How a file's imports are read: every `crate::…`, `super::…` and `self::…` path outside
//! comments, strings and `#[cfg(test)]` modules, whether in a `use` (groups expanded) or in an
//! expression, is followed through the module tree (`mod x;` declarations, `#[path]` included)
//! to the deepest module file it names; a name that a module file only re-exports (`pub use`)
//! is followed to the file that defines it. Test files (declared under `#[cfg(test)]`) are not
//! part of the layout. An edge from a file to itself does not count.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// The workspace's crates: each folder with a `src/lib.rs` or `src/main.rs`.
const CRATES: &[&str] = &[
    "fabric",
    "transports/tcp",
    "transports/quic",
    "transports/verbs",
    "bench",
    "cli",
    "sidecar",
    "tests",
];

/// One module of a crate: its file, and whether it is compiled only for tests.
#[derive(Debug, Clone)]
struct Module {
    file: PathBuf,
    test_only: bool,
}

/// A crate's module tree: module path (`["api", "node"]`) → module.
type Tree = BTreeMap<Vec<String>, Module>;

/// Source text with comments, string and char literals blanked out (same length, newlines
/// kept), so that paths inside them are not read as imports.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if j < b.len() && b[j] == b'"' && (i == 0 || !is_ident(b[i - 1])) {
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                let end = b[j + 1..]
                    .windows(close.len())
                    .position(|w| w == close.as_slice())
                    .map_or(b.len(), |p| j + 1 + p + close.len());
                out.extend(b[i..end].iter().map(|&c| blank(c)));
                i = end;
            } else {
                out.push(b[i]);
                i += 1;
            }
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    out.push(b' ');
                    i += 1;
                }
                out.push(blank(b[i]));
                i += 1;
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a): blank only the former.
            let rest = &b[i + 1..];
            let len = if rest.first() == Some(&b'\\') {
                rest.iter().position(|&c| c == b'\'').map(|p| p + 2)
            } else if rest.len() >= 2 && rest[1] == b'\'' {
                Some(3)
            } else {
                std::str::from_utf8(&rest[..rest.len().min(5)])
                    .ok()
                    .and_then(|s| s.chars().next())
                    .filter(|c| !c.is_ascii())
                    .map(|c| c.len_utf8() + 2)
            };
            match len {
                Some(n) if i + n <= b.len() => {
                    out.extend(b[i..i + n].iter().map(|&c| blank(c)));
                    i += n;
                }
                _ => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The text of `src` (already stripped) without the bodies of inline `#[cfg(test)]` modules.
fn without_test_modules(src: &str) -> String {
    let mut out = src.to_owned();
    let mut from = 0;
    while let Some(p) = out[from..].find("#[cfg(test)]") {
        let at = from + p;
        let after = &out[at..];
        // Only an inline module (`mod x {`), not `mod x;` nor a test-only item of another kind.
        let head_end = after.find(['{', ';']).unwrap_or(after.len());
        let head = &after[..head_end];
        if head.contains("mod ") && after[head_end..].starts_with('{') {
            let open = at + head_end;
            let mut depth = 0;
            let mut end = out.len();
            for (k, c) in out[open..].char_indices() {
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
            let blanked: String = out[at..end]
                .chars()
                .map(|c| if c == '\n' { '\n' } else { ' ' })
                .collect();
            out.replace_range(at..end, &blanked);
            from = end;
        } else {
            from = at + "#[cfg(test)]".len();
        }
    }
    out
}

/// `mod name;` declarations of a file: (name, `#[path]` if any, under `#[cfg(test)]`).
fn declared_modules(stripped: &str, raw: &str) -> Vec<(String, Option<String>, bool)> {
    let mut found = Vec::new();
    let lines: Vec<&str> = stripped.lines().collect();
    let raw_lines: Vec<&str> = raw.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let t = line.trim();
        let rest = t
            .strip_prefix("pub(crate) mod ")
            .or_else(|| t.strip_prefix("pub(super) mod "))
            .or_else(|| t.strip_prefix("pub mod "))
            .or_else(|| t.strip_prefix("mod "));
        let Some(rest) = rest else { continue };
        let Some(name) = rest.strip_suffix(';') else {
            continue;
        };
        // Attributes on the lines just above.
        let mut path = None;
        let mut test_only = false;
        for k in (0..n).rev() {
            let a = raw_lines[k].trim();
            if !a.starts_with("#[") {
                break;
            }
            if a.starts_with("#[cfg(test)]") {
                test_only = true;
            }
            if let Some(p) = a.strip_prefix("#[path = \"") {
                path = p.split('"').next().map(str::to_owned);
            }
        }
        found.push((name.trim().to_owned(), path, test_only));
    }
    found
}

/// Reads a crate's module tree from its root file.
fn module_tree(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut todo = vec![(
        Vec::<String>::new(),
        root.to_path_buf(),
        false,
        true, // the root owns its directory, as a mod.rs does
    )];
    while let Some((path, file, test_only, owns_dir)) = todo.pop() {
        let raw = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let stripped = strip(&raw);
        let dir = if owns_dir {
            file.parent().expect("a file has a folder").to_path_buf()
        } else {
            file.with_extension("")
        };
        for (name, at, test) in declared_modules(&stripped, &raw) {
            let (child, child_owns) = match at {
                Some(p) => (file.parent().expect("folder").join(p), false),
                None => {
                    let flat = dir.join(format!("{name}.rs"));
                    if flat.exists() {
                        (flat, false)
                    } else {
                        (dir.join(&name).join("mod.rs"), true)
                    }
                }
            };
            let mut child_path = path.clone();
            child_path.push(name);
            todo.push((child_path, child, test_only || test, child_owns));
        }
        tree.insert(path, Module { file, test_only });
    }
    tree
}

/// Expands a `use` tree (`a::{b, c::{d, e as f}}`) into whole paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let s = s.trim();
        if s.is_empty() {
            return;
        }
        if let Some(open) = s.find('{') {
            let head: Vec<String> = s[..open]
                .split("::")
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect();
            let close = s.rfind('}').unwrap_or(s.len());
            let inner = &s[open + 1..close];
            let mut base = prefix.to_vec();
            base.extend(head);
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parse(&inner[start..i], &base, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parse(&inner[start..], &base, out);
        } else {
            let s = s.split(" as ").next().unwrap_or(s);
            let mut p = prefix.to_vec();
            p.extend(
                s.split("::")
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned),
            );
            out.push(p);
        }
    }
    let mut out = Vec::new();
    parse(tree, &[], &mut out);
    out
}

/// Every path of a file that starts at `crate`, `super` or `self`: from its `use` statements
/// (expanded) and from paths written in its code.
fn local_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    // `use` statements, which may span lines.
    let mut rest = code;
    while let Some(p) = find_word(rest, "use") {
        let stmt = &rest[p + 3..];
        let end = stmt.find(';').unwrap_or(stmt.len());
        let text: String = stmt[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        paths.extend(expand_use(&text));
        rest = &stmt[end..];
    }
    // Paths in code: crate::a::b, super::super::c, self::d.
    let b = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(p) = code[from..].find(start) {
            let at = from + p;
            from = at + start.len();
            if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b':') {
                continue;
            }
            let mut end = at;
            while end < b.len() && (is_ident(b[end]) || b[end] == b':') {
                end += 1;
            }
            paths.push(
                code[at..end]
                    .split("::")
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
        }
    }
    paths
        .into_iter()
        .filter(|p| {
            matches!(
                p.first().map(String::as_str),
                Some("crate" | "super" | "self")
            )
        })
        .collect()
}

/// Position of `word` as a whole word followed by a space (a `use` keyword).
fn find_word(s: &str, word: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(p) = s[from..].find(word) {
        let at = from + p;
        let before_ok = at == 0 || !is_ident(b[at - 1]);
        let after = at + word.len();
        if before_ok && after < b.len() && b[after] == b' ' {
            return Some(at);
        }
        from = after;
    }
    None
}

/// The names a module file re-exports (`pub use` / `pub(crate) use`), each with the whole path
/// it names, relative to that module.
fn reexports(code: &str) -> HashMap<String, Vec<String>> {
    let mut map = HashMap::new();
    for prefix in ["pub use ", "pub(crate) use ", "pub(super) use "] {
        let mut rest = code;
        while let Some(p) = rest.find(prefix) {
            let stmt = &rest[p + prefix.len()..];
            let end = stmt.find(';').unwrap_or(stmt.len());
            let text: String = stmt[..end].split_whitespace().collect::<Vec<_>>().join(" ");
            for path in expand_use(&text) {
                if let Some(last) = path.last() {
                    map.insert(last.clone(), path.clone());
                }
            }
            rest = &stmt[end..];
        }
    }
    map
}

/// A crate read for its layout: its tree, and each module's code without test modules.
struct Crate {
    tree: Tree,
    code: BTreeMap<Vec<String>, String>,
}

impl Crate {
    fn read(root: &Path) -> Crate {
        let tree = module_tree(root);
        let code = tree
            .iter()
            .map(|(m, module)| {
                let raw = fs::read_to_string(&module.file).expect("readable");
                (m.clone(), without_test_modules(&strip(&raw)))
            })
            .collect();
        Crate { tree, code }
    }

    /// The module (file) that `path`, written in module `at`, leads to.
    fn resolve(&self, at: &[String], path: &[String], depth: usize) -> Option<Vec<String>> {
        let mut m: Vec<String> = at.to_vec();
        let mut segs = path.iter().peekable();
        match segs.peek().map(|s| s.as_str()) {
            Some("crate") => {
                m.clear();
                segs.next();
            }
            Some("self") => {
                segs.next();
            }
            Some("super") => {
                while segs.peek().map(|s| s.as_str()) == Some("super") {
                    m.pop();
                    segs.next();
                }
            }
            _ => {}
        }
        while let Some(seg) = segs.next() {
            let mut child = m.clone();
            child.push(seg.clone());
            if self.tree.contains_key(&child) {
                m = child;
                continue;
            }
            // Not a child module: an item of module `m`, or a name `m` re-exports.
            if depth < 8 {
                if let Some(target) = self
                    .code
                    .get(&m)
                    .map(|c| reexports(c))
                    .and_then(|r| r.get(seg).cloned())
                {
                    let mut full = target;
                    full.extend(segs.cloned());
                    return self.resolve(&m, &full, depth + 1).or(Some(m));
                }
            }
            return Some(m);
        }
        Some(m)
    }

    /// file → (file it uses → names it takes from it).
    fn edges(&self) -> BTreeMap<PathBuf, BTreeMap<PathBuf, BTreeSet<String>>> {
        let mut edges: BTreeMap<PathBuf, BTreeMap<PathBuf, BTreeSet<String>>> = BTreeMap::new();
        for (m, code) in &self.code {
            if self.tree[m].test_only {
                continue;
            }
            let from = &self.tree[m].file;
            for path in local_paths(code) {
                let Some(target) = self.resolve(m, &path, 0) else {
                    continue;
                };
                let Some(module) = self.tree.get(&target) else {
                    continue;
                };
                if module.test_only || &module.file == from {
                    continue;
                }
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(module.file.clone())
                    .or_default()
                    .insert(path.join("::"));
            }
        }
        edges
    }
}

/// The circles of a graph: its strongly connected components of more than one file (Tarjan).
fn circles(edges: &BTreeMap<PathBuf, BTreeMap<PathBuf, BTreeSet<String>>>) -> Vec<Vec<PathBuf>> {
    struct State<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeMap<PathBuf, BTreeSet<String>>>,
        index: HashMap<&'a PathBuf, usize>,
        low: HashMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        next: usize,
        found: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a PathBuf) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(out) = s.edges.get(v) {
            for w in out.keys() {
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    let nodes: Vec<&PathBuf> = edges.keys().collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

/// A readable account of the circles of one crate, with what ties each.
fn describe(
    edges: &BTreeMap<PathBuf, BTreeMap<PathBuf, BTreeSet<String>>>,
    found: &[Vec<PathBuf>],
    base: &Path,
) -> String {
    let rel = |p: &Path| p.strip_prefix(base).unwrap_or(p).display().to_string();
    let mut text = String::new();
    for c in found {
        let names: Vec<String> = c.iter().map(|p| rel(p)).collect();
        text.push_str(&format!("circle: {}\n", names.join(", ")));
        for a in c {
            for (b, used) in edges.get(a).into_iter().flatten() {
                if c.contains(b) {
                    let used: Vec<&str> = used.iter().map(String::as_str).collect();
                    text.push_str(&format!(
                        "  {} -> {}: {}\n",
                        rel(a),
                        rel(b),
                        used.join(", ")
                    ));
                }
            }
        }
    }
    text
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

fn crate_root(dir: &Path) -> PathBuf {
    let lib = dir.join("src/lib.rs");
    if lib.exists() {
        lib
    } else {
        dir.join("src/main.rs")
    }
}

#[test]
fn no_crate_of_the_workspace_has_an_import_circle_between_its_files() {
    let base = workspace();
    let mut report = String::new();
    let mut files = 0;
    for dir in CRATES {
        let krate = Crate::read(&crate_root(&base.join(dir)));
        files += krate.tree.len();
        let edges = krate.edges();
        report.push_str(&describe(&edges, &circles(&edges), &base));
    }
    assert!(files > 50, "the layout check read only {files} files");
    assert!(report.is_empty(), "import circles between files:\n{report}");
}

/// The check finds a circle that is there (through a re-export, a group import and a `super::`
/// path in code), and none in a tree without one: it is not a test that always passes.
#[test]
fn the_check_finds_a_circle_and_only_a_circle() {
    let dir = std::env::temp_dir().join(format!("af-layout-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("src/outer")).unwrap();
    let write = |p: &str, s: &str| fs::write(dir.join(p), s).unwrap();
    write(
        "src/lib.rs",
        "mod a;\nmod outer;\npub use a::Alpha;\n// crate::outer::inner in a comment\n",
    );
    write("src/a.rs", "pub struct Alpha;\n");
    write(
        "src/outer/mod.rs",
        "mod inner;\npub(crate) use inner::Beta;\npub fn f() { let s = \"crate::a\"; }\n",
    );
    write(
        "src/outer/inner.rs",
        "pub struct Beta;\n#[cfg(test)]\nmod tests { use crate::outer::f; }\n",
    );
    let krate = Crate::read(&dir.join("src/lib.rs"));
    let edges = krate.edges();
    assert!(circles(&edges).is_empty(), "no circle yet: {edges:?}");

    // a.rs takes Beta through the re-export in outer/mod.rs (it lands on inner.rs), and inner.rs
    // takes Alpha through the crate root's re-export (it lands on a.rs): a circle a <-> inner.
    write(
        "src/a.rs",
        "use crate::{outer::{Beta}};\npub struct Alpha(Beta);\n",
    );
    write(
        "src/outer/inner.rs",
        "pub struct Beta;\nfn g() -> super::super::Alpha { todo!() }\n",
    );
    let krate = Crate::read(&dir.join("src/lib.rs"));
    let edges = krate.edges();
    let found = circles(&edges);
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 1, "{edges:?}");
    let names: Vec<String> = found[0]
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.rs", "inner.rs"]);
}
