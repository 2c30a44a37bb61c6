"""Hostile / malformed requests with http.client and raw sockets. After every
bad request the server must still be running and answer a good request."""

from __future__ import annotations

import http.client
import select
import socket
import time
import xmlrpc.client

import base64

import pytest

from conftest import (
    E_API,
    MAX_BODY_BYTES,
    PASSWORDS,
    check_token_result,
    record_token,
    session,
)

SESSION = session("alice")
BASIC_ALICE = "Basic " + base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()


def post(broker, body: bytes, path: str = "/RPC2", headers: dict | None = None, method: str = "POST",
         timeout: float = 10.0):
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "text/xml"}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def assert_rpc_rejected(status: int, body: bytes, allow_codes=(E_API,)):
    """An XML-RPC fault, or an oned error array [False, "[...] ...", code] (code 0x1000 by default)."""
    assert status == 200, f"HTTP {status} instead of an XML-RPC fault/error: {body[:300]!r}"
    try:
        params, _ = xmlrpc.client.loads(body)
    except xmlrpc.client.Fault as f:
        assert isinstance(f.faultCode, int) and isinstance(f.faultString, str)
        return
    except Exception as e:  # not even a valid XML-RPC response
        pytest.fail(f"response is not XML-RPC: {e}: {body[:300]!r}")
    assert len(params) == 1, params
    res = params[0]
    assert isinstance(res, list) and len(res) >= 3 and res[0] is False, res
    assert res[2] in allow_codes, f"code {res[2]:#x} not in {[hex(c) for c in allow_codes]}: {res[1]!r}"


def call_xml(method: str, params_xml: str) -> bytes:
    return (f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName>"
            f"<params>{params_xml}</params></methodCall>").encode()


def p(value_xml: str) -> str:
    return f"<param><value>{value_xml}</value></param>"


# --- malformed XML -----------------------------------------------------------

MALFORMED = {
    "empty": b"",
    "not-xml": b"this is not xml at all",
    "json": b'{"method": "one.vm.novnctoken"}',
    "truncated": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>7</int>"))[:-30],
    "mismatched-tags": b"<?xml version='1.0'?><methodCall><methodName>one.vm.novnctoken</methodName>"
                       b"<params><param><value><string>x</int></value></param></params></methodCall>",
    "no-methodName": b"<?xml version='1.0'?><methodCall><params>" + p("<int>7</int>").encode() + b"</params></methodCall>",
    "wrong-root": b"<?xml version='1.0'?><methodResponse><params></params></methodResponse>",
    "int-not-a-number": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>abc</int>")),
    "int-overflow": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>99999999999999999999999</int>")),
    "bad-boolean": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>7</int>")
                            + p("<int>60</int>") + p("<boolean>maybe</boolean>")),
    "unknown-type": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<bignum>7</bignum>")),
    "nul-byte": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}\x00</string>") + p("<int>7</int>")),
    "bad-base64": call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<base64>!!!</base64>")),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_xml(broker, name):
    status, _, body = post(broker, MALFORMED[name])
    # nul-byte: an error of any code is fine, it may be treated as a bad session.
    codes = (E_API, 0x0100) if name == "nul-byte" else (E_API,)
    assert_rpc_rejected(status, body, codes)
    broker.assert_healthy()


# --- entity expansion / XXE ---------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<methodCall><methodName>one.vm.novnctoken</methodName><params>
<param><value><string>&lol9;</string></value></param>
<param><value><int>7</int></value></param>
</params></methodCall>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE m [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>one.vm.novnctoken</methodName><params>
<param><value><string>&xxe;</string></value></param>
<param><value><int>7</int></value></param>
</params></methodCall>"""

# A DOCTYPE alone (no entities) with an otherwise valid call: still refused.
DOCTYPE_ONLY = (b'<?xml version="1.0"?>\n<!DOCTYPE methodCall>\n'
                + call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>7</int>"))
                .split(b"?>", 1)[1])

# An internal entity that would expand to a valid session: must not be expanded.
ENTITY_SESSION = (f'<?xml version="1.0"?>\n<!DOCTYPE m [<!ENTITY s "{SESSION}">]>\n'
                  "<methodCall><methodName>one.vm.novnctoken</methodName><params>"
                  "<param><value><string>&s;</string></value></param>"
                  "<param><value><int>7</int></value></param></params></methodCall>").encode()


@pytest.mark.parametrize("name,body", [
    pytest.param("billion-laughs", BILLION_LAUGHS, id="billion-laughs"),
    pytest.param("xxe", XXE, id="xxe"),
    pytest.param("doctype-only", DOCTYPE_ONLY, id="doctype-only"),
    pytest.param("entity-session", ENTITY_SESSION, id="entity-session"),
])
def test_doctype_and_entities_refused_quickly(broker, name, body):
    t0 = time.monotonic()
    status, _, resp = post(broker, body, timeout=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"{name}: answer took {elapsed:.2f}s"
    assert b"root:" not in resp, "XXE: /etc/passwd content leaked into the response"
    assert_rpc_rejected(status, resp)
    broker.assert_healthy()


# --- deep nesting ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["array", "struct"])
def test_deeply_nested_value(broker, kind):
    depth = 10000
    if kind == "array":
        opening = "<value><array><data>" * depth
        closing = "</data></array></value>" * depth
    else:
        opening = "<value><struct><member><name>a</name>" * depth
        closing = "</member></struct></value>" * depth
    body = (f"<?xml version='1.0'?><methodCall><methodName>one.vm.novnctoken</methodName><params>"
            f"<param><value><string>{SESSION}</string></value></param>"
            f"<param>{opening}<value><int>7</int></value>{closing}</param>"
            f"</params></methodCall>").encode()
    status, _, resp = post(broker, body)
    assert_rpc_rejected(status, resp)
    broker.assert_healthy()


def test_many_params(broker):
    body = call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>7</int>") * 20000)
    assert len(body) < MAX_BODY_BYTES
    status, _, resp = post(broker, body)
    assert_rpc_rejected(status, resp)
    broker.assert_healthy()


# --- body size -----------------------------------------------------------------

def _raw_request_expect_status(broker, head: bytes, body_chunks, timeout: float = 10.0) -> bytes:
    """Send head, then body chunks while watching for an early answer; return the response bytes."""
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=timeout)
    resp = b""
    try:
        s.sendall(head)
        for chunk in body_chunks:
            r, _, _ = select.select([s], [], [], 0)
            if r:
                break  # server answered early (e.g. 413 from Content-Length)
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                break
            if not data:
                break
            resp += data
            if b"\r\n\r\n" in resp:
                head_part, _, rest = resp.partition(b"\r\n\r\n")
                lower = head_part.lower()
                if b"content-length:" in lower:
                    cl = int(lower.split(b"content-length:")[1].split(b"\r\n")[0].strip())
                    if len(rest) >= cl:
                        break
    finally:
        s.close()
    return resp


def _status_of(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1."), f"no HTTP response (connection dropped?): {resp[:200]!r}"
    return int(resp.split(b" ", 2)[1])


def _chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"x" * n
        sent += n


@pytest.mark.parametrize("path", ["/RPC2", "/api/v1/vms/7/console-tokens"])
def test_body_over_limit_with_content_length_413(broker, path):
    size = 2 * 1024 * 1024
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            f"Authorization: {BASIC_ALICE}\r\nContent-Length: {size}\r\n\r\n").encode()
    resp = _raw_request_expect_status(broker, head, _chunks(size))
    assert _status_of(resp) == 413, resp[:300]
    broker.assert_healthy()


@pytest.mark.parametrize("path", ["/RPC2", "/api/v1/vms/7/console-tokens"])
def test_chunked_body_over_limit_413(broker, path):
    size = 2 * 1024 * 1024
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            f"Authorization: {BASIC_ALICE}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()

    def chunked():
        for c in _chunks(size):
            yield f"{len(c):x}\r\n".encode() + c + b"\r\n"
        yield b"0\r\n\r\n"

    resp = _raw_request_expect_status(broker, head, chunked())
    assert _status_of(resp) == 413, resp[:300]
    broker.assert_healthy()


def test_body_just_under_limit_is_processed(broker):
    # A valid call padded with whitespace to just under max_body_bytes is not a 413.
    call = call_xml("one.vm.novnctoken", p(f"<string>{SESSION}</string>") + p("<int>7</int>"))
    body = call + b" " * (MAX_BODY_BYTES - len(call) - 16)
    status, _, resp = post(broker, body)
    assert status == 200
    (res,), _ = xmlrpc.client.loads(resp)
    assert res[0] is True, res
    check_token_result(record_token(res[1]), vm_id=7)


# --- broken connections ----------------------------------------------------------

def test_truncated_body_then_close(broker):
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    s.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
              b"Content-Length: 5000\r\n\r\n<?xml version='1.0'?><methodCall><methodName>one.vm")
    s.close()
    time.sleep(0.2)
    broker.assert_healthy()


def test_slow_client_does_not_block_others(broker):
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    try:
        s.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n<?xml")
        t0 = time.monotonic()
        broker.assert_healthy()
        assert time.monotonic() - t0 < 5
    finally:
        s.close()


def test_garbage_request_line(broker):
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    try:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-not-http\r\n\r\n")
        try:
            s.recv(4096)
        except (socket.timeout, ConnectionResetError):
            pass
    finally:
        s.close()
    broker.assert_healthy()


# --- methods / encodings -----------------------------------------------------------

def test_get_rpc2_is_4xx(broker):
    status, _, _ = post(broker, b"", method="GET")
    assert 400 <= status < 500, status
    broker.assert_healthy()


@pytest.mark.parametrize("where", ["session", "methodName", "declared-latin1"])
def test_non_utf8_bytes(broker, where):
    if where == "session":
        body = (b"<?xml version='1.0' encoding='UTF-8'?><methodCall><methodName>one.vm.novnctoken</methodName>"
                b"<params><param><value><string>alice:\xff\xfe\xc3\x28</string></value></param>"
                b"<param><value><int>7</int></value></param></params></methodCall>")
        codes = (E_API, 0x0100)
    elif where == "methodName":
        body = (b"<?xml version='1.0'?><methodCall><methodName>one.vm.novnc\xfftoken</methodName>"
                b"<params><param><value><string>" + SESSION.encode() + b"</string></value></param>"
                b"<param><value><int>7</int></value></param></params></methodCall>")
        codes = (E_API,)
    else:
        body = (b"<?xml version='1.0' encoding='ISO-8859-1'?><methodCall><methodName>one.vm.novnctoken"
                b"</methodName><params><param><value><string>alice:\xe9\xe8</string></value></param>"
                b"<param><value><int>7</int></value></param></params></methodCall>")
        codes = (E_API, 0x0100)
    status, _, resp = post(broker, body)
    assert_rpc_rejected(status, resp, codes)
    broker.assert_healthy()


@pytest.mark.parametrize("tag", ["i4", "int", "i8"])
def test_integer_tags_accepted(broker, tag):
    body = call_xml("one.vm.novnctoken",
                    p(f"<string>{SESSION}</string>") + p(f"<{tag}>7</{tag}>") + p(f"<{tag}>120</{tag}>")
                    + p("<boolean>1</boolean>"))
    status, _, resp = post(broker, body)
    assert status == 200, resp[:300]
    (res,), _ = xmlrpc.client.loads(resp)
    assert res[0] is True, res
    check_token_result(record_token(res[1]), vm_id=7, ttl=120, single_use=True)


def test_untyped_value_is_a_string(broker):
    # XML-RPC spec: <value> without a type element is a string.
    body = call_xml("one.vm.novnctoken", p(SESSION) + p("<int>7</int>"))
    status, _, resp = post(broker, body)
    assert status == 200, resp[:300]
    (res,), _ = xmlrpc.client.loads(resp)
    assert res[0] is True, res
    check_token_result(record_token(res[1]), vm_id=7)


def test_escaped_characters_in_session(broker):
    # A password with XML-special characters is unescaped before checking: wrong
    # password for alice -> authentication error, not a parse error.
    body = call_xml("one.vm.novnctoken", p("<string>alice:&lt;&amp;&gt;&quot;&apos;</string>") + p("<int>7</int>"))
    status, _, resp = post(broker, body)
    assert_rpc_rejected(status, resp, (0x0100,))


def test_whitespace_and_comments_tolerated(broker):
    body = (b"<?xml version='1.0'?>\n<!-- a comment -->\n<methodCall>\n  <methodName>one.vm.novnctoken</methodName>\n"
            b"  <params>\n    <param>\n      <value><string>" + SESSION.encode() + b"</string></value>\n    </param>\n"
            b"    <param><value><int>7</int></value></param>\n  </params>\n</methodCall>\n")
    status, _, resp = post(broker, body)
    assert status == 200, resp[:300]
    (res,), _ = xmlrpc.client.loads(resp)
    assert res[0] is True, res
    record_token(res[1])
