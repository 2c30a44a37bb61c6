//! Builds the console page (`web/`) and the vendored noVNC and spice-html5
//! modules (`vendor/novnc/`, `vendor/spice-html5/`) into the binary, so that
//! it serves a working console with no files beside it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut out = String::new();
    for (name, dir, needed) in [
        ("WEB_FILES", "web", "console.html"),
        ("NOVNC_FILES", "vendor/novnc", "core/rfb.js"),
        ("SPICE_FILES", "vendor/spice-html5", "main.js"),
    ] {
        println!("cargo::rerun-if-changed={dir}");
        let mut files = Vec::new();
        collect(&root.join(dir), "", &mut files);
        files.sort();
        if !files.iter().any(|(rel, _)| rel == needed) {
            panic!(
                "{dir}/{needed} is missing (vendor/novnc is refreshed by scripts/update-novnc, \
                 vendor/spice-html5 by scripts/update-spice-html5)"
            );
        }
        writeln!(out, "static {name}: &[(&str, &[u8])] = &[").unwrap();
        // Paths relative to the package, resolved when the crate compiles,
        // so this output holds no absolute path of the tree it came from.
        for (rel, _) in files {
            let from_root = format!("/{dir}/{rel}");
            writeln!(
                out,
                "    ({rel:?}, include_bytes!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {from_root:?}))),"
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let version = novnc_version(&root.join("vendor/novnc/package.json"));
    writeln!(out, "const NOVNC_VERSION: &str = {version:?};").unwrap();
    let version = spice_version(&root.join("vendor/spice-html5/VERSION"));
    writeln!(out, "const SPICE_VERSION: &str = {version:?};").unwrap();
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("assets.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}

/// Every regular file under `dir`, as (path relative to `dir`, absolute
/// path); hidden names are left out, as the server would refuse them.
fn collect(dir: &Path, prefix: &str, files: &mut Vec<(String, String)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; the console page's files are part of the source tree \
             (vendor/novnc is refreshed by scripts/update-novnc, \
             vendor/spice-html5 by scripts/update-spice-html5)",
            dir.display()
        )
    });
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            panic!("{}: file names must be UTF-8", path.display());
        };
        if name.starts_with('.') {
            continue;
        }
        let rel = format!("{prefix}{name}");
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if meta.is_dir() {
            collect(&path, &format!("{rel}/"), files);
        } else if meta.is_file() {
            let Some(abs) = path.to_str().map(str::to_owned) else {
                panic!("{}: paths must be UTF-8", path.display());
            };
            files.push((rel, abs));
        }
    }
}

/// The `version` of noVNC's package.json; it names the path its modules are
/// served under.
fn novnc_version(package_json: &Path) -> String {
    let text = std::fs::read_to_string(package_json)
        .unwrap_or_else(|e| panic!("{}: {e}", package_json.display()));
    let version = text
        .split_once("\"version\"")
        .and_then(|(_, rest)| rest.trim_start().strip_prefix(':'))
        .and_then(|rest| rest.trim_start().strip_prefix('"'))
        .and_then(|rest| rest.split_once('"'))
        .map(|(v, _)| v.to_owned())
        .unwrap_or_default();
    if !plain_version(&version) {
        panic!(
            "{}: no plain \"version\" (got {version:?})",
            package_json.display()
        );
    }
    version
}

/// spice-html5's version, which scripts/update-spice-html5 writes to
/// vendor/spice-html5/VERSION; it names the path its modules are served
/// under.
fn spice_version(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let version = text.trim();
    if !plain_version(version) {
        panic!("{}: no plain version (got {version:?})", file.display());
    }
    version.to_owned()
}

/// A version that can be one part of a URL path as it is.
fn plain_version(version: &str) -> bool {
    let plain = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
    !version.is_empty() && !version.starts_with('.') && version.chars().all(plain)
}
