"""Session records through the proxy, listed by GET /api/v1/sessions and
`vncbroker sessions`: admins see every session, a user only their own.
Each row says whether the session was view-only, what input it carried (for
sessions whose messages the proxy followed) and whether it was recorded;
GET /api/v1/sessions/{id}/recording and the replay tokens answer for
sessions without a recording."""

import base64
import json
import socket
import struct
import threading
import time

import pytest
import requests

from conftest import PASSWORDS, basic, populate
from vnc_helpers import WsClient, Xvnc

T = 10
VNC_PW = "Sq4mVx8e"
# The fields every session row has, and their types (None: JSON null).
SESSION_FIELDS = {
    "id": int, "vm_id": int, "user": str, "client_addr": str, "node": str, "started_at": int,
    "ended_at": (int, type(None)), "bytes_to_client": int, "bytes_to_server": int,
    "close_reason": (str, type(None)), "view_only": bool,
    "key_events": (int, type(None)), "pointer_events": (int, type(None)),
    "clipboard_bytes_to_vm": (int, type(None)), "clipboard_bytes_from_vm": (int, type(None)),
    "recording": bool, "recording_state": (str, type(None)),
    "resumed_from": (int, type(None)),
    "protocol": str, "channels": int,
}
COUNTS = ("key_events", "pointer_events", "clipboard_bytes_to_vm", "clipboard_bytes_from_vm")


def check_session_row(row: dict) -> None:
    assert set(row) == set(SESSION_FIELDS), f"fields differ: {sorted(row)}"
    for k, types in SESSION_FIELDS.items():
        assert isinstance(row[k], types), f"{k} = {row[k]!r} is not {types}"
        # bool is an int in Python: the int fields must not be booleans.
        if types is int or (isinstance(types, tuple) and int in types):
            assert not isinstance(row[k], bool), f"{k} = {row[k]!r} is a boolean"
    assert row["recording_state"] in (None, "recording", "complete", "incomplete"), row
    if not row["recording"]:
        assert row["recording_state"] is None, row
    assert row["protocol"] in ("vnc", "spice"), row
    # A VNC console is one connection; a SPICE one its main channel and more.
    assert row["channels"] >= 1 and (row["protocol"] == "spice" or row["channels"] == 1), row


def list_sessions(b, user: str = "root", **query) -> list[dict]:
    r = requests.get(f"{b.api_url}/sessions", auth=basic(user), params=query, timeout=T)
    assert r.status_code == 200, r.text
    rows = r.json()["sessions"]
    for row in rows:
        check_session_row(row)
    return rows


def wait_ended(b, vm_id: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = list_sessions(b, vm_id=vm_id)
        if rows and rows[0]["ended_at"] is not None:
            return rows[0]
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def json_error(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, f"status {r.status_code} != {status}: {r.text[:500]}"
    err = r.json()["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    return err

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def greeting_server():
    """A stand-in VNC server: greets with a version line, then echoes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            def handle(c=c):
                with c:
                    c.sendall(b"RFB 003.008\n")
                    while data := c.recv(4096):
                        c.sendall(data)
            threading.Thread(target=handle, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def open_session(port, token):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"GET /websockify?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    rest = head.split(b"\r\n\r\n", 1)[1]
    while len(rest) < 14:
        rest += s.recv(4096)
    assert rest[:2] == b"\x82\x0c" and rest[2:14] == b"RFB 003.008\n"
    # One masked 4-byte message, echoed back.
    s.sendall(bytes([0x82, 0x84, 1, 2, 3, 4]) + bytes(b ^ m for b, m in zip(b"ping", [1, 2, 3, 4])))
    echo = b""
    while len(echo) < 6:
        echo += s.recv(4096)
    assert echo == b"\x82\x04ping"
    return s


def test_sessions_are_recorded_and_listed_by_role(broker_factory):
    srv = greeting_server()
    env = broker_factory.env()
    populate(env)
    env.add_vm(20, "alice", srv.getsockname()[1], name="greeter")
    b = broker_factory.start(env)
    api = b.api_url

    tok = requests.post(f"{api}/vms/20/console-tokens", auth=basic("alice"), timeout=10).json()["token"]
    s = open_session(b.port, tok)
    live = requests.get(f"{api}/sessions", auth=basic("alice"), timeout=10).json()["sessions"]
    assert len(live) == 1 and live[0]["ended_at"] is None and live[0]["vm_id"] == 20
    check_session_row(live[0])
    # A plain relay (no policy to enforce): the proxy did not follow its
    # messages, so it has no input counts; not view-only, not recorded.
    assert live[0]["view_only"] is False and live[0]["recording"] is False
    assert live[0]["recording_state"] is None
    assert all(live[0][k] is None for k in COUNTS), live[0]
    assert [r["id"] for r in list_sessions(b, "alice", live="true")] == [live[0]["id"]]
    s.close()

    deadline = time.monotonic() + 5
    while True:
        rows = requests.get(f"{api}/sessions?vm_id=20", auth=basic("root"), timeout=10).json()["sessions"]
        if rows and rows[0]["ended_at"] is not None:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    row = rows[0]
    check_session_row(row)
    assert row["view_only"] is False and row["recording"] is False and row["recording_state"] is None
    assert all(row[k] is None for k in COUNTS), row
    # live=true lists live sessions only; live=false is the same as no filter.
    assert list_sessions(b, live="true") == []
    assert list_sessions(b, "alice", live="true") == []
    assert [r["id"] for r in list_sessions(b, live="false")] == [row["id"]]
    for bad in ("maybe", "2", ""):
        r = requests.get(f"{api}/sessions", params={"live": bad}, auth=basic("root"), timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (bad, r.text)
    assert row["user"] == "alice"
    assert row["client_addr"].startswith("127.0.0.1:")
    assert row["node"]
    assert row["bytes_to_client"] == 12 + 4
    assert row["bytes_to_server"] == 4
    # The raw socket closed without a WebSocket close frame.
    assert row["close_reason"] == "client connection lost"
    assert (row["protocol"], row["channels"]) == ("vnc", 1), row

    assert requests.get(f"{api}/sessions", auth=basic("bob"), timeout=10).json()["sessions"] == []
    # A user cannot widen the filter to someone else's sessions.
    assert requests.get(f"{api}/sessions?user=alice", auth=basic("bob"), timeout=10).json()["sessions"] == []
    assert len(requests.get(f"{api}/sessions?user=alice", auth=basic("root"), timeout=10).json()["sessions"]) == 1
    assert requests.get(f"{api}/sessions?since=99999999999", auth=basic("root"), timeout=10).json()["sessions"] == []
    assert requests.get(f"{api}/sessions", timeout=10).status_code == 401
    bad = requests.get(f"{api}/sessions?vm_id=seven", auth=basic("root"), timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"

    cli = json.loads(env.cli("sessions", "--vm", "20", "--json").stdout)
    assert [r["id"] for r in cli] == [row["id"]]
    table = env.cli("sessions", "--since", "1h").stdout
    assert "greeter" not in table and "client connection lost" in table
    # PROTOCOL and CHANNELS come last before the free-text REASON.
    head, line = table.splitlines()[:2]
    assert head.split()[-3:] == ["PROTOCOL", "CHANNELS", "REASON"], head
    assert line.split("  client connection lost")[0].split()[-2:] == ["vnc", "1"], line
    srv.close()


# ---------------------------------------------------------------------------
# Recordings of sessions that were not recorded

def greeter_broker(broker_factory, extra_config: str = ""):
    srv = greeting_server()
    env = broker_factory.env()
    if extra_config:
        env.config.write_text(env.config.read_text() + "\n" + extra_config + "\n")
    populate(env)
    env.add_vm(20, "alice", srv.getsockname()[1], name="greeter")
    b = broker_factory.start(env)
    tok = requests.post(f"{b.api_url}/vms/20/console-tokens", auth=basic("alice"), timeout=T).json()["token"]
    open_session(b.port, tok).close()
    return srv, b, wait_ended(b, 20)


def test_recording_endpoints_without_a_recording(broker_factory):
    srv, b, row = greeter_broker(broker_factory)
    api, sid = b.api_url, row["id"]
    assert row["recording"] is False
    unknown = sid + 1000

    # The session exists, but was not recorded.
    err = json_error(requests.get(f"{api}/sessions/{sid}/recording", auth=basic("root"), timeout=T),
                     404, "no_recording")
    assert "not recorded" in err["message"], err
    json_error(requests.post(f"{api}/sessions/{sid}/replay-tokens", auth=basic("root"), timeout=T),
               404, "no_recording")
    # No such session; a session the caller may not see is the same to them.
    for user in ("root", "alice"):
        json_error(requests.get(f"{api}/sessions/{unknown}/recording", auth=basic(user), timeout=T),
                   404, "not_found")
        json_error(requests.post(f"{api}/sessions/{unknown}/replay-tokens", auth=basic(user), timeout=T),
                   404, "not_found")
    json_error(requests.get(f"{api}/sessions/{sid}/recording", auth=basic("bob"), timeout=T), 404, "not_found")
    json_error(requests.post(f"{api}/sessions/{sid}/replay-tokens", auth=basic("bob"), timeout=T),
               404, "not_found")
    # Without [recording] owner_can_view, the session's own user may not see its recording.
    json_error(requests.get(f"{api}/sessions/{sid}/recording", auth=basic("alice"), timeout=T),
               403, "forbidden")
    json_error(requests.post(f"{api}/sessions/{sid}/replay-tokens", auth=basic("alice"), timeout=T),
               403, "forbidden")
    # No or wrong credentials; an id that is not one.
    r = requests.get(f"{api}/sessions/{sid}/recording", timeout=T)
    json_error(r, 401, "unauthorized")
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("basic"), r.headers
    json_error(requests.get(f"{api}/sessions/{sid}/recording", auth=basic("root", "wrong"), timeout=T),
               401, "unauthorized")
    json_error(requests.post(f"{api}/sessions/{sid}/replay-tokens", timeout=T), 401, "unauthorized")
    json_error(requests.get(f"{api}/sessions/seven/recording", auth=basic("root"), timeout=T),
               400, "bad_request")

    # replay/data takes a replay token only.
    data = f"{api}/replay/data"
    json_error(requests.get(data, timeout=T), 401, "unauthorized")
    for header in ("Bearer garbage", "Bearer " + "A" * 43, "Bearer v1:AAAA", "Bearer ",
                   "Basic " + base64.b64encode(f"root:{PASSWORDS['root']}".encode()).decode()):
        json_error(requests.get(data, headers={"Authorization": header}, timeout=T), 401, "unauthorized")
    b.assert_alive()
    srv.close()


def test_owner_can_view_unrecorded_is_no_recording(broker_factory):
    srv, b, row = greeter_broker(broker_factory, "[recording]\nowner_can_view = true")
    api, sid = b.api_url, row["id"]
    for user in ("alice", "root"):
        json_error(requests.get(f"{api}/sessions/{sid}/recording", auth=basic(user), timeout=T),
                   404, "no_recording")
        json_error(requests.post(f"{api}/sessions/{sid}/replay-tokens", auth=basic(user), timeout=T),
                   404, "no_recording")
    # Others still see no such session.
    json_error(requests.get(f"{api}/sessions/{sid}/recording", auth=basic("bob"), timeout=T), 404, "not_found")
    srv.close()


# ---------------------------------------------------------------------------
# A session whose messages the proxy follows (view-only), on a real VNC server

@pytest.fixture(scope="module")
def xvnc(tmp_path_factory):
    x = Xvnc(tmp_path_factory.mktemp("xvnc-sessions"), password=VNC_PW)
    try:
        yield x
    finally:
        x.stop()


def rfb_handshake(ws: WsClient) -> None:
    """The browser's side of RFB 3.8 through the proxy's security handshake."""
    assert ws.recv_exact(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    n = ws.recv_exact(1)[0]
    assert list(ws.recv_exact(n)) == [1], "offered only None"
    ws.send(b"\x01")
    assert ws.recv_exact(4) == b"\x00\x00\x00\x00"
    ws.send(b"\x01")
    ws.recv_exact(20)
    ws.recv_exact(int.from_bytes(ws.recv_exact(4), "big"))


def test_view_only_session_row(broker_factory, xvnc):
    env = broker_factory.env()
    populate(env)
    env.add_vm(21, "alice", xvnc.port, name="xvnc", vnc_password=VNC_PW)
    b = broker_factory.start(env)
    r = requests.post(f"{b.api_url}/vms/21/console-tokens", auth=basic("alice"), json={"view_only": True},
                      timeout=T)
    assert r.status_code == 201, r.text
    ws = WsClient(b.port, "/" + r.json()["path"])
    assert ws.status == 101, ws.head
    rfb_handshake(ws)
    # A key press and a pointer event: a viewer's input, which the proxy does not pass on.
    ws.send(struct.pack(">BBxxI", 4, 1, 0x61))
    ws.send(struct.pack(">BBHH", 5, 0, 10, 10))

    deadline = time.monotonic() + 5
    while not (live := list_sessions(b, live="true")):
        assert time.monotonic() < deadline, "no live session listed"
        time.sleep(0.05)
    assert len(live) == 1 and live[0]["vm_id"] == 21 and live[0]["ended_at"] is None, live
    assert live[0]["view_only"] is True and live[0]["recording"] is False, live[0]
    assert list_sessions(b, "bob", live="true") == []
    assert [s["id"] for s in list_sessions(b, "alice", live="true")] == [live[0]["id"]]
    ws.close()

    row = wait_ended(b, 21)
    assert row["id"] == live[0]["id"]
    assert row["view_only"] is True
    assert row["recording"] is False and row["recording_state"] is None
    # The proxy followed the browser's messages: those counts are numbers.
    # (The VNC server's stream needs no parsing when its clipboard may pass,
    # so clipboard_bytes_from_vm may be null.)
    for k in ("key_events", "pointer_events", "clipboard_bytes_to_vm"):
        assert isinstance(row[k], int) and not isinstance(row[k], bool) and row[k] >= 0, (k, row)
    assert row["clipboard_bytes_to_vm"] == 0, row
    assert list_sessions(b, live="true") == []

    # A control session with the clipboard off: the proxy follows both
    # directions, so every count is a number, and the input it passed on is counted.
    env.cli("vm", "set", "21", "--clipboard", "none")
    r = requests.post(f"{b.api_url}/vms/21/console-tokens", auth=basic("alice"), timeout=T)
    assert r.status_code == 201 and r.json()["view_only"] is False, r.text
    ws = WsClient(b.port, "/" + r.json()["path"])
    assert ws.status == 101, ws.head
    rfb_handshake(ws)
    ws.send(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBxxI", 4, 0, 0x61))
    ws.send(struct.pack(">BBHH", 5, 0, 10, 10))
    time.sleep(0.5)
    ws.close()
    deadline = time.monotonic() + 5
    while True:
        rows = list_sessions(b, vm_id=21)
        if len(rows) == 2 and rows[0]["ended_at"] is not None:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    row = rows[0]
    assert row["view_only"] is False and row["recording"] is False, row
    for k in COUNTS:
        assert isinstance(row[k], int) and not isinstance(row[k], bool) and row[k] >= 0, (k, row)
    assert row["key_events"] >= 1 and row["pointer_events"] >= 1, row
    assert row["clipboard_bytes_to_vm"] == 0 and row["clipboard_bytes_from_vm"] == 0, row
