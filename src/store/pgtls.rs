//! TLS to PostgreSQL with rustls (ring), for the pool and the LISTEN
//! connection alike, following the [`SslMode`] the connection string gives.
//!
//! - `verify-full`: the chain must lead to a CA of `sslrootcert` and the
//!   certificate must name the host connected to (each host of a list in turn).
//! - `verify-ca`, and `require` with `sslrootcert`: the chain is checked, the
//!   name is not.
//! - `require` without `sslrootcert`: encrypted, but any certificate is taken
//!   (the handshake signatures are still checked); a warning says so.
//! - `disable`: the client never starts TLS; the connector refuses any
//!   certificate should it ever be asked.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

use super::StoreError;
use super::conninfo::{ConnInfo, RootCerts, SslMode};

/// What the pool and the LISTEN connection connect with.
pub type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// The connector for `info`'s TLS settings. Fails, naming the file, if the
/// CA file cannot be read or holds no certificate.
pub fn connector(info: &ConnInfo) -> Result<Connector, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let roots = match &info.root_certs {
        Some(root) if info.ssl_mode != SslMode::Disable => Some(Arc::new(load_roots(root)?)),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (info.ssl_mode, roots) {
        (SslMode::Disable, _) => Arc::new(Refuse { algorithms }),
        (SslMode::Require, None) => {
            tracing::warn!(
                "sslmode=require without sslrootcert: the connection to PostgreSQL is encrypted, \
                 but whoever answers is believed; use sslmode=verify-full with sslrootcert"
            );
            Arc::new(AnyCertificate { algorithms })
        }
        (SslMode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
        (SslMode::Require | SslMode::VerifyCa, Some(roots)) => Arc::new(ChainOnly {
            inner: webpki(roots, &provider)?,
        }),
        (mode, None) => {
            return Err(StoreError::unavailable(format!(
                "sslmode={} needs sslrootcert",
                mode.as_str()
            )));
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::internal(format!("TLS protocol versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What PostgreSQL 17 expects of direct TLS; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn load_roots(root: &RootCerts) -> Result<RootCertStore, StoreError> {
    let mut store = RootCertStore::empty();
    match root {
        RootCerts::File(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| StoreError::unavailable(format!("sslrootcert {shown}: {e}")))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::unavailable(format!("sslrootcert {shown}: {e}")))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(StoreError::unavailable(format!(
                    "sslrootcert {shown} holds no PEM CA certificate"
                )));
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(StoreError::unavailable(
                    "sslrootcert=system: no trusted CA certificates found on this system \
                     (install ca-certificates, or name a CA file)",
                ));
            }
        }
    }
    Ok(store)
}

fn webpki(
    roots: Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, StoreError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(provider))
        .build()
        .map_err(|e| StoreError::unavailable(format!("sslrootcert: {e}")))?;
    Ok(verifier)
}

/// A reason a TLS connection to PostgreSQL failed, worded for the operator,
/// if `e` is one.
pub fn explain(e: &tokio_postgres::Error) -> Option<String> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(explain_rustls(tls));
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(explain_rustls(tls));
        }
        if c.to_string() == "server does not support TLS" {
            return Some(
                "the server does not accept TLS connections (ssl = off in postgresql.conf?): \
                 turn TLS on there, or set sslmode=disable to connect in plaintext"
                    .into(),
            );
        }
        cause = c.source();
    }
    None
}

fn explain_rustls(e: &rustls::Error) -> String {
    let why = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "the server's certificate is not signed by a CA in sslrootcert"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server's certificate does not name the host in the database URL \
                 (sslmode=verify-full checks it)"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (check the clocks)"
            }
            _ => "the server's certificate was refused",
        },
        rustls::Error::AlertReceived(_) => "the server refused the TLS handshake",
        _ => "the TLS handshake failed",
    };
    format!("{why} ({e})")
}

/// Any certificate, with a valid handshake signature: `require` without a CA.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The chain to a CA, whatever name the certificate carries: `verify-ca`.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<dyn ServerCertVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked last, after the chain and the dates.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// No certificate at all: the connector of a plaintext connection.
#[derive(Debug)]
struct Refuse {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Refuse {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "TLS is off (sslmode=disable)".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
