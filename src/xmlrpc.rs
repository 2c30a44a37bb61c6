//! XML-RPC on the wire, without I/O: parse a `methodCall`, write a
//! `methodResponse` or a fault.
//!
//! The parser is a pull parser over quick-xml with hard limits: a document
//! type declaration is refused outright (so no entity is ever declared, let
//! alone expanded), nesting is bounded, and so is the number of values.
//! quick-xml resolves only the five predefined entities and character
//! references; anything else is an error.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use quick_xml::Reader;
use quick_xml::events::Event;

/// How deeply arrays and structs may nest.
pub const MAX_DEPTH: usize = 32;
/// How many values one call may carry in all.
pub const MAX_VALUES: usize = 10_000;

/// An XML-RPC value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Bool(bool),
    Str(String),
    Double(f64),
    DateTime(String),
    Base64(Vec<u8>),
    Array(Vec<Value>),
    Struct(Vec<(String, Value)>),
    Nil,
}

impl Value {
    /// The XML-RPC type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Bool(_) => "boolean",
            Value::Str(_) => "string",
            Value::Double(_) => "double",
            Value::DateTime(_) => "dateTime.iso8601",
            Value::Base64(_) => "base64",
            Value::Array(_) => "array",
            Value::Struct(_) => "struct",
            Value::Nil => "nil",
        }
    }
}

/// A parsed `methodCall`.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCall {
    pub method: String,
    pub params: Vec<Value>,
}

/// Why a request body is not a usable `methodCall`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("document type declarations are not accepted")]
    Doctype,
    #[error("malformed XML: {0}")]
    Xml(String),
    #[error("not an XML-RPC call: {0}")]
    Shape(String),
    #[error("values nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more than {MAX_VALUES} values")]
    TooMany,
    #[error("bad {0} value")]
    BadScalar(&'static str),
}

struct Parser<'a> {
    reader: Reader<&'a [u8]>,
    values: usize,
}

/// One significant event: an element opens, an element closes, or text.
enum Item<'a> {
    Open(String),
    Close(String),
    Text(Cow<'a, str>),
    Eof,
}

impl<'a> Parser<'a> {
    fn new(body: &'a [u8]) -> Parser<'a> {
        let mut reader = Reader::from_reader(body);
        let cfg = reader.config_mut();
        cfg.expand_empty_elements = true;
        cfg.check_end_names = true;
        Parser { reader, values: 0 }
    }

    fn item(&mut self) -> Result<Item<'a>, WireError> {
        loop {
            let ev = self
                .reader
                .read_event()
                .map_err(|e| WireError::Xml(e.to_string()))?;
            return Ok(match ev {
                Event::DocType(_) => return Err(WireError::Doctype),
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) => continue,
                Event::Start(e) => Item::Open(name(e.local_name().as_ref())),
                Event::End(e) => Item::Close(name(e.local_name().as_ref())),
                Event::Empty(_) => continue, // not produced: empty elements are expanded
                Event::Text(t) => {
                    Item::Text(t.unescape().map_err(|e| WireError::Xml(e.to_string()))?)
                }
                Event::CData(c) => {
                    Item::Text(c.decode().map_err(|e| WireError::Xml(e.to_string()))?)
                }
                Event::Eof => Item::Eof,
            });
        }
    }

    /// Next item that is not whitespace-only text.
    fn tag(&mut self) -> Result<Item<'a>, WireError> {
        loop {
            match self.item()? {
                Item::Text(t) if t.trim().is_empty() => continue,
                other => return Ok(other),
            }
        }
    }

    fn expect_open(&mut self, want: &str) -> Result<(), WireError> {
        match self.tag()? {
            Item::Open(n) if n == want => Ok(()),
            other => Err(unexpected(want, other)),
        }
    }

    fn expect_close(&mut self, want: &str) -> Result<(), WireError> {
        match self.tag()? {
            Item::Close(n) if n == want => Ok(()),
            other => Err(unexpected(&format!("/{want}"), other)),
        }
    }

    /// Text content up to the closing tag of `elem`; no child elements.
    fn text_until_close(&mut self, elem: &str) -> Result<String, WireError> {
        let mut out = String::new();
        loop {
            match self.item()? {
                Item::Text(t) => out.push_str(&t),
                Item::Close(n) if n == elem => return Ok(out),
                other => return Err(unexpected(&format!("text of <{elem}>"), other)),
            }
        }
    }

    fn call(&mut self) -> Result<MethodCall, WireError> {
        self.expect_open("methodCall")?;
        self.expect_open("methodName")?;
        let method = self.text_until_close("methodName")?.trim().to_owned();
        if method.is_empty() {
            return Err(WireError::Shape("empty methodName".into()));
        }
        let mut params = Vec::new();
        match self.tag()? {
            Item::Close(n) if n == "methodCall" => {}
            Item::Open(n) if n == "params" => {
                loop {
                    match self.tag()? {
                        Item::Close(n) if n == "params" => break,
                        Item::Open(n) if n == "param" => {
                            self.expect_open("value")?;
                            params.push(self.value(0)?);
                            self.expect_close("param")?;
                        }
                        other => return Err(unexpected("param", other)),
                    }
                }
                self.expect_close("methodCall")?;
            }
            other => return Err(unexpected("params", other)),
        }
        match self.tag()? {
            Item::Eof => Ok(MethodCall { method, params }),
            other => Err(unexpected("end of document", other)),
        }
    }

    fn response(&mut self) -> Result<MethodResponse, WireError> {
        self.expect_open("methodResponse")?;
        let out = match self.tag()? {
            Item::Open(n) if n == "params" => {
                self.expect_open("param")?;
                self.expect_open("value")?;
                let v = self.value(0)?;
                self.expect_close("param")?;
                self.expect_close("params")?;
                MethodResponse::Value(v)
            }
            Item::Open(n) if n == "fault" => {
                self.expect_open("value")?;
                let v = self.value(0)?;
                self.expect_close("fault")?;
                let Value::Struct(members) = v else {
                    return Err(WireError::Shape("a fault must carry a struct".into()));
                };
                let mut code = 0;
                let mut message = String::new();
                for (k, v) in members {
                    match (k.as_str(), v) {
                        ("faultCode", Value::Int(c)) => code = c,
                        ("faultString", Value::Str(m)) => message = m,
                        _ => {}
                    }
                }
                MethodResponse::Fault { code, message }
            }
            other => return Err(unexpected("params or fault", other)),
        };
        self.expect_close("methodResponse")?;
        match self.tag()? {
            Item::Eof => Ok(out),
            other => Err(unexpected("end of document", other)),
        }
    }

    /// Parses the inside of a `<value>` whose opening tag was consumed,
    /// through its closing tag.
    fn value(&mut self, depth: usize) -> Result<Value, WireError> {
        if depth > MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(WireError::TooMany);
        }
        let mut text = String::new();
        let kind = loop {
            match self.item()? {
                Item::Text(t) => text.push_str(&t),
                // A value without a type element is a string.
                Item::Close(n) if n == "value" => return Ok(Value::Str(text)),
                Item::Open(kind) if text.trim().is_empty() => break kind,
                other => return Err(unexpected("value content", other)),
            }
        };
        let v = match kind.as_str() {
            "i4" | "int" | "i8" => {
                let t = self.text_until_close(&kind)?;
                Value::Int(t.trim().parse().map_err(|_| bad("int", &t))?)
            }
            "boolean" => {
                let t = self.text_until_close(&kind)?;
                match t.trim() {
                    "1" => Value::Bool(true),
                    "0" => Value::Bool(false),
                    _ => return Err(bad("boolean", &t)),
                }
            }
            "string" => Value::Str(self.text_until_close(&kind)?),
            "double" => {
                let t = self.text_until_close(&kind)?;
                Value::Double(t.trim().parse().map_err(|_| bad("double", &t))?)
            }
            "dateTime.iso8601" => Value::DateTime(self.text_until_close(&kind)?.trim().to_owned()),
            "base64" => {
                let t = self.text_until_close(&kind)?;
                let compact: String = t.split_whitespace().collect();
                Value::Base64(STANDARD.decode(compact).map_err(|_| bad("base64", &t))?)
            }
            "nil" => {
                self.text_until_close(&kind)?;
                Value::Nil
            }
            "array" => {
                self.expect_open("data")?;
                let mut items = Vec::new();
                loop {
                    match self.tag()? {
                        Item::Close(n) if n == "data" => break,
                        Item::Open(n) if n == "value" => items.push(self.value(depth + 1)?),
                        other => return Err(unexpected("value", other)),
                    }
                }
                self.expect_close("array")?;
                Value::Array(items)
            }
            "struct" => {
                let mut members = Vec::new();
                loop {
                    match self.tag()? {
                        Item::Close(n) if n == "struct" => break,
                        Item::Open(n) if n == "member" => {
                            self.expect_open("name")?;
                            let name = self.text_until_close("name")?;
                            self.expect_open("value")?;
                            let v = self.value(depth + 1)?;
                            self.expect_close("member")?;
                            members.push((name, v));
                        }
                        other => return Err(unexpected("member", other)),
                    }
                }
                Value::Struct(members)
            }
            other => return Err(WireError::Shape(format!("unknown value type <{other}>"))),
        };
        self.expect_close("value")?;
        Ok(v)
    }
}

fn name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

fn bad(kind: &'static str, _text: &str) -> WireError {
    WireError::BadScalar(kind)
}

fn unexpected(want: &str, got: Item<'_>) -> WireError {
    let got = match got {
        Item::Open(n) => format!("<{n}>"),
        Item::Close(n) => format!("</{n}>"),
        // Never echo content: it may be part of a session string.
        Item::Text(_) => "text".into(),
        Item::Eof => "end of document".into(),
    };
    WireError::Shape(format!("expected {want}, found {got}"))
}

/// Parses a request body as an XML-RPC `methodCall`.
pub fn parse_call(body: &[u8]) -> Result<MethodCall, WireError> {
    Parser::new(body).call()
}

/// A `methodResponse`: the value, or a fault's code and string.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodResponse {
    Value(Value),
    Fault { code: i64, message: String },
}

/// Parses a `methodResponse` (what oned answers), with the same limits as
/// requests.
pub fn parse_response(body: &[u8]) -> Result<MethodResponse, WireError> {
    Parser::new(body).response()
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
}

fn write_value(out: &mut String, v: &Value) {
    out.push_str("<value>");
    match v {
        Value::Int(i) if i32::try_from(*i).is_ok() => {
            out.push_str("<int>");
            out.push_str(&i.to_string());
            out.push_str("</int>");
        }
        Value::Int(i) => {
            out.push_str("<i8>");
            out.push_str(&i.to_string());
            out.push_str("</i8>");
        }
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        Value::Str(s) => {
            out.push_str("<string>");
            escape_into(out, s);
            out.push_str("</string>");
        }
        Value::Double(d) => {
            out.push_str("<double>");
            out.push_str(&d.to_string());
            out.push_str("</double>");
        }
        Value::DateTime(s) => {
            out.push_str("<dateTime.iso8601>");
            escape_into(out, s);
            out.push_str("</dateTime.iso8601>");
        }
        Value::Base64(b) => {
            out.push_str("<base64>");
            out.push_str(&STANDARD.encode(b));
            out.push_str("</base64>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for i in items {
                write_value(out, i);
            }
            out.push_str("</data></array>");
        }
        Value::Struct(members) => {
            out.push_str("<struct>");
            for (k, v) in members {
                out.push_str("<member><name>");
                escape_into(out, k);
                out.push_str("</name>");
                write_value(out, v);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
        Value::Nil => out.push_str("<nil/>"),
    }
    out.push_str("</value>");
}

/// Writes a successful `methodResponse` carrying `v`.
pub fn response(v: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\r\n<methodResponse><params><param>");
    write_value(&mut out, v);
    out.push_str("</param></params></methodResponse>\r\n");
    out
}

/// Writes a fault `methodResponse`.
pub fn fault(code: i64, message: &str) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\r\n<methodResponse><fault>");
    write_value(
        &mut out,
        &Value::Struct(vec![
            ("faultCode".into(), Value::Int(code)),
            ("faultString".into(), Value::Str(message.into())),
        ]),
    );
    out.push_str("</fault></methodResponse>\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(params: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?><methodCall><methodName>one.vm.novnctoken</methodName><params>{params}</params></methodCall>"
        )
    }

    #[test]
    fn parses_what_python_sends() {
        let body = call(
            "<param><value><string>alice:pw</string></value></param>\n\
             <param><value><int>7</int></value></param>\
             <param><value><i4>60</i4></value></param>\
             <param><value><boolean>1</boolean></value></param>",
        );
        let c = parse_call(body.as_bytes()).unwrap();
        assert_eq!(c.method, "one.vm.novnctoken");
        assert_eq!(
            c.params,
            vec![
                Value::Str("alice:pw".into()),
                Value::Int(7),
                Value::Int(60),
                Value::Bool(true)
            ]
        );
    }

    #[test]
    fn untyped_values_empty_strings_entities_and_cdata() {
        let body = call(
            "<param><value>a &amp; b</value></param>\
             <param><value><string/></value></param>\
             <param><value></value></param>\
             <param><value><string><![CDATA[<x>]]></string></value></param>\
             <param><value><string>&#65;</string></value></param>",
        );
        let c = parse_call(body.as_bytes()).unwrap();
        assert_eq!(
            c.params,
            vec![
                Value::Str("a & b".into()),
                Value::Str("".into()),
                Value::Str("".into()),
                Value::Str("<x>".into()),
                Value::Str("A".into())
            ]
        );
    }

    #[test]
    fn no_params_element_is_fine() {
        let c = parse_call(b"<methodCall><methodName>system.listMethods</methodName></methodCall>")
            .unwrap();
        assert!(c.params.is_empty());
    }

    #[test]
    fn nested_arrays_and_structs() {
        let body = call(
            "<param><value><array><data><value><i8>5000000000</i8></value>\
             <value><struct><member><name>k</name><value><double>1.5</double></value></member></struct></value>\
             </data></array></value></param>",
        );
        let c = parse_call(body.as_bytes()).unwrap();
        assert_eq!(
            c.params,
            vec![Value::Array(vec![
                Value::Int(5_000_000_000),
                Value::Struct(vec![("k".into(), Value::Double(1.5))])
            ])]
        );
    }

    #[test]
    fn doctype_and_entities_are_refused() {
        let laughs = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]>\
                      <methodCall><methodName>&lol2;</methodName></methodCall>";
        assert_eq!(parse_call(laughs.as_bytes()), Err(WireError::Doctype));
        let undeclared = call("<param><value>&lol;</value></param>");
        assert!(matches!(
            parse_call(undeclared.as_bytes()),
            Err(WireError::Xml(_))
        ));
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let depth = 10_000;
        let mut body = String::from("<methodCall><methodName>m</methodName><params><param><value>");
        for _ in 0..depth {
            body.push_str("<array><data><value>");
        }
        assert_eq!(parse_call(body.as_bytes()), Err(WireError::TooDeep));
    }

    #[test]
    fn too_many_values_are_bounded() {
        let mut body = String::from(
            "<methodCall><methodName>m</methodName><params><param><value><array><data>",
        );
        for _ in 0..=MAX_VALUES {
            body.push_str("<value><int>1</int></value>");
        }
        body.push_str("</data></array></value></param></params></methodCall>");
        assert_eq!(parse_call(body.as_bytes()), Err(WireError::TooMany));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        for bad in [
            &b""[..],
            b"not xml",
            b"<methodCall>",
            b"<methodCall><methodName>m</methodName><params><param><value><int>x</int></value></param></params></methodCall>",
            b"<methodCall><methodName>m</methodName><params><param><value><int>99999999999999999999</int></value></param></params></methodCall>",
            b"<methodCall><methodName>m</methodName><params><param><value><boolean>2</boolean></value></param></params></methodCall>",
            b"<methodCall><methodName>m</methodName><params><param><value><foo>1</foo></value></param></params></methodCall>",
            b"<methodCall><methodName>m</methodName></methodCall><extra/>",
            b"<methodCall><methodName></methodName></methodCall>",
            b"<methodCall><methodName>m</methodName><params><param><value><int>1</i4></value></param></params></methodCall>",
            b"<methodCall><methodName>\xff\xfe</methodName></methodCall>",
        ] {
            assert!(parse_call(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let seed = call(
            "<param><value><array><data><value><struct><member><name>a</name><value><i4>1</i4></value></member></struct></value></data></array></value></param>",
        );
        let bytes = seed.as_bytes();
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = bytes.to_vec();
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
            b.truncate((x >> 40) as usize % (b.len() + 1));
            let _ = parse_call(&b);
        }
    }

    #[test]
    fn responses_parse_back() {
        let v = Value::Array(vec![
            Value::Bool(true),
            Value::Str("<VM/>".into()),
            Value::Int(0),
        ]);
        assert_eq!(
            parse_response(response(&v).as_bytes()),
            Ok(MethodResponse::Value(v))
        );
        assert_eq!(
            parse_response(fault(-1, "boom").as_bytes()),
            Ok(MethodResponse::Fault {
                code: -1,
                message: "boom".into()
            })
        );
        assert!(parse_response(b"<methodResponse></methodResponse>").is_err());
        assert!(parse_response(b"<!DOCTYPE x><methodResponse/>").is_err());
    }

    #[test]
    fn responses_round_trip_through_the_parser_shapes() {
        let r = response(&Value::Array(vec![
            Value::Bool(true),
            Value::Struct(vec![("token".into(), Value::Str("a<&>b".into()))]),
            Value::Int(0),
            Value::Int(1 << 40),
        ]));
        assert!(r.contains("<string>a&lt;&amp;&gt;b</string>"));
        assert!(r.contains("<i8>1099511627776</i8>"));
        let f = fault(-32601, "no such method");
        assert!(f.contains("<name>faultCode</name><value><int>-32601</int></value>"));
    }
}
