//! The parts of an OpenNebula VM document (`one.vm.info`) the broker needs,
//! parsed without I/O.
//!
//! Both forms oned produces are read: the raw one, with template values in
//! CDATA, and the pretty-printed one. Unknown elements are skipped. A
//! document type declaration is refused, nesting and size are bounded, and
//! only the predefined entities are resolved.

use quick_xml::Reader;
use quick_xml::events::Event;

use crate::protocol::Protocol;

/// Largest VM document accepted. Real ones are a few KiB to a few hundred.
pub const MAX_DOC: usize = 4 << 20;
/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;

/// What the broker reads from a VM document.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct VmDoc {
    pub id: Option<String>,
    pub name: Option<String>,
    pub uname: Option<String>,
    pub state: Option<String>,
    pub lcm_state: Option<String>,
    pub graphics_type: Option<String>,
    pub graphics_port: Option<String>,
    pub graphics_passwd: Option<String>,
    /// HOSTNAME of the last history record: where the VM runs now.
    pub hostname: Option<String>,
    /// The broker's settings in the VM template's `VNCBROKER` vector
    /// (`CONTROL`, `CLIPBOARD`, `RECORD`, `USB_REDIRECT`, `MICROPHONE`), as
    /// written. Only TEMPLATE is read: the VM's owner can edit
    /// USER_TEMPLATE.
    pub broker_control: Option<String>,
    pub broker_clipboard: Option<String>,
    pub broker_record: Option<String>,
    pub broker_usb_redirect: Option<String>,
    pub broker_microphone: Option<String>,
}

impl std::fmt::Debug for VmDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDoc")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("state", &self.state)
            .field("lcm_state", &self.lcm_state)
            .field("graphics_type", &self.graphics_type)
            .field("graphics_port", &self.graphics_port)
            .field(
                "graphics_passwd",
                &self.graphics_passwd.as_ref().map(|_| "<set>"),
            )
            .field("hostname", &self.hostname)
            .field("broker_control", &self.broker_control)
            .field("broker_clipboard", &self.broker_clipboard)
            .field("broker_record", &self.broker_record)
            .field("broker_usb_redirect", &self.broker_usb_redirect)
            .field("broker_microphone", &self.broker_microphone)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("VM document larger than {MAX_DOC} bytes")]
    TooLarge,
    #[error("VM document nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("VM document has a document type declaration")]
    Doctype,
    #[error("malformed VM document: {0}")]
    Xml(String),
    #[error("not a VM document: the root element is not <VM>")]
    NotVm,
}

/// One history record while it is being read.
#[derive(Default)]
struct History {
    seq: Option<i64>,
    hostname: Option<String>,
}

/// Parses a VM document.
pub fn parse(xml: &str) -> Result<VmDoc, DocError> {
    if xml.len() > MAX_DOC {
        return Err(DocError::TooLarge);
    }
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut path: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut doc = VmDoc::default();
    let mut current: Option<History> = None;
    // (seq, document position, hostname) of the best record so far.
    let mut best: Option<(i64, usize, String)> = None;
    let mut records = 0usize;
    let mut saw_root = false;
    loop {
        match reader
            .read_event()
            .map_err(|e| DocError::Xml(e.to_string()))?
        {
            Event::DocType(_) => return Err(DocError::Doctype),
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if path.is_empty() {
                    if saw_root || name != "VM" {
                        return Err(DocError::NotVm);
                    }
                    saw_root = true;
                }
                if path.len() >= MAX_DEPTH {
                    return Err(DocError::TooDeep);
                }
                if is_history(&path, &name) {
                    current = Some(History::default());
                }
                path.push(name);
                text.clear();
            }
            Event::Empty(e) => {
                if path.is_empty() {
                    let name = e.local_name();
                    if saw_root || name.as_ref() != b"VM" {
                        return Err(DocError::NotVm);
                    }
                    saw_root = true;
                }
            }
            Event::Text(t) => {
                if text.len() < 64 * 1024 {
                    text.push_str(&t.unescape().map_err(|e| DocError::Xml(e.to_string()))?);
                }
            }
            Event::CData(c) => {
                if text.len() < 64 * 1024 {
                    text.push_str(&c.decode().map_err(|e| DocError::Xml(e.to_string()))?);
                }
            }
            Event::End(_) => {
                let value = text.trim().to_owned();
                text.clear();
                let p: Vec<&str> = path.iter().map(String::as_str).collect();
                match p.as_slice() {
                    ["VM", "ID"] => doc.id = Some(value),
                    ["VM", "NAME"] => doc.name = Some(value),
                    ["VM", "UNAME"] => doc.uname = Some(value),
                    ["VM", "STATE"] => doc.state = Some(value),
                    ["VM", "LCM_STATE"] => doc.lcm_state = Some(value),
                    ["VM", "TEMPLATE", "GRAPHICS", "TYPE"] => doc.graphics_type = Some(value),
                    ["VM", "TEMPLATE", "GRAPHICS", "PORT"] => doc.graphics_port = Some(value),
                    ["VM", "TEMPLATE", "GRAPHICS", "PASSWD"] => doc.graphics_passwd = Some(value),
                    ["VM", "TEMPLATE", "VNCBROKER", "CONTROL"] => doc.broker_control = Some(value),
                    ["VM", "TEMPLATE", "VNCBROKER", "CLIPBOARD"] => {
                        doc.broker_clipboard = Some(value)
                    }
                    ["VM", "TEMPLATE", "VNCBROKER", "RECORD"] => doc.broker_record = Some(value),
                    ["VM", "TEMPLATE", "VNCBROKER", "USB_REDIRECT"] => {
                        doc.broker_usb_redirect = Some(value)
                    }
                    ["VM", "TEMPLATE", "VNCBROKER", "MICROPHONE"] => {
                        doc.broker_microphone = Some(value)
                    }
                    ["VM", "HISTORY_RECORDS", "HISTORY", "SEQ"] | ["VM", "HISTORY", "SEQ"] => {
                        if let Some(h) = current.as_mut() {
                            h.seq = value.parse().ok();
                        }
                    }
                    ["VM", "HISTORY_RECORDS", "HISTORY", "HOSTNAME"]
                    | ["VM", "HISTORY", "HOSTNAME"] => {
                        if let Some(h) = current.as_mut() {
                            h.hostname = Some(value);
                        }
                    }
                    ["VM", "HISTORY_RECORDS", "HISTORY"] | ["VM", "HISTORY"] => {
                        if let Some(h) = current.take() {
                            records += 1;
                            if let Some(host) = h.hostname.filter(|h| !h.is_empty()) {
                                // The highest SEQ wins; document order breaks ties
                                // and stands in for a missing SEQ.
                                let key = (h.seq.unwrap_or(i64::MIN), records);
                                if best.as_ref().is_none_or(|(s, r, _)| key >= (*s, *r)) {
                                    best = Some((key.0, key.1, host));
                                }
                            }
                        }
                    }
                    _ => {}
                }
                path.pop();
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    if !path.is_empty() {
        return Err(DocError::Xml("the document ends inside an element".into()));
    }
    if !saw_root {
        return Err(DocError::NotVm);
    }
    doc.hostname = best.map(|(_, _, h)| h);
    Ok(doc)
}

fn is_history(path: &[String], name: &str) -> bool {
    name == "HISTORY"
        && matches!(
            path.iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice(),
            ["VM", "HISTORY_RECORDS"] | ["VM"]
        )
}

/// The LCM states in which Sunstone offered a console (with STATE 3, ACTIVE).
pub const LIVE_LCM_STATES: &[i64] = &[3, 4, 12, 13, 16, 17, 18, 24, 25, 26, 27, 28, 29, 57, 58, 62];

/// Why a parsed VM has no console to offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    /// No GRAPHICS, or neither VNC nor SPICE: OpenNebula's "no such
    /// object" (0x0400).
    #[error("{0}")]
    NoConsole(String),
    /// Not in a state with a live console: OpenNebula's action error (0x0800).
    #[error("{0}")]
    NotLive(String),
}

/// Where a VM's console is, per its document: the hypervisor host, the
/// GRAPHICS port, and GRAPHICS/PASSWD (the VNC or SPICE password).
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleTarget {
    pub host: String,
    pub port: u16,
    pub password: Option<String>,
    pub protocol: Protocol,
}

impl std::fmt::Debug for ConsoleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl VmDoc {
    /// The broker's settings from the template's `VNCBROKER` vector; a value
    /// that names nothing known is an error, never silently the default.
    pub fn policy(&self) -> Result<crate::policy::VmPolicy, crate::policy::BadValue> {
        use crate::policy::{VmPolicy, parse_flag};
        Ok(VmPolicy {
            control: self.broker_control.as_deref().map(str::parse).transpose()?,
            clipboard: self
                .broker_clipboard
                .as_deref()
                .map(str::parse)
                .transpose()?,
            record: self
                .broker_record
                .as_deref()
                .map(|r| parse_flag("record", r))
                .transpose()?,
            usb_redirect: self
                .broker_usb_redirect
                .as_deref()
                .map(|r| parse_flag("usb_redirect", r))
                .transpose()?,
            microphone: self
                .broker_microphone
                .as_deref()
                .map(|r| parse_flag("microphone", r))
                .transpose()?,
        })
    }

    /// The console of this VM (VNC or SPICE, GRAPHICS/TYPE in any case),
    /// or why there is none.
    pub fn console_target(&self) -> Result<ConsoleTarget, ConsoleError> {
        let protocol = match self.graphics_type.as_deref() {
            None => {
                return Err(ConsoleError::NoConsole(
                    "the VM has no GRAPHICS section with a TYPE".into(),
                ));
            }
            Some(t) => t.parse::<Protocol>().map_err(|_| {
                let shown: String = t.chars().take(16).collect();
                ConsoleError::NoConsole(format!("the VM's console is {shown:?}, not VNC or SPICE"))
            })?,
        };
        let state = self.state.as_deref().and_then(|s| s.parse::<i64>().ok());
        let lcm = self
            .lcm_state
            .as_deref()
            .and_then(|s| s.parse::<i64>().ok());
        let live = state == Some(3) && lcm.is_some_and(|l| LIVE_LCM_STATES.contains(&l));
        if !live {
            return Err(ConsoleError::NotLive(format!(
                "the VM is not running (STATE {}, LCM_STATE {})",
                state.map_or("?".into(), |s| s.to_string()),
                lcm.map_or("?".into(), |s| s.to_string())
            )));
        }
        let port = self
            .graphics_port
            .as_deref()
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ConsoleError::NotLive(format!(
                    "the VM has no {} port assigned",
                    protocol.as_str().to_uppercase()
                ))
            })?;
        let host = self
            .hostname
            .clone()
            .ok_or_else(|| ConsoleError::NotLive("the VM is not placed on a host".into()))?;
        Ok(ConsoleTarget {
            host,
            port,
            password: self.graphics_passwd.clone().filter(|p| !p.is_empty()),
            protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/opennebula/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn pretty_printed_6_99_document() {
        let d = parse(&fixture("01-docs-sd-rst-vm-800-opennebula-6.99.xml")).unwrap();
        assert_eq!(d.id.as_deref(), Some("800"));
        assert_eq!(d.graphics_type.as_deref(), Some("vnc"));
        assert_eq!(d.graphics_port.as_deref(), Some("6700"));
        assert_eq!(
            d.hostname.as_deref(),
            Some("ubuntu2204-kvm-ceph-quincy-6-99-0c08-2.test")
        );
        assert_eq!(
            (d.state.as_deref(), d.lcm_state.as_deref()),
            (Some("3"), Some("69"))
        );
        // LCM_STATE 69 (BACKUP) is not one where Sunstone offered a console.
        assert!(matches!(d.console_target(), Err(ConsoleError::NotLive(_))));
    }

    #[test]
    fn raw_cdata_document_running() {
        let d = parse(&fixture("02-quattor-rpcdata-one.vm.info-raw-cdata.xml")).unwrap();
        let t = d.console_target().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.password),
            ("hyp101", 5960, None)
        );
        assert_eq!(d.uname.as_deref(), Some("oneadmin"));
    }

    #[test]
    fn onedock_document_with_placeholders_parses() {
        let d = parse(&fixture("03-onedock-testing-vm-keymap.xml")).unwrap();
        assert_eq!(d.id.as_deref(), Some("%%VMID%%"));
        assert_eq!(d.hostname.as_deref(), Some("wn1"));
        // LCM_STATE 2 (BOOT): no console yet.
        assert!(matches!(d.console_target(), Err(ConsoleError::NotLive(_))));
    }

    #[test]
    fn legacy_document_without_graphics() {
        let d = parse(&fixture("04-opennebula-one-oca-ruby-fixture-vm.xml")).unwrap();
        assert_eq!(d.id.as_deref(), Some("6"));
        assert!(d.hostname.is_some());
        assert!(matches!(
            d.console_target(),
            Err(ConsoleError::NoConsole(_))
        ));
    }

    /// A modern running VM built from the 6.99 document: migrated once, with
    /// a VNC password, in raw (CDATA) form.
    fn migrated(graphics: &str, state: &str, lcm: &str) -> String {
        format!(
            "<VM><ID>42</ID><NAME>web</NAME><STATE>{state}</STATE><LCM_STATE>{lcm}</LCM_STATE>\
             <TEMPLATE><GRAPHICS>{graphics}</GRAPHICS><UNKNOWN_THING><A>1</A></UNKNOWN_THING></TEMPLATE>\
             <HISTORY_RECORDS><HISTORY><SEQ>0</SEQ><HOSTNAME>old-host</HOSTNAME></HISTORY>\
             <HISTORY><SEQ>1</SEQ><HOSTNAME><![CDATA[new-host]]></HOSTNAME></HISTORY></HISTORY_RECORDS></VM>"
        )
    }

    #[test]
    fn last_history_record_and_password() {
        let g = "<LISTEN><![CDATA[0.0.0.0]]></LISTEN><PASSWD><![CDATA[s3cr&t]]></PASSWD>\
                 <PORT><![CDATA[5907]]></PORT><RANDOM_PASSWD>YES</RANDOM_PASSWD><TYPE><![CDATA[VNC]]></TYPE>";
        let d = parse(&migrated(g, "3", "3")).unwrap();
        let t = d.console_target().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.password.as_deref()),
            ("new-host", 5907, Some("s3cr&t"))
        );
        assert!(!format!("{d:?} {t:?}").contains("s3cr"));
    }

    #[test]
    fn every_live_lcm_state_and_some_dead_ones() {
        let g = "<PORT>5900</PORT><TYPE>vnc</TYPE>";
        for lcm in LIVE_LCM_STATES {
            assert!(
                parse(&migrated(g, "3", &lcm.to_string()))
                    .unwrap()
                    .console_target()
                    .is_ok(),
                "{lcm}"
            );
        }
        for (state, lcm) in [
            ("3", "0"),
            ("3", "2"),
            ("3", "69"),
            ("8", "0"),
            ("5", "3"),
            ("x", "3"),
        ] {
            assert!(
                matches!(
                    parse(&migrated(g, state, lcm)).unwrap().console_target(),
                    Err(ConsoleError::NotLive(_))
                ),
                "{state}/{lcm}"
            );
        }
    }

    #[test]
    fn broker_policy_comes_from_the_template_only() {
        use crate::policy::{Clipboard, Control, VmPolicy};
        let doc = |template: &str, user: &str| {
            format!(
                "<VM><STATE>3</STATE><LCM_STATE>3</LCM_STATE><TEMPLATE>{template}</TEMPLATE>\
                 <USER_TEMPLATE>{user}</USER_TEMPLATE></VM>"
            )
        };
        let set = "<VNCBROKER><CONTROL><![CDATA[exclusive]]></CONTROL>\
                   <CLIPBOARD>TO-VM</CLIPBOARD><RECORD>YES</RECORD></VNCBROKER>";
        let p = parse(&doc(set, "")).unwrap().policy().unwrap();
        assert_eq!(
            p,
            VmPolicy {
                control: Some(Control::Exclusive),
                clipboard: Some(Clipboard::ToVm),
                record: Some(true),
                ..VmPolicy::default()
            }
        );
        // The owner can edit USER_TEMPLATE: it never loosens anything.
        let loose = "<VNCBROKER><CLIPBOARD>both</CLIPBOARD><RECORD>no</RECORD></VNCBROKER>";
        let p = parse(&doc("", loose)).unwrap().policy().unwrap();
        assert_eq!(p, VmPolicy::default());
        let e = parse(&doc(
            "<VNCBROKER><CLIPBOARD>sideways</CLIPBOARD></VNCBROKER>",
            "",
        ))
        .unwrap()
        .policy()
        .unwrap_err();
        assert!(e.to_string().contains("both, to-vm, from-vm, none"), "{e}");
        assert!(
            parse(&doc("<VNCBROKER><RECORD>maybe</RECORD></VNCBROKER>", ""))
                .unwrap()
                .policy()
                .is_err()
        );
    }

    #[test]
    fn spice_consoles_in_any_case_with_their_password() {
        let g = "<LISTEN><![CDATA[0.0.0.0]]></LISTEN><PASSWD><![CDATA[sp1ce&pw]]></PASSWD>\
                 <PORT><![CDATA[5942]]></PORT><RANDOM_PASSWD>YES</RANDOM_PASSWD><TYPE><![CDATA[SPICE]]></TYPE>";
        let t = parse(&migrated(g, "3", "3"))
            .unwrap()
            .console_target()
            .unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.password.as_deref(), t.protocol),
            ("new-host", 5942, Some("sp1ce&pw"), Protocol::Spice)
        );
        assert!(!format!("{t:?}").contains("sp1ce"));
        for ty in ["spice", "Spice", "VNC"] {
            let g = format!("<PORT>5900</PORT><TYPE>{ty}</TYPE>");
            let t = parse(&migrated(&g, "3", "3"))
                .unwrap()
                .console_target()
                .unwrap();
            let want = if ty == "VNC" {
                Protocol::Vnc
            } else {
                Protocol::Spice
            };
            assert_eq!((t.protocol, t.password), (want, None), "{ty}");
        }
        // A SPICE VM that is off has no console, like a VNC one.
        let g = "<PORT>5900</PORT><TYPE>SPICE</TYPE>";
        assert!(matches!(
            parse(&migrated(g, "8", "0")).unwrap().console_target(),
            Err(ConsoleError::NotLive(_))
        ));
        let e = parse(&migrated("<TYPE>SPICE</TYPE>", "3", "3"))
            .unwrap()
            .console_target()
            .unwrap_err();
        assert_eq!(
            e,
            ConsoleError::NotLive("the VM has no SPICE port assigned".into())
        );
    }

    #[test]
    fn spice_device_policy_comes_from_the_template_only() {
        use crate::policy::VmPolicy;
        let doc = |template: &str, user: &str| {
            format!(
                "<VM><STATE>3</STATE><LCM_STATE>3</LCM_STATE><TEMPLATE>{template}</TEMPLATE>\
                 <USER_TEMPLATE>{user}</USER_TEMPLATE></VM>"
            )
        };
        let set = "<VNCBROKER><MICROPHONE><![CDATA[YES]]></MICROPHONE>\
                   <USB_REDIRECT>yes</USB_REDIRECT></VNCBROKER>";
        let p = parse(&doc(set, "")).unwrap().policy().unwrap();
        assert_eq!(
            p,
            VmPolicy {
                usb_redirect: Some(true),
                microphone: Some(true),
                ..VmPolicy::default()
            }
        );
        let off =
            "<VNCBROKER><MICROPHONE>no</MICROPHONE><USB_REDIRECT>NO</USB_REDIRECT></VNCBROKER>";
        let p = parse(&doc(off, "")).unwrap().policy().unwrap();
        assert_eq!((p.usb_redirect, p.microphone), (Some(false), Some(false)));
        // The owner's USER_TEMPLATE turns no device on.
        let p = parse(&doc("", set)).unwrap().policy().unwrap();
        assert_eq!(p, VmPolicy::default());
        for bad in [
            "<VNCBROKER><USB_REDIRECT>sometimes</USB_REDIRECT></VNCBROKER>",
            "<VNCBROKER><MICROPHONE>loud</MICROPHONE></VNCBROKER>",
        ] {
            let e = parse(&doc(bad, "")).unwrap().policy().unwrap_err();
            assert!(e.to_string().contains("yes, no"), "{e}");
        }
    }

    #[test]
    fn console_type_checks() {
        for g in [
            "<PORT>5900</PORT><TYPE>SDL</TYPE>",
            "<PORT>5900</PORT><TYPE>rdp</TYPE>",
            "<PORT>5900</PORT>",
        ] {
            let e = parse(&migrated(g, "3", "3"))
                .unwrap()
                .console_target()
                .unwrap_err();
            assert!(matches!(e, ConsoleError::NoConsole(_)), "{g}: {e:?}");
        }
        let e = parse(&migrated("<PORT>5900</PORT><TYPE>SDL</TYPE>", "3", "3"))
            .unwrap()
            .console_target()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VM's console is \"SDL\", not VNC or SPICE"
        );
        let no_graphics = "<VM><STATE>3</STATE><LCM_STATE>3</LCM_STATE><TEMPLATE/></VM>";
        assert!(matches!(
            parse(no_graphics).unwrap().console_target(),
            Err(ConsoleError::NoConsole(_))
        ));
        for port in ["", "abc", "70000", "0"] {
            let g = format!("<PORT>{port}</PORT><TYPE>vnc</TYPE>");
            assert!(
                parse(&migrated(&g, "3", "3"))
                    .unwrap()
                    .console_target()
                    .is_err(),
                "{port:?}"
            );
        }
        let pending = "<VM><STATE>3</STATE><LCM_STATE>3</LCM_STATE><TEMPLATE><GRAPHICS><PORT>5900</PORT>\
                       <TYPE>vnc</TYPE></GRAPHICS></TEMPLATE><HISTORY_RECORDS/></VM>";
        assert!(matches!(
            parse(pending).unwrap().console_target(),
            Err(ConsoleError::NotLive(_))
        ));
    }

    #[test]
    fn hostile_documents_are_refused() {
        let laughs = "<?xml version=\"1.0\"?><!DOCTYPE VM [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;&a;\">]><VM><NAME>&b;</NAME></VM>";
        assert_eq!(parse(laughs), Err(DocError::Doctype));
        assert!(matches!(
            parse("<VM><NAME>&undefined;</NAME></VM>"),
            Err(DocError::Xml(_))
        ));
        let deep = format!("<VM>{}", "<A>".repeat(100_000));
        assert_eq!(parse(&deep), Err(DocError::TooDeep));
        let huge = format!("<VM><NAME>{}</NAME></VM>", "x".repeat(MAX_DOC));
        assert_eq!(parse(&huge), Err(DocError::TooLarge));
        assert_eq!(parse("<HOST><ID>1</ID></HOST>"), Err(DocError::NotVm));
        assert_eq!(parse(""), Err(DocError::NotVm));
        assert!(parse("<VM><ID>1</ID>").is_err());
        assert!(parse("<VM><ID>1</NAME></VM>").is_err());
        assert_eq!(parse("<VM/><VM/>"), Err(DocError::NotVm));
    }

    #[test]
    fn garbage_never_panics() {
        let seed = migrated("<PORT>5900</PORT><TYPE>vnc</TYPE>", "3", "3");
        let mut x: u64 = 0x853C49E6748FEA9B;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = seed.clone().into_bytes();
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
            b.truncate((x >> 40) as usize % (b.len() + 1));
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = parse(s).map(|d| d.console_target());
            }
        }
    }
}
