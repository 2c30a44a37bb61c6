//! Which remote-display protocol a VM's console speaks. The proxy takes a
//! token's protocol from its row, fixed at mint time like its target.

use std::fmt;
use std::str::FromStr;

use crate::policy::BadValue;

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Vnc,
    /// One TCP connection per channel, each with its own link handshake.
    Spice,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Vnc => "vnc",
            Protocol::Spice => "spice",
        }
    }

    /// Reads the stored form; an unknown one (a newer version's) is `None`,
    /// and its console is refused rather than spoken to in the wrong tongue.
    pub fn from_stored(s: &str) -> Option<Protocol> {
        s.parse().ok()
    }
}

impl FromStr for Protocol {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Protocol, BadValue> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vnc" => Ok(Protocol::Vnc),
            "spice" => Ok(Protocol::Spice),
            _ => Err(BadValue {
                what: "protocol",
                expected: "vnc, spice",
                got: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_case_and_refuses_the_unknown() {
        assert_eq!("SPICE".parse::<Protocol>(), Ok(Protocol::Spice));
        assert_eq!(" vnc ".parse::<Protocol>(), Ok(Protocol::Vnc));
        assert!(
            "rdp"
                .parse::<Protocol>()
                .unwrap_err()
                .to_string()
                .contains("vnc, spice")
        );
        assert_eq!(Protocol::from_stored("spice"), Some(Protocol::Spice));
        assert_eq!(Protocol::from_stored("x11"), None);
        assert_eq!(Protocol::default(), Protocol::Vnc);
    }
}
