//! The import rule of the library's top-level modules (ARCHITECTURE.md, "Layers").
//!
//! Reads `src/`, finds every path to another top-level module in code (`crate::x`, `$crate::x`,
//! `super::x` reaching the crate root, grouped `use crate::{x, y::z}`, and string literals that
//! are whole paths, such as `serialize_with = "crate::numbers::..."`), and checks that
//!
//! - the graph of top-level modules has no cycle, and
//! - every module is in a layer and imports only from lower layers (or from its own layer where
//!   that layer allows it).
//!
//! Comments, doc comments (intra-doc links are not imports) and the text of string literals
//! are left out; `#[cfg(test)]` modules are *not* left out: tests follow the same rule.
//! The binary's modules (`main.rs` and the modules it declares, such as `cli/`) are not part of
//! the library and are not read.
//!
//! Run it: `cargo test --test module_layers`. To check another tree's sources, point
//! `INFERFLOW_LAYERS_SRC` at its `src` directory, e.g.
//! `INFERFLOW_LAYERS_SRC=/path/to/other/src cargo test --test module_layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import from lower layers only, and from its own layer
/// when the layer allows it (never in a cycle).
const LAYERS: &[Layer] = &[
    Layer {
        name: "leaf",
        modules: &["backoff", "model", "numbers", "secret", "section"],
        within: false,
    },
    Layer {
        name: "component",
        modules: &[
            "access",
            "batching",
            "decode",
            "executor",
            "feature_store",
            "kafka",
            "metrics",
            "pipeline",
            "providers",
            "replay",
            "telemetry",
            "tracing_otel",
        ],
        within: true,
    },
    Layer {
        name: "config",
        modules: &["config"],
        within: false,
    },
    Layer {
        name: "app",
        modules: &["app", "client", "http", "processor"],
        within: true,
    },
];

struct Layer {
    name: &'static str,
    modules: &'static [&'static str],
    /// Whether modules of this layer may import each other.
    within: bool,
}

/// Where one top-level module names another: file (relative to `src/`) and line.
type Sites = Vec<(String, usize)>;

/// `from -> to -> where`.
type Graph = BTreeMap<String, BTreeMap<String, Sites>>;

fn src_dir() -> PathBuf {
    match std::env::var_os("INFERFLOW_LAYERS_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    }
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = module_graph(&src_dir());
    let cycles: Vec<Vec<String>> = strongly_connected(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .collect();
    if cycles.is_empty() {
        return;
    }
    let mut report = String::new();
    for scc in &cycles {
        let _ = writeln!(report, "cycle between {}", scc.join(", "));
        if let Some(path) = one_cycle(&graph, scc) {
            let _ = writeln!(report, "  for example {}", path.join(" -> "));
        }
        for from in scc {
            for (to, sites) in &graph[from] {
                if scc.contains(to) {
                    let _ = writeln!(report, "  {from} -> {to}: {}", show_sites(sites));
                }
            }
        }
    }
    panic!("the top-level modules of src/ import each other in a cycle:\n{report}");
}

#[test]
fn imports_only_go_down_the_layers() {
    let dir = src_dir();
    let graph = module_graph(&dir);
    let layer_of = |module: &str| LAYERS.iter().position(|l| l.modules.contains(&module));
    let mut report = String::new();
    for module in top_level_modules(&dir) {
        if layer_of(&module).is_none() {
            let _ = writeln!(
                report,
                "{module} is in no layer: add it to LAYERS in tests/module_layers.rs and to ARCHITECTURE.md"
            );
        }
    }
    for (from, targets) in &graph {
        let Some(from_layer) = layer_of(from) else {
            continue;
        };
        for (to, sites) in targets {
            let Some(to_layer) = layer_of(to) else {
                continue;
            };
            let allowed =
                to_layer < from_layer || (to_layer == from_layer && LAYERS[from_layer].within);
            if !allowed {
                let _ = writeln!(
                    report,
                    "{from} ({}) -> {to} ({}): {}",
                    LAYERS[from_layer].name,
                    LAYERS[to_layer].name,
                    show_sites(sites)
                );
            }
        }
    }
    assert!(
        report.is_empty(),
        "imports against the layers (leaf < component < config < app):\n{report}"
    );
}

fn show_sites(sites: &Sites) -> String {
    let shown: Vec<String> = sites
        .iter()
        .take(6)
        .map(|(file, line)| format!("{file}:{line}"))
        .collect();
    let more = sites.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The library's top-level modules: the `mod` items of `lib.rs`.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    let lib = fs::read_to_string(src.join("lib.rs")).expect("reading src/lib.rs");
    let tokens = tokens(&code_only(&lib));
    let mut modules = BTreeSet::new();
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        match token.text.as_str() {
            "{" => depth += 1,
            "}" => depth = depth.saturating_sub(1),
            "mod" if depth == 0 => {
                if let (Some(name), Some(end)) = (tokens.get(i + 1), tokens.get(i + 2))
                    && end.text == ";"
                    && is_ident(&name.text)
                {
                    modules.insert(name.text.clone());
                }
            }
            _ => {}
        }
    }
    modules
}

/// The graph of the top-level modules under `src`.
fn module_graph(src: &Path) -> Graph {
    let modules = top_level_modules(src);
    let mut graph = Graph::new();
    for module in &modules {
        graph.entry(module.clone()).or_default();
        let mut files = Vec::new();
        let file = src.join(format!("{module}.rs"));
        if file.is_file() {
            files.push(file);
        }
        rust_files(&src.join(module), &mut files);
        for file in files {
            let rel = file.strip_prefix(src).expect("under src").to_path_buf();
            let text = fs::read_to_string(&file).expect("reading a source file");
            for (target, line) in references(&rel, &text, &modules) {
                if target != *module {
                    graph
                        .entry(module.clone())
                        .or_default()
                        .entry(target)
                        .or_default()
                        .push((rel.display().to_string(), line));
                }
            }
        }
    }
    graph
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file relative to `src/`: `kafka/source.rs` is `kafka::source`,
/// `kafka/mod.rs` and `kafka.rs` are `kafka`.
fn file_module_depth(rel: &Path) -> usize {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts.last().map(String::as_str) {
        Some("mod.rs") => parts.len() - 1,
        _ => parts.len(),
    }
}

/// The top-level modules a file refers to, with the line of each reference.
fn references(rel: &Path, text: &str, modules: &BTreeSet<String>) -> Vec<(String, usize)> {
    let tokens = tokens(&code_only(text));
    let file_depth = file_module_depth(rel);
    let mut found = Vec::new();
    // Inline `mod name { ... }` blocks open at these brace depths.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        match t.text.as_str() {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline_mods.last() == Some(&depth) {
                    inline_mods.pop();
                }
            }
            "mod" => {
                let opens = tokens.get(i + 2).is_some_and(|t| t.text == "{");
                if tokens.get(i + 1).is_some_and(|t| is_ident(&t.text)) && opens {
                    inline_mods.push(depth);
                }
            }
            "crate" if next_is(&tokens, i + 1, "::") => {
                for name in first_segments(&tokens, i + 2) {
                    if modules.contains(&name) {
                        found.push((name, t.line));
                    }
                }
            }
            "super" if next_is(&tokens, i + 1, "::") => {
                // `super::super::...`: reaches the crate root after as many steps as the
                // current module is deep.
                let mut steps = 1;
                let mut j = i + 2;
                while tokens.get(j).is_some_and(|t| t.text == "super")
                    && next_is(&tokens, j + 1, "::")
                {
                    steps += 1;
                    j += 2;
                }
                if steps == file_depth + inline_mods.len() {
                    for name in first_segments(&tokens, j) {
                        if modules.contains(&name) {
                            found.push((name, t.line));
                        }
                    }
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

fn next_is(tokens: &[Token], i: usize, text: &str) -> bool {
    tokens.get(i).is_some_and(|t| t.text == text)
}

/// The first segment of the path at `tokens[i]`: one name, or each item's first name in a
/// `{a, b::c, d::{e}}` group.
fn first_segments(tokens: &[Token], i: usize) -> Vec<String> {
    let Some(first) = tokens.get(i) else {
        return Vec::new();
    };
    if first.text != "{" {
        return if is_ident(&first.text) {
            vec![first.text.clone()]
        } else {
            Vec::new()
        };
    }
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut item_start = true;
    for t in &tokens[i..] {
        match t.text.as_str() {
            "{" => {
                depth += 1;
                if depth == 1 {
                    item_start = true;
                }
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => item_start = true,
            name if depth == 1 && item_start => {
                if is_ident(name) {
                    names.push(name.to_owned());
                }
                item_start = false;
            }
            _ => {}
        }
    }
    names
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

#[derive(Debug)]
struct Token {
    text: String,
    line: usize,
}

/// Identifiers, `::`, and single punctuation characters, with their lines.
fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token {
                text: chars[start..i].iter().collect(),
                line,
            });
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(Token {
                text: "::".to_owned(),
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}

/// `text` with comments and the contents of string and character literals blanked out
/// (newlines kept, so lines still count). A string literal that is a whole path to an item
/// (`"crate::numbers::serialize_plain_option"`, as serde attributes take them) is kept, without
/// its quotes, since it names an item as an import does.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, s: &[char]| {
        for &c in s {
            out.push(if c == '\n' { '\n' } else { ' ' });
        }
    };
    let ident_char = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let prev_ident = i > 0 && ident_char(chars[i - 1]);
        if c == '/' && next == Some('/') {
            let end = chars[i..]
                .iter()
                .position(|&c| c == '\n')
                .map_or(chars.len(), |p| i + p);
            blank(&mut out, &chars[i..end]);
            i = end;
        } else if c == '/' && next == Some('*') {
            let mut nesting = 0;
            let mut j = i;
            while j < chars.len() {
                if chars[j] == '/' && chars.get(j + 1) == Some(&'*') {
                    nesting += 1;
                    j += 2;
                } else if chars[j] == '*' && chars.get(j + 1) == Some(&'/') {
                    nesting -= 1;
                    j += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            let end = j.min(chars.len());
            blank(&mut out, &chars[i..end]);
            i = end;
        } else if !prev_ident && (c == 'r' || (c == 'b' && next == Some('r'))) && {
            // A raw string: r"...", r#"..."#, br"...".
            let mut j = if c == 'b' { i + 2 } else { i + 1 };
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            chars.get(j) == Some(&'"')
        } {
            let mut j = if c == 'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while chars[j] == '#' {
                hashes += 1;
                j += 1;
            }
            let body_start = j + 1;
            let mut k = body_start;
            let body_end = loop {
                if k >= chars.len() {
                    break chars.len();
                }
                if chars[k] == '"' && (1..=hashes).all(|h| chars.get(k + h) == Some(&'#')) {
                    break k;
                }
                k += 1;
            };
            let end = (body_end + 1 + hashes).min(chars.len());
            string_literal(
                &mut out,
                &chars[i..body_start],
                &chars[body_start..body_end],
            );
            blank(&mut out, &chars[body_end..end]);
            i = end;
        } else if c == '"' || (c == 'b' && next == Some('"') && !prev_ident) {
            let body_start = if c == 'b' { i + 2 } else { i + 1 };
            let mut k = body_start;
            while k < chars.len() && chars[k] != '"' {
                k += if chars[k] == '\\' { 2 } else { 1 };
            }
            let body_end = k.min(chars.len());
            string_literal(
                &mut out,
                &chars[i..body_start],
                &chars[body_start..body_end],
            );
            let end = (body_end + 1).min(chars.len());
            blank(&mut out, &chars[body_end..end]);
            i = end;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), or a lifetime ('a), kept.
            let end = if next == Some('\\') {
                chars[i + 2..]
                    .iter()
                    .position(|&c| c == '\'')
                    .map(|p| i + 2 + p + 1)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    blank(&mut out, &chars[i..end]);
                    i = end;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Blanks a string literal, or keeps its body when it is a whole `crate::`/`super::` path.
fn string_literal(out: &mut String, opening: &[char], body: &[char]) {
    let body_text: String = body.iter().collect();
    let segments: Vec<&str> = body_text.split("::").collect();
    let is_path = segments.len() > 1
        && matches!(segments[0], "crate" | "super")
        && segments.iter().all(|s| is_ident(s));
    for _ in opening {
        out.push(' ');
    }
    if is_path {
        out.push_str(&body_text);
    } else {
        for &c in body {
            out.push(if c == '\n' { '\n' } else { ' ' });
        }
    }
}

/// Tarjan's strongly connected components.
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|t| t.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            scc.sort();
            s.out.push(scc);
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}

/// A shortest cycle through the first module of `scc`, staying inside it.
fn one_cycle(graph: &Graph, scc: &[String]) -> Option<Vec<String>> {
    let start = scc.first()?;
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.as_str()]);
    while let Some(v) = queue.pop_front() {
        for w in graph[v].keys().filter(|w| scc.contains(w)) {
            if w == start {
                // Walk back from `v` to `start`, then turn it around.
                let mut back = vec![v];
                let mut at = v;
                while at != start {
                    at = came_from[at];
                    back.push(at);
                }
                let mut walk: Vec<String> = back.iter().rev().map(|m| (*m).to_owned()).collect();
                walk.push(start.clone());
                return Some(walk);
            }
            if !came_from.contains_key(w.as_str()) {
                came_from.insert(w.as_str(), v);
                queue.push_back(w.as_str());
            }
        }
    }
    None
}

/// The scanner itself: what counts as a reference and what does not.
mod scanner {
    use super::*;

    fn refs(rel: &str, text: &str) -> Vec<(String, usize)> {
        let modules: BTreeSet<String> = ["config", "kafka", "numbers", "pipeline", "providers"]
            .into_iter()
            .map(String::from)
            .collect();
        references(Path::new(rel), text, &modules)
    }

    #[test]
    fn paths_in_code_count_and_comments_and_strings_do_not() {
        let text = r#"//! See [`crate::pipeline`].
/// Uses [`crate::providers::Provider`].
use crate::kafka::KafkaConfig;
/* crate::pipeline in a block /* nested */ comment */
fn f() -> &'static str {
    let _c = 'x';
    "crate::pipeline::load_dir is only text here"
}
#[serde(serialize_with = "crate::numbers::serialize_plain_option")]
struct S;
"#;
        assert_eq!(
            refs("feature_store/coherence.rs", text),
            [("kafka".to_owned(), 3), ("numbers".to_owned(), 9)]
        );
    }

    #[test]
    fn grouped_imports_and_super_paths_resolve_to_top_level_modules() {
        let text = "use crate::{config::{Config, Sources}, kafka, numbers::Plain};\n\
                    use super::providers::Provider;\n\
                    use super::sibling;\n\
                    mod tests { use super::super::pipeline::PipelineDef; use super::*; }\n";
        // In `app.rs` (depth 1) `super::` is the crate root; in the inline module it takes two.
        assert_eq!(
            refs("app.rs", text),
            [
                ("config".to_owned(), 1),
                ("kafka".to_owned(), 1),
                ("numbers".to_owned(), 1),
                ("providers".to_owned(), 2),
                ("pipeline".to_owned(), 4),
            ]
        );
        // In `kafka/source.rs` (depth 2) one `super::` stays inside `kafka`.
        assert_eq!(refs("kafka/source.rs", "use super::providers::X;\n"), []);
        assert_eq!(
            refs("kafka/mod.rs", "use super::providers::X;\n"),
            [("providers".to_owned(), 1)]
        );
    }

    #[test]
    fn a_cycle_is_found_and_shown() {
        let mut graph = Graph::new();
        for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            graph
                .entry(from.to_owned())
                .or_default()
                .insert(to.to_owned(), vec![(format!("{from}.rs"), 1)]);
        }
        graph.entry("d".to_owned()).or_default();
        let sccs: Vec<Vec<String>> = strongly_connected(&graph)
            .into_iter()
            .filter(|s| s.len() > 1)
            .collect();
        assert_eq!(sccs, [["a", "b", "c"]]);
        assert_eq!(one_cycle(&graph, &sccs[0]).unwrap(), ["a", "b", "c", "a"]);
    }
}
