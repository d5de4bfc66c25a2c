//! The layering of guard's userspace, checked: each layer may use only the
//! layers below it (see the crate documentation and ARCHITECTURE.md), so the
//! module graph has no cycles and the daemon never reaches into `guard run`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Modules every layer may use: errors, reading input files (`input.rs`,
/// which uses nothing of the crate), and the test-only `fault`.
const BASE: &[&str] = &["error", "input", "fault"];

/// Layer -> the layers it may use (besides itself and [`BASE`]).
const ALLOWED: &[(&str, &[&str])] = &[
    ("kernel", &[]),
    ("policy", &[]),
    ("report", &["kernel", "policy"]),
    ("api", &["kernel", "policy", "report"]),
    // The dependency map reads what runs record; runs write to it.
    ("deps", &["kernel", "policy", "report"]),
    ("run", &["api", "deps", "kernel", "policy", "report"]),
    ("daemon", &["api", "kernel", "policy", "report"]),
    ("doctor", &["api", "kernel", "policy", "report"]),
];

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    let mut seen: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (layer, allowed) in ALLOWED {
        for file in rust_files(&src.join(layer)) {
            let text = fs::read_to_string(&file).unwrap();
            for used in crate_modules(&text) {
                if used != *layer
                    && !BASE.contains(&used.as_str())
                    && !allowed.contains(&used.as_str())
                {
                    violations.push(format!(
                        "{} ({layer}) uses crate::{used}",
                        file.strip_prefix(&src).unwrap().display()
                    ));
                }
                seen.entry(layer).or_default().insert(used);
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    // The check sees real uses (it would pass vacuously otherwise).
    assert!(seen["run"].contains("api") && seen["daemon"].contains("kernel"));
    let input = fs::read_to_string(src.join("input.rs")).unwrap();
    assert!(
        crate_modules(&input).is_empty(),
        "input.rs uses nothing of the crate"
    );
}

#[test]
fn the_module_reader_sees_every_form_of_use() {
    let text = "use crate::{\n    api::{self, Frame},\n    kernel::{\n        cgroup::X,\n    },\n    error::Result,\n};\nuse crate::report::Y;\nfn f() { crate::policy::compile(); }\nuse crate::{run, daemon::{a, b}};\n";
    let found: BTreeSet<String> = crate_modules(text).into_iter().collect();
    let expected: BTreeSet<String> = [
        "api", "kernel", "error", "report", "policy", "run", "daemon",
    ]
    .map(String::from)
    .into();
    assert_eq!(found, expected);
}

/// Top-level modules of the crate a file refers to: `crate::name` anywhere,
/// and the first-level names of `use crate::{...}` groups.
fn crate_modules(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut word = String::new();
            let mut first_level_name = true;
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if ch.is_alphanumeric() || ch == '_' {
                    word.push(ch);
                    continue;
                }
                if depth == 1 && first_level_name && !word.is_empty() {
                    found.push(word.clone());
                    first_level_name = false;
                }
                word.clear();
                if depth == 1 && ch == ',' {
                    first_level_name = true;
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}
