"""Stock websockify (from PyPI) redeeming vncbroker tokens through the
broker's websockify JSONTokenApi-compatible endpoint:

    GET /api/v1/websockify/<token>?secret=S -> 200 {"host": ..., "port": ...}

The lookup redeems the token: expiry, revocation and single use apply, so
websockify refuses a token the broker's own proxy would refuse. 403 without
the secret (unless the client address is allowed), 404 for invalid tokens
and when [websockify_api] is not enabled.

Real parts: the broker binary, websockify run as a subprocess with
--token-plugin JSONTokenApi, TigerVNC's Xvnc (-SecurityTypes None, so the RFB
handshake passes through websockify unchanged), and a raw WebSocket client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import PASSWORDS
from vnc_helpers import WsClient, Xvnc, free_port, stop_process, wait_listening

SECRET = "0123456789abcdef-secret"
T = 10
ALICE = ("alice", PASSWORDS["alice"])
VMS = (20, 21, 22, 23, 24, 25)


def websockify_bin() -> Path:
    """websockify from the venv running the tests (/tmp/pv in development,
    /work/main/.venv in CI)."""
    p = Path(sys.executable).parent / "websockify"
    assert p.is_file() and os.access(p, os.X_OK), f"websockify not found next to {sys.executable}"
    return p


def websockify_api_section(enabled: bool = True, secret: str | None = SECRET, allow: list[str] = ()) -> str:
    lines = ["", "[websockify_api]", f"enabled = {'true' if enabled else 'false'}"]
    if secret is not None:
        lines.append(f'secret = "{secret}"')
    lines.append("allow = [" + ", ".join(f'"{a}"' for a in allow) + "]")
    return "\n".join(lines) + "\n"


def start_local_broker(broker_factory, vnc_port: int, section: str):
    """Local inventory: alice owns VMs 20-25, all at 127.0.0.1:vnc_port."""
    env = broker_factory.env()
    env.config.write_text(env.config.read_text() + section)
    env.add_user("alice", PASSWORDS["alice"])
    for vm in VMS:
        env.cli("vm", "add", str(vm), "--host", "127.0.0.1", "--port", str(vnc_port), "--owner", "alice")
    return broker_factory.start(env)


def mint(b, vm_id: int, **body) -> str:
    r = requests.post(f"{b.api_url}/vms/{vm_id}/console-tokens", auth=ALICE, json=body or None, timeout=T)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def lookup(b, token: str, secret: str | None = SECRET) -> requests.Response:
    params = {} if secret is None else {"secret": secret}
    return requests.get(f"{b.api_url}/websockify/{token}", params=params, timeout=T)


@pytest.fixture(scope="module")
def xvnc(tmp_path_factory):
    x = Xvnc(tmp_path_factory.mktemp("xvnc-none"), password=None)
    try:
        yield x
    finally:
        x.stop()


@pytest.fixture
def broker(broker_factory, xvnc):
    return start_local_broker(broker_factory, xvnc.port, websockify_api_section())


@pytest.fixture
def websockify(broker, tmp_path):
    port = free_port()
    log = open(tmp_path / "websockify.log", "ab")
    source = f"http://127.0.0.1:{broker.port}/api/v1/websockify/%s?secret={SECRET}"
    proc = subprocess.Popen(
        [str(websockify_bin()), "--token-plugin", "JSONTokenApi", "--token-source", source, f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    try:
        wait_listening(port, timeout=15, proc=proc)
        yield port
    finally:
        # websockify forks a child per connection; they share its session.
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
        stop_process(proc)


def rfb_through(ws_port: int, token: str) -> WsClient:
    """Connects through websockify and reads Xvnc's greeting, then goes on to
    ServerInit (security type None passes through unchanged)."""
    ws = WsClient(ws_port, f"/?token={token}")
    assert ws.status == 101, ws.head
    assert ws.recv_exact(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    n = ws.recv_exact(1)[0]
    assert 1 in ws.recv_exact(n)
    ws.send(b"\x01")
    assert ws.recv_exact(4) == b"\x00\x00\x00\x00"
    ws.send(b"\x01")
    assert ws.recv_exact(4) == b"\x02\x80\x01\xe0"  # 640x480
    return ws


def assert_refused(ws_port: int, token: str) -> None:
    """websockify refuses: no upgrade (or a close), and not one RFB byte."""
    ws = WsClient(ws_port, f"/?token={token}")
    try:
        if ws.status == 101:
            ws.wait_close(timeout=10, stop_on_data=True)
        assert ws.data == b"", f"RFB bytes passed for a refused token: {ws.data!r}"
        assert ws.status not in (None, 101) or ws.eof or ws.close_code is not None, "the connection must be closed"
    finally:
        ws.sock.close()


# ---------------------------------------------------------------------------
# Through websockify

def test_websockify_relays_to_xvnc(broker, websockify, xvnc):
    tok = mint(broker, 20)
    ws = rfb_through(websockify, tok)
    ws.close()
    # A token that is not single-use redeems again.
    rfb_through(websockify, tok).close()
    # Junk is refused.
    assert_refused(websockify, "A" * 43)


def test_expired_token_refused(broker, websockify):
    tok = mint(broker, 21, ttl=1)
    time.sleep(2.1)
    assert_refused(websockify, tok)
    assert lookup(broker, tok).status_code == 404


def test_revoked_token_refused(broker, websockify):
    tok = mint(broker, 22)
    r = requests.delete(f"{broker.api_url}/vms/22/console-tokens", auth=ALICE, timeout=T)
    assert r.status_code == 200, r.text
    assert_refused(websockify, tok)
    assert lookup(broker, tok).status_code == 404


def test_single_use_token_works_once(broker, websockify):
    tok = mint(broker, 23, single_use=True)
    rfb_through(websockify, tok).close()
    assert_refused(websockify, tok)
    assert lookup(broker, tok).status_code == 404


# ---------------------------------------------------------------------------
# The endpoint itself

def test_lookup_answers_target_and_guards_secret(broker, xvnc):
    tok = mint(broker, 24, single_use=True)
    # Refused requests do not redeem the token.
    for secret in (None, "", "wrong-secret-0123456789", SECRET[:-1], SECRET + "x"):
        r = lookup(broker, tok, secret)
        assert r.status_code == 403, (secret, r.status_code, r.text)
        assert "127.0.0.1" not in r.text and str(xvnc.port) not in r.text
    r = lookup(broker, tok)
    assert r.status_code == 200, r.text
    assert r.json() == {"host": "127.0.0.1", "port": xvnc.port}
    assert lookup(broker, tok).status_code == 404, "a single-use token must redeem once"
    for junk in ("A" * 43, "nonsense"):
        assert lookup(broker, junk).status_code == 404
    assert SECRET not in broker.log_text()


def test_lookup_absent_when_disabled(broker_factory, xvnc):
    b = start_local_broker(broker_factory, xvnc.port, "")  # the default: enabled = false
    tok = mint(b, 25, single_use=True)
    assert lookup(b, tok).status_code == 404
    assert lookup(b, tok, None).status_code == 404
    b2 = start_local_broker(broker_factory, xvnc.port, websockify_api_section(enabled=False))
    tok2 = mint(b2, 25)
    assert lookup(b2, tok2).status_code == 404


def test_lookup_from_allowed_address_without_secret(broker_factory, xvnc):
    b = start_local_broker(broker_factory, xvnc.port, websockify_api_section(allow=["127.0.0.1"]))
    tok = mint(b, 25)
    r = lookup(b, tok, None)
    assert r.status_code == 200, r.text
    assert r.json() == {"host": "127.0.0.1", "port": xvnc.port}
    # An allow list alone, without a secret, is a valid configuration too.
    b2 = start_local_broker(broker_factory, xvnc.port, websockify_api_section(secret=None, allow=["127.0.0.1"]))
    r = lookup(b2, mint(b2, 25), None)
    assert r.status_code == 200 and r.json() == {"host": "127.0.0.1", "port": xvnc.port}, r.text
