"""Shared fixtures for the vncbroker Python API tests.

The tests drive the real binary: they create a throw-away database with the
CLI (`user add`, `vm add`), start `vncbroker serve --listen 127.0.0.1:0`, read
the bound port from the single stdout line and talk to it over HTTP.

Binary: $VNCBROKER_BIN, default <repo>/target/debug/vncbroker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VNCBROKER_BIN", str(REPO / "target" / "debug" / "vncbroker")))

PUBLIC_URL = "http://console.example.test:8640"
DEFAULT_TTL = 600
MAX_TTL = 3600
MAX_BODY_BYTES = 1048576

# Distinctive passwords so that the log-leak test can grep for them.
PASSWORDS = {
    "root": "root-Pw-7hQx2LmZ",
    "alice": "alice-Pw-Kk93vRtY",
    "bob": "bob-Pw-Ww41pNcE",
    "carol": "carol-Pw-Zz58sJdA",
}
VNC_PASSWORD_VM9 = "vncPw9Qr"  # VNC passwords are at most 8 significant chars

TOKEN_FIELDS = {"token", "url", "path", "expires_at", "ttl", "vm_id", "single_use", "view_only", "protocol"}
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")

# Codes of oned-style error arrays.
E_AUTHENTICATION = 0x0100
E_AUTHORIZATION = 0x0200
E_NO_EXISTS = 0x0400
E_ACTION = 0x0800
E_API = 0x1000
E_INTERNAL = 0x2000

CLI_TIMEOUT = 60
START_TIMEOUT = 30
PER_TEST_TIMEOUT = 45

# Every token any test has seen; the log-leak test checks none of them
# made it into the server's stderr.
SEEN_TOKENS: list[str] = []


def record_token(result):
    """Remember a minted token (from a dict result) and return the result."""
    if isinstance(result, dict) and isinstance(result.get("token"), str):
        SEEN_TOKENS.append(result["token"])
    return result


def session(user: str, password: str | None = None) -> str:
    return f"{user}:{PASSWORDS[user] if password is None else password}"


def basic(user: str, password: str | None = None) -> tuple[str, str]:
    return (user, PASSWORDS[user] if password is None else password)


class TimeoutTransport(xmlrpc.client.Transport):
    """xmlrpc.client transport with a socket timeout so a hung server fails fast."""

    def __init__(self, timeout: float = 10.0):
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def write_config(path: Path, db_url: str) -> None:
    path.write_text(
        f'''listen = "127.0.0.1:0"
public_url = "{PUBLIC_URL}"
database = "{db_url}"

[tokens]
default_ttl = {DEFAULT_TTL}
max_ttl = {MAX_TTL}
single_use = false
purge_interval = 60

[api]
max_body_bytes = {MAX_BODY_BYTES}
'''
    )


def child_env() -> dict:
    """Environment for the binary: VNCBROKER_* config overrides from the caller's
    environment are dropped so that only the test config applies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VNCBROKER_") or k in ("VNCBROKER_BIN", "VNCBROKER_KEEP_TMP")}
    return env


def _require_binary() -> None:
    if not BIN.is_file() or not os.access(BIN, os.X_OK):
        pytest.fail(f"vncbroker binary not found or not executable at {BIN} "
                    f"(set VNCBROKER_BIN or build it with cargo build)")


@dataclass
class Env:
    """A temp dir with a config file and a database populated through the CLI."""

    tmp: Path
    config: Path
    db_url: str
    db_path: Path
    cwd: Path

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(BIN), *args, "--config", str(self.config), "--database", self.db_url]
        proc = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=child_env(),
            timeout=CLI_TIMEOUT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"CLI failed ({proc.returncode}): {cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def add_user(self, name: str, password: str, admin: bool = False):
        args = ["user", "add", name]
        if admin:
            args.append("--admin")
        args.append("--password-stdin")
        return self.cli(*args, stdin=password + "\n")

    def add_vm(self, vm_id: int, owner: str, port: int, name: str | None = None,
               vnc_password: str | None = None, allow: list[str] | None = None,
               protocol: str | None = None):
        args = ["vm", "add", str(vm_id), "--host", "127.0.0.1", "--port", str(port), "--owner", owner]
        if protocol:
            args += ["--protocol", protocol]
        if name:
            args += ["--name", name]
        if allow:
            args += ["--allow", ",".join(allow)]
        if vnc_password is not None:
            args.append("--password-stdin")
            return self.cli(*args, stdin=vnc_password + "\n")
        return self.cli(*args)


def make_env(tmp: Path, relative_db: bool = False) -> Env:
    tmp.mkdir(parents=True, exist_ok=True)
    db_path = tmp / "vncbroker.db"
    # Both URL forms of the contract: sqlite:///abs/path and sqlite://relative (cwd = tmp).
    db_url = "sqlite://vncbroker.db" if relative_db else f"sqlite://{db_path}"
    if not relative_db:
        assert db_url.startswith("sqlite:///")
    config = tmp / "vncbroker.toml"
    write_config(config, db_url)
    return Env(tmp=tmp, config=config, db_url=db_url, db_path=db_path, cwd=tmp)


@dataclass
class Broker:
    env: Env
    proc: subprocess.Popen
    port: int
    log_path: Path
    stdout_lines: list = field(default_factory=list)
    cli_outputs: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rpc_url(self) -> str:
        return f"{self.base_url}/RPC2"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v1"

    @property
    def db_path(self) -> Path:
        return self.env.db_path

    @property
    def tmp(self) -> Path:
        return self.env.tmp

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def xmlrpc(self, timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self.rpc_url, transport=TimeoutTransport(timeout), allow_none=False)

    def assert_alive(self) -> None:
        rc = self.proc.poll()
        assert rc is None, f"server exited with {rc}; log tail:\n{self.log_text()[-4000:]}"

    def assert_healthy(self) -> None:
        """The server is running and a good request still succeeds."""
        self.assert_alive()
        res = self.xmlrpc(timeout=10).one.vm.novnctoken(session("alice"), 7)
        assert isinstance(res, list) and res[0] is True, f"good request failed after bad one: {res!r}"
        record_token(res[1])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed. Returns the exit code, None if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None


def start_broker(env: Env, log_name: str = "server.stderr.log") -> Broker:
    _require_binary()
    log_path = env.tmp / log_name
    log_f = open(log_path, "ab")
    server_env = child_env()
    # Verbose logging makes the secrets-in-logs check meaningful.
    server_env.setdefault("RUST_LOG", "debug")
    server_env.setdefault("RUST_BACKTRACE", "1")
    proc = subprocess.Popen(
        [str(BIN), "serve", "--config", str(env.config), "--database", env.db_url,
         "--listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log_f,
        cwd=env.cwd,
        env=server_env,
    )
    log_f.close()

    def fail(msg: str):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        log = log_path.read_text(errors="replace")
        pytest.fail(f"{msg}\nserver stderr:\n{log[-4000:]}")

    # Read the first stdout line with a deadline.
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + START_TIMEOUT
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fail(f"server printed no 'listening on' line within {START_TIMEOUT}s (got {buf!r})")
        if not sel.select(timeout=remaining):
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            fail(f"server stdout closed before 'listening on' line (exit={proc.poll()}, got {buf!r})")
        buf += chunk
    sel.close()
    first, _, rest = buf.partition(b"\n")
    line = first.decode("utf-8", "replace")
    m = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)", line.rstrip("\r"))
    if not m:
        fail(f"unexpected first stdout line: {line!r}")
    port = int(m.group(1))
    if port == 0:
        fail("server reported port 0")

    broker = Broker(env=env, proc=proc, port=port, log_path=log_path)
    if rest:
        broker.stdout_lines.append(rest.decode("utf-8", "replace"))

    def drain():
        # Keep reading stdout so the server can never block on a full pipe.
        for raw in iter(proc.stdout.readline, b""):
            broker.stdout_lines.append(raw.decode("utf-8", "replace"))

    threading.Thread(target=drain, daemon=True).start()
    return broker


def populate(env: Env) -> dict:
    """Users root(admin)/alice/bob/carol and VMs 7 (alice, allow bob), 8 (carol),
    9 (bob, VNC password), plus spare VMs owned by alice with no tokens."""
    out = {}
    env.add_user("root", PASSWORDS["root"], admin=True)
    for name in ("alice", "bob", "carol"):
        env.add_user(name, PASSWORDS[name])
    env.add_vm(7, "alice", 5907, name="alice-vm", allow=["bob"])
    env.add_vm(8, "carol", 5908, name="carol-vm")
    env.add_vm(9, "bob", 5909, name="bob-vm", vnc_password=VNC_PASSWORD_VM9)
    # Spare VMs with no tokens, for exact revoke counts.
    env.add_vm(10, "alice", 5910, name="revoke-xmlrpc")
    env.add_vm(11, "alice", 5911, name="revoke-json")
    env.add_vm(12, "alice", 5912, name="revoke-pyone")
    # A VM that is added then removed: it must not exist afterwards.
    env.add_vm(50, "alice", 5950, name="removed")
    env.cli("vm", "rm", "50")
    out["user_list"] = env.cli("user", "list").stdout
    out["vm_list"] = env.cli("vm", "list").stdout
    return out


@pytest.fixture(scope="session")
def broker():
    """Session-wide running server on a populated temp database."""
    _require_binary()
    tmp = Path(tempfile.mkdtemp(prefix="vncbroker-pytest-"))
    env = make_env(tmp)
    b = None
    try:
        outputs = populate(env)
        b = start_broker(env)
        b.cli_outputs = outputs
        yield b
    finally:
        if b is not None:
            b.stop()
        if os.environ.get("VNCBROKER_KEEP_TMP"):
            sys.stderr.write(f"\nvncbroker test dir kept: {tmp}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def broker_factory():
    """Build extra environments/servers (e.g. for restart tests); all are stopped at teardown."""
    started: list[Broker] = []
    dirs: list[Path] = []

    class Factory:
        def env(self, relative_db: bool = False) -> Env:
            tmp = Path(tempfile.mkdtemp(prefix="vncbroker-pytest-extra-"))
            dirs.append(tmp)
            return make_env(tmp, relative_db=relative_db)

        def start(self, env: Env, log_name: str = "server.stderr.log") -> Broker:
            b = start_broker(env, log_name=log_name)
            started.append(b)
            return b

    try:
        yield Factory()
    finally:
        for b in started:
            b.stop()
        if not os.environ.get("VNCBROKER_KEEP_TMP"):
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _per_test_timeout():
    """Fail a test (instead of hanging the suite) if the server stops answering."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test took longer than {PER_TEST_TIMEOUT}s (server hung?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, PER_TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_token_result(res, vm_id: int, ttl: int = DEFAULT_TTL, single_use: bool = False,
                       now: float | None = None, view_only: bool = False, protocol: str = "vnc") -> None:
    """Assert a token result (XML-RPC struct / JSON object / CLI output) follows the contract."""
    assert isinstance(res, dict), f"expected a struct/object, got {type(res).__name__}: {res!r}"
    assert set(res) == TOKEN_FIELDS, f"fields differ: got {sorted(res)}, want {sorted(TOKEN_FIELDS)}"
    token = res["token"]
    assert isinstance(token, str)
    assert TOKEN_RE.fullmatch(token), f"token is not 43 chars of base64url: {token!r}"
    # 43 base64url chars = 32 bytes exactly, no padding.
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    # A view-only link tells the console page so (the proxy enforces it regardless).
    mode = "&view_only=1" if view_only else ""
    assert isinstance(res["url"], str) and res["url"] == f"{PUBLIC_URL}/console#token={token}{mode}", res["url"]
    assert isinstance(res["path"], str) and res["path"] == f"websockify?token={token}"
    for k in ("expires_at", "ttl", "vm_id"):
        assert isinstance(res[k], int) and not isinstance(res[k], bool), f"{k} is not an int: {res[k]!r}"
    assert isinstance(res["single_use"], bool), f"single_use is not a bool: {res['single_use']!r}"
    assert isinstance(res["view_only"], bool), f"view_only is not a bool: {res['view_only']!r}"
    assert res["vm_id"] == vm_id
    assert res["ttl"] == ttl
    assert res["single_use"] is single_use
    assert res["view_only"] is view_only
    # Which client opens the console: the console page / noVNC for "vnc".
    assert res["protocol"] == protocol, f"protocol {res['protocol']!r} != {protocol!r}"
    now = time.time() if now is None else now
    assert abs(res["expires_at"] - (now + ttl)) <= 5, \
        f"expires_at {res['expires_at']} not ~ now+{ttl} ({now + ttl:.0f})"


TOKEN_POLICY_COLUMNS = ("view_only", "exclusive", "clipboard", "record")


def token_policy(db_path: Path, token: str) -> dict | None:
    """The session policy stored in a token's row (view_only, exclusive,
    clipboard, record), looked up by sha256(token); None if there is no row."""
    h = hashlib.sha256(token.encode()).digest()
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as c:
        row = c.execute(
            f"SELECT {', '.join(TOKEN_POLICY_COLUMNS)} FROM tokens WHERE token_hash = ?", (h,)
        ).fetchone()
    return None if row is None else dict(zip(TOKEN_POLICY_COLUMNS, row))
