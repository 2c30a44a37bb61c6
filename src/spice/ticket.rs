//! The SPICE ticket: the password plus a NUL, encrypted with RSA-OAEP
//! (SHA-1) under the key the server sent for this one link.

use rsa::pkcs8::DecodePublicKey;

use super::wire::TICKET_LEN;

/// Why a ticket could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the SPICE server's public key cannot be read: {0}")]
    Key(String),
    #[error("the stored SPICE password is too long for a ticket")]
    TooLong,
    #[error("encrypting the ticket failed: {0}")]
    Encrypt(String),
}

/// Seals `password` for the server whose SubjectPublicKeyInfo is `spki`.
pub fn seal(spki: &[u8], password: &str) -> Result<Vec<u8>, TicketError> {
    let key =
        rsa::PublicKey::from_public_key_der(spki).map_err(|e| TicketError::Key(e.to_string()))?;
    let mut plain = Vec::with_capacity(password.len() + 1);
    plain.extend_from_slice(password.as_bytes());
    plain.push(0);
    // OAEP with SHA-1 over a 1024-bit key leaves room for 86 bytes.
    if plain.len() > TICKET_LEN - 2 * 20 - 2 {
        return Err(TicketError::TooLong);
    }
    let sealed = key
        .encrypt(
            &mut getrandom::SysRng,
            rsa::Oaep::<sha1::Sha1>::new(),
            &plain,
        )
        .map_err(|e| TicketError::Encrypt(e.to_string()))?;
    plain.fill(0);
    if sealed.len() != TICKET_LEN {
        return Err(TicketError::Key(format!(
            "a {}-bit key; SPICE uses 1024",
            sealed.len() * 8
        )));
    }
    Ok(sealed)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A server's side of the ticket, for the tests: a fresh key pair, and
    //! what a ticket opens to.
    use rsa::pkcs8::EncodePublicKey;

    pub struct ServerKey(rsa::PrivateKey);

    impl ServerKey {
        pub fn new() -> ServerKey {
            ServerKey(rsa::PrivateKey::new(&mut getrandom::SysRng, 1024).expect("key"))
        }

        pub fn spki(&self) -> Vec<u8> {
            self.0
                .to_public_key()
                .to_public_key_der()
                .expect("der")
                .into_vec()
        }

        /// The password a ticket carries, without its NUL.
        pub fn open(&self, ticket: &[u8]) -> Option<String> {
            let plain = self
                .0
                .decrypt(rsa::Oaep::<sha1::Sha1>::new(), ticket)
                .ok()?;
            let text = plain.strip_suffix(&[0])?;
            String::from_utf8(text.to_vec()).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_ticket_opens_to_the_password() {
        let server = testing::ServerKey::new();
        let spki = server.spki();
        assert_eq!(spki.len(), super::super::wire::PUBKEY_LEN);
        let t = seal(&spki, "s3cret").unwrap();
        assert_eq!(t.len(), TICKET_LEN);
        assert_eq!(server.open(&t).as_deref(), Some("s3cret"));
        // Fresh randomness every time.
        assert_ne!(seal(&spki, "s3cret").unwrap(), t);
        assert_eq!(server.open(&seal(&spki, "").unwrap()).as_deref(), Some(""));
    }

    #[test]
    fn bad_keys_and_long_passwords_are_errors() {
        assert!(matches!(seal(&[0; 162], "pw"), Err(TicketError::Key(_))));
        assert!(matches!(seal(b"", "pw"), Err(TicketError::Key(_))));
        let spki = testing::ServerKey::new().spki();
        assert_eq!(seal(&spki, &"x".repeat(86)), Err(TicketError::TooLong));
        assert!(seal(&spki, &"x".repeat(85)).is_ok());
    }
}
