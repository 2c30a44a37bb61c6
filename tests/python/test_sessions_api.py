"""Session records through the proxy, listed by GET /api/v1/sessions and
`vncbroker sessions`: admins see every session, a user only their own."""

import json
import socket
import threading
import time

import requests

from conftest import basic, populate

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
    s.close()

    deadline = time.monotonic() + 5
    while True:
        rows = requests.get(f"{api}/sessions?vm_id=20", auth=basic("root"), timeout=10).json()["sessions"]
        if rows and rows[0]["ended_at"] is not None:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    row = rows[0]
    assert row["user"] == "alice"
    assert row["client_addr"].startswith("127.0.0.1:")
    assert row["node"]
    assert row["bytes_to_client"] == 12 + 4
    assert row["bytes_to_server"] == 4
    assert row["close_reason"] == "client closed"

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
    assert "greeter" not in table and "client closed" in table
    srv.close()
