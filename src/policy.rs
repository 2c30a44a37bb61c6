//! What a console session may do: control or view only, whether one person
//! holds control alone, which way the clipboard goes, whether it is
//! recorded.
//!
//! A VM's own settings ([`VmPolicy`]) leave any of these unset to take the
//! broker's default ([`Defaults`]). Minting resolves them, with the caller's
//! view-only choice, into the [`SessionPolicy`] its token carries, so a
//! session follows the rules of the moment its link was made, wherever it
//! is redeemed.

use std::fmt;
use std::str::FromStr;

/// Whether a VM takes several control sessions at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// Several people may be in control at once (the VNC server's shared mode).
    #[default]
    Shared,
    /// A new control session is refused while another is live; view-only
    /// sessions are always let in.
    Exclusive,
}

/// Which way clipboard text may cross the console.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clipboard {
    #[default]
    Both,
    /// From the browser to the VM only.
    ToVm,
    /// From the VM to the browser only.
    FromVm,
    None,
}

/// A setting's text that names no known value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be one of {expected}, not {got:?}")]
pub struct BadValue {
    pub what: &'static str,
    pub expected: &'static str,
    pub got: String,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Shared => "shared",
            Control::Exclusive => "exclusive",
        }
    }
}

impl FromStr for Control {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Control, BadValue> {
        match s.trim().to_ascii_lowercase().as_str() {
            "shared" => Ok(Control::Shared),
            "exclusive" => Ok(Control::Exclusive),
            _ => Err(BadValue {
                what: "control",
                expected: "shared, exclusive",
                got: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Clipboard {
    pub fn as_str(self) -> &'static str {
        match self {
            Clipboard::Both => "both",
            Clipboard::ToVm => "to-vm",
            Clipboard::FromVm => "from-vm",
            Clipboard::None => "none",
        }
    }

    /// Whether text may go from the browser to the VM.
    pub fn to_vm(self) -> bool {
        matches!(self, Clipboard::Both | Clipboard::ToVm)
    }

    /// Whether text may go from the VM to the browser.
    pub fn from_vm(self) -> bool {
        matches!(self, Clipboard::Both | Clipboard::FromVm)
    }
}

impl FromStr for Clipboard {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Clipboard, BadValue> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "both" => Ok(Clipboard::Both),
            "to-vm" => Ok(Clipboard::ToVm),
            "from-vm" => Ok(Clipboard::FromVm),
            "none" => Ok(Clipboard::None),
            _ => Err(BadValue {
                what: "clipboard",
                expected: "both, to-vm, from-vm, none",
                got: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Clipboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads a yes/no setting the way OpenNebula templates write them.
pub fn parse_flag(what: &'static str, s: &str) -> Result<bool, BadValue> {
    match s.trim().to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" => Ok(false),
        _ => Err(BadValue {
            what,
            expected: "yes, no",
            got: s.to_owned(),
        }),
    }
}

/// A VM's own console settings; `None` takes the broker's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmPolicy {
    pub control: Option<Control>,
    pub clipboard: Option<Clipboard>,
    pub record: Option<bool>,
    /// SPICE: the usbredir channels (the browser's USB devices plugged
    /// into the VM). Off unless set.
    pub usb_redirect: Option<bool>,
    /// SPICE: the record channel (the client's microphone). Off unless set.
    pub microphone: Option<bool>,
}

/// The broker's defaults for VMs that do not say (`[proxy] clipboard`,
/// `[recording] default`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defaults {
    pub clipboard: Clipboard,
    pub record: bool,
}

/// The rules one console session follows, fixed when its token is minted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionPolicy {
    /// Nothing from the browser reaches the VM but screen requests.
    pub view_only: bool,
    /// The VM takes one control session at a time.
    pub exclusive: bool,
    pub clipboard: Clipboard,
    pub record: bool,
    /// SPICE: usbredir channels may link.
    pub usb_redirect: bool,
    /// SPICE: the record (microphone) channel may link.
    pub microphone: bool,
}

impl SessionPolicy {
    /// The rules a new token gets from its VM, the defaults and the caller.
    pub fn resolve(vm: VmPolicy, defaults: Defaults, view_only: bool) -> SessionPolicy {
        SessionPolicy {
            view_only,
            exclusive: vm.control == Some(Control::Exclusive),
            clipboard: vm.clipboard.unwrap_or(defaults.clipboard),
            record: vm.record.unwrap_or(defaults.record),
            usb_redirect: vm.usb_redirect.unwrap_or(false),
            microphone: vm.microphone.unwrap_or(false),
        }
    }

    /// Whether the proxy must take part in the RFB handshake and follow the
    /// session's messages: without this, the session is a plain relay.
    pub fn needs_inspection(&self) -> bool {
        self.view_only || self.clipboard != Clipboard::Both || self.record
    }

    /// Whether the VNC server's stream must be parsed (to drop its
    /// clipboard); everything else is decided on the browser's messages.
    pub fn needs_server_parsing(&self) -> bool {
        !self.clipboard.from_vm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_print() {
        for c in [Control::Shared, Control::Exclusive] {
            assert_eq!(c.as_str().parse::<Control>(), Ok(c));
        }
        for c in [
            Clipboard::Both,
            Clipboard::ToVm,
            Clipboard::FromVm,
            Clipboard::None,
        ] {
            assert_eq!(c.as_str().parse::<Clipboard>(), Ok(c));
            assert_eq!(c.to_string().to_uppercase().parse::<Clipboard>(), Ok(c));
        }
        assert_eq!("TO_VM".parse::<Clipboard>(), Ok(Clipboard::ToVm));
        let e = "sideways".parse::<Clipboard>().unwrap_err();
        assert!(e.to_string().contains("both, to-vm, from-vm, none"), "{e}");
        assert!("".parse::<Control>().is_err());
        assert_eq!(parse_flag("record", "YES"), Ok(true));
        assert_eq!(parse_flag("record", "no"), Ok(false));
        assert!(parse_flag("record", "maybe").is_err());
    }

    #[test]
    fn a_vm_setting_wins_over_the_default() {
        let defaults = Defaults {
            clipboard: Clipboard::None,
            record: true,
        };
        let p = SessionPolicy::resolve(VmPolicy::default(), defaults, false);
        assert_eq!(p.clipboard, Clipboard::None);
        assert!(p.record && !p.exclusive && !p.view_only);
        let vm = VmPolicy {
            control: Some(Control::Exclusive),
            clipboard: Some(Clipboard::Both),
            record: Some(false),
            usb_redirect: Some(true),
            microphone: None,
        };
        let p = SessionPolicy::resolve(vm, defaults, true);
        assert_eq!(
            p,
            SessionPolicy {
                view_only: true,
                exclusive: true,
                clipboard: Clipboard::Both,
                record: false,
                usb_redirect: true,
                microphone: false,
            }
        );
    }

    #[test]
    fn only_what_the_policy_needs_is_parsed() {
        let plain = SessionPolicy::default();
        assert!(!plain.needs_inspection() && !plain.needs_server_parsing());
        let exclusive = SessionPolicy {
            exclusive: true,
            ..plain
        };
        assert!(!exclusive.needs_inspection());
        let to_vm_only = SessionPolicy {
            clipboard: Clipboard::ToVm,
            ..plain
        };
        assert!(to_vm_only.needs_inspection() && to_vm_only.needs_server_parsing());
        let from_vm_only = SessionPolicy {
            clipboard: Clipboard::FromVm,
            ..plain
        };
        assert!(from_vm_only.needs_inspection() && !from_vm_only.needs_server_parsing());
        let viewer = SessionPolicy {
            view_only: true,
            ..plain
        };
        assert!(viewer.needs_inspection() && !viewer.needs_server_parsing());
    }
}
