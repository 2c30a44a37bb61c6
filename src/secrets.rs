//! VNC passwords at rest: sealed with ChaCha20-Poly1305 under a key kept in
//! a file of its own, so a copy of the database alone reveals none.
//!
//! Sealed values read `v1:<base64url(nonce || ciphertext)>`. The key file
//! holds 32 random bytes in base64; it is named in the config, or generated
//! beside an SQLite database with mode 0600, but only while the database
//! holds no sealed password: a lost key is a startup error, never a new key
//! that opens nothing. Nodes sharing a PostgreSQL database must share one
//! key file, so there it must be named.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error(
        "a shared database needs a shared key: set [secrets] key_file (the same file on every node)"
    )]
    KeyFileRequired,
    #[error(
        "secrets key file {path} is missing, but the database holds VNC passwords sealed with it. \
         Restore the file from your backup (the same key: a new one opens none of them). If it is \
         lost for good, so are those passwords: clear them (vncbroker vm set ID --no-password, \
         for each VM that has one) and set them again (vm set ID --password-stdin)"
    )]
    KeyFileMissing { path: String },
    #[error(
        "the database holds sealed VNC passwords: set [secrets] key_file (or VNCBROKER_KEY_FILE) \
         to the key file they were sealed with, the same file on every node"
    )]
    SharedKeyMissing,
    #[error(
        "secrets key file {path} does not open the VNC passwords in the database: it is not the \
         key they were sealed with. Restore that key file from your backup (or clear the \
         passwords with vncbroker vm set ID --no-password and set them again)"
    )]
    WrongKey { path: String },
    #[error("a stored secret cannot be decrypted with this key (wrong key file?)")]
    Undecryptable,
    #[error("no OS randomness: {0}")]
    Random(String),
}

/// Seals and opens stored secrets.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    pub fn from_key(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// The key file to use for a database URL: the configured one, or
    /// `vncbroker.key` beside an SQLite file.
    pub fn key_path(configured: Option<&str>, database: &str) -> Result<PathBuf, SecretsError> {
        if let Some(p) = configured {
            return Ok(PathBuf::from(p));
        }
        let db = database
            .strip_prefix("sqlite://")
            .ok_or(SecretsError::KeyFileRequired)?;
        let dir = Path::new(db).parent().filter(|d| !d.as_os_str().is_empty());
        Ok(dir.unwrap_or(Path::new(".")).join("vncbroker.key"))
    }

    /// Loads the key file. A configured file must exist; the default one is
    /// created (mode 0600) when missing, and its location logged.
    pub fn load(path: &Path, create: bool) -> Result<Sealer, SecretsError> {
        let shown = path.display().to_string();
        let err = |message: String| SecretsError::KeyFile {
            path: shown.clone(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let raw = STANDARD
                    .decode(text.trim())
                    .map_err(|_| err("not base64".into()))?;
                let key: [u8; 32] = raw
                    .try_into()
                    .map_err(|_| err("must hold 32 bytes of key".into()))?;
                Ok(Sealer::from_key(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| SecretsError::Random(e.to_string()))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| err(format!("cannot create: {e}")))?;
                // Exactly 0600, whatever the umask took away.
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| err(e.to_string()))?;
                writeln!(f, "{}", STANDARD.encode(key)).map_err(|e| err(e.to_string()))?;
                tracing::info!(path = %shown, "generated a new key for stored VNC passwords; back it up with the database");
                Ok(Sealer::from_key(&key))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Seals a secret for storage.
    pub fn seal(&self, plain: &str) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SecretsError::Random(e.to_string()))?;
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .map_err(|_| SecretsError::Undecryptable)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(out)))
    }

    /// Opens a sealed secret.
    pub fn open(&self, sealed: &str) -> Result<String, SecretsError> {
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| URL_SAFE_NO_PAD.decode(b).ok())
            .filter(|r| r.len() > NONCE_LEN)
            .ok_or(SecretsError::Undecryptable)?;
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| SecretsError::Undecryptable)?;
        String::from_utf8(plain).map_err(|_| SecretsError::Undecryptable)
    }
}

/// The broker's handle on stored secrets: a [`Sealer`], or the reason
/// there is none (a shared database without a configured key file). Without
/// one, everything works but storing or using a VNC password.
#[derive(Debug, Clone)]
pub struct Secrets(Option<std::sync::Arc<Sealer>>);

impl Secrets {
    /// Loads the key for this configuration: `key_file` if set (it must
    /// exist), else `vncbroker.key` beside an SQLite database. `sample` is
    /// one sealed VNC password from the store, if it holds any. The default
    /// file is created only while there is none: a new key would open none
    /// of them. A PostgreSQL store without
    /// `key_file` gets no sealer, unless it holds sealed passwords (then it
    /// is an error). A key that does not open a stored password is refused.
    pub fn open_for(
        key_file: Option<&str>,
        database: &str,
        sample: Option<String>,
    ) -> Result<Secrets, SecretsError> {
        let path = match Sealer::key_path(key_file, database) {
            Ok(path) => path,
            Err(SecretsError::KeyFileRequired) if sample.is_some() => {
                return Err(SecretsError::SharedKeyMissing);
            }
            Err(SecretsError::KeyFileRequired) => return Ok(Secrets(None)),
            Err(e) => return Err(e),
        };
        let shown = path.display().to_string();
        if key_file.is_none() && sample.is_some() && !path.exists() {
            return Err(SecretsError::KeyFileMissing { path: shown });
        }
        let sealer = Sealer::load(&path, key_file.is_none())?;
        if let Some(sealed) = sample
            && sealer.open(&sealed).is_err()
        {
            return Err(SecretsError::WrongKey { path: shown });
        }
        Ok(Secrets(Some(std::sync::Arc::new(sealer))))
    }

    pub fn from_sealer(sealer: Sealer) -> Secrets {
        Secrets(Some(std::sync::Arc::new(sealer)))
    }

    fn sealer(&self) -> Result<&Sealer, SecretsError> {
        self.0.as_deref().ok_or(SecretsError::KeyFileRequired)
    }

    pub fn seal(&self, plain: &str) -> Result<String, SecretsError> {
        self.sealer()?.seal(plain)
    }

    pub fn open(&self, sealed: &str) -> Result<String, SecretsError> {
        self.sealer()?.open(sealed)
    }

    /// Seals an optional secret.
    pub fn seal_opt(&self, plain: Option<&str>) -> Result<Option<String>, SecretsError> {
        plain.map(|p| self.seal(p)).transpose()
    }

    /// Opens an optional sealed secret.
    pub fn open_opt(&self, sealed: Option<&str>) -> Result<Option<String>, SecretsError> {
        sealed.map(|s| self.open(s)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Registry;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn seal_and_open() {
        let s = Sealer::from_key(&[7u8; 32]);
        let a = s.seal("vnc-pass").unwrap();
        let b = s.seal("vnc-pass").unwrap();
        assert!(a.starts_with("v1:") && !a.contains("vnc-pass"));
        assert_ne!(a, b, "fresh nonces");
        assert_eq!(s.open(&a).unwrap(), "vnc-pass");
        let other = Sealer::from_key(&[8u8; 32]);
        assert!(matches!(other.open(&a), Err(SecretsError::Undecryptable)));
        for junk in ["", "v1:", "vnc-pass", "v1:!!!", "v2:abcd"] {
            assert!(s.open(junk).is_err(), "{junk:?}");
        }
        let mut tampered = a.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(s.open(std::str::from_utf8(&tampered).unwrap()).is_err());
    }

    async fn sqlite(dir: &Path) -> (String, std::sync::Arc<dyn crate::store::Store>) {
        let url = format!("sqlite://{}/broker.db", dir.display());
        let store = crate::store::open(&url).await.unwrap();
        (url, store)
    }

    async fn sample(store: &dyn Registry) -> Option<String> {
        store.sealed_vnc_password().await.unwrap()
    }

    async fn add_sealed_vm(store: &dyn Registry, sealed: String) {
        if store.user("o").await.unwrap().is_none() {
            store.add_user("o", "h", false).await.unwrap();
        }
        store
            .add_vm(&crate::store::Vm {
                policy: Default::default(),
                protocol: Default::default(),
                id: 1,
                name: "vm".into(),
                vnc_host: "127.0.0.1".into(),
                vnc_port: 5901,
                vnc_password: Some(sealed),
                owner: "o".into(),
                allowed: vec![],
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn without_a_key_only_secrets_fail() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = sqlite(dir.path()).await;
        // A shared database without a configured key, as far as the key goes.
        let s = Secrets::open_for(None, "postgres://db/x", sample(&*store).await).unwrap();
        assert!(matches!(s.seal("x"), Err(SecretsError::KeyFileRequired)));
        assert_eq!(s.seal_opt(None).unwrap(), None);
        assert_eq!(s.open_opt(None).unwrap(), None);
        let missing = dir.path().join("configured.key");
        let configured = Secrets::open_for(
            Some(missing.to_str().unwrap()),
            "postgres://db/x",
            sample(&*store).await,
        );
        assert!(configured.is_err());
        // Once it holds a sealed password, the key is not optional.
        add_sealed_vm(&*store, Sealer::from_key(&[1; 32]).seal("pw").unwrap()).await;
        let err = Secrets::open_for(None, "postgres://db/x", sample(&*store).await).unwrap_err();
        assert!(matches!(err, SecretsError::SharedKeyMissing), "{err}");
        assert!(err.to_string().contains("key_file"));
    }

    #[tokio::test]
    async fn the_default_key_is_made_only_for_a_database_without_sealed_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let (url, store) = sqlite(dir.path()).await;
        let key = dir.path().join("vncbroker.key");
        let first = Secrets::open_for(None, &url, sample(&*store).await).unwrap();
        assert!(key.exists(), "made for an empty database");
        add_sealed_vm(&*store, first.seal("pw").unwrap()).await;
        let again = Secrets::open_for(None, &url, sample(&*store).await).unwrap();
        assert_eq!(again.open(&first.seal("x").unwrap()).unwrap(), "x");

        std::fs::remove_file(&key).unwrap();
        let err = Secrets::open_for(None, &url, sample(&*store).await).unwrap_err();
        assert!(
            matches!(&err, SecretsError::KeyFileMissing { path } if *path == key.display().to_string()),
            "{err}"
        );
        assert!(!key.exists(), "no new key");

        Sealer::load(&key, true).unwrap();
        let err = Secrets::open_for(None, &url, sample(&*store).await).unwrap_err();
        assert!(matches!(err, SecretsError::WrongKey { .. }), "{err}");
        let configured = key.to_str().unwrap();
        let err = Secrets::open_for(Some(configured), &url, sample(&*store).await).unwrap_err();
        assert!(matches!(err, SecretsError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}/broker.db", dir.path().display());
        let path = Sealer::key_path(None, &db).unwrap();
        assert_eq!(path, dir.path().join("vncbroker.key"));
        let a = Sealer::load(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Sealer::load(&path, true).unwrap();
        assert_eq!(
            b.open(&a.seal("x").unwrap()).unwrap(),
            "x",
            "the same key is reloaded"
        );
        assert!(matches!(
            Sealer::key_path(None, "postgres://db/x"),
            Err(SecretsError::KeyFileRequired)
        ));
        let missing = dir.path().join("nope.key");
        assert!(Sealer::load(&missing, false).is_err());
        std::fs::write(dir.path().join("bad.key"), "not a key").unwrap();
        assert!(Sealer::load(&dir.path().join("bad.key"), false).is_err());
    }
}
