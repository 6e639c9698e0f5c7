//! Reading YAML with the line of every field, so each problem points at the
//! field that causes it.
//!
//! saphyr (a maintained YAML 1.2 parser; serde_yaml is archived) loads
//! documents as [`MarkedYaml`] trees whose nodes, mapping keys included, carry
//! their start position. Rather than deserialize into structs (which loses
//! positions and tends to drop unknown fields), the resource parsers walk the
//! tree with [`Fields`]: every key of a mapping must be one the parser
//! implements, one it names as "not supported yet", or it is reported as
//! unknown — config is rejected, never silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::Diagnostic;

/// A node of a loaded document.
pub(crate) type Node<'a> = MarkedYaml<'a>;

/// A value and the (1-based) line it was written on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) line: usize,
}

/// The 1-based line a node starts on.
pub(crate) fn line_of(node: &Node<'_>) -> usize {
    node.span.start.line().max(1)
}

/// A fingerprint of what a document says: its keys and values, not where
/// they are written (lines, comments, quoting style), so that a reload
/// reports a resource as changed only when its content changed. A key order
/// change counts as a change (mappings hash in order).
pub(crate) fn fingerprint(node: &Node<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    // saphyr hashes a node's data and not its span.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut hasher);
    hasher.finish()
}

/// Parses a file into its documents, skipping empty ones (`---` with nothing
/// after it, or a file of comments). On a syntax error: the parser's line and
/// message.
pub(crate) fn parse_documents(text: &str) -> Result<Vec<Node<'_>>, (usize, String)> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        (
            e.marker().line().max(1),
            format!("YAML syntax error: {}", e.info()),
        )
    })?;
    Ok(docs
        .into_iter()
        .filter(|d| !matches!(d.data, YamlData::BadValue | YamlData::Value(Scalar::Null)))
        .collect())
}

/// Collects the diagnostics of one document, prefixed with the resource they
/// are about (`VirtualService shop/catalog: ...`).
pub(crate) struct Sink<'f> {
    file: &'f Path,
    what: String,
    diagnostics: Vec<Diagnostic>,
}

impl<'f> Sink<'f> {
    pub(crate) fn new(file: &'f Path) -> Self {
        Sink {
            file,
            what: String::new(),
            diagnostics: Vec::new(),
        }
    }

    /// Sets the prefix of later messages.
    pub(crate) fn about(&mut self, what: impl Into<String>) {
        self.what = what.into();
    }

    pub(crate) fn error(&mut self, line: usize, message: impl fmt::Display) {
        let message = if self.what.is_empty() {
            message.to_string()
        } else {
            format!("{}: {message}", self.what)
        };
        self.diagnostics.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            message,
        });
    }

    pub(crate) fn count(&self) -> usize {
        self.diagnostics.len()
    }

    pub(crate) fn into_diagnostics(self) -> Vec<Diagnostic> {
        self.diagnostics
    }
}

/// `parent.key`, or `key` at the top.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// What kind of value a node holds, for messages.
fn describe(node: &Node<'_>) -> &'static str {
    match &node.data {
        YamlData::Value(Scalar::Null) => "nothing",
        YamlData::Value(Scalar::Boolean(_)) => "a boolean",
        YamlData::Value(Scalar::Integer(_)) => "an integer",
        YamlData::Value(Scalar::FloatingPoint(_)) => "a number with a fraction",
        YamlData::Value(Scalar::String(_)) => "a string",
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        YamlData::Tagged(..) => "a tagged value (YAML tags are not supported)",
        YamlData::Alias(_) | YamlData::Representation(..) | YamlData::BadValue => {
            "an unreadable value"
        }
    }
}

/// One field of a mapping: where it is and its value.
#[derive(Clone, Copy)]
pub(crate) struct Field<'p, 'n, 'a> {
    /// The path from the top of the spec (`http[0].route`).
    pub(crate) path: &'p str,
    /// The line of the key.
    pub(crate) key_line: usize,
    pub(crate) node: &'n Node<'a>,
}

/// The recognised fields of a mapping, after unknown and unsupported ones
/// were reported.
pub(crate) struct Fields<'n, 'a> {
    /// Path of the mapping itself.
    pub(crate) path: String,
    /// Line of the mapping (its first key), for "missing field" problems.
    pub(crate) line: usize,
    entries: Vec<(String, usize, &'n Node<'a>)>,
}

impl<'n, 'a> Fields<'n, 'a> {
    /// Reads `node` as a mapping whose keys may be `known` (returned) or
    /// `unsupported` (reported as not supported yet); any other key is
    /// reported as unknown. `None` (reported) when it is not a mapping.
    pub(crate) fn read(
        sink: &mut Sink<'_>,
        node: &'n Node<'a>,
        path: &str,
        known: &[&str],
        unsupported: &[&str],
    ) -> Option<Self> {
        let YamlData::Mapping(map) = &node.data else {
            let what = if path.is_empty() {
                "a resource".to_string()
            } else {
                format!("'{path}'")
            };
            sink.error(
                line_of(node),
                format!("{what} must be a mapping, found {}", describe(node)),
            );
            return None;
        };
        let mut entries = Vec::new();
        for (k, v) in map.iter() {
            let YamlData::Value(Scalar::String(key)) = &k.data else {
                sink.error(
                    line_of(k),
                    format!(
                        "keys of '{}' must be strings, found {}",
                        if path.is_empty() {
                            "the resource"
                        } else {
                            path
                        },
                        describe(k)
                    ),
                );
                continue;
            };
            let key: &str = key;
            if known.contains(&key) {
                entries.push((join(path, key), line_of(k), v));
            } else if unsupported.contains(&key) {
                sink.error(
                    line_of(k),
                    format!("field '{}' is not supported yet", join(path, key)),
                );
            } else {
                sink.error(line_of(k), format!("unknown field '{}'", join(path, key)));
            }
        }
        Some(Fields {
            path: path.to_string(),
            line: line_of(node),
            entries,
        })
    }

    /// Reads the value of `field` as a mapping (see [`Fields::read`]); a
    /// missing field inside it is reported at the line of `field`'s key.
    pub(crate) fn of(
        sink: &mut Sink<'_>,
        field: Field<'_, 'n, 'a>,
        known: &[&str],
        unsupported: &[&str],
    ) -> Option<Self> {
        let mut f = Fields::read(sink, field.node, field.path, known, unsupported)?;
        f.line = field.key_line;
        Some(f)
    }

    /// The field `name`, unless absent or null (Kubernetes treats both alike).
    pub(crate) fn get(&self, name: &str) -> Option<Field<'_, 'n, 'a>> {
        let full = join(&self.path, name);
        self.entries
            .iter()
            .find(|(p, _, node)| *p == full && !matches!(node.data, YamlData::Value(Scalar::Null)))
            .map(|(p, line, node)| Field {
                path: p,
                key_line: *line,
                node,
            })
    }

    /// Like [`Fields::get`], but reports a missing field.
    pub(crate) fn require(&self, sink: &mut Sink<'_>, name: &str) -> Option<Field<'_, 'n, 'a>> {
        let f = self.get(name);
        if f.is_none() {
            sink.error(
                self.line,
                format!("missing field '{}'", join(&self.path, name)),
            );
        }
        f
    }

    /// The present fields, in document order.
    pub(crate) fn present(&self) -> impl Iterator<Item = Field<'_, 'n, 'a>> {
        self.entries
            .iter()
            .filter(|(_, _, n)| !matches!(n.data, YamlData::Value(Scalar::Null)))
            .map(|(p, line, node)| Field {
                path: p,
                key_line: *line,
                node,
            })
    }
}

impl<'n, 'a> Field<'_, 'n, 'a> {
    /// The line of the value (the key's line for an empty value).
    pub(crate) fn line(&self) -> usize {
        match &self.node.data {
            YamlData::Value(_) => line_of(self.node),
            _ => self.key_line,
        }
    }

    fn wrong(&self, sink: &mut Sink<'_>, expected: &str) {
        sink.error(
            self.line(),
            format!(
                "'{}' must be {expected}, found {}",
                self.path,
                describe(self.node)
            ),
        );
    }

    /// A string value.
    pub(crate) fn string(&self, sink: &mut Sink<'_>) -> Option<Spanned<String>> {
        match &self.node.data {
            YamlData::Value(Scalar::String(s)) => Some(Spanned {
                value: s.to_string(),
                line: self.line(),
            }),
            YamlData::Value(Scalar::Integer(_) | Scalar::FloatingPoint(_) | Scalar::Boolean(_)) => {
                self.wrong(sink, "a string (quote it)");
                None
            }
            _ => {
                self.wrong(sink, "a string");
                None
            }
        }
    }

    /// A boolean value.
    pub(crate) fn boolean(&self, sink: &mut Sink<'_>) -> Option<bool> {
        match &self.node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            _ => {
                self.wrong(sink, "true or false");
                None
            }
        }
    }

    /// An integer value.
    pub(crate) fn integer(&self, sink: &mut Sink<'_>) -> Option<i64> {
        match &self.node.data {
            YamlData::Value(Scalar::Integer(i)) => Some(*i),
            _ => {
                self.wrong(sink, "an integer");
                None
            }
        }
    }

    /// A number, integer or not (`20`, `0.5`).
    pub(crate) fn number(&self, sink: &mut Sink<'_>) -> Option<f64> {
        match &self.node.data {
            YamlData::Value(Scalar::Integer(i)) => Some(*i as f64),
            YamlData::Value(Scalar::FloatingPoint(f)) => Some(f.0),
            _ => {
                self.wrong(sink, "a number");
                None
            }
        }
    }

    /// An integer between `min` and `max`; out of range is reported with
    /// `hint` appended (e.g. "leave the field out for no limit").
    pub(crate) fn integer_in(
        &self,
        sink: &mut Sink<'_>,
        min: i64,
        max: i64,
        hint: &str,
    ) -> Option<i64> {
        let n = self.integer(sink)?;
        if (min..=max).contains(&n) {
            return Some(n);
        }
        let hint = if hint.is_empty() {
            String::new()
        } else {
            format!(" ({hint})")
        };
        sink.error(
            self.line(),
            format!(
                "'{}' must be between {min} and {max}, found {n}{hint}",
                self.path
            ),
        );
        None
    }

    /// A port number, 1 to 65535.
    pub(crate) fn port(&self, sink: &mut Sink<'_>) -> Option<u16> {
        let n = self.integer(sink)?;
        match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                sink.error(
                    self.line(),
                    format!("'{}': port number {n} is out of range (1-65535)", self.path),
                );
                None
            }
        }
    }

    /// A list: each element with its path (`path[i]`).
    pub(crate) fn list(&self, sink: &mut Sink<'_>) -> Option<Vec<(String, &'n Node<'a>)>> {
        match &self.node.data {
            YamlData::Sequence(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("{}[{i}]", self.path), n))
                    .collect(),
            ),
            _ => {
                self.wrong(sink, "a list");
                None
            }
        }
    }

    /// A mapping with arbitrary string keys (header names, labels): each
    /// entry as (key, key line, value path, value).
    pub(crate) fn entries(&self, sink: &mut Sink<'_>) -> Option<Vec<MapEntry<'n, 'a>>> {
        let YamlData::Mapping(map) = &self.node.data else {
            self.wrong(sink, "a mapping");
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (k, v) in map.iter() {
            match &k.data {
                YamlData::Value(Scalar::String(key)) => out.push(MapEntry {
                    key: key.to_string(),
                    line: line_of(k),
                    path: join(self.path, key),
                    node: v,
                }),
                _ => {
                    sink.error(
                        line_of(k),
                        format!(
                            "keys of '{}' must be strings, found {}",
                            self.path,
                            describe(k)
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// A list of strings, each with its path and line.
    pub(crate) fn string_list(
        &self,
        sink: &mut Sink<'_>,
    ) -> Option<Vec<(String, Spanned<String>)>> {
        let items = self.list(sink)?;
        let before = sink.count();
        let mut out = Vec::new();
        for (path, node) in &items {
            let item = Field {
                path,
                key_line: line_of(node),
                node,
            };
            if let Some(s) = item.string(sink) {
                out.push((path.clone(), s));
            }
        }
        (sink.count() == before).then_some(out)
    }

    /// A mapping whose keys are strings or integers (Istio's
    /// `portLevelMtls: {8080: ...}`): each entry with the key as written.
    pub(crate) fn scalar_key_entries(&self, sink: &mut Sink<'_>) -> Option<Vec<MapEntry<'n, 'a>>> {
        let YamlData::Mapping(map) = &self.node.data else {
            self.wrong(sink, "a mapping");
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (k, v) in map.iter() {
            let key = match &k.data {
                YamlData::Value(Scalar::String(key)) => key.to_string(),
                YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                _ => {
                    sink.error(
                        line_of(k),
                        format!(
                            "keys of '{}' must be strings or numbers, found {}",
                            self.path,
                            describe(k)
                        ),
                    );
                    ok = false;
                    continue;
                }
            };
            out.push(MapEntry {
                path: join(self.path, &key),
                key,
                line: line_of(k),
                node: v,
            });
        }
        ok.then_some(out)
    }

    /// A mapping of strings to strings (labels).
    pub(crate) fn string_map(&self, sink: &mut Sink<'_>) -> Option<BTreeMap<String, String>> {
        let entries = self.entries(sink)?;
        let mut out = BTreeMap::new();
        let before = sink.count();
        for e in entries {
            let f = e.field();
            if let Some(v) = f.string(sink) {
                out.insert(e.key, v.value);
            }
        }
        (sink.count() == before).then_some(out)
    }
}

/// One entry of a free-form mapping.
pub(crate) struct MapEntry<'n, 'a> {
    pub(crate) key: String,
    pub(crate) line: usize,
    pub(crate) path: String,
    pub(crate) node: &'n Node<'a>,
}

impl<'n, 'a> MapEntry<'n, 'a> {
    /// The entry as a field, to read its value.
    pub(crate) fn field(&self) -> Field<'_, 'n, 'a> {
        Field {
            path: &self.path,
            key_line: self.line,
            node: self.node,
        }
    }
}

/// A read-only look at a loaded document, for reports about what it says
/// (`check --for grpc`) rather than for validation: an absent, null or
/// mistyped value reads as absent (validation reports those).
#[derive(Clone, Copy)]
pub(crate) struct Look<'n, 'a> {
    /// The line of the key this value is under (the node's own line for
    /// the document and for list items): where a report about it points.
    pub(crate) line: usize,
    node: &'n Node<'a>,
}

impl<'n, 'a> Look<'n, 'a> {
    /// The whole document.
    pub(crate) fn document(node: &'n Node<'a>) -> Self {
        Look {
            line: line_of(node),
            node,
        }
    }

    /// The value at a dotted path of mapping keys (`spec.trafficPolicy`).
    pub(crate) fn get(&self, path: &str) -> Option<Look<'n, 'a>> {
        let mut at = *self;
        for key in path.split('.') {
            let YamlData::Mapping(map) = &at.node.data else {
                return None;
            };
            let (k, v) = map
                .iter()
                .find(|(k, _)| matches!(&k.data, YamlData::Value(Scalar::String(s)) if s == key))?;
            if matches!(v.data, YamlData::Value(Scalar::Null)) {
                return None;
            }
            at = Look {
                line: line_of(k),
                node: v,
            };
        }
        Some(at)
    }

    /// The items of a list (none if it is not one).
    pub(crate) fn items(&self) -> Vec<Look<'n, 'a>> {
        match &self.node.data {
            YamlData::Sequence(items) => items
                .iter()
                .map(|node| Look {
                    line: line_of(node),
                    node,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The string-keyed entries of a mapping, in document order.
    pub(crate) fn entries(&self) -> Vec<(String, Look<'n, 'a>)> {
        let YamlData::Mapping(map) = &self.node.data else {
            return Vec::new();
        };
        map.iter()
            .filter_map(|(k, v)| match &k.data {
                YamlData::Value(Scalar::String(key)) => Some((
                    key.to_string(),
                    Look {
                        line: line_of(k),
                        node: v,
                    },
                )),
                YamlData::Value(Scalar::Integer(key)) => Some((
                    key.to_string(),
                    Look {
                        line: line_of(k),
                        node: v,
                    },
                )),
                _ => None,
            })
            .collect()
    }

    /// A scalar as text: a string, or a number or boolean as written
    /// (`retryOn: 503` is an integer to YAML).
    pub(crate) fn text(&self) -> Option<String> {
        match &self.node.data {
            YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
            YamlData::Value(Scalar::Integer(i)) => Some(i.to_string()),
            YamlData::Value(Scalar::Boolean(b)) => Some(b.to_string()),
            _ => None,
        }
    }

    /// An integer.
    pub(crate) fn integer(&self) -> Option<i64> {
        match &self.node.data {
            YamlData::Value(Scalar::Integer(i)) => Some(*i),
            _ => None,
        }
    }

    /// A boolean.
    pub(crate) fn boolean(&self) -> Option<bool> {
        match &self.node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_look_finds_values_and_the_lines_of_their_keys() {
        let text = "kind: X\nspec:\n  http:\n  - retries:\n      attempts: 3\n      \
                    retryOn: 503\n  - {}\n  gone: null\n";
        let docs = parse_documents(text).unwrap();
        let doc = Look::document(&docs[0]);
        assert_eq!(doc.get("kind").and_then(|k| k.text()).as_deref(), Some("X"));
        let http = doc.get("spec.http").unwrap().items();
        assert_eq!(http.len(), 2);
        assert_eq!(http[0].line, 4);
        let retry_on = http[0].get("retries.retryOn").unwrap();
        assert_eq!(
            (retry_on.line, retry_on.text().as_deref()),
            (6, Some("503"))
        );
        assert_eq!(http[0].get("retries.attempts").unwrap().integer(), Some(3));
        assert!(http[1].get("retries").is_none());
        assert!(doc.get("spec.gone").is_none(), "null reads as absent");
        assert!(doc.get("kind.deeper").is_none());
    }

    #[test]
    fn fingerprints_follow_content_not_layout() {
        let fp = |text: &str| fingerprint(&parse_documents(text).unwrap()[0]);
        let a = fp("kind: X\nspec: {a: 1, b: [x, y]}\n");
        assert_eq!(
            a,
            fp("# a comment\n\nkind: X\nspec:\n  a: 1\n  b:\n  - x\n  - y\n")
        );
        assert_ne!(a, fp("kind: X\nspec: {a: 2, b: [x, y]}\n"));
    }

    #[test]
    fn lines_are_those_of_keys_and_values() {
        let text = "# c\nkind: X\nspec:\n  a: 1\n  b:\n  - x\n  - y\n";
        let docs = parse_documents(text).unwrap();
        let mut sink = Sink::new(Path::new("f.yaml"));
        let top = Fields::read(&mut sink, &docs[0], "", &["kind", "spec"], &[]).unwrap();
        let spec = top.get("spec").unwrap();
        assert_eq!(spec.key_line, 3);
        let spec = Fields::read(&mut sink, spec.node, "", &["a", "b"], &[]).unwrap();
        assert_eq!(spec.line, 4);
        assert_eq!(spec.get("a").unwrap().line(), 4);
        let b = spec.get("b").unwrap().list(&mut sink).unwrap();
        assert_eq!(b[1].0, "b[1]");
        assert_eq!(line_of(b[1].1), 7);
        assert_eq!(sink.count(), 0);
    }

    #[test]
    fn empty_documents_are_skipped_and_syntax_errors_have_lines() {
        let docs = parse_documents("---\na: 1\n---\n---\n# only a comment\n").unwrap();
        assert_eq!(docs.len(), 1);
        assert!(parse_documents("# nothing\n").unwrap().is_empty());
        let (line, msg) = parse_documents("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(msg.starts_with("YAML syntax error"), "{msg}");
        let (line, msg) = parse_documents("a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
        assert_eq!(line, 4);
        assert!(msg.contains("duplicated key"), "{msg}");
    }
}
