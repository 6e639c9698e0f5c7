//! Two-module import cycles in a crate's `src/` tree (issue 14, crate shape).
//!
//! A cycle between two sibling modules (`ads` uses `state` and `state` uses
//! `ads`) means neither can be understood, tested or moved without the other:
//! the shared item belongs in a module below both. This checker reads the source
//! text (no compiler, no extra dependency), builds the graph of module-to-module
//! references and reports every pair that references each other, so a test can
//! fail when one comes back.
//!
//! What counts as a reference, from the module whose code contains it:
//! - a `use` tree's paths starting with `crate::`, `self::` or `super::` (groups
//!   like `use crate::{a::X, b::Y}` expanded);
//! - such paths in code (`crate::a::f()`, `super::b::T`, `$crate::a::m!`).
//!
//! Comments of every kind (`//`, `///`, `//!`, `/* */`) and string literals are
//! skipped: an intra-doc link such as ``[`crate::ads::f`]`` documents, it does
//! not import. Paths relative to the current module (`child::X`) only reach
//! children, which are never part of a cycle, so they are not followed.
//!
//! Granularity: one node per module file (`lib.rs` is the root, `a.rs` and
//! `a/mod.rs` are `a`, `a/b.rs` is `a::b`; `#[path = ".."] mod x;` is followed),
//! plus one node per inline `#[cfg(test)]` module (`a::tests`): test code may
//! use whatever it tests, and a test helper's import is not the layer's. Other
//! inline modules belong to their file's node.
//!
//! Not a cycle: a module and its ancestor (`config` and `config::policy`). A
//! parent using its child and the child using `super::` items is how Rust
//! modules work, and a child sees its ancestors' private items anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::Path;

/// One reference found in the source: where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The file, relative to the `src/` directory (`config/policy.rs`).
    pub file: String,
    /// The 1-based line of the path's first segment.
    pub line: usize,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Two modules that reference each other, `a` sorting before `b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// The first module (`ads`, `config::policy`; the root is `crate`).
    pub a: String,
    /// The second module.
    pub b: String,
    /// One reference from `a` to `b`.
    pub a_to_b: Site,
    /// One reference from `b` to `a`.
    pub b_to_a: Site,
}

impl Cycle {
    /// The pair as `a <-> b`, the key of an allow-list.
    pub fn pair(&self) -> String {
        format!("{} <-> {}", self.a, self.b)
    }
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} <-> {} ({} -> {} at {}; {} -> {} at {})",
            self.a, self.b, self.a, self.b, self.a_to_b, self.b, self.a, self.b_to_a
        )
    }
}

/// The two-module cycles of the crate whose source directory is `src`.
///
/// Reads every `.rs` file under `src` and checks the module tree rooted at
/// `lib.rs` (and, as a separate crate, `main.rs`).
pub fn check_dir(src: &Path) -> io::Result<Vec<Cycle>> {
    let mut files = BTreeMap::new();
    read_tree(src, src, &mut files)?;
    if files.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no .rs files under {}", src.display()),
        ));
    }
    Ok(check_files(&files))
}

fn read_tree(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            read_tree(root, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let Ok(relative) = path.strip_prefix(root) else {
                continue;
            };
            let key = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.insert(key, std::fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

/// The two-module cycles of an in-memory tree: file paths relative to `src/`
/// with `/` separators (`lib.rs`, `config/policy.rs`) to their text.
pub fn check_files(files: &BTreeMap<String, String>) -> Vec<Cycle> {
    let mut cycles = Vec::new();
    for edges in crate_graphs(files) {
        for ((from, to), site) in &edges {
            if from < to
                && let Some(back) = edges.get(&(to.clone(), from.clone()))
            {
                cycles.push(Cycle {
                    a: display(from),
                    b: display(to),
                    a_to_b: site.clone(),
                    b_to_a: back.clone(),
                });
            }
        }
    }
    cycles
}

/// One module's reference to another (neither the other's ancestor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The module whose code holds the reference.
    pub from: String,
    /// The module it names.
    pub to: String,
    /// Where: the first such reference.
    pub site: Site,
}

/// Every module-to-module reference of the crate whose source directory is
/// `src`, one per pair: for layer rules ("`pool` does not import `mesh`").
pub fn references_dir(src: &Path) -> io::Result<Vec<Reference>> {
    let mut files = BTreeMap::new();
    read_tree(src, src, &mut files)?;
    Ok(references(&files))
}

/// [`references_dir`] of an in-memory tree, as for [`check_files`].
pub fn references(files: &BTreeMap<String, String>) -> Vec<Reference> {
    crate_graphs(files)
        .into_iter()
        .flatten()
        .map(|((from, to), site)| Reference {
            from: display(&from),
            to: display(&to),
            site,
        })
        .collect()
}

/// The reference graph of each crate root present (`lib.rs`, `main.rs`).
fn crate_graphs(files: &BTreeMap<String, String>) -> Vec<Edges> {
    ["lib.rs", "main.rs"]
        .into_iter()
        .filter(|root| files.contains_key(*root))
        .map(|root| crate_graph(files, root))
        .collect()
}

/// The first reference each way between two modules.
type Edges = BTreeMap<(ModPath, ModPath), Site>;

/// A module's path from the crate root; empty for the root.
type ModPath = Vec<String>;

fn display(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_owned()
    } else {
        path.join("::")
    }
}

/// A module file reached from the crate root, and the directory its `mod x;`
/// declarations resolve against.
struct ModFile {
    file: String,
    module: ModPath,
    child_dir: String,
}

/// A path reference in code, before resolution.
struct RawRef {
    /// The full module path (file module plus inline modules) of the code.
    scope: ModPath,
    segments: Vec<String>,
    line: usize,
}

fn crate_graph(files: &BTreeMap<String, String>, root: &str) -> Edges {
    let mut nodes: BTreeSet<ModPath> = BTreeSet::new();
    let mut refs: Vec<(String, RawRef)> = Vec::new();
    let mut queue = vec![ModFile {
        file: root.to_owned(),
        module: Vec::new(),
        child_dir: String::new(),
    }];
    let mut seen = BTreeSet::new();
    while let Some(current) = queue.pop() {
        if !seen.insert(current.file.clone()) {
            continue;
        }
        let Some(text) = files.get(&current.file) else {
            continue;
        };
        nodes.insert(current.module.clone());
        let tokens = tokenize(text);
        let parsed = parse_file(&tokens, &current.module);
        for test_module in parsed.test_modules {
            nodes.insert(test_module);
        }
        for declared in parsed.declarations {
            let file_dir = parent_dir(&current.file);
            let (candidates, child_dir_of): (Vec<String>, fn(&str) -> String) =
                match &declared.path_attr {
                    Some(path) => {
                        let base = if declared.inline.is_empty() {
                            file_dir.clone()
                        } else {
                            join(&current.child_dir, &declared.inline.join("/"))
                        };
                        (vec![normalize(&join(&base, path))], parent_dir)
                    }
                    None => {
                        let base = join(&current.child_dir, &declared.inline.join("/"));
                        (
                            vec![
                                join(&base, &format!("{}.rs", declared.name)),
                                join(&base, &format!("{}/mod.rs", declared.name)),
                            ],
                            module_child_dir,
                        )
                    }
                };
            if let Some(file) = candidates.into_iter().find(|f| files.contains_key(f)) {
                let mut module = current.module.clone();
                module.extend(declared.inline.iter().cloned());
                module.push(declared.name.clone());
                queue.push(ModFile {
                    child_dir: child_dir_of(&file),
                    file,
                    module,
                });
            }
        }
        refs.extend(parsed.refs.into_iter().map(|r| (current.file.clone(), r)));
    }

    // The first reference each way between two nodes.
    let mut edges = Edges::new();
    for (file, raw) in refs {
        let Some(target) = resolve(&raw.scope, &raw.segments) else {
            continue;
        };
        let from = node_of(&nodes, &raw.scope);
        let to = node_of(&nodes, &target);
        if from.starts_with(&to) || to.starts_with(&from) {
            continue;
        }
        edges.entry((from, to)).or_insert(Site {
            file,
            line: raw.line,
        });
    }
    edges
}

fn parent_dir(file: &str) -> String {
    match file.rfind('/') {
        Some(i) => file[..i].to_owned(),
        None => String::new(),
    }
}

/// Where `mod x;` in `file` looks: beside a `mod.rs`, in `a/` for `a.rs`.
fn module_child_dir(file: &str) -> String {
    let dir = parent_dir(file);
    let name = file.rsplit('/').next().unwrap_or(file);
    match name.strip_suffix(".rs") {
        Some("mod") | None => dir,
        Some(stem) => join(&dir, stem),
    }
}

fn join(dir: &str, rest: &str) -> String {
    match (dir.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_owned(),
        (_, true) => dir.to_owned(),
        _ => format!("{dir}/{rest}"),
    }
}

/// Resolves `.` and `..` in a `#[path]` result.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

/// The module a path starting with `crate`, `self` or `super` names, written
/// in module `scope`; `None` for a `super` above the root.
fn resolve(scope: &[String], segments: &[String]) -> Option<ModPath> {
    let mut target: ModPath;
    let mut rest = segments;
    match segments.first().map(String::as_str) {
        Some("crate") => {
            target = Vec::new();
            rest = &segments[1..];
        }
        Some("self") | Some("super") => {
            target = scope.to_vec();
            if segments[0] == "self" {
                rest = &segments[1..];
            }
        }
        _ => return None,
    }
    while let Some(first) = rest.first() {
        if first != "super" {
            break;
        }
        target.pop()?;
        rest = &rest[1..];
    }
    target.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(target)
}

/// The node holding `path`: its longest prefix that is a node.
fn node_of(nodes: &BTreeSet<ModPath>, path: &[String]) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| &path[..n])
        .find(|prefix| nodes.contains(*prefix))
        .unwrap_or(&[])
        .to_vec()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    PathSep,
    Punct(char),
}

/// Tokens with their 1-based line; comments dropped, literals kept whole so a
/// `"crate::a"` inside one is not a path.
fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied();
    while let Some(c) = at(i) {
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == Some('/') {
            while at(i).is_some_and(|c| c != '\n') {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == Some('*') {
            let mut depth = 0usize;
            while let Some(c) = at(i) {
                if c == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if c == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if let Some((end, content)) = raw_string(&chars, i) {
            let start_line = line;
            line += chars[i..end].iter().filter(|c| **c == '\n').count();
            tokens.push((Tok::Str(content), start_line));
            i = end;
        } else if c == '"' || (c == 'b' || c == 'c') && at(i + 1) == Some('"') {
            let start_line = line;
            i += if c == '"' { 1 } else { 2 };
            let mut content = String::new();
            while let Some(c) = at(i) {
                match c {
                    '\\' => {
                        if at(i + 1) == Some('\n') {
                            line += 1;
                        }
                        i += 2;
                    }
                    '"' => {
                        i += 1;
                        break;
                    }
                    _ => {
                        if c == '\n' {
                            line += 1;
                        }
                        content.push(c);
                        i += 1;
                    }
                }
            }
            tokens.push((Tok::Str(content), start_line));
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{..}') or a lifetime ('a).
            if at(i + 1) == Some('\\') {
                // Past the backslash and the escaped character (`'\''`).
                i += 3;
                while at(i).is_some_and(|c| c != '\'' && c != '\n') {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == Some('\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c == 'b' && at(i + 1) == Some('\'') {
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let start = if c == 'r' && at(i + 1) == Some('#') {
                i + 2
            } else {
                i
            };
            let mut end = start;
            while at(end).is_some_and(|c| c.is_alphanumeric() || c == '_') {
                end += 1;
            }
            if end == start {
                end = start + 1;
            }
            tokens.push((Tok::Ident(chars[start..end].iter().collect()), line));
            i = end;
        } else if c.is_ascii_digit() {
            while at(i).is_some_and(|c| c.is_alphanumeric() || c == '_') {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == Some(':') {
            tokens.push((Tok::PathSep, line));
            i += 2;
        } else {
            tokens.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    tokens
}

/// A raw string (`r"..."`, `r#"..."#`, `br".."`, `cr".."`) starting at `i`:
/// its end and content.
fn raw_string(chars: &[char], i: usize) -> Option<(usize, String)> {
    let mut j = i;
    if matches!(chars.get(j), Some('b') | Some('c')) {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while chars.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    if chars.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    let start = j;
    while j < chars.len() {
        if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
            return Some((j + 1 + hashes, chars[start..j].iter().collect()));
        }
        j += 1;
    }
    Some((chars.len(), chars[start..].iter().collect()))
}

/// `mod name;` found in a file.
struct Declaration {
    name: String,
    /// The inline modules (`mod a { .. }`) it is written in.
    inline: Vec<String>,
    path_attr: Option<String>,
}

struct ParsedFile {
    declarations: Vec<Declaration>,
    test_modules: Vec<ModPath>,
    refs: Vec<RawRef>,
}

fn ident(tokens: &[(Tok, usize)], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn is(tokens: &[(Tok, usize)], i: usize, tok: &Tok) -> bool {
    tokens.get(i).is_some_and(|(t, _)| t == tok)
}

fn parse_file(tokens: &[(Tok, usize)], module: &[String]) -> ParsedFile {
    let mut parsed = ParsedFile {
        declarations: Vec::new(),
        test_modules: Vec::new(),
        refs: Vec::new(),
    };
    // Inline modules open at this point: name and the brace depth inside them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let scope = |inline: &[(String, usize)]| {
        let mut scope = module.to_vec();
        scope.extend(inline.iter().map(|(name, _)| name.clone()));
        scope
    };
    let mut i = 0;
    while i < tokens.len() {
        let (tok, line) = &tokens[i];
        match tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(word) if word == "mod" => {
                if let Some(name) = ident(tokens, i + 1) {
                    let attrs = attributes_before(tokens, i);
                    if is(tokens, i + 2, &Tok::Punct('{')) {
                        depth += 1;
                        inline.push((name.to_owned(), depth));
                        if attrs.iter().any(|a| is_cfg_test(a)) {
                            parsed.test_modules.push(scope(&inline));
                        }
                        i += 3;
                        continue;
                    }
                    if is(tokens, i + 2, &Tok::Punct(';')) {
                        let path_attr = attrs.iter().find_map(|a| match a.as_slice() {
                            [Tok::Ident(p), Tok::Punct('='), Tok::Str(s)] if p == "path" => {
                                Some(s.clone())
                            }
                            _ => None,
                        });
                        let child = Declaration {
                            name: name.to_owned(),
                            inline: inline.iter().map(|(n, _)| n.clone()).collect(),
                            path_attr,
                        };
                        if attrs.iter().any(|a| is_cfg_test(a)) {
                            let mut test = scope(&inline);
                            test.push(child.name.clone());
                            parsed.test_modules.push(test);
                        }
                        parsed.declarations.push(child);
                    }
                }
            }
            Tok::Ident(word) if word == "use" => {
                let mut j = i + 1;
                if is(tokens, j, &Tok::PathSep) {
                    j += 1;
                }
                let mut paths = Vec::new();
                j = use_tree(tokens, j, &[], &mut paths);
                let here = scope(&inline);
                for (segments, line) in paths {
                    parsed.refs.push(RawRef {
                        scope: here.clone(),
                        segments,
                        line,
                    });
                }
                i = j.max(i + 1);
                continue;
            }
            Tok::Ident(word)
                if matches!(word.as_str(), "crate" | "self" | "super")
                    && is(tokens, i + 1, &Tok::PathSep) =>
            {
                let mut segments = vec![word.clone()];
                let mut j = i + 1;
                while is(tokens, j, &Tok::PathSep)
                    && let Some(next) = ident(tokens, j + 1)
                {
                    segments.push(next.to_owned());
                    j += 2;
                }
                parsed.refs.push(RawRef {
                    scope: scope(&inline),
                    segments,
                    line: *line,
                });
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parsed
}

/// The attributes (`#[..]` contents) written before the item whose keyword is
/// at `i`, skipping a visibility (`pub`, `pub(crate)`).
fn attributes_before(tokens: &[(Tok, usize)], i: usize) -> Vec<Vec<Tok>> {
    let mut attrs = Vec::new();
    let mut j = i;
    if j > 0 && is(tokens, j - 1, &Tok::Punct(')')) {
        while j > 0 && !is(tokens, j - 1, &Tok::Punct('(')) {
            j -= 1;
        }
        j = j.saturating_sub(1);
    }
    if j > 0 && ident(tokens, j - 1) == Some("pub") {
        j -= 1;
    }
    while j > 0 && is(tokens, j - 1, &Tok::Punct(']')) {
        let end = j - 1;
        let mut k = end;
        let mut nesting = 0usize;
        loop {
            match &tokens[k].0 {
                Tok::Punct(']') => nesting += 1,
                Tok::Punct('[') => {
                    nesting -= 1;
                    if nesting == 0 {
                        break;
                    }
                }
                _ => {}
            }
            if k == 0 {
                return attrs;
            }
            k -= 1;
        }
        if k == 0 || !is(tokens, k - 1, &Tok::Punct('#')) {
            break;
        }
        attrs.push(tokens[k + 1..end].iter().map(|(t, _)| t.clone()).collect());
        j = k - 1;
    }
    attrs
}

fn is_cfg_test(attr: &[Tok]) -> bool {
    matches!(attr.first(), Some(Tok::Ident(cfg)) if cfg == "cfg")
        && attr
            .iter()
            .any(|t| matches!(t, Tok::Ident(t) if t == "test"))
        && !attr
            .iter()
            .any(|t| matches!(t, Tok::Ident(t) if t == "not"))
}

/// Parses a use tree at `i` under `prefix`, pushing each full path with the
/// line of its first segment; returns the index after the tree.
fn use_tree(
    tokens: &[(Tok, usize)],
    mut i: usize,
    prefix: &[String],
    out: &mut Vec<(Vec<String>, usize)>,
) -> usize {
    let mut path = prefix.to_vec();
    let mut line = tokens.get(i).map_or(0, |(_, l)| *l);
    loop {
        match tokens.get(i) {
            Some((Tok::Ident(name), l)) if name != "as" => {
                if path.len() == prefix.len() {
                    line = *l;
                }
                path.push(name.clone());
                i += 1;
                if is(tokens, i, &Tok::PathSep) {
                    i += 1;
                    continue;
                }
                if ident(tokens, i) == Some("as") {
                    i += 2;
                }
                out.push((path, line));
                return i;
            }
            Some((Tok::Punct('*'), _)) => {
                out.push((path, line));
                return i + 1;
            }
            Some((Tok::Punct('{'), _)) => {
                i += 1;
                while let Some((tok, _)) = tokens.get(i) {
                    match tok {
                        Tok::Punct('}') => return i + 1,
                        Tok::Punct(',') => i += 1,
                        Tok::Punct(';') => return i,
                        _ => {
                            let next = use_tree(tokens, i, &path, out);
                            if next == i {
                                // Not a use tree (a macro's `$x`): skip the token.
                                i += 1;
                            } else {
                                i = next;
                            }
                        }
                    }
                }
                return i;
            }
            _ => {
                if path.len() > prefix.len() {
                    out.push((path, line));
                }
                return i;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
            .collect()
    }

    fn pairs(files: &[(&str, &str)]) -> Vec<String> {
        check_files(&tree(files)).iter().map(Cycle::pair).collect()
    }

    #[test]
    fn finds_a_use_and_a_code_path_cycle_with_sites() {
        let cycles = check_files(&tree(&[
            ("lib.rs", "pub mod ads;\npub mod state;\n"),
            (
                "ads.rs",
                "use crate::state::Shared;\npub fn caller_labels() {}\n",
            ),
            (
                "state.rs",
                "pub struct Shared;\nfn f() {\n    crate::ads::caller_labels()\n}\n",
            ),
        ]));
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].pair(), "ads <-> state");
        assert_eq!(cycles[0].a_to_b.to_string(), "ads.rs:1");
        assert_eq!(cycles[0].b_to_a.to_string(), "state.rs:3");
    }

    #[test]
    fn use_groups_super_and_nested_files_resolve() {
        assert_eq!(
            pairs(&[
                ("lib.rs", "mod config;"),
                (
                    "config/mod.rs",
                    "mod policy;\nmod resources;\nuse policy::X;"
                ),
                (
                    "config/policy.rs",
                    "use super::resources::R;\npub struct X;"
                ),
                (
                    "config/resources.rs",
                    "use crate::{error::E, config::{policy::{self, X as Y}}};\npub struct R;"
                ),
            ]),
            ["config::policy <-> config::resources"]
        );
    }

    #[test]
    fn doc_links_comments_and_strings_are_not_references() {
        assert_eq!(
            pairs(&[
                ("lib.rs", "mod a;\nmod b;"),
                ("a.rs", "use crate::b::B;\npub fn f() {}"),
                (
                    "b.rs",
                    "//! See [`crate::a::f`].\n/// Calls [`crate::a::f`].\n\
                     // crate::a::f();\n/* crate::a::f() /* nested */ crate::a */\n\
                     #[doc = \"crate::a::f\"]\npub struct B;\n\
                     const S: &str = r#\"crate::a::f\"#;\nconst C: char = '\"';\nconst Q: char = '\\'';\n\
                     fn g<'a>(x: &'a str) -> &'a str { x }"
                ),
            ]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn parent_and_child_are_not_a_cycle() {
        assert_eq!(
            pairs(&[
                (
                    "lib.rs",
                    "pub mod xds;\nuse xds::listener::L;\nfn f() { crate::xds::g() }"
                ),
                (
                    "xds/mod.rs",
                    "pub mod listener;\npub fn g() {}\nuse listener::L;"
                ),
                (
                    "xds/listener.rs",
                    "use super::g;\nuse crate::xds::g as h;\npub struct L;\nuse crate::f;"
                ),
            ]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn cfg_test_modules_are_their_own_nodes_other_inline_modules_are_not() {
        assert_eq!(
            pairs(&[
                ("lib.rs", "mod model;\nmod rbac;"),
                (
                    "model.rs",
                    "pub struct M;\n#[cfg(test)]\nmod tests {\n    use crate::rbac::R;\n}\n"
                ),
                (
                    "rbac.rs",
                    "use crate::model::M;\nmod inner {\n    use super::super::model::M;\n}\npub struct R;"
                ),
            ]),
            Vec::<String>::new()
        );
        assert_eq!(
            pairs(&[
                ("lib.rs", "mod model;\nmod rbac;"),
                (
                    "model.rs",
                    "pub struct M;\nmod imp {\n    fn f() { super::super::rbac::r() }\n}\n"
                ),
                ("rbac.rs", "use crate::model::M;\npub fn r() {}"),
            ]),
            ["model <-> rbac"]
        );
    }

    #[test]
    fn path_attributes_and_test_files_are_followed() {
        let cycles = check_files(&tree(&[
            ("lib.rs", "mod admin;\nmod state;"),
            (
                "admin.rs",
                "#[path = \"graph.rs\"]\npub(crate) mod graph;\n#[cfg(test)]\n#[path = \"admin_tests.rs\"]\nmod tests;",
            ),
            ("graph.rs", "use crate::state::S;"),
            ("admin_tests.rs", "use crate::state::S;"),
            (
                "state.rs",
                "pub struct S;\nfn f() { crate::admin::graph::g(); crate::admin::tests::t(); }",
            ),
        ]));
        let found: Vec<String> = cycles.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            found,
            [
                "admin::graph <-> state (admin::graph -> state at graph.rs:1; state -> admin::graph at state.rs:2)",
                "admin::tests <-> state (admin::tests -> state at admin_tests.rs:1; state -> admin::tests at state.rs:2)",
            ]
        );
    }

    #[test]
    fn references_name_both_ends() {
        let found = references(&tree(&[
            ("lib.rs", "mod pool;\nmod mesh;"),
            ("pool/mod.rs", "mod host;"),
            ("pool/host.rs", "fn f() {\n    crate::mesh::g()\n}"),
            (
                "mesh/mod.rs",
                "pub fn g() {}\n/// [`crate::pool`]\npub struct M;",
            ),
        ]));
        assert_eq!(
            found,
            [Reference {
                from: "pool::host".to_owned(),
                to: "mesh".to_owned(),
                site: Site {
                    file: "pool/host.rs".to_owned(),
                    line: 2,
                },
            }]
        );
    }

    #[test]
    fn reads_a_directory() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        std::fs::create_dir_all(dir.join("a")).expect("create a tree");
        std::fs::write(dir.join("lib.rs"), "mod a;\nmod b;").expect("write lib.rs");
        std::fs::write(dir.join("a/mod.rs"), "use crate::b::B;").expect("write a/mod.rs");
        std::fs::write(dir.join("b.rs"), "pub struct B;\nuse crate::a;").expect("write b.rs");
        let cycles = check_dir(dir).expect("check the tree");
        assert_eq!(
            cycles.iter().map(Cycle::pair).collect::<Vec<_>>(),
            ["a <-> b"]
        );
    }
}
