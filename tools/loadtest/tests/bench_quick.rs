//! The benchmark harness (tools/loadtest/src/bin/vncbroker-bench.rs) in `--quick` mode:
//! it runs to the end against the built broker and writes its report with
//! every expected row. No figure is checked: timings depend on the machine.

use std::process::Command;

#[test]
fn quick_benchmark_writes_a_report_with_every_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("BENCHMARKS.md");
    let run = Command::new(env!("CARGO_BIN_EXE_vncbroker-bench"))
        .arg("--quick")
        .arg("--broker")
        .arg(testkit::bin())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running vncbroker-bench");
    assert!(
        run.status.success(),
        "vncbroker-bench --quick failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let md = std::fs::read_to_string(&out).expect("reading the report");
    for heading in [
        "## Run",
        "## Targets",
        "## Results",
        "## TLS",
        "## CPU per GiB relayed",
        "## Memory with idle sessions",
    ] {
        assert!(md.lines().any(|l| l == heading), "no {heading:?} in:\n{md}");
    }
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    for row in [
        // Results, beside direct TCP, the plain relay and websockify.
        "download, 1 connection, 64 KiB writes |",
        "download, 16 connections, 64 KiB writes |",
        "upload, 1 KiB masked messages |",
        "upload, 64 KiB masked messages |",
        "round trip, 16-byte echo (p50 / p99) |",
        "round trip, 16-byte echo, all processes on one CPU (p50 / p99) |",
        "session setup, SQLite, 1 client |",
        "session setup, SQLite, 4 clients |",
        "token minting, XML-RPC keep-alive, SQLite, 4 connections |",
        "session setup, SQLite, empty token table, 4 clients |",
        "session setup, SQLite, 20,000 tokens in the table, 4 clients |",
        "session setup, PostgreSQL, 4 clients |",
        "token minting, XML-RPC keep-alive, PostgreSQL, 4 connections |",
        "session setup, PostgreSQL, 20,000 tokens in the table, 4 clients |",
        // Targets.
        "round trip, 16-byte echo |",
        "round trip, 16-byte echo, all processes on one CPU |",
        "token minting, SQLite |",
        "token minting, PostgreSQL |",
        "session setup, SQLite, 1 client, rate |",
        "session setup, SQLite, 1 client, p50 over direct TCP |",
        "session setup, SQLite, 4 clients, rate |",
        "session setup, SQLite, 4 clients, p50 over direct TCP |",
        "session setup, SQLite, 4 clients, p99 latency |",
        "session setup, PostgreSQL, 4 clients, no regression |",
        "upload, 64 KiB masked messages | ≥ 0.9× the plain relay",
        "upload, 1 KiB masked messages | ≥ 0.8× the plain relay",
        "WSS download, 1 connection, 64 KiB writes | ≥ 1.0× the TLS relay",
        "WSS upload, 64 KiB masked messages | ≥ 1.5× websockify",
        "CPU per GiB relayed, download, 1 connection, 64 KiB writes |",
        "CPU per GiB relayed, TLS: WSS upload, 1 KiB masked messages |",
        // TLS.
        "WSS download, 1 connection, 64 KiB writes |",
        "WSS upload, 64 KiB masked messages |",
        "WSS upload, 1 KiB masked messages |",
        // CPU.
        "TLS: WSS download, 1 connection, 64 KiB writes |",
        "session setup, SQLite, 20,000 tokens vs empty table |",
        "memory per idle session at 400 in one process, after the RFB greeting |",
        "memory per idle session at 500 over two processes, silent target |",
        "memory per idle session at 50 in one process, QEMU",
        // Memory.
        "vncbroker, 100 idle sessions, greeting target |",
        "vncbroker, 400 idle sessions, greeting target |",
        "vncbroker, 500 idle sessions over two processes, greeting target |",
        "vncbroker, 400 idle sessions, silent target |",
        "vncbroker, 20 idle sessions to QEMU",
        "websockify",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("| {row}"))),
            "no row {row:?} in:\n{md}"
        );
    }
    // Each results row has all eight columns.
    let results = md
        .split("## Results")
        .nth(1)
        .and_then(|s| s.split("## ").next())
        .expect("results section");
    for line in results.lines().filter(|l| l.starts_with("| ")) {
        assert_eq!(line.matches(" | ").count(), 7, "malformed row {line:?}");
    }
}
