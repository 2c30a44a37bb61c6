//! Console tokens: what they are and the rules they live by.
//!
//! A token is 32 bytes from the operating system's CSPRNG, given to the
//! caller once as text: base64url without padding, or lowercase hex for
//! remote-viewer files (see [`TokenForm`]). Only the SHA-256 of that text is
//! ever stored, so a copy of the database does not open any console.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Length of a token's text form: 32 bytes in unpadded base64url.
pub const TOKEN_LEN: usize = 43;

/// Length of a token's lowercase form: 32 bytes in hex.
pub const LOWERCASE_TOKEN_LEN: usize = 64;

/// How a token's 32 bytes are written out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenForm {
    /// Unpadded base64url: short, and safe in URLs and cookies.
    #[default]
    Base64Url,
    /// Lowercase hex, for the userinfo of a remote-viewer file's `proxy=`
    /// URL: virt-viewer lower-cases it and splits it at `:` and `@`, so a
    /// base64url token would not come back as it was given.
    Lowercase,
}

/// The SHA-256 of a token, the only form the store keeps.
pub type TokenHash = [u8; 32];

/// A freshly minted token. Its text leaves the process exactly once, in the
/// mint response; `Debug` never shows it.
pub struct Token(String);

impl Token {
    /// Draws a new token from the OS CSPRNG, in base64url.
    pub fn generate() -> Result<Token, getrandom::Error> {
        Token::generate_in(TokenForm::Base64Url)
    }

    /// Draws a new token from the OS CSPRNG, written in `form`.
    pub fn generate_in(form: TokenForm) -> Result<Token, getrandom::Error> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw)?;
        Ok(Token(match form {
            TokenForm::Base64Url => URL_SAFE_NO_PAD.encode(raw),
            TokenForm::Lowercase => hex::encode(raw),
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        hash_token(&self.0)
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", fingerprint(&self.hash()))
    }
}

/// Hashes a token as presented by a client.
pub fn hash_token(text: &str) -> TokenHash {
    Sha256::digest(text.as_bytes()).into()
}

/// Whether `text` has the shape of a token in either form. Lets callers
/// refuse junk without touching the store.
pub fn looks_like_token(text: &str) -> bool {
    match text.len() {
        TOKEN_LEN => text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        LOWERCASE_TOKEN_LEN => text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        _ => false,
    }
}

/// A short, non-secret label for logs: the first 8 hex digits of the hash.
pub fn fingerprint(hash: &TokenHash) -> String {
    hex::encode(&hash[..4])
}

/// Lifetime rules for minted tokens, from the `[tokens]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub default_ttl: i64,
    pub max_ttl: i64,
    pub single_use: bool,
}

/// Why a mint request's lifetime was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error("ttl {requested} exceeds the maximum of {max} seconds")]
    TooLong { requested: i64, max: i64 },
}

impl Policy {
    /// The ttl a request gets: none, zero or negative means the default; more
    /// than the maximum is refused rather than silently clamped.
    pub fn ttl(&self, requested: Option<i64>) -> Result<i64, TtlError> {
        match requested {
            None => Ok(self.default_ttl),
            Some(t) if t <= 0 => Ok(self.default_ttl),
            Some(t) if t > self.max_ttl => Err(TtlError::TooLong {
                requested: t,
                max: self.max_ttl,
            }),
            Some(t) => Ok(t),
        }
    }

    pub fn single_use(&self, requested: Option<bool>) -> bool {
        requested.unwrap_or(self.single_use)
    }
}

/// A token is valid strictly before its expiry second.
pub fn is_live(expires_at: i64, now: i64) -> bool {
    expires_at > now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_43_chars_of_base64url_and_distinct() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_eq!(a.as_str().len(), TOKEN_LEN);
        assert!(looks_like_token(a.as_str()));
        assert_ne!(a.as_str(), b.as_str());
        let raw = URL_SAFE_NO_PAD.decode(a.as_str()).unwrap();
        assert_eq!(raw.len(), 32);
    }

    #[test]
    fn lowercase_tokens_are_64_hex_digits_and_pass_the_shape_check() {
        let a = Token::generate_in(TokenForm::Lowercase).unwrap();
        let b = Token::generate_in(TokenForm::Lowercase).unwrap();
        assert_eq!(a.as_str().len(), LOWERCASE_TOKEN_LEN);
        assert_eq!(a.as_str(), a.as_str().to_ascii_lowercase());
        assert!(!a.as_str().contains([':', '@']));
        assert!(looks_like_token(a.as_str()));
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(hex::decode(a.as_str()).unwrap().len(), 32);
        // The hash is of the text, as for every token.
        assert_eq!(a.hash(), hash_token(a.as_str()));
        // Only the lowercase form is one: upper case, or other letters, are junk.
        assert!(!looks_like_token(&a.as_str().to_ascii_uppercase()));
        assert!(!looks_like_token(&"g".repeat(64)));
        assert!(!looks_like_token(&"a".repeat(63)));
        assert!(!looks_like_token(&"a".repeat(65)));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = Token::generate().unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains(t.as_str()));
        assert!(shown.contains(&fingerprint(&t.hash())));
    }

    #[test]
    fn hash_is_sha256_of_the_text() {
        assert_eq!(
            hex::encode(hash_token("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn shape_check_rejects_junk() {
        assert!(!looks_like_token(""));
        assert!(!looks_like_token(&"a".repeat(42)));
        assert!(!looks_like_token(&"a".repeat(44)));
        assert!(!looks_like_token(&format!("{}=", "a".repeat(42))));
        assert!(looks_like_token(
            &"a-_"
                .repeat(14)
                .chars()
                .chain("Z".chars())
                .collect::<String>()
        ));
    }

    #[test]
    fn ttl_rules() {
        let p = Policy {
            default_ttl: 600,
            max_ttl: 3600,
            single_use: false,
        };
        assert_eq!(p.ttl(None), Ok(600));
        assert_eq!(p.ttl(Some(0)), Ok(600));
        assert_eq!(p.ttl(Some(-5)), Ok(600));
        assert_eq!(p.ttl(Some(60)), Ok(60));
        assert_eq!(p.ttl(Some(3600)), Ok(3600));
        assert_eq!(
            p.ttl(Some(3601)),
            Err(TtlError::TooLong {
                requested: 3601,
                max: 3600
            })
        );
        assert!(!p.single_use(None));
        assert!(p.single_use(Some(true)));
    }

    #[test]
    fn expiry_second_itself_is_not_live() {
        assert!(is_live(100, 99));
        assert!(!is_live(100, 100));
        assert!(!is_live(100, 101));
    }
}
