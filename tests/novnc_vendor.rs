//! The noVNC built into the binary (`vendor/novnc/`) is the `@novnc/novnc`
//! package pinned in `package-lock.json`, file for file, and holds exactly
//! the modules the console page loads. `npm ci` puts the locked package in
//! `node_modules`; `scripts/update-novnc` refreshes the copy from it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

const FIX: &str = "run scripts/update-novnc (it runs `npm ci` and copies the locked package)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vendored() -> PathBuf {
    repo().join("vendor/novnc")
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn version(package_json: &Path) -> String {
    json(package_json)["version"]
        .as_str()
        .unwrap_or_else(|| panic!("{} has no version", package_json.display()))
        .to_owned()
}

fn locked_version() -> String {
    json(&repo().join("package-lock.json"))["packages"]["node_modules/@novnc/novnc"]["version"]
        .as_str()
        .expect("package-lock.json pins @novnc/novnc")
        .to_owned()
}

/// Every file under `dir`, hidden ones too, relative and with `/`.
fn files(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if entry.file_type().unwrap().is_dir() {
            files(&entry.path(), &format!("{rel}/"), out);
        } else {
            out.insert(rel);
        }
    }
}

/// The relative module specifiers a JavaScript module imports
/// (`from '...'`, `import '...'`, `import('...')`).
fn relative_imports(source: &str) -> Vec<String> {
    let mut specs = Vec::new();
    for keyword in ["from", "import"] {
        for (at, _) in source.match_indices(keyword) {
            let before = source[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == '.') {
                continue;
            }
            let rest = source[at + keyword.len()..].trim_start();
            let rest = rest.strip_prefix('(').unwrap_or(rest).trim_start();
            let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                continue;
            };
            let Some((spec, _)) = rest[1..].split_once(quote) else {
                continue;
            };
            if spec.starts_with("./") || spec.starts_with("../") {
                specs.push(spec.to_owned());
            }
        }
    }
    specs
}

/// `spec` imported from module `from`, as a path in the package.
fn resolve(from: &str, spec: &str) -> String {
    let mut parts: Vec<&str> = from.split('/').collect();
    parts.pop();
    for part in spec.split('/') {
        match part {
            "." | "" => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

#[test]
fn the_vendored_copy_is_the_locked_package() {
    let locked = locked_version();
    let package = repo().join("node_modules/@novnc/novnc");
    assert!(
        package.join("package.json").is_file(),
        "node_modules/@novnc/novnc is missing: run `npm ci`"
    );
    assert_eq!(
        version(&package.join("package.json")),
        locked,
        "node_modules/@novnc/novnc is not the version in package-lock.json: run `npm ci`"
    );
    assert_eq!(
        version(&vendored().join("package.json")),
        locked,
        "vendor/novnc is not the locked noVNC: {FIX}"
    );
    let mut copied = BTreeSet::new();
    files(&vendored(), "", &mut copied);
    let differing: Vec<&String> = copied
        .iter()
        .filter(|f| std::fs::read(vendored().join(f)).ok() != std::fs::read(package.join(f)).ok())
        .collect();
    assert!(
        differing.is_empty(),
        "vendor/novnc differs from the locked package in {differing:?}: {FIX}"
    );
    // The page imports this version's path, which is cached for good.
    let page = std::fs::read_to_string(repo().join("web/console.js")).unwrap();
    let import = format!("from '/novnc/{locked}/core/rfb.js'");
    assert!(
        page.contains(&import),
        "web/console.js lacks {import}: {FIX}"
    );
}

#[test]
fn the_vendored_copy_holds_what_the_console_page_loads_and_the_licences() {
    let mut copied = BTreeSet::new();
    files(&vendored(), "", &mut copied);
    let mut loaded = BTreeSet::new();
    let mut missing = Vec::new();
    let mut todo = vec!["core/rfb.js".to_owned()];
    while let Some(module) = todo.pop() {
        if !loaded.insert(module.clone()) {
            continue;
        }
        let Ok(source) = std::fs::read_to_string(vendored().join(&module)) else {
            missing.push(module);
            continue;
        };
        for spec in relative_imports(&source) {
            todo.push(resolve(&module, &spec));
        }
    }
    assert!(
        missing.is_empty(),
        "modules imported but not vendored: {missing:?}: {FIX}"
    );
    let modules: BTreeSet<String> = copied
        .iter()
        .filter(|f| f.ends_with(".js"))
        .cloned()
        .collect();
    let unused: Vec<&String> = modules.difference(&loaded).collect();
    assert!(
        unused.is_empty(),
        "vendored modules nothing loads: {unused:?}: {FIX}"
    );
    assert!(
        loaded.len() > 40,
        "only {} modules: {loaded:?}",
        loaded.len()
    );
    for licence in [
        "LICENSE.txt",
        "AUTHORS",
        "docs/LICENSE.MPL-2.0",
        "vendor/pako/LICENSE",
    ] {
        assert!(
            copied.contains(licence),
            "vendor/novnc lacks {licence}: {FIX}"
        );
    }
    let others: Vec<&String> = copied
        .iter()
        .filter(|f| {
            !f.ends_with(".js") && *f != "package.json" && !f.contains("LICENSE") && *f != "AUTHORS"
        })
        .collect();
    assert!(
        others.is_empty(),
        "unexpected files in vendor/novnc: {others:?}"
    );
}

#[test]
fn imports_are_found_and_resolved() {
    let src = "import * as Log from './util/logging.js';\nimport Display from \"./display.js\"\n\
               import {\n  a,\n  b\n} from '../x/y.js';\nimport './side.js';\nconst m = import( './lazy.js');\n\
               // ported from 'ar' written by someone\nimport x from 'bare';\nconst fromage = Xfrom './no.js';";
    assert_eq!(
        relative_imports(src),
        [
            "./util/logging.js",
            "./display.js",
            "../x/y.js",
            "./side.js",
            "./lazy.js"
        ]
    );
    assert_eq!(resolve("core/rfb.js", "./util/int.js"), "core/util/int.js");
    assert_eq!(
        resolve("core/inflator.js", "../vendor/pako/lib/zlib/inflate.js"),
        "vendor/pako/lib/zlib/inflate.js"
    );
}
