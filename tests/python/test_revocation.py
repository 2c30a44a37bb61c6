"""Revocation without holes, and live sessions that follow the registry and
the cloud.

Everything is real: the broker binary (one or two processes on one SQLite
file), pyone and requests as clients, TigerVNC's Xvnc behind the proxy, the
admin CLI, and libfaketime for a node whose clock is wrong. Only oned is the
test double (oned_double.py, built from real oned documents).

The promise: revoking a VM ends every live session of it, whatever token
opened it (single-use and used, reusable and expired, purged), on every
node, within about two seconds, whatever the nodes' clocks say; a session
being set up while the revocation is made ends too. Removing a VM or user,
or taking a user off a VM, ends that user's sessions; in OpenNebula mode the
periodic re-check ends sessions whose VM moved, stopped or went, or whose
user lost USE, and keeps them while oned is unreachable.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from email.utils import parsedate_to_datetime

import pyone
import pytest
import requests

from conftest import PASSWORDS, basic, session
from oned_double import OnedDouble
from vnc_helpers import WsClient, Xvnc, free_port

T = 10
VNC_PW = "Rv7kQm2x"
PROMPT = 2.5  # "within about two seconds", with a poll tick of slack

CLOSE_ACCESS = 4403
CLOSE_VM_GONE = 4404
CLOSE_MOVED = 4409
CLOSE_REVOKED = 4410

ON_PW = {"oneadmin": "oneadmin-Pw-Q7v2LxRe", "alice": PASSWORDS["alice"], "bob": PASSWORDS["bob"]}


@pytest.fixture(scope="module")
def xvnc(tmp_path_factory):
    x = Xvnc(tmp_path_factory.mktemp("xvnc-revocation"), password=VNC_PW)
    try:
        yield x
    finally:
        x.stop()


def append_config(env, text: str) -> None:
    env.config.write_text(env.config.read_text() + "\n" + text + "\n")


def local_env(broker_factory, xvnc, proxy: str = "") -> "Env":  # noqa: F821
    """Users root (admin), alice, bob, carol; VM 7 (alice's, bob allowed) and
    VM 8 (carol's) on the real Xvnc, with its VNC password stored."""
    env = broker_factory.env()
    env.add_user("root", PASSWORDS["root"], admin=True)
    for name in ("alice", "bob", "carol"):
        env.add_user(name, PASSWORDS[name])
    env.add_vm(7, "alice", xvnc.port, vnc_password=VNC_PW, allow=["bob"])
    env.add_vm(8, "carol", xvnc.port, vnc_password=VNC_PW)
    append_config(env, "[proxy]\nrevocation_check_ms = 500\n" + proxy)
    return env


def open_console(b, token_path: str) -> WsClient:
    ws = WsClient(b.port, "/" + token_path.lstrip("/"))
    assert ws.status == 101, ws.head
    # Server greeting through the security proxy, then ClientInit and the
    # desktop name: the session is live.
    assert ws.recv_exact(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    n = ws.recv_exact(1)[0]
    assert list(ws.recv_exact(n)) == [1], "offered only None"
    ws.send(b"\x01")
    assert ws.recv_exact(4) == b"\x00\x00\x00\x00"
    ws.send(b"\x01")
    ws.recv_exact(20)
    name_len = int.from_bytes(ws.recv_exact(4), "big")
    ws.recv_exact(name_len)
    return ws


def closes_with(ws: WsClient, code: int, within: float = PROMPT) -> str:
    started = time.monotonic()
    got, reason = ws.wait_close(timeout=within + 5)
    took = time.monotonic() - started
    assert got == code, (got, reason)
    assert took < within, f"closed after {took:.2f}s, more than {within}s"
    return reason


def still_open(ws: WsClient, for_secs: float = 1.5) -> None:
    try:
        code, reason = ws.wait_close(timeout=for_secs)
    except TimeoutError:
        return
    raise AssertionError(f"session ended: {code} {reason!r}")


def mint_json(b, vm: int, user: str, **body) -> dict:
    r = requests.post(f"{b.api_url}/vms/{vm}/console-tokens", auth=basic(user), json=body or None, timeout=T)
    assert r.status_code == 201, r.text
    return r.json()


def live_sessions(b, user: str = "root") -> list[dict]:
    r = requests.get(f"{b.api_url}/sessions", auth=basic(user), timeout=T)
    assert r.status_code == 200, r.text
    return [s for s in r.json()["sessions"] if s["ended_at"] is None]


def wait_live(b, n: int, user: str = "root") -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        rows = live_sessions(b, user)
        if len(rows) >= n:
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Revoking a VM ends every kind of session

def test_revoke_ends_single_use_reusable_and_purged_token_sessions(broker_factory, xvnc):
    env = local_env(broker_factory, xvnc)
    env.config.write_text(env.config.read_text().replace("purge_interval = 60", "purge_interval = 1"))
    b = broker_factory.start(env)
    alice = pyone.OneServer(b.rpc_url, session=session("alice"))
    # pyone's positional form: ttl 0 (the default), single-use.
    # The short-lived token is opened at once, so a slow machine cannot let
    # it expire first.
    short = alice.vm.novnctoken(7, 5)
    short_ws = open_console(b, short["path"])
    once = alice.vm.novnctoken(7, 0, True)
    assert once["single_use"] is True
    reusable = alice.vm.novnctoken(7)
    other_vm = mint_json(b, 8, "carol")
    sessions = {
        "expired and purged": short_ws,
        "single-use, used": open_console(b, once["path"]),
        "reusable": open_console(b, reusable["path"]),
    }
    bystander = open_console(b, other_vm["path"])
    wait_live(b, 4)
    # The short token expires and the purge (every second) deletes it.
    time.sleep(max(0.0, short["expires_at"] - time.time()) + 2.5)
    started = time.monotonic()
    # Live tokens: only the reusable one (the single-use one is used, the
    # short one gone).
    assert alice.vm.novnctokenrevoke(7) == 1
    for what, ws in sessions.items():
        left = PROMPT - (time.monotonic() - started) + 0.5
        reason = closes_with(ws, CLOSE_REVOKED, within=left)
        assert reason == "session ended: console access revoked", (what, reason)
    still_open(bystander, 0.5)
    rows = requests.get(f"{b.api_url}/sessions?vm_id=7", auth=basic("alice"), timeout=T).json()["sessions"]
    assert sorted(r["close_reason"] for r in rows) == ["revoked"] * 3, rows
    # The revoked tokens open nothing any more.
    ws = WsClient(b.port, "/" + reusable["path"])
    assert ws.wait_close(stop_on_data=True)[0] == 4401
    bystander.close()


def test_json_revoke_counts_tokens_and_sessions(broker_factory, xvnc):
    b = broker_factory.start(local_env(broker_factory, xvnc))
    t1 = mint_json(b, 7, "alice")
    mint_json(b, 7, "bob")
    ws1 = open_console(b, t1["path"])
    ws2 = open_console(b, t1["path"])
    wait_live(b, 2)
    r = requests.delete(f"{b.api_url}/vms/7/console-tokens", auth=basic("alice"), timeout=T)
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": 2, "sessions_ended": 2}
    closes_with(ws1, CLOSE_REVOKED)
    closes_with(ws2, CLOSE_REVOKED)
    # carol may not revoke alice's VM, and a revoke by someone else ends nothing.
    r = requests.delete(f"{b.api_url}/vms/7/console-tokens", auth=basic("carol"), timeout=T)
    assert r.status_code == 403, r.text


def test_a_node_whose_clock_runs_ahead_still_ends_revoked_sessions(broker_factory, xvnc):
    """Two nodes on one database: the API node with the right time, the
    proxy node 30 s ahead (libfaketime). Revocations are ordered by the
    database, so the proxy's clock plays no part."""
    # libfaketime preloaded into the broker itself: the `faketime` command
    # would fork it, and the harness's SIGTERM would then end only the
    # wrapper and leave the node running.
    libfaketime = next(
        (p for p in glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") if os.path.exists(p)), None
    )
    assert libfaketime, "libfaketime (Debian package faketime) is needed"
    env = local_env(broker_factory, xvnc)
    api = broker_factory.start(env, log_name="api.log")
    # The same files, a node 30 s ahead.
    import conftest

    real_bin = conftest.BIN
    wrapper = env.tmp / "vncbroker-ahead"
    wrapper.write_text(
        "#!/bin/sh\nFAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME=+30s "
        f'LD_PRELOAD={libfaketime} exec {real_bin} "$@"\n'
    )
    wrapper.chmod(0o755)
    conftest.BIN = wrapper
    try:
        proxy = broker_factory.start(env, log_name="proxy-ahead.log")
    finally:
        conftest.BIN = real_bin
    # The node's clock really is ahead: its HTTP Date says so.
    said = requests.get(f"{proxy.base_url}/healthz", timeout=T).headers["Date"]
    ahead = parsedate_to_datetime(said).timestamp() - time.time()
    assert 25 <= ahead <= 40, f"the proxy node's clock is {ahead:.0f} s ahead, not 30"
    tok = mint_json(api, 7, "alice")
    ws = open_console(proxy, tok["path"])
    r = requests.delete(f"{api.api_url}/vms/7/console-tokens", auth=basic("alice"), timeout=T)
    assert r.status_code == 200, r.text
    closes_with(ws, CLOSE_REVOKED)
    assert r.json() == {"revoked": 1, "sessions_ended": 1}


# ---------------------------------------------------------------------------
# Ending one session

def test_end_one_session_by_api_and_cli(broker_factory, xvnc):
    b = broker_factory.start(local_env(broker_factory, xvnc))
    tok = mint_json(b, 7, "alice")
    a1, a2 = open_console(b, tok["path"]), open_console(b, tok["path"])
    rows = wait_live(b, 2, "alice")
    first, second = sorted(r["id"] for r in rows)
    # bob and carol cannot end alice's session, and learn nothing about it.
    for user in ("bob", "carol"):
        r = requests.delete(f"{b.api_url}/sessions/{first}", auth=basic(user), timeout=T)
        assert r.status_code == 404, r.text
    assert requests.delete(f"{b.api_url}/sessions/abc", auth=basic("alice"), timeout=T).status_code == 400
    assert requests.delete(f"{b.api_url}/sessions/{first}", timeout=T).status_code == 401
    # The owner ends her own; only that one ends.
    r = requests.delete(f"{b.api_url}/sessions/{first}", auth=basic("alice"), timeout=T)
    assert r.status_code == 200 and r.json() == {"session": first, "sessions_ended": 1}, r.text
    # Which socket is `first` is not known; exactly one closes.
    codes = []
    for ws in (a1, a2):
        try:
            codes.append(ws.wait_close(timeout=PROMPT)[0])
        except TimeoutError:
            codes.append(None)
    assert sorted(codes, key=str) == sorted([CLOSE_REVOKED, None], key=str), codes
    again = requests.delete(f"{b.api_url}/sessions/{first}", auth=basic("alice"), timeout=T)
    assert again.status_code == 409, again.text
    # The admin CLI ends the other.
    out = b.env.cli("sessions", "end", str(second)).stdout
    assert f"session {second}" in out, out
    survivor = a2 if codes[0] == CLOSE_REVOKED else a1
    closes_with(survivor, CLOSE_REVOKED)
    assert b.env.cli("sessions", "end", "999999", check=False).returncode != 0


# ---------------------------------------------------------------------------
# The local registry: changes end the sessions they withdraw

def test_registry_changes_end_the_sessions_they_withdraw(broker_factory, xvnc):
    b = broker_factory.start(local_env(broker_factory, xvnc))
    bob_t = mint_json(b, 7, "bob")
    alice_t = mint_json(b, 7, "alice")
    bob_ws = open_console(b, bob_t["path"])
    alice_ws = open_console(b, alice_t["path"])
    wait_live(b, 2)

    # bob is taken off VM 7: his session ends, alice's goes on, his token dies.
    out = b.env.cli("vm", "disallow", "7", "bob").stdout
    assert "1 token revoked, 1 live session ending" in out, out
    closes_with(bob_ws, CLOSE_ACCESS)
    still_open(alice_ws, 0.5)
    ws = WsClient(b.port, "/" + bob_t["path"])
    assert ws.wait_close(stop_on_data=True)[0] == 4401
    r = requests.post(f"{b.api_url}/vms/7/console-tokens", auth=basic("bob"), timeout=T)
    assert r.status_code == 403

    # Allowed again, then bob is removed altogether.
    b.env.cli("vm", "allow", "7", "bob")
    bob_ws = open_console(b, mint_json(b, 7, "bob")["path"])
    out = b.env.cli("user", "rm", "bob").stdout
    assert "1 live session ending" in out, out
    closes_with(bob_ws, CLOSE_ACCESS)
    still_open(alice_ws, 0.5)
    # The owner of VMs cannot be removed while they own them.
    rm = b.env.cli("user", "rm", "alice", check=False)
    assert rm.returncode != 0 and "owns VMs" in rm.stderr, rm.stderr

    # The VM's console moves: every session of it ends.
    out = b.env.cli("vm", "set", "7", "--port", str(free_port())).stdout
    assert "1 live session ending" in out, out
    closes_with(alice_ws, CLOSE_MOVED)
    b.env.cli("vm", "set", "7", "--port", str(xvnc.port))
    alice_ws = open_console(b, mint_json(b, 7, "alice")["path"])
    # A new owner: the old one's session ends.
    b.env.cli("vm", "set", "7", "--owner", "carol")
    closes_with(alice_ws, CLOSE_ACCESS)
    # The VM is removed: carol's session on it ends.
    carol_ws = open_console(b, mint_json(b, 7, "carol")["path"])
    carol_8 = open_console(b, mint_json(b, 8, "carol")["path"])
    out = b.env.cli("vm", "rm", "7").stdout
    assert "1 live session ending" in out, out
    closes_with(carol_ws, CLOSE_VM_GONE)
    still_open(carol_8, 0.5)
    carol_8.close()


def test_passwd_changes_the_password_and_can_end_sessions(broker_factory, xvnc):
    b = broker_factory.start(local_env(broker_factory, xvnc))
    ws = open_console(b, mint_json(b, 7, "alice")["path"])
    b.env.cli("user", "passwd", "alice", "--password-stdin", stdin="new-Pw-Ab12cd34\n")
    r = requests.post(f"{b.api_url}/vms/7/console-tokens", auth=basic("alice"), timeout=T)
    assert r.status_code == 401, "the old password must stop working at once"
    r = requests.post(f"{b.api_url}/vms/7/console-tokens", auth=("alice", "new-Pw-Ab12cd34"), timeout=T)
    assert r.status_code == 201, r.text
    still_open(ws, 0.5)
    out = b.env.cli("user", "passwd", "alice", "--password-stdin", "--end-sessions",
                    stdin="newer-Pw-Ab12cd34\n").stdout
    assert "live session" in out, out
    closes_with(ws, CLOSE_REVOKED)
    assert b.env.cli("user", "passwd", "nobody", "--password-stdin", stdin="x\n", check=False).returncode != 0


# ---------------------------------------------------------------------------
# OpenNebula mode

def on_broker(broker_factory, oned, *, recheck: int = 0, service: bool = True, timeout_ms: int = 1000):
    env = broker_factory.env()
    extra = f'[inventory]\nkind = "opennebula"\nendpoint = "{oned.url}"\ntimeout_ms = {timeout_ms}\n'
    if service:
        extra += f'service_session = "oneadmin:{ON_PW["oneadmin"]}"\n'
    extra += "[proxy]\nrevocation_check_ms = 500\n"
    if recheck:
        extra += f"recheck_interval_secs = {recheck}\n"
    append_config(env, extra)
    return broker_factory.start(env)


def on_one(b, user: str):
    return pyone.OneServer(b.rpc_url, session=f"{user}:{ON_PW[user]}")


@pytest.fixture
def oned():
    d = OnedDouble(ON_PW)
    try:
        yield d
    finally:
        d.close()


def test_opennebula_revoke_needs_no_live_console(broker_factory, oned, xvnc):
    """A leaked token of a running VM; the VM is powered off; revoking it
    works (authorisation only) and the token stays dead when the VM comes
    back on the same host and port."""
    oned.add_vm(30, owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = on_broker(broker_factory, oned)
    alice = on_one(b, "alice")
    leaked = alice.vm.novnctoken(30)
    # POWEROFF, SUSPENDED, and ACTIVE/PROLOG_MIGRATE (a cold migration).
    revoked = []
    for state, lcm in ((8, 0), (5, 0), (3, 8)):
        oned.update_vm(30, state=state, lcm_state=lcm)
        with pytest.raises(pyone.OneActionException):
            alice.vm.novnctoken(30)
        revoked.append(alice.vm.novnctokenrevoke(30))
    assert revoked == [1, 0, 0]
    oned.update_vm(30, state=3, lcm_state=3)
    ws = WsClient(b.port, "/" + leaked["path"])
    assert ws.wait_close(stop_on_data=True)[0] == 4401
    # bob has no USE on VM 30: refused, as oned refuses him.
    with pytest.raises(pyone.OneAuthorizationException):
        on_one(b, "bob").vm.novnctokenrevoke(30)


def test_opennebula_sessions_follow_the_cloud(broker_factory, oned, xvnc):
    oned.add_vm(30, owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = on_broker(broker_factory, oned, recheck=1)
    alice = on_one(b, "alice")

    # The user loses USE (the VM changes owner).
    ws = open_console(b, alice.vm.novnctoken(30)["path"])
    still_open(ws, 1.5)
    oned.update_vm(30, owner="bob")
    closes_with(ws, CLOSE_ACCESS, within=2.5)
    oned.update_vm(30, owner="alice")

    # The VM is powered off.
    ws = open_console(b, alice.vm.novnctoken(30)["path"])
    oned.update_vm(30, state=8, lcm_state=0)
    assert closes_with(ws, CLOSE_VM_GONE, within=2.5).endswith("not running")
    oned.update_vm(30, state=3, lcm_state=3)

    # The VM migrates to another host.
    ws = open_console(b, alice.vm.novnctoken(30)["path"])
    oned.migrate(30, "node-2.test")
    closes_with(ws, CLOSE_MOVED, within=2.5)
    oned.migrate(30, "127.0.0.1")

    # The VM's console becomes SPICE (on the same host and port).
    ws = open_console(b, alice.vm.novnctoken(30)["path"])
    oned.update_vm(30, graphics="SPICE")
    closes_with(ws, CLOSE_MOVED, within=2.5)
    oned.update_vm(30, graphics="VNC")

    # The user's password changes: oned no longer accepts the stored session.
    ws = open_console(b, alice.vm.novnctoken(30)["path"])
    oned.passwords["alice"] = "changed-Pw-1"
    closes_with(ws, CLOSE_ACCESS, within=2.5)
    oned.passwords["alice"] = ON_PW["alice"]

    # The VM is deleted.
    ws = open_console(b, alice.vm.novnctoken(30)["path"])
    oned.remove_vm(30)
    closes_with(ws, CLOSE_VM_GONE, within=2.5)

    # Neither the user's password nor the service session's reaches the log.
    log = b.log_text()
    assert ON_PW["alice"] not in log and ON_PW["oneadmin"] not in log and VNC_PW not in log


def test_opennebula_unreachable_keeps_sessions_and_counts(broker_factory, oned, xvnc):
    oned.add_vm(30, owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = on_broker(broker_factory, oned, recheck=1)
    ws = open_console(b, on_one(b, "alice").vm.novnctoken(30)["path"])
    oned.close()
    still_open(ws, 3.5)
    metrics = requests.get(f"{b.base_url}/metrics", timeout=T).text
    line = next(l for l in metrics.splitlines() if l.startswith("vncbroker_recheck_failures_total "))
    assert float(line.split()[1]) >= 1, line
    # Still relaying: a FramebufferUpdateRequest gets an answer.
    ws.send(b"\x03\x00\x00\x00\x00\x00\x00\x10\x00\x10")
    assert ws.recv_exact(1, timeout=5) == b"\x00"
    ws.close()


def test_opennebula_session_set_up_during_a_revocation_still_ends(broker_factory, oned, xvnc):
    """The proxy redeems the token, then checks the VM's placement with oned
    (slow here: 2 s), then registers the session. A revocation made in that
    window must still end it."""
    oned.add_vm(30, owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = on_broker(broker_factory, oned, timeout_ms=5000)
    alice = on_one(b, "alice")
    tok = alice.vm.novnctoken(30)
    oned.update_vm(30, service_delay=2.0)
    result = {}

    def connect():
        ws = WsClient(b.port, "/" + tok["path"], timeout=15)
        result["close"] = ws.wait_close(timeout=10)

    t = threading.Thread(target=connect)
    t.start()
    time.sleep(0.7)  # redeemed; the placement check is under way
    assert alice.vm.novnctokenrevoke(30) == 1  # reusable: still live though used
    t.join(15)
    code, reason = result["close"]
    assert code == CLOSE_REVOKED, (code, reason)
