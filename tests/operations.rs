//! Operations against the real binary: /metrics, /healthz and /readyz, the
//! SIGTERM drain, SIGHUP reloads (TLS certificate, token lifetimes, a bad
//! file), JSON logs, session retention and `--version`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use testkit::*;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

/// A VNC "server" that echoes every byte: the proxy relays without a
/// password, so what the browser side sends comes back.
async fn echo_server() -> TinyServer {
    TinyServer::start(|mut s: TcpStream| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let r = http_request(port, "GET", path, &[], b"").await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// [`testkit::scrape`], and the answer is in Prometheus' text format.
async fn scrape(port: u16) -> String {
    let r = http_request(port, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ctype = r
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    String::from_utf8(r.body).expect("metrics are UTF-8")
}

/// Sends `data` and expects it echoed back.
async fn roundtrip(ws: &mut Ws, data: &[u8]) {
    ws.send(data).await.expect("sending through the proxy");
    assert_eq!(ws.read_exact(data.len()).await.expect("the echo"), data);
}

const MINT_ROUTE: &str = "POST /api/v1/vms/{id}/console-tokens";

fn xmlrpc_call(method: &str, params: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_mints_sessions_bytes_refusals_api_calls_and_store_calls() {
    let echo = echo_server().await;
    let broker = Broker::start("");
    broker.add_vm(1, echo.port, None);

    let before = scrape(broker.port).await;
    for family in [
        "vncbroker_sessions_active gauge",
        "vncbroker_sessions_total counter",
        "vncbroker_bytes_to_client_total counter",
        "vncbroker_bytes_to_server_total counter",
        "vncbroker_tokens_minted_total counter",
        "vncbroker_tokens_redeemed_total counter",
        "vncbroker_tokens_refused_total counter",
        "vncbroker_api_requests_total counter",
        "vncbroker_api_request_duration_seconds histogram",
        "vncbroker_store_duration_seconds histogram",
        "vncbroker_store_errors_total counter",
    ] {
        assert!(
            before.contains(&format!("# TYPE {family}\n")),
            "no {family}:\n{before}"
        );
    }
    assert_eq!(metric(&before, "vncbroker_tokens_minted_total"), 0.0);
    assert_eq!(metric(&before, "vncbroker_sessions_active"), 0.0);

    let t = broker.mint_default(1).await;
    let mut ws = broker.ws_token(&t.token).await;
    roundtrip(&mut ws, b"hello").await;
    roundtrip(&mut ws, b"world!").await;
    let live = scrape(broker.port).await;
    assert_eq!(metric(&live, "vncbroker_sessions_active"), 1.0, "{live}");
    assert_eq!(metric(&live, "vncbroker_bytes_to_server_total"), 11.0);
    assert_eq!(metric(&live, "vncbroker_bytes_to_client_total"), 11.0);
    ws.close_normal().await;
    broker.ended_sessions(1).await;

    // A refused token, an unknown XML-RPC method and a failed login.
    let mut bad = broker.ws_token(&unknown_token()).await;
    assert_eq!(bad.expect_close(STEP).await.0, 4401);
    let r = http_request(
        broker.port,
        "POST",
        "/RPC2",
        &[("Content-Type", "text/xml".into())],
        xmlrpc_call("no.such.method", "").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = http_request(
        broker.port,
        "POST",
        "/RPC2",
        &[("Content-Type", "text/xml".into())],
        xmlrpc_call(
            "one.vm.novnctoken",
            &format!(
                "<param><value><string>{USER}:wrong</string></value></param>\
                 <param><value><int>1</int></value></param>"
            ),
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);

    let m = scrape(broker.port).await;
    let eq = |series: &str, want: f64| {
        assert_eq!(metric(&m, series), want, "{series} in:\n{m}");
    };
    eq("vncbroker_sessions_active", 0.0);
    eq("vncbroker_tokens_minted_total", 1.0);
    eq("vncbroker_tokens_redeemed_total", 1.0);
    eq("vncbroker_tokens_refused_total{reason=\"invalid\"}", 1.0);
    eq("vncbroker_tokens_refused_total{reason=\"no_token\"}", 0.0);
    eq("vncbroker_sessions_total{outcome=\"client_closed\"}", 1.0);
    eq("vncbroker_sessions_total{outcome=\"shutdown\"}", 0.0);
    eq("vncbroker_session_duration_seconds_count", 1.0);
    eq("vncbroker_bytes_to_server_total", 11.0);
    eq("vncbroker_bytes_to_client_total", 11.0);
    eq(
        &format!("vncbroker_api_requests_total{{method=\"{MINT_ROUTE}\",status=\"201\"}}"),
        1.0,
    );
    eq(
        &format!("vncbroker_api_request_duration_seconds_count{{method=\"{MINT_ROUTE}\"}}"),
        1.0,
    );
    eq(
        &format!(
            "vncbroker_api_request_duration_seconds_bucket{{method=\"{MINT_ROUTE}\",le=\"+Inf\"}}"
        ),
        1.0,
    );
    eq(
        "vncbroker_api_requests_total{method=\"other\",status=\"200\"}",
        1.0,
    );
    eq(
        "vncbroker_api_requests_total{method=\"one.vm.novnctoken\",status=\"200\"}",
        1.0,
    );
    eq(
        "vncbroker_xmlrpc_results_total{method=\"one.vm.novnctoken\",code=\"0x0100\"}",
        1.0,
    );
    eq(
        "vncbroker_xmlrpc_results_total{method=\"other\",code=\"-32601\"}",
        1.0,
    );
    eq(
        "vncbroker_store_duration_seconds_count{op=\"insert_token\"}",
        1.0,
    );
    eq("vncbroker_store_duration_seconds_count{op=\"redeem\"}", 2.0);
    eq(
        "vncbroker_store_duration_seconds_count{op=\"open_session\"}",
        1.0,
    );
    eq(
        "vncbroker_store_duration_seconds_count{op=\"close_session\"}",
        1.0,
    );
    assert!(!m.contains("no.such.method"), "method names are not echoed");
    assert!(
        !m.contains("vncbroker_store_errors_total{"),
        "no store errors expected:\n{m}"
    );
}

/// Prometheus' own checker accepts `/metrics` of a broker that has served a
/// session, refused a token, answered XML-RPC calls and timed store calls:
/// every family parses and follows the naming rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_after_traffic() {
    let echo = echo_server().await;
    let broker = Broker::start("");
    broker.add_vm(1, echo.port, None);
    let t = broker.mint_default(1).await;
    let mut ws = broker.ws_token(&t.token).await;
    roundtrip(&mut ws, b"hello").await;
    let mut bad = broker.ws_token(&unknown_token()).await;
    assert_eq!(bad.expect_close(STEP).await.0, 4401);
    for method in ["no.such.method", "one.vm.novnctoken"] {
        let r = http_request(
            broker.port,
            "POST",
            "/RPC2",
            &[("Content-Type", "text/xml".into())],
            xmlrpc_call(method, "").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let live = scrape(broker.port).await;
    ws.close_normal().await;
    broker.ended_sessions(1).await;
    let after = scrape(broker.port).await;
    assert_eq!(
        metric(
            &after,
            "vncbroker_sessions_total{outcome=\"client_closed\"}"
        ),
        1.0
    );

    for text in [live, after] {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) must be installed");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool: {said}\n{text}");
        assert_eq!(said.trim(), "", "promtool found problems:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_follow_the_process_and_the_store() {
    let broker = Broker::start("");
    assert_eq!(get(broker.port, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(broker.port, "/readyz").await, (200, "ready".into()));

    // Break the store behind the broker's back: the cheap query fails.
    let conn = rusqlite::Connection::open(&broker.db_path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("DROP TABLE sessions").unwrap();
    drop(conn);
    let (status, body) = get(broker.port, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "store unavailable"));
    assert_eq!(get(broker.port, "/healthz").await, (200, "ok".into()));
    let m = scrape(broker.port).await;
    assert_eq!(
        metric(
            &m,
            "vncbroker_store_errors_total{op=\"ping\",kind=\"internal\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_sessions_then_closes_them_with_1001_and_exits_0() {
    let echo = echo_server().await;
    let mut broker = Broker::start("[server]\ndrain_timeout_secs = 2\n");
    broker.add_vm(1, echo.port, None);
    let t = broker.mint_default(1).await;
    let mut ws = broker.ws_token(&t.token).await;
    roundtrip(&mut ws, b"before").await;
    assert_eq!(get(broker.port, "/readyz").await.0, 200);

    // A probe's connection made just before the drain, its request not
    // sent yet.
    let mut early = tokio::net::TcpStream::connect(("127.0.0.1", broker.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    broker.signal("-TERM");
    // Readiness goes false at once.
    loop {
        let (status, body) = get(broker.port, "/readyz").await;
        if status == 503 {
            assert_eq!(body, "draining");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "/readyz still {status} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The early connection still gets its answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        early
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(STEP, early.read_to_end(&mut answer))
            .await
            .expect("no answer on the early connection")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 503") && answer.ends_with("draining"),
            "{answer:?}"
        );
    }
    // The live session keeps relaying during the drain.
    roundtrip(&mut ws, b"during the drain").await;
    // No new sessions, nor API calls; probes and metrics still answer.
    let err = Ws::connect(
        broker.port,
        &format!("/websockify?token={}", t.token),
        &WsOptions::binary(),
    )
    .await
    .err()
    .expect("a new WebSocket must be refused while draining");
    assert!(err.contains("503"), "{err}");
    let r = post_mint(broker.port, 1, USER, USER_PW).await;
    assert_eq!(r.status, 503);
    assert_eq!(get(broker.port, "/healthz").await, (200, "ok".into()));
    let m = scrape(broker.port).await;
    assert_eq!(metric(&m, "vncbroker_draining"), 1.0);
    assert_eq!(metric(&m, "vncbroker_sessions_active"), 1.0);

    // The live session is closed only when the drain time is over.
    let (code, reason) = ws.expect_close(Duration::from_secs(15)).await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_millis(1900) && at < Duration::from_secs(10),
        "closed after {at:?}"
    );

    let status = broker
        .wait_exit(Duration::from_secs(15))
        .expect("the broker exits after the drain");
    assert!(status.success(), "exit status {status}");
    let rows = broker.sessions();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].ended_at.is_some(), "{rows:?}");
    assert_eq!(
        rows[0].close_reason.as_deref(),
        Some("server shutting down")
    );
    assert_eq!(rows[0].bytes_to_server, 22);
    let log = broker.log();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("vncbroker stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_sessions_exits_at_once() {
    let mut broker = Broker::start("[server]\ndrain_timeout_secs = 30\n");
    let t0 = Instant::now();
    broker.signal("-TERM");
    let status = broker
        .wait_exit(Duration::from_secs(10))
        .expect("the broker exits");
    assert!(status.success(), "exit status {status}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// SIGHUP
// ---------------------------------------------------------------------------

/// The config [`Broker::start`] writes, with other extra TOML.
fn rewrite_config(broker: &Broker, extra_toml: &str) {
    std::fs::write(
        &broker.config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\nnode_name = \"{NODE}\"\n\n{extra_toml}\n",
            broker.db_url
        ),
    )
    .unwrap();
}

/// Waits until `needle` occurs `n` times in the broker's log.
async fn log_count(broker: &Broker, needle: &str, n: usize) {
    let deadline = Instant::now() + STEP;
    while broker.log().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "{needle:?} did not appear {n} times in the log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_token_lifetimes_and_keeps_the_running_config_when_the_new_one_is_bad() {
    let mut broker = Broker::start("[tokens]\ndefault_ttl = 600\n");
    broker.add_vm(1, 5900, None);
    assert_eq!(broker.mint_default(1).await.ttl, 600);

    rewrite_config(
        &broker,
        "[tokens]\ndefault_ttl = 120\nmax_ttl = 1800\n\n[api]\nmax_body_bytes = 2048\n",
    );
    broker.signal("-HUP");
    log_count(&broker, "configuration reloaded", 1).await;
    assert_eq!(broker.mint_default(1).await.ttl, 120);
    let r = http_request(
        broker.port,
        "POST",
        "/api/v1/vms/1/console-tokens",
        &[("Authorization", basic_auth(USER, USER_PW))],
        b"{\"ttl\": 3000}",
    )
    .await;
    assert_eq!(r.status, 400, "the new max_ttl applies");
    let log = broker.log();
    assert!(
        log.contains("take effect only after a restart") && log.contains("[api]"),
        "{log}"
    );

    // A file that does not parse, then one that does not validate: both
    // are refused and the running settings stay.
    std::fs::write(&broker.config, "[tokens\n").unwrap();
    broker.signal("-HUP");
    log_count(&broker, "configuration reload failed", 1).await;
    rewrite_config(&broker, "[tokens]\ndefault_ttl = 7200\nmax_ttl = 3600\n");
    broker.signal("-HUP");
    log_count(&broker, "configuration reload failed", 2).await;
    assert_eq!(broker.mint_default(1).await.ttl, 120);
    broker.assert_alive();
}

fn openssl_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    testkit::pg::openssl_ec_req(
        dir,
        &[
            "-x509",
            "-days",
            "2",
            "-subj",
            &format!("/CN=vncbroker-{name}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    (cert, key)
}

/// SHA-256 of the leaf certificate in a PEM file.
fn pem_fingerprint(path: &Path) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use sha2::Digest;
    let der = CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .expect("a certificate")
        .unwrap();
    sha2::Sha256::digest(der.as_ref()).to_vec()
}

/// Accepts any server certificate: the test compares fingerprints itself.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection to the broker, and the SHA-256 of the certificate it served.
async fn tls_connect(port: u16) -> (Tls, Vec<u8>) {
    use sha2::Digest;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    let fp = sha2::Sha256::digest(leaf.as_ref()).to_vec();
    (tls, fp)
}

/// Sends over a WSS session and expects the echo.
async fn wss_roundtrip(ws: &mut WebSocketStream<Tls>, data: &[u8]) {
    ws.send(Message::binary(data.to_vec())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        match tokio::time::timeout(STEP, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("the live session broke: {other:?}"),
        }
    }
    assert_eq!(got, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_tls_certificate_without_dropping_a_live_session() {
    let certs = tempfile::tempdir().unwrap();
    let (a_cert, a_key) = openssl_cert(certs.path(), "a");
    let (b_cert, b_key) = openssl_cert(certs.path(), "b");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::copy(&a_cert, &cert).unwrap();
    std::fs::copy(&a_key, &key).unwrap();
    let (fp_a, fp_b) = (pem_fingerprint(&a_cert), pem_fingerprint(&b_cert));
    assert_ne!(fp_a, fp_b);

    let echo = echo_server().await;
    let broker = Broker::start(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    broker.add_vm(1, echo.port, None);
    let minted: Value = serde_json::from_str(&broker.cli(&["token", "mint", "1"], None)).unwrap();
    let token = minted["token"].as_str().unwrap().to_owned();

    let (tls, served) = tls_connect(broker.port).await;
    assert_eq!(served, fp_a, "the first certificate is served");
    let url = format!("wss://127.0.0.1:{}/websockify?token={token}", broker.port);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WSS upgrade");
    wss_roundtrip(&mut ws, b"with certificate a").await;

    // Renewal: new files in place, then SIGHUP.
    std::fs::copy(&b_cert, &cert).unwrap();
    std::fs::copy(&b_key, &key).unwrap();
    broker.signal("-HUP");
    let deadline = Instant::now() + STEP;
    while tls_connect(broker.port).await.1 != fp_b {
        assert!(Instant::now() < deadline, "certificate b is never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wss_roundtrip(&mut ws, b"after the swap").await;

    // A broken certificate is refused and the current one kept.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    broker.signal("-HUP");
    log_count(&broker, "configuration reload failed", 1).await;
    assert_eq!(tls_connect(broker.port).await.1, fp_b);
    wss_roundtrip(&mut ws, b"still here").await;

    // openssl agrees on what is served.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
            broker.port
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace(':', "");
    assert!(
        text.to_ascii_lowercase().contains(&hex::encode(&fp_b)),
        "openssl s_client saw {text:?}"
    );
    ws.close(None).await.unwrap();
}

// ---------------------------------------------------------------------------
// Logs, retention, version
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_session_fields() {
    let echo = echo_server().await;
    let broker = Broker::start("[log]\nformat = \"json\"\n");
    broker.add_vm(1, echo.port, None);
    let t = broker.mint_default(1).await;
    let mut ws = broker.ws_token(&t.token).await;
    roundtrip(&mut ws, b"12345").await;
    ws.close_normal().await;
    let rows = broker.ended_sessions(1).await;
    let mut bad = broker.ws_token(&unknown_token()).await;
    bad.expect_close(STEP).await;

    let log = broker.log();
    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v.is_object() && v["level"].is_string() && v["fields"].is_object());
        lines.push(v);
    }
    let find = |message: &str| {
        lines
            .iter()
            .find(|v| v["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in:\n{log}"))
            .clone()
    };
    let started = find("console session started");
    let ended = find("console session ended");
    for v in [&started, &ended] {
        let f = &v["fields"];
        assert_eq!(f["session"], rows[0].id, "{v}");
        assert_eq!(f["vm_id"], 1, "{v}");
        assert_eq!(f["user"], USER, "{v}");
        assert_eq!(f["node"], NODE, "{v}");
        assert!(
            f["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{v}"
        );
    }
    let f = &ended["fields"];
    assert!(f["duration_ms"].is_u64(), "{ended}");
    assert_eq!(f["bytes_to_client"], 5);
    assert_eq!(f["bytes_to_server"], 5);
    assert_eq!(f["reason"], "client closed");
    let refused = find("console connection refused");
    assert_eq!(refused["fields"]["code"], 4401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_session_records_that_ended_long_ago() {
    let extra = |days: u32| {
        format!("[tokens]\npurge_interval = 1\n\n[sessions]\nretention_days = {days}\n")
    };
    let broker = Broker::start(&extra(1));
    let now = now_unix();
    let day = 86_400;
    let conn = rusqlite::Connection::open(&broker.db_path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let insert = |started: i64, ended: Option<i64>| -> i64 {
        conn.execute(
            "INSERT INTO sessions (token_id, vm_id, user_name, client_addr, node, started_at,
                                   ended_at, close_reason)
             VALUES (NULL, 1, 'alice', '127.0.0.1:1', 'old-node', ?1, ?2, 'client closed')",
            rusqlite::params![started, ended],
        )
        .unwrap();
        conn.last_insert_rowid()
    };
    let old = insert(now - 3 * day, Some(now - 2 * day));
    let old_live = insert(now - 3 * day, None);
    let recent = insert(now - 2 * 3600, Some(now - 3600));
    let ids = || -> Vec<i64> { broker.sessions().iter().map(|r| r.id).collect() };
    poll_until("the old ended row is deleted", STEP, || {
        (!ids().contains(&old)).then_some(())
    })
    .await;
    assert_eq!(ids(), vec![old_live, recent]);

    // retention_days = 0 keeps everything (and the setting is reloadable).
    rewrite_config(&broker, &extra(0));
    broker.signal("-HUP");
    log_count(&broker, "configuration reloaded", 1).await;
    let old2 = insert(now - 3 * day, Some(now - 2 * day));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(ids(), vec![old_live, recent, old2]);
}

#[test]
fn version_flag_prints_the_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vncbroker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_packaged_config_and_unit_agree_with_the_binary() {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    // The sample parses and validates (every command checks the config).
    let out = Command::new(BIN)
        .arg("--config")
        .arg(root.join("dist/vncbroker.toml"))
        .arg("--database")
        .arg(format!("sqlite://{}", dir.path().join("x.db").display()))
        .args(["user", "list"])
        .env_remove("VNCBROKER_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dist/vncbroker.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(root.join("dist/vncbroker.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/vncbroker serve --config /etc/vncbroker/vncbroker.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=vncbroker",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    // systemd waits longer than the drain before it kills.
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec in seconds");
    let toml = std::fs::read_to_string(root.join("dist/vncbroker.toml")).unwrap();
    let drain: u64 = toml
        .lines()
        .find_map(|l| l.strip_prefix("drain_timeout_secs = "))
        .and_then(|v| v.trim().parse().ok())
        .expect("drain_timeout_secs");
    assert!(
        stop > drain,
        "TimeoutStopSec={stop} <= drain_timeout_secs={drain}"
    );
}
