//! `POST /RPC2`: the token methods in OpenNebula's XML-RPC conventions.
//!
//! Every method takes the session string first and answers
//! `[success, result-or-message, code]`, as oned does, so OpenNebula's
//! bindings (pyone, the Ruby OCA) work unchanged.

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use crate::inventory::{Credential, InventoryError};
use crate::limits::Refused;
use crate::service::{MintRequest, Minted, ServiceError};
use crate::xmlrpc::{self as wire, Value};

/// OpenNebula's error codes.
pub mod code {
    pub const SUCCESS: i64 = 0x0000;
    pub const AUTHENTICATION: i64 = 0x0100;
    pub const AUTHORIZATION: i64 = 0x0200;
    pub const NO_EXISTS: i64 = 0x0400;
    pub const ACTION: i64 = 0x0800;
    pub const XML_RPC_API: i64 = 0x1000;
    pub const INTERNAL: i64 = 0x2000;
}

/// Fault codes for calls that are not calls at all (the common
/// specification for XML-RPC fault codes).
const FAULT_PARSE: i64 = -32700;
const FAULT_NO_METHOD: i64 = -32601;

pub const METHOD_TOKEN: &str = "one.vm.novnctoken";
pub const METHOD_TOKEN_ALIAS: &str = "one.vm.token";
pub const METHOD_REVOKE: &str = "one.vm.novnctokenrevoke";

/// The method names counted by name in `/metrics`; anything else is
/// `other`, so callers cannot grow the label set.
const COUNTED_METHODS: &[&str] = &[
    METHOD_TOKEN,
    METHOD_TOKEN_ALIAS,
    METHOD_REVOKE,
    "system.listMethods",
];

/// The `method` label for an XML-RPC method name.
pub fn method_label(name: &str) -> &'static str {
    COUNTED_METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("other")
}

/// The `code` label for a result: OpenNebula's known codes (0 for success)
/// and the fault codes this API answers; codes passed through from oned
/// that are none of these count as `other`.
pub fn code_label(code: i64) -> &'static str {
    match code {
        code::SUCCESS => "0x0000",
        code::AUTHENTICATION => "0x0100",
        code::AUTHORIZATION => "0x0200",
        code::NO_EXISTS => "0x0400",
        code::ACTION => "0x0800",
        code::XML_RPC_API => "0x1000",
        code::INTERNAL => "0x2000",
        FAULT_PARSE => "-32700",
        FAULT_NO_METHOD => "-32601",
        _ => "other",
    }
}

/// Session strings longer than this are refused without a lookup.
const MAX_SESSION: usize = 4096;

pub async fn handle(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ip = state.client_ip(peer, &headers);
    let parsed = wire::parse_call(&body);
    // The method label for /metrics; unknown names fold into "other".
    let label = parsed.as_ref().ok().map(|c| method_label(&c.method));
    let xml = match parsed {
        // A failure is charged before the call is looked at, and refunded
        // unless the session string turns out wrong.
        Ok(call) => match state.limiter.begin(ip).await {
            Ok(attempt) => {
                let (xml, failed_login) =
                    crate::auth::CLIENT.scope(ip, dispatch(&state, call)).await;
                if failed_login {
                    attempt.fail();
                } else {
                    attempt.refund();
                }
                xml
            }
            Err(Refused::Spent) => {
                tokio::time::sleep(state.limiter.delay()).await;
                refusal(
                    &call.method,
                    "Too many failed attempts, try again later.",
                    code::AUTHENTICATION,
                )
            }
            Err(Refused::Busy) => refusal(
                &call.method,
                "Too many logins in progress from this address, try again shortly.",
                code::INTERNAL,
            ),
        },
        Err(e) => {
            tracing::debug!(error = %e, "malformed XML-RPC request");
            wire::fault(FAULT_PARSE, &format!("parse error: {e}"))
        }
    };
    let mut resp = ([(header::CONTENT_TYPE, "text/xml")], xml).into_response();
    if let Some(label) = label {
        resp.extensions_mut()
            .insert(crate::metrics::ApiMethod(label));
    }
    resp
}

/// A refusal before the call is looked at.
fn refusal(method: &str, message: &str, code: i64) -> String {
    let method: String = method.chars().take(64).collect();
    wire::response(&Value::Array(vec![
        Value::Bool(false),
        Value::Str(format!("[{method}] {message}")),
        Value::Int(code),
    ]))
}

/// Answers a call; the flag says whether it failed authentication.
async fn dispatch(state: &ApiState, call: wire::MethodCall) -> (String, bool) {
    let method = call.method.as_str();
    let result = match method {
        METHOD_TOKEN | METHOD_TOKEN_ALIAS => novnctoken(state, &call.params).await,
        METHOD_REVOKE => revoke(state, &call.params).await,
        "system.listMethods" => Ok(Value::Array(
            [METHOD_TOKEN, METHOD_TOKEN_ALIAS, METHOD_REVOKE]
                .iter()
                .map(|m| Value::Str((*m).into()))
                .collect(),
        )),
        _ => {
            let shown: String = method.chars().take(64).collect();
            let xml = wire::fault(FAULT_NO_METHOD, &format!("method {shown:?} not found"));
            crate::metrics::global().xmlrpc_result("other", code_label(FAULT_NO_METHOD));
            return (xml, false);
        }
    };
    let failed_login = matches!(&result, Err(f) if f.code == code::AUTHENTICATION);
    crate::metrics::global().xmlrpc_result(
        method_label(method),
        code_label(result.as_ref().map_or_else(|f| f.code, |_| code::SUCCESS)),
    );
    let v = match result {
        Ok(v) => Value::Array(vec![Value::Bool(true), v, Value::Int(code::SUCCESS)]),
        Err(failure) => {
            let mut items = vec![
                Value::Bool(false),
                Value::Str(format!("[{method}] {}", failure.message)),
                Value::Int(failure.code),
            ];
            if let Some(id) = failure.object {
                items.push(Value::Int(id));
            }
            Value::Array(items)
        }
    };
    (wire::response(&v), failed_login)
}

/// A failed call: oned's message, code and (where known) object id.
struct Failure {
    message: String,
    code: i64,
    object: Option<i64>,
}

fn bad_param(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: code::XML_RPC_API,
        object: None,
    }
}

impl Failure {
    fn from_service(err: ServiceError, vm_id: i64) -> Failure {
        use InventoryError as I;
        let code = match &err {
            ServiceError::Inventory(e) => match e {
                I::Authentication => code::AUTHENTICATION,
                I::Authorization { .. } => code::AUTHORIZATION,
                I::NoSuchVm(_) | I::NoConsole { .. } => code::NO_EXISTS,
                I::NotAvailable { .. } => code::ACTION,
                I::Oned { code, .. } => *code,
                I::Unavailable(_) | I::Busy => code::INTERNAL,
            },
            ServiceError::NoSuchSession(_) | ServiceError::NoRecording { .. } => code::NO_EXISTS,
            ServiceError::SessionOver(_) => code::ACTION,
            ServiceError::NotAllowed(_) => code::AUTHORIZATION,
            ServiceError::WrongProtocol { .. } => code::ACTION,
            ServiceError::BadParameter(_) => code::XML_RPC_API,
            ServiceError::Store(_) | ServiceError::Unavailable(_) | ServiceError::Internal(_) => {
                code::INTERNAL
            }
        };
        // Like oned, an authentication failure names no object.
        let object = (code != code::AUTHENTICATION).then_some(vm_id).or(Some(-1));
        Failure {
            message: oned_message(&err),
            code,
            object,
        }
    }
}

/// An error in oned's own words, as pyone users and oned's clients know
/// them; the kinds oned has no words for keep the service's.
fn oned_message(err: &ServiceError) -> String {
    use InventoryError as I;
    match err {
        ServiceError::Inventory(I::Authentication) => AUTHENTICATION_FAILED.into(),
        ServiceError::Inventory(I::Authorization { user, vm_id }) => {
            format!("User [{user}] : Not authorized to perform USE VM [{vm_id}].")
        }
        ServiceError::Inventory(I::NoSuchVm(id)) => {
            format!("Error getting virtual machine [{id}].")
        }
        ServiceError::Inventory(I::Busy) => {
            "Server busy: too many logins in progress, try again shortly".into()
        }
        other => super::client_message(other),
    }
}

/// oned's answer to a session it does not know.
const AUTHENTICATION_FAILED: &str = "User couldn't be authenticated, aborting call.";

/// Checks arity and the leading (session, vm_id) pair every method has.
fn session_and_vm(params: &[Value], max: usize) -> Result<(Credential, i64), Failure> {
    if params.len() < 2 || params.len() > max {
        return Err(bad_param(format!(
            "Wrong number of parameters: expected 2 to {max}, got {}",
            params.len()
        )));
    }
    let session = match &params[0] {
        Value::Str(s) => s,
        other => {
            return Err(bad_param(format!(
                "Parameter 1 (session) must be a string, got {}",
                other.type_name()
            )));
        }
    };
    let vm_id = match &params[1] {
        Value::Int(i) => *i,
        other => {
            return Err(bad_param(format!(
                "Parameter 2 (vm_id) must be an int, got {}",
                other.type_name()
            )));
        }
    };
    let cred = if session.len() > MAX_SESSION {
        None
    } else {
        Credential::from_session(session)
    };
    let cred = cred.ok_or(Failure {
        message: AUTHENTICATION_FAILED.into(),
        code: code::AUTHENTICATION,
        object: None,
    })?;
    Ok((cred, vm_id))
}

async fn novnctoken(state: &ApiState, params: &[Value]) -> Result<Value, Failure> {
    let (cred, vm_id) = session_and_vm(params, 5)?;
    let ttl = match params.get(2) {
        None => None,
        Some(Value::Int(t)) => Some(*t),
        Some(other) => {
            return Err(bad_param(format!(
                "Parameter 3 (ttl) must be an int, got {}",
                other.type_name()
            )));
        }
    };
    let single_use = match params.get(3) {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            return Err(bad_param(format!(
                "Parameter 4 (single_use) must be a boolean, got {}",
                other.type_name()
            )));
        }
    };
    let view_only = match params.get(4) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad_param(format!(
                "Parameter 5 (view_only) must be a boolean, got {}",
                other.type_name()
            )));
        }
    };
    let request = MintRequest {
        ttl,
        single_use,
        view_only,
    };
    let minted = state
        .service
        .mint(&cred, vm_id, request)
        .await
        .map_err(|e| Failure::from_service(e, vm_id))?;
    Ok(minted_value(minted))
}

async fn revoke(state: &ApiState, params: &[Value]) -> Result<Value, Failure> {
    let (cred, vm_id) = session_and_vm(params, 2)?;
    let done = state
        .service
        .revoke(&cred, vm_id)
        .await
        .map_err(|e| Failure::from_service(e, vm_id))?;
    // oned's convention: the int result; the sessions ended are in the JSON
    // API's answer.
    Ok(Value::Int(i64::try_from(done.tokens).unwrap_or(i64::MAX)))
}

/// The answer of `one.vm.novnctoken`, one struct for either protocol: the
/// method keeps the name OpenNebula's clients know, and `protocol` ("vnc"
/// or "spice") says which client opens the console.
fn minted_value(m: Minted) -> Value {
    Value::Struct(vec![
        ("token".into(), Value::Str(m.token)),
        ("url".into(), Value::Str(m.url)),
        ("path".into(), Value::Str(m.path)),
        ("expires_at".into(), Value::Int(m.expires_at)),
        ("ttl".into(), Value::Int(m.ttl)),
        ("vm_id".into(), Value::Int(m.vm_id)),
        ("single_use".into(), Value::Bool(m.single_use)),
        ("view_only".into(), Value::Bool(m.view_only)),
        ("protocol".into(), Value::Str(m.protocol.as_str().into())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_and_codes_fold_into_other() {
        assert_eq!(method_label("one.vm.novnctoken"), "one.vm.novnctoken");
        assert_eq!(method_label("one.vm.token"), "one.vm.token");
        assert_eq!(method_label("x\"y"), "other");
        assert_eq!(code_label(code::AUTHENTICATION), "0x0100");
        assert_eq!(code_label(FAULT_NO_METHOD), "-32601");
        assert_eq!(code_label(0x4000), "other");
    }
}
