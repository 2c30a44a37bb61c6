//! OpenNebula as the inventory: oned decides who may open which console.
//!
//! For each request the broker calls `one.vm.info` with the caller's own
//! session string, so oned authenticates the caller and checks VM:USE, as
//! Sunstone did. oned's refusals pass through with their codes and
//! messages; an unreachable or slow oned is an internal error (0x2000)
//! within the configured timeout.

pub mod vmdoc;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use quick_xml::Reader;
use quick_xml::events::Event;

use self::vmdoc::ConsoleError;
use super::{Console, Credential, Grant, Inventory, InventoryError, Lapse, Principal, Verdict};
use crate::protocol::Protocol;
use crate::xmlrpc::{self as wire, MethodResponse, Value};

/// Largest answer read from oned.
const MAX_RESPONSE: usize = 8 << 20;

/// oned's error codes, as its answers carry them.
const AUTHENTICATION: i64 = 0x0100;
const AUTHORIZATION: i64 = 0x0200;
const NO_EXISTS: i64 = 0x0400;

/// A minimal XML-RPC client for oned.
pub struct Oned {
    endpoint: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

/// What a call to oned gave.
enum Answer {
    Ok(Value),
    Refused { code: i64, message: String },
}

impl Oned {
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Oned, String> {
        let endpoint: Uri = endpoint
            .parse()
            .map_err(|e| format!("inventory.endpoint {endpoint:?}: {e}"))?;
        if endpoint.scheme_str() != Some("http") {
            return Err(
                "inventory.endpoint must be an http:// URL of oned's XML-RPC server".into(),
            );
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Oned {
            endpoint,
            client,
            timeout,
        })
    }

    async fn call(&self, method: &str, params: Vec<Value>) -> Result<Answer, InventoryError> {
        let body = call_body(method, &params);
        let req = hyper::Request::post(self.endpoint.clone())
            .header(hyper::header::CONTENT_TYPE, "text/xml")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| InventoryError::Unavailable(format!("oned request: {e}")))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| InventoryError::Unavailable(format!("oned unreachable: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| InventoryError::Unavailable(format!("reading oned's answer: {e}")))?
                .to_bytes();
            if !status.is_success() {
                return Err(InventoryError::Unavailable(format!(
                    "oned answered HTTP {status}"
                )));
            }
            Ok(body)
        };
        let body = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                InventoryError::Unavailable(format!(
                    "oned did not answer within {:?}",
                    self.timeout
                ))
            })??;
        match wire::parse_response(&body).map_err(|e| {
            InventoryError::Unavailable(format!("oned's answer is not XML-RPC: {e}"))
        })? {
            MethodResponse::Fault { code, message } => Err(InventoryError::Unavailable(format!(
                "oned fault {code}: {message}"
            ))),
            MethodResponse::Value(Value::Array(items)) => match items.as_slice() {
                [Value::Bool(true), v, ..] => Ok(Answer::Ok(v.clone())),
                [
                    Value::Bool(false),
                    Value::Str(message),
                    Value::Int(code),
                    ..,
                ] => Ok(Answer::Refused {
                    code: *code,
                    message: message.clone(),
                }),
                _ => Err(InventoryError::Unavailable(
                    "oned's answer has an unexpected shape".into(),
                )),
            },
            MethodResponse::Value(_) => Err(InventoryError::Unavailable(
                "oned's answer has an unexpected shape".into(),
            )),
        }
    }
}

fn call_body(method: &str, params: &[Value]) -> String {
    // A methodCall is a methodResponse's params with a name in front.
    let mut out = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    out.push_str(method);
    out.push_str("</methodName><params>");
    for p in params {
        let one = wire::response(p);
        let start = one.find("<param>").map_or(0, |i| i + "<param>".len());
        let end = one.rfind("</param>").unwrap_or(one.len());
        out.push_str("<param>");
        out.push_str(&one[start..end]);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// The OpenNebula-backed inventory.
pub struct OpenNebulaInventory {
    oned: Oned,
    /// A session string of a service account that may read every VM, for
    /// re-checking a VM's placement when a token is redeemed.
    service_session: Option<String>,
}

impl OpenNebulaInventory {
    pub fn new(oned: Oned, service_session: Option<String>) -> OpenNebulaInventory {
        OpenNebulaInventory {
            oned,
            service_session,
        }
    }

    async fn vm_doc(&self, session: &str, vm_id: i64) -> Result<vmdoc::VmDoc, InventoryError> {
        match self
            .oned
            .call(
                "one.vm.info",
                vec![Value::Str(session.to_owned()), Value::Int(vm_id)],
            )
            .await?
        {
            Answer::Ok(Value::Str(xml)) => vmdoc::parse(&xml)
                .map_err(|e| InventoryError::Unavailable(format!("VM [{vm_id}] document: {e}"))),
            Answer::Ok(_) => Err(InventoryError::Unavailable(
                "one.vm.info returned no document".into(),
            )),
            Answer::Refused { code, message } => Err(refusal(code, message, vm_id)),
        }
    }
}

/// oned's refusal as an inventory error, its code and message kept (less
/// oned's own "[method] " prefix: ours goes in front).
fn refusal(code: i64, message: String, vm_id: i64) -> InventoryError {
    let message = match message.strip_prefix('[').and_then(|m| m.split_once("] ")) {
        Some((_, rest)) => rest.to_owned(),
        None => message,
    };
    match code {
        AUTHENTICATION => InventoryError::Authentication,
        AUTHORIZATION | NO_EXISTS => InventoryError::Oned { code, message },
        _ => {
            tracing::warn!(code, %message, vm_id, "oned refused");
            InventoryError::Oned { code, message }
        }
    }
}

fn session_of(cred: &Credential) -> String {
    format!("{}:{}", cred.user, cred.secret)
}

#[async_trait]
impl Inventory for OpenNebulaInventory {
    async fn authenticate(&self, cred: &Credential) -> Result<Principal, InventoryError> {
        match self
            .oned
            .call(
                "one.user.info",
                vec![Value::Str(session_of(cred)), Value::Int(-1)],
            )
            .await?
        {
            Answer::Ok(Value::Str(xml)) => {
                let (name, gid) = user_name_and_group(&xml).ok_or_else(|| {
                    InventoryError::Unavailable("one.user.info: unreadable user document".into())
                })?;
                // oned's own administrators are the oneadmin group, id 0.
                Ok(Principal {
                    name,
                    admin: gid == 0,
                })
            }
            Answer::Ok(_) => Err(InventoryError::Unavailable(
                "one.user.info returned no document".into(),
            )),
            Answer::Refused { code, message } => Err(refusal(code, message, -1)),
        }
    }

    async fn console(&self, cred: &Credential, vm_id: i64) -> Result<Console, InventoryError> {
        let doc = self.vm_doc(&session_of(cred), vm_id).await?;
        let target = doc.console_target().map_err(|e| match e {
            ConsoleError::NoConsole(why) => InventoryError::NoConsole { vm_id, why },
            ConsoleError::NotLive(why) => InventoryError::NotAvailable { vm_id, why },
        })?;
        let policy = doc.policy().map_err(|e| InventoryError::NotAvailable {
            vm_id,
            why: format!("TEMPLATE/VNCBROKER: {e}"),
        })?;
        Ok(Console {
            user: cred.user.clone(),
            vm_id,
            host: target.host,
            port: target.port,
            vnc_password: target.password,
            policy,
            protocol: target.protocol,
            // oned alone knows the caller's rights (ownership, groups,
            // ACLs), so live sessions are re-checked with their session.
            recheck_as: Some(cred.clone()),
        })
    }

    async fn authorize(&self, cred: &Credential, vm_id: i64) -> Result<Principal, InventoryError> {
        // oned answers one.vm.info only to callers with USE on the VM, in
        // whatever state it is: revoking needs no live console.
        self.vm_doc(&session_of(cred), vm_id).await?;
        Ok(Principal {
            name: cred.user.clone(),
            admin: false,
        })
    }

    async fn recheck(&self, vm_id: i64, grants: &[Grant]) -> Vec<Verdict> {
        // The VM's state and placement, once for all its sessions, with the
        // service account where one is configured.
        let placement = match &self.service_session {
            Some(session) => match self.vm_doc(session, vm_id).await {
                Ok(doc) => Some(doc),
                Err(e) => {
                    let verdict = match e {
                        InventoryError::Oned {
                            code: NO_EXISTS, ..
                        } => Verdict::End(Lapse::VmGone),
                        other => Verdict::Unknown(other.to_string()),
                    };
                    return vec![verdict; grants.len()];
                }
            },
            None => None,
        };
        let mut out: Vec<Verdict> = Vec::with_capacity(grants.len());
        for (i, g) in grants.iter().enumerate() {
            // One call per user and target, however many sessions they have.
            if let Some(j) = grants[..i].iter().position(|o| {
                o.caller == g.caller
                    && o.host == g.host
                    && o.port == g.port
                    && o.protocol == g.protocol
            }) {
                out.push(out[j].clone());
                continue;
            }
            // The user's own view: oned answers it only while the user may
            // still USE the VM.
            let own = match &g.caller {
                Some(cred) => Some(self.vm_doc(&session_of(cred), vm_id).await),
                None => None,
            };
            let doc = match (&placement, &own) {
                (_, Some(Err(InventoryError::Authentication))) => {
                    out.push(Verdict::End(Lapse::CredentialRejected));
                    continue;
                }
                (_, Some(Err(InventoryError::Oned { code, .. })))
                    if *code == AUTHORIZATION || *code == NO_EXISTS =>
                {
                    out.push(Verdict::End(Lapse::AccessLost));
                    continue;
                }
                (Some(doc), _) => doc,
                (None, Some(Ok(doc))) => doc,
                (_, Some(Err(e))) => {
                    out.push(Verdict::Unknown(e.to_string()));
                    continue;
                }
                (_, None) => {
                    out.push(Verdict::Continue);
                    continue;
                }
            };
            out.push(match doc.console_target() {
                Ok(t) if t.host == g.host && t.port == g.port && t.protocol == g.protocol => {
                    Verdict::Continue
                }
                Ok(_) => Verdict::End(Lapse::VmMoved),
                Err(_) => Verdict::End(Lapse::VmStopped),
            });
        }
        out
    }

    async fn still_at(
        &self,
        vm_id: i64,
        host: &str,
        port: u16,
        protocol: Protocol,
    ) -> Result<bool, InventoryError> {
        let Some(session) = &self.service_session else {
            return Ok(true);
        };
        let doc = self.vm_doc(session, vm_id).await?;
        Ok(match doc.console_target() {
            Ok(t) => t.host == host && t.port == port && t.protocol == protocol,
            Err(_) => false,
        })
    }
}

/// NAME and GID of a `one.user.info` document.
fn user_name_and_group(xml: &str) -> Option<(String, i64)> {
    if xml.len() > vmdoc::MAX_DOC {
        return None;
    }
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let (mut name, mut gid) = (None, None);
    loop {
        match reader.read_event().ok()? {
            Event::DocType(_) => return None,
            Event::Start(e) => {
                if path.len() >= vmdoc::MAX_DEPTH {
                    return None;
                }
                path.push(e.local_name().as_ref().to_vec());
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) if path.len() == 2 && path[0] == b"USER" => {
                let v = t.unescape().ok()?.trim().to_owned();
                match path[1].as_slice() {
                    b"NAME" => name = Some(v),
                    b"GID" => gid = v.parse().ok(),
                    _ => {}
                }
            }
            Event::CData(c) if path.len() == 2 && path[0] == b"USER" && path[1] == b"NAME" => {
                name = Some(c.decode().ok()?.trim().to_owned());
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Some((name?, gid?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_bodies_are_well_formed_calls() {
        let body = call_body("one.vm.info", &[Value::Str("a:b&c".into()), Value::Int(7)]);
        let call = wire::parse_call(body.as_bytes()).unwrap();
        assert_eq!(call.method, "one.vm.info");
        assert_eq!(call.params, vec![Value::Str("a:b&c".into()), Value::Int(7)]);
    }

    #[test]
    fn user_documents() {
        let xml = "<USER><ID>3</ID><GID>1</GID><GROUPS><ID>1</ID></GROUPS><GNAME>users</GNAME>\
                   <NAME>alice</NAME></USER>";
        assert_eq!(user_name_and_group(xml), Some(("alice".into(), 1)));
        let admin = "<USER><ID>0</ID><GID>0</GID><NAME><![CDATA[oneadmin]]></NAME></USER>";
        assert_eq!(user_name_and_group(admin), Some(("oneadmin".into(), 0)));
        assert_eq!(user_name_and_group("<USER><NAME>x</NAME></USER>"), None);
        assert_eq!(user_name_and_group("<!DOCTYPE x><USER/>"), None);
    }

    #[test]
    fn endpoints_must_be_http() {
        assert!(Oned::new("http://127.0.0.1:2633/RPC2", Duration::from_secs(1)).is_ok());
        assert!(Oned::new("https://one/RPC2", Duration::from_secs(1)).is_err());
        assert!(Oned::new("not a url", Duration::from_secs(1)).is_err());
    }
}
