//! The spice-html5 built into the binary (`vendor/spice-html5/`) is Debian's
//! `spice-html5` package as installed, file for file, with the package's
//! copyright file and the licence texts it names, and holds exactly the
//! modules the console page loads. `scripts/update-spice-html5` refreshes
//! the copy from the package.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const FIX: &str = "run scripts/update-spice-html5 (after apt-get install spice-html5)";
const INSTALLED: &str = "/usr/share/spice-html5";

fn vendored() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vendor/spice-html5")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir`, relative and with `/`.
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

/// The modules `module` imports (spice-html5 writes every import as
/// `from './x.js'`), as paths in the package.
fn imports(module: &str, source: &str) -> Vec<String> {
    let dir = module.rsplit_once('/').map_or("", |(d, _)| d);
    source
        .match_indices("from '")
        .filter_map(|(at, m)| source[at + m.len()..].split_once('\''))
        .filter_map(|(spec, _)| spec.strip_prefix("./"))
        .map(|rel| {
            if dir.is_empty() {
                rel.to_owned()
            } else {
                format!("{dir}/{rel}")
            }
        })
        .collect()
}

fn version() -> String {
    String::from_utf8(read(&vendored().join("VERSION")))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn the_vendored_copy_is_the_installed_debian_package() {
    assert!(
        Path::new(INSTALLED).join("main.js").is_file(),
        "{INSTALLED} is missing: apt-get install spice-html5 (scripts/test does)"
    );
    let out = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "spice-html5"])
        .output()
        .expect("dpkg-query");
    let debian = String::from_utf8(out.stdout).unwrap();
    let upstream = debian.rsplit_once('-').map_or(debian.as_str(), |(v, _)| v);
    assert_eq!(
        version(),
        upstream,
        "vendor/spice-html5 is not the installed spice-html5 {debian}: {FIX}"
    );
    let readme = String::from_utf8(read(&vendored().join("README.md"))).unwrap();
    assert!(
        readme.contains(&format!("spice-html5 {upstream} (Debian's {debian})")),
        "vendor/spice-html5/README.md does not name {debian}: {FIX}"
    );

    let mut copied = BTreeSet::new();
    files(&vendored(), "", &mut copied);
    let theirs = |f: &str| -> PathBuf {
        match f {
            "COPYING.txt" => "/usr/share/doc/spice-html5/copyright".into(),
            "LGPL-3.txt" => "/usr/share/common-licenses/LGPL-3".into(),
            "GPL-3.txt" => "/usr/share/common-licenses/GPL-3".into(),
            _ => Path::new(INSTALLED).join(f),
        }
    };
    let differing: Vec<&String> = copied
        .iter()
        .filter(|f| !matches!(f.as_str(), "README.md" | "VERSION"))
        .filter(|f| std::fs::read(vendored().join(f)).ok() != std::fs::read(theirs(f)).ok())
        .collect();
    assert!(
        differing.is_empty(),
        "vendor/spice-html5 differs from the installed package in {differing:?}: {FIX}"
    );
}

#[test]
fn the_vendored_copy_holds_what_the_console_page_loads_and_the_licences() {
    let mut copied = BTreeSet::new();
    files(&vendored(), "", &mut copied);
    let mut loaded = BTreeSet::new();
    let mut missing = Vec::new();
    let mut todo = vec!["main.js".to_owned()];
    while let Some(module) = todo.pop() {
        if !loaded.insert(module.clone()) {
            continue;
        }
        let Ok(source) = std::fs::read_to_string(vendored().join(&module)) else {
            missing.push(module);
            continue;
        };
        todo.extend(imports(&module, &source));
    }
    assert!(
        missing.is_empty(),
        "modules imported but not vendored: {missing:?}: {FIX}"
    );
    assert!(loaded.contains("thirdparty/rsa.js"), "{loaded:?}");
    let others: BTreeSet<String> = copied.difference(&loaded).cloned().collect();
    let expected: BTreeSet<String> = [
        "COPYING.txt",
        "GPL-3.txt",
        "LGPL-3.txt",
        "README.md",
        "VERSION",
    ]
    .map(String::from)
    .into();
    assert_eq!(
        others, expected,
        "vendor/spice-html5 holds other files than the modules main.js loads and the licences"
    );

    // The page imports spice-html5 by this version's path, which is cached
    // for good, and nothing under another.
    let page =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web/spice.js"))
            .unwrap();
    let prefix = format!("'/spice-html5/{}/", version());
    let paths = page.matches("'/spice-html5/").count();
    assert!(paths >= 1, "web/spice.js does not import spice-html5");
    assert_eq!(
        page.matches(&prefix).count(),
        paths,
        "web/spice.js imports spice-html5 from another path than {prefix}: {FIX}"
    );
}

#[test]
fn imports_are_found_and_resolved() {
    let src = "import * as Messages from './spicemsg.js';\nimport { Constants } from './enums.js';\n\
               import {\n  a,\n} from './spicemsg.js';\nimport { x } from 'bare';";
    assert_eq!(
        imports("main.js", src),
        ["spicemsg.js", "enums.js", "spicemsg.js"]
    );
    assert_eq!(
        imports("thirdparty/rng.js", "import { p } from './prng4.js';"),
        ["thirdparty/prng4.js"]
    );
}
