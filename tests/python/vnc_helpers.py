"""Real-VNC helpers for the proxy tests: TigerVNC's Xvnc as the VNC server,
a raw RFC 6455 client (no WebSocket library: the bytes on the wire are
what is being tested), free ports, and subprocess clean-up."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
from pathlib import Path

XVNC = "/usr/bin/Xvnc"
VNCPASSWD = "/usr/bin/vncpasswd"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def free_port() -> int:
    """A TCP port nothing listens on right now (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before listening on {port}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM the one process we started, SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _free_display() -> int:
    for d in range(40, 100):
        if os.path.exists(f"/tmp/.X11-unix/X{d}") or os.path.exists(f"/tmp/.X{d}-lock"):
            continue
        return d
    raise AssertionError("no free X display number between 40 and 99")


class Xvnc:
    """TigerVNC's Xvnc on 127.0.0.1:port, 640x480.

    password=None starts it with -SecurityTypes None; otherwise VncAuth with
    a password file made by `vncpasswd -f`."""

    def __init__(self, workdir: Path, password: str | None = None, width: int = 640, height: int = 480):
        self.password = password
        self.width, self.height = width, height
        self.port = free_port()
        self.proc = None
        self.log_path = Path(workdir) / f"xvnc-{self.port}.log"
        args = [XVNC]
        last_err = None
        for _ in range(5):
            self.display = _free_display()
            args = [XVNC, f":{self.display}", "-rfbport", str(self.port), "-nolisten", "tcp",
                    "-interface", "127.0.0.1", "-geometry", f"{width}x{height}"]
            if password is None:
                args += ["-SecurityTypes", "None"]
            else:
                pwfile = Path(workdir) / f"xvnc-{self.port}.passwd"
                enc = subprocess.run([VNCPASSWD, "-f"], input=password.encode() + b"\n",
                                     capture_output=True, timeout=10, check=True).stdout
                assert len(enc) == 8, f"vncpasswd -f gave {len(enc)} bytes"
                pwfile.write_bytes(enc)
                args += ["-SecurityTypes", "VncAuth", "-PasswordFile", str(pwfile)]
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            try:
                wait_listening(self.port, timeout=10, proc=self.proc)
                return
            except AssertionError as e:  # lost a race for the display or the port
                last_err = e
                stop_process(self.proc)
                self.port = free_port()
        raise AssertionError(f"Xvnc did not start: {last_err}\n{self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------------
# A raw WebSocket client

class WsClosed(Exception):
    def __init__(self, code: int | None, reason: str):
        super().__init__(f"closed: {code} {reason!r}")
        self.code = code
        self.reason = reason


class WsClient:
    """Minimal client: handshake, masked binary frames out, a byte stream in."""

    def __init__(self, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.data = b""          # binary payload received and not yet consumed
        self.close_code = None
        self.close_reason = None
        self.eof = False
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                # Closed before answering the upgrade: status None, head what came.
                self.head, self._buf, self.status, self.eof = head, b"", None, True
                return
            head += chunk
        self.head, _, self._buf = head.partition(b"\r\n\r\n")
        self.status = int(self.head.split(b" ", 2)[1])

    def _read_more(self, deadline: float) -> None:
        if self.eof:
            raise WsClosed(None, "EOF without a close frame")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for data from the WebSocket")
        r, _, _ = select.select([self.sock], [], [], remaining)
        if not r:
            raise TimeoutError("timed out waiting for data from the WebSocket")
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise WsClosed(None, "EOF without a close frame")
        self._buf += chunk

    def _frame(self, deadline: float):
        """One frame: (opcode, payload)."""
        while True:
            b = self._buf
            if len(b) >= 2:
                op, ln = b[0] & 0x0F, b[1] & 0x7F
                assert not b[1] & 0x80, "server frames must not be masked"
                pos = 2
                if ln == 126 and len(b) >= 4:
                    ln, pos = struct.unpack(">H", b[2:4])[0], 4
                elif ln == 127 and len(b) >= 10:
                    ln, pos = struct.unpack(">Q", b[2:10])[0], 10
                elif ln >= 126:
                    pos = None
                if pos is not None and len(b) >= pos + ln:
                    self._buf = b[pos + ln:]
                    return op, b[pos:pos + ln]
            self._read_more(deadline)

    def _pump(self, deadline: float) -> None:
        """Reads one frame; data goes to self.data, a close frame raises WsClosed."""
        op, payload = self._frame(deadline)
        if op in (0x0, 0x1, 0x2):
            self.data += payload
        elif op == 0x8:
            self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
            self.close_reason = payload[2:].decode("utf-8", "replace")
            raise WsClosed(self.close_code, self.close_reason)
        elif op == 0x9:
            self.send(payload, opcode=0xA)

    def recv_exact(self, n: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.data) < n:
            self._pump(deadline)
        out, self.data = self.data[:n], self.data[n:]
        return out

    def wait_close(self, timeout: float = 10.0, stop_on_data: bool = False) -> tuple[int | None, str]:
        """Reads until the connection closes; returns (close code, reason).
        Data frames that arrive first are kept in self.data; with
        stop_on_data the first data returns (None, "data") at once."""
        deadline = time.monotonic() + timeout
        try:
            while not (stop_on_data and self.data):
                self._pump(deadline)
            return None, "data"
        except WsClosed as e:
            return e.code, e.reason

    def send(self, data: bytes, opcode: int = 0x2) -> None:
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def close(self) -> None:
        try:
            self.send(struct.pack(">H", 1000), opcode=0x8)
        except OSError:
            pass
        self.sock.close()
