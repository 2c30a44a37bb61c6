"""The broker with OpenNebula as its inventory ([inventory] kind = "opennebula").

oned is the test double in oned_double.py (real oned documents from
tests/fixtures/opennebula/, edited); everything else is real: the broker
binary, pyone as the XML-RPC client, requests for the JSON API, TigerVNC's
Xvnc as the VNC server behind the proxy, and a raw WebSocket client.

Contract under test: one.vm.novnctoken asks oned's one.vm.info with the
caller's own session; the target is the HOSTNAME of the last HISTORY record
and TEMPLATE/GRAPHICS/PORT; GRAPHICS/PASSWD is stored with the token for the
proxy's RFB security proxy. GRAPHICS TYPE SPICE (any case) is a console too:
its token says protocol "spice", GRAPHICS/PASSWD is the SPICE password, and
GET /api/v1/vms/{id}/console.vv writes a remote-viewer file for it. No
GRAPHICS / neither VNC nor SPICE -> 0x0400, not live -> 0x0800, oned's
refusals pass through, oned down or slow -> 0x2000.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import struct
import time
import xmlrpc.client
from contextlib import closing

import pyone
import pytest
import requests

from conftest import (
    E_ACTION,
    E_AUTHENTICATION,
    E_AUTHORIZATION,
    E_INTERNAL,
    E_NO_EXISTS,
    PASSWORDS,
    TimeoutTransport,
    check_token_result,
    token_policy,
)
from oned_double import LIVE_LCM_STATES, OnedDouble
from vnc_helpers import WsClient, Xvnc, free_port

PW = {
    "oneadmin": "oneadmin-Pw-Q7v2LxRe",
    "alice": PASSWORDS["alice"],
    "bob": PASSWORDS["bob"],
}
VNC_PW = "Xv9qLm2T"  # VncAuth uses 8 characters
T = 10  # HTTP timeout


def sess(user: str, password: str | None = None) -> str:
    return f"{user}:{PW[user] if password is None else password}"


def one(b, user: str, password: str | None = None):
    return pyone.OneServer(b.rpc_url, session=sess(user, password))


def raw_rpc(b, timeout: float = 10.0):
    return xmlrpc.client.ServerProxy(b.rpc_url, transport=TimeoutTransport(timeout), allow_none=False)


def start_on(broker_factory, endpoint: str, *, timeout_ms: int = 1000, service_session: str | None = None):
    """A broker whose config (the conftest's, copied per env) gains an [inventory] section."""
    env = broker_factory.env()
    extra = f'\n[inventory]\nkind = "opennebula"\nendpoint = "{endpoint}"\ntimeout_ms = {timeout_ms}\n'
    if service_session is not None:
        extra += f'service_session = "{service_session}"\n'
    env.config.write_text(env.config.read_text() + extra)
    return broker_factory.start(env)


def token_row(b, token: str):
    """(vm_id, target_host, target_port, vnc_password, user_name) of a token's row."""
    h = hashlib.sha256(token.encode()).digest()
    with closing(sqlite3.connect(f"file:{b.db_path}?mode=ro", uri=True)) as c:
        return c.execute(
            "SELECT vm_id, target_host, target_port, vnc_password, user_name FROM tokens WHERE token_hash = ?",
            (h,),
        ).fetchone()


class Sealed:
    """Equals a stored VNC password column that is sealed (ChaCha20-Poly1305,
    "v1:..."), never the plaintext. The end-to-end test shows the proxy
    opens it to the right password."""

    def __init__(self, plain: str):
        self.plain = plain

    def __eq__(self, stored) -> bool:
        return isinstance(stored, str) and stored.startswith("v1:") and self.plain not in stored

    def __repr__(self) -> str:
        return f"Sealed(<{len(self.plain)} chars>)"


def token_count(b, vm_id: int) -> int:
    with closing(sqlite3.connect(f"file:{b.db_path}?mode=ro", uri=True)) as c:
        return c.execute("SELECT count(*) FROM tokens WHERE vm_id = ?", (vm_id,)).fetchone()[0]


def api_mint(b, vm_id: int, user: str, password: str | None = None, **body):
    return requests.post(f"{b.api_url}/vms/{vm_id}/console-tokens", auth=(user, PW[user] if password is None else password),
                         json=body or None, timeout=T)


def json_error(r: requests.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, f"status {r.status_code} != {status}: {r.text[:500]}"
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}/RPC2"


@pytest.fixture
def oned():
    d = OnedDouble(PW)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def xvnc(tmp_path_factory):
    x = Xvnc(tmp_path_factory.mktemp("xvnc"), password=VNC_PW)
    try:
        yield x
    finally:
        x.stop()


# ---------------------------------------------------------------------------
# Minting

@pytest.mark.parametrize("form", ["raw", "pretty"])
@pytest.mark.parametrize("passwd", [None, "gr&phx<1"])
def test_mint_for_running_vm(broker_factory, oned, form, passwd):
    oned.add_vm(7, form=form, owner="alice", port=5907, passwd=passwd, hosts=["kvm-07.example.test"])
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(7)
    check_token_result(res, vm_id=7)
    expected_pw = Sealed(passwd) if passwd is not None else None
    assert token_row(b, res["token"]) == (7, "kvm-07.example.test", 5907, expected_pw, "alice")
    # oned was asked with the caller's own session.
    calls = oned.calls_of("one.vm.info")
    assert calls and calls[-1].params[:2] == (sess("alice"), 7), calls
    # ttl and single_use pass through as in local mode.
    res = one(b, "alice").vm.novnctoken(7, 90, True)
    check_token_result(res, vm_id=7, ttl=90, single_use=True)
    assert token_row(b, res["token"])[1:3] == ("kvm-07.example.test", 5907)


def test_admin_group_may_mint_for_others_vm(broker_factory, oned):
    oned.add_vm(7, form="raw", owner="alice", port=5907, hosts=["h1"])
    b = start_on(broker_factory, oned.url)
    res = one(b, "oneadmin").vm.novnctoken(7)
    check_token_result(res, vm_id=7)
    assert token_row(b, res["token"]) == (7, "h1", 5907, None, "oneadmin")


def test_oned_refusals_pass_through(broker_factory, oned):
    oned.add_vm(7, form="raw", owner="alice", port=5907)
    b = start_on(broker_factory, oned.url)

    with pytest.raises(pyone.OneAuthenticationException):
        one(b, "alice", "wrong-password").vm.novnctoken(7)
    with pytest.raises(pyone.OneAuthenticationException):
        pyone.OneServer(b.rpc_url, session="mallory:x").vm.novnctoken(7)
    with pytest.raises(pyone.OneAuthorizationException) as ei:
        one(b, "bob").vm.novnctoken(7)
    assert "Not authorized" in str(ei.value)
    with pytest.raises(pyone.OneNoExistsException):
        one(b, "alice").vm.novnctoken(999)

    rpc = raw_rpc(b)
    res = rpc.one.vm.novnctoken(sess("alice", "wrong-password"), 7)
    assert res[:3] == [False, "[one.vm.novnctoken] User couldn't be authenticated, aborting call.",
                       E_AUTHENTICATION], res
    res = rpc.one.vm.novnctoken(sess("bob"), 7)
    assert res[:3] == [False, "[one.vm.novnctoken] User [4] : Not authorized to perform USE VM [7].",
                       E_AUTHORIZATION], res
    res = rpc.one.vm.novnctoken(sess("alice"), 999)
    assert res[:3] == [False, "[one.vm.novnctoken] Error getting virtual machine [999].", E_NO_EXISTS], res
    # Each of these really was oned's answer to the caller's own session.
    sessions = [c.params[0] for c in oned.calls_of("one.vm.info")]
    assert sess("bob") in sessions and sess("alice", "wrong-password") in sessions
    assert token_count(b, 7) == 0 and token_count(b, 999) == 0
    # The caller's password never reaches the log.
    log = b.log_text()
    assert PW["alice"] not in log and PW["bob"] not in log


# ---------------------------------------------------------------------------
# The console policy in TEMPLATE/VNCBROKER

def policy(view_only=0, exclusive=0, clipboard="both", record=0) -> dict:
    return {"view_only": view_only, "exclusive": exclusive, "clipboard": clipboard, "record": record}


@pytest.mark.parametrize("form", ["raw", "pretty", "onedock"])
def test_template_vncbroker_policy(broker_factory, oned, form):
    oned.add_vm(7, form=form, owner="alice", port=5907, hosts=["h7"],
                vncbroker={"CLIPBOARD": "to-vm", "RECORD": "YES", "CONTROL": "exclusive"})
    oned.add_vm(8, form=form, owner="alice", port=5908, hosts=["h8"])
    doc = oned.document(7)
    assert "<VNCBROKER>" in doc and "<VNCBROKER>" not in oned.document(8)
    b = start_on(broker_factory, oned.url)

    res = one(b, "alice").vm.novnctoken(7)
    check_token_result(res, vm_id=7)
    assert token_policy(b.db_path, res["token"]) == policy(exclusive=1, clipboard="to-vm", record=1)
    # The caller's view-only choice comes on top of the VM's policy.
    res = one(b, "alice").vm.novnctoken(7, 0, False, True)
    check_token_result(res, vm_id=7, view_only=True)
    assert token_policy(b.db_path, res["token"]) == policy(view_only=1, exclusive=1, clipboard="to-vm", record=1)
    r = api_mint(b, 7, "alice", view_only=True)
    assert r.status_code == 201, r.text
    check_token_result(r.json(), vm_id=7, view_only=True)
    assert token_policy(b.db_path, r.json()["token"]) == policy(view_only=1, exclusive=1, clipboard="to-vm",
                                                                 record=1)
    # A VM without the vector takes the config's defaults.
    res = one(b, "alice").vm.novnctoken(8)
    assert token_policy(b.db_path, res["token"]) == policy()


@pytest.mark.parametrize("values,expected", [
    ({"CLIPBOARD": "none"}, policy(clipboard="none")),
    ({"CLIPBOARD": "FROM-VM", "CONTROL": "Shared", "RECORD": "no"}, policy(clipboard="from-vm")),
    ({"RECORD": "yes"}, policy(record=1)),
    ({"CONTROL": "EXCLUSIVE"}, policy(exclusive=1)),
])
def test_template_vncbroker_partial_and_any_case(broker_factory, oned, values, expected):
    oned.add_vm(7, form="raw", owner="alice", port=5907, vncbroker=values)
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(7)
    assert token_policy(b.db_path, res["token"]) == expected


@pytest.mark.parametrize("form", ["raw", "pretty", "onedock"])
def test_user_template_vncbroker_is_ignored(broker_factory, oned, form):
    """USER_TEMPLATE is the VM owner's to edit: its VNCBROKER vector (even an
    invalid one) neither grants nor takes away anything."""
    oned.add_vm(7, form=form, owner="alice", port=5907,
                user_vncbroker={"CLIPBOARD": "both", "RECORD": "NO", "CONTROL": "shared"},
                vncbroker={"CLIPBOARD": "none", "RECORD": "YES", "CONTROL": "exclusive"})
    oned.add_vm(8, form=form, owner="alice", port=5908,
                user_vncbroker={"CLIPBOARD": "none", "RECORD": "YES", "CONTROL": "exclusive"})
    oned.add_vm(9, form=form, owner="alice", port=5909, user_vncbroker={"CLIPBOARD": "sideways"})
    template, user_template = oned.document(8).split("<USER_TEMPLATE>")
    assert "<VNCBROKER>" not in template and "<VNCBROKER>" in user_template
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(7)
    assert token_policy(b.db_path, res["token"]) == policy(exclusive=1, clipboard="none", record=1)
    res = one(b, "alice").vm.novnctoken(8)
    assert token_policy(b.db_path, res["token"]) == policy()
    res = one(b, "alice").vm.novnctoken(9)
    check_token_result(res, vm_id=9)
    assert token_policy(b.db_path, res["token"]) == policy()


@pytest.mark.parametrize("values,what,accepted", [
    ({"CLIPBOARD": "sideways"}, "clipboard", "both, to-vm, from-vm, none"),
    ({"CONTROL": "sideways", "CLIPBOARD": "none"}, "control", "shared, exclusive"),
    ({"RECORD": "sometimes"}, "record", "yes, no"),
])
def test_invalid_template_vncbroker_is_refused(broker_factory, oned, values, what, accepted):
    oned.add_vm(7, form="pretty", owner="alice", port=5907, vncbroker=values)
    b = start_on(broker_factory, oned.url)
    bad = next(v for k, v in values.items() if k.lower() == what)

    with pytest.raises(pyone.OneActionException) as ei:
        one(b, "alice").vm.novnctoken(7)
    assert "TEMPLATE/VNCBROKER" in str(ei.value), str(ei.value)
    res = raw_rpc(b).one.vm.novnctoken(sess("alice"), 7)
    assert res[0] is False and res[2] == E_ACTION, res
    assert res[1].startswith("[one.vm.novnctoken] "), res
    msg = res[1]
    assert "TEMPLATE/VNCBROKER" in msg and f"{what} must be one of {accepted}" in msg and bad in msg, msg
    assert not msg.startswith("[one.vm.novnctoken] [one.vm.info]"), msg
    err = json_error(api_mint(b, 7, "alice", view_only=True), 409, "console_unavailable")
    assert "TEMPLATE/VNCBROKER" in err["message"] and accepted in err["message"], err
    assert token_count(b, 7) == 0


# ---------------------------------------------------------------------------
# Console availability

def test_no_console_is_no_exists(broker_factory, oned):
    # Document 04 as it is (legacy schema, no GRAPHICS at all).
    oned.add_vm(4, form="legacy", owner="alice", state=None, lcm_state=None, graphics="keep",
                port=None, hosts=None)
    # Document 01 with its GRAPHICS element removed.
    oned.add_vm(1, form="pretty", owner="alice", graphics=None)
    # Graphics the broker has no proxy for (SDL is a local window), both forms.
    oned.add_vm(2, form="raw", owner="alice", graphics="SDL")
    oned.add_vm(3, form="pretty", owner="alice", graphics="rdp")
    b = start_on(broker_factory, oned.url)
    rpc = raw_rpc(b)
    assert "<GRAPHICS>" not in oned.document(4) and "<GRAPHICS>" not in oned.document(1)
    assert "<TYPE><![CDATA[SDL]]></TYPE>" in oned.document(2)
    assert "<TYPE>rdp</TYPE>" in oned.document(3)
    for vm in (2, 3):
        msg = rpc.one.vm.novnctoken(sess("alice"), vm)[1]
        assert "not VNC or SPICE" in msg, msg
    for vm in (4, 1, 2, 3):
        with pytest.raises(pyone.OneNoExistsException):
            one(b, "alice").vm.novnctoken(vm)
        res = rpc.one.vm.novnctoken(sess("alice"), vm)
        assert res[0] is False and res[2] == E_NO_EXISTS, (vm, res)
        assert res[1].startswith("[one.vm.novnctoken] ") and not res[1].startswith(
            "[one.vm.novnctoken] [one.vm.info]"), res
        assert token_count(b, vm) == 0


def spice_row(b, token: str):
    """(protocol, usb_redirect, microphone) of a token's row."""
    h = hashlib.sha256(token.encode()).digest()
    with closing(sqlite3.connect(f"file:{b.db_path}?mode=ro", uri=True)) as c:
        return c.execute("SELECT protocol, usb_redirect, microphone FROM tokens WHERE token_hash = ?",
                         (h,)).fetchone()


@pytest.mark.parametrize("form,graphics", [("raw", "SPICE"), ("pretty", "spice"), ("onedock", "Spice")])
def test_spice_vm_mints_a_spice_token(broker_factory, oned, form, graphics):
    """A real VNC document with GRAPHICS TYPE changed to SPICE: one.vm.novnctoken
    (pyone and xmlrpc.client) and the JSON API mint for it, the answer says
    protocol "spice", and GRAPHICS/PASSWD and PORT are the SPICE console's."""
    oned.add_vm(40, form=form, owner="alice", graphics=graphics, port=5940, passwd="sp1ce&Pw",
                hosts=["kvm-40.example.test"], state=3, lcm_state=3)
    oned.add_vm(41, form=form, owner="alice", port=5941, hosts=["kvm-41.example.test"], state=3, lcm_state=3)
    doc = oned.document(40)
    assert f">{graphics}<" in doc or f"[{graphics}]" in doc, doc
    b = start_on(broker_factory, oned.url)

    res = one(b, "alice").vm.novnctoken(40)
    check_token_result(res, vm_id=40, protocol="spice")
    assert token_row(b, res["token"]) == (40, "kvm-40.example.test", 5940, Sealed("sp1ce&Pw"), "alice")
    assert spice_row(b, res["token"]) == ("spice", 0, 0)
    res = raw_rpc(b).one.vm.novnctoken(sess("alice"), 40, 60, True)
    assert res[0] is True and res[2] == 0, res
    check_token_result(res[1], vm_id=40, ttl=60, single_use=True, protocol="spice")
    r = api_mint(b, 40, "alice")
    assert r.status_code == 201, r.text
    check_token_result(r.json(), vm_id=40, protocol="spice")
    # The VNC VM beside it still says vnc.
    check_token_result(one(b, "alice").vm.novnctoken(41), vm_id=41, protocol="vnc")
    assert "sp1ce&Pw" not in b.log_text()


def test_spice_devices_come_from_template_vncbroker(broker_factory, oned):
    oned.add_vm(42, form="pretty", owner="alice", graphics="SPICE",
                vncbroker={"USB_REDIRECT": "YES", "MICROPHONE": "yes"})
    oned.add_vm(43, form="raw", owner="alice", graphics="SPICE", vncbroker={"MICROPHONE": "yes"},
                user_vncbroker={"USB_REDIRECT": "yes"})
    oned.add_vm(44, form="raw", owner="alice", graphics="SPICE", vncbroker={"USB_REDIRECT": "often"})
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(42)
    assert spice_row(b, res["token"]) == ("spice", 1, 1)
    # The owner's USER_TEMPLATE turns no device on.
    res = one(b, "alice").vm.novnctoken(43)
    assert spice_row(b, res["token"]) == ("spice", 0, 1)
    with pytest.raises(pyone.OneActionException) as ei:
        one(b, "alice").vm.novnctoken(44)
    assert "TEMPLATE/VNCBROKER" in str(ei.value) and "yes, no" in str(ei.value), str(ei.value)


def test_spice_vm_remote_viewer_file(broker_factory, oned):
    oned.add_vm(45, form="raw", owner="alice", graphics="SPICE", port=5945, passwd="vvPw-45",
                hosts=["kvm-45.example.test"], vncbroker={"USB_REDIRECT": "yes"})
    oned.add_vm(46, form="raw", owner="alice", port=5946)
    b = start_on(broker_factory, oned.url)
    r = requests.get(f"{b.api_url}/vms/45/console.vv", params={"single_use": "true", "ttl": 90},
                     auth=("alice", PW["alice"]), timeout=T)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/x-virt-viewer"
    assert r.headers["Content-Disposition"] == 'attachment; filename="vm-45.vv"'
    lines = r.text.splitlines()
    assert lines[0] == "[virt-viewer]", r.text
    keys = dict(line.split("=", 1) for line in lines[1:])
    assert keys["type"] == "spice" and keys["host"] == "vm-45" and keys["port"] == "5900", keys
    assert "password" not in keys and "vvPw-45" not in r.text, r.text
    assert keys["enable-usbredir"] == "1" and keys["delete-this-file"] == "1", keys
    # conftest's public_url is the proxy; the token is its password.
    m = re.fullmatch(r"http://vncbroker:([0-9a-f]{64})@console\.example\.test:8640", keys["proxy"])
    assert m, keys["proxy"]
    token = m.group(1)
    assert token_row(b, token) == (45, "kvm-45.example.test", 5945, Sealed("vvPw-45"), "alice")
    assert spice_row(b, token) == ("spice", 1, 0)
    # A VNC VM gets no file, and no token.
    r = requests.get(f"{b.api_url}/vms/46/console.vv", auth=("alice", PW["alice"]), timeout=T)
    json_error(r, 409, "wrong_protocol")
    assert token_count(b, 46) == 0
    # oned's refusals as for every mint.
    json_error(requests.get(f"{b.api_url}/vms/45/console.vv", auth=("bob", PW["bob"]), timeout=T), 403)
    json_error(requests.get(f"{b.api_url}/vms/45/console.vv", auth=("alice", "nope"), timeout=T), 401)
    assert token not in b.log_text()


@pytest.mark.parametrize("form", ["raw", "pretty", "onedock"])
def test_lower_case_vnc_type_works(broker_factory, oned, form):
    oned.add_vm(5, form=form, owner="alice", graphics="vnc", port=6005, hosts=["wn5"])
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(5)
    check_token_result(res, vm_id=5)
    assert token_row(b, res["token"])[1:3] == ("wn5", 6005)


def test_vm_not_live_is_action_error(broker_factory, oned):
    # Document 03 as it is: STATE 3, LCM_STATE 2 (BOOT).
    oned.add_vm(3, form="onedock", owner="alice", state=None, lcm_state=None, graphics="keep",
                port=None, hosts=None)
    assert "<LCM_STATE>2</LCM_STATE>" in oned.document(3)
    oned.add_vm(8, form="raw", owner="alice", state=8, lcm_state=0)  # POWEROFF
    b = start_on(broker_factory, oned.url)
    for vm in (3, 8):
        with pytest.raises(pyone.OneActionException):
            one(b, "alice").vm.novnctoken(vm)
        res = raw_rpc(b).one.vm.novnctoken(sess("alice"), vm)
        assert res[0] is False and res[2] == E_ACTION and res[1].startswith("[one.vm.novnctoken] "), res
        r = api_mint(b, vm, "alice")
        json_error(r, 409)
        assert token_count(b, vm) == 0


def test_live_states_exactly(broker_factory, oned):
    """STATE 3 with each LCM_STATE 0..69: a token exactly for the live list;
    other STATEs (with a live LCM_STATE) never."""
    oned.add_vm(9, form="raw", owner="alice", port=5909, hosts=["n9"])
    b = start_on(broker_factory, oned.url)
    rpc = raw_rpc(b)
    accepted, refused_with = [], {}
    for lcm in range(0, 70):
        oned.update_vm(9, state=3, lcm_state=lcm)
        res = rpc.one.vm.novnctoken(sess("alice"), 9)
        if res[0] is True:
            accepted.append(lcm)
        else:
            refused_with[lcm] = res[2]
    assert accepted == LIVE_LCM_STATES
    assert set(refused_with.values()) == {E_ACTION}, refused_with
    for state in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11):
        oned.update_vm(9, state=state, lcm_state=3)
        res = rpc.one.vm.novnctoken(sess("alice"), 9)
        assert res[0] is False and res[2] == E_ACTION, (state, res)
    # Each live LCM state through pyone, the way clients call it.
    for lcm in LIVE_LCM_STATES:
        oned.update_vm(9, state=3, lcm_state=lcm)
        assert one(b, "alice").vm.novnctoken(9)["vm_id"] == 9


@pytest.mark.parametrize("form", ["raw", "pretty", "legacy"])
def test_migrated_vm_targets_last_host(broker_factory, oned, form):
    graphics = "keep" if form == "legacy" else "VNC"
    kw = dict(graphics=graphics, port=None) if form == "legacy" else dict(port=5911)
    oned.add_vm(11, form=form, owner="alice", hosts=["old-host.test", "new-host.test"], **kw)
    if form == "legacy":
        # Document 04 has no GRAPHICS: it migrates, but still has no console.
        b = start_on(broker_factory, oned.url)
        with pytest.raises(pyone.OneNoExistsException):
            one(b, "alice").vm.novnctoken(11)
        return
    oned.add_vm(12, form=form, owner="alice", port=5912, hosts=["a.test", "b.test", "c.test"])
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(11)
    assert token_row(b, res["token"])[1:3] == ("new-host.test", 5911)
    res = one(b, "alice").vm.novnctoken(12)
    assert token_row(b, res["token"])[1:3] == ("c.test", 5912)
    # A live migration while the broker runs: the next token follows it.
    oned.migrate(11, "newer-host.test", port=5999)
    res = one(b, "alice").vm.novnctoken(11)
    assert token_row(b, res["token"])[1:3] == ("newer-host.test", 5999)


# ---------------------------------------------------------------------------
# oned down or slow

def test_oned_down_is_internal_error(broker_factory):
    b = start_on(broker_factory, closed_endpoint(), timeout_ms=1000)
    t0 = time.monotonic()
    with pytest.raises(pyone.OneInternalException):
        one(b, "alice").vm.novnctoken(7)
    assert time.monotonic() - t0 < 3.0
    t0 = time.monotonic()
    res = raw_rpc(b).one.vm.novnctoken(sess("alice"), 7)
    assert time.monotonic() - t0 < 3.0
    assert res[0] is False and res[2] == E_INTERNAL and res[1].startswith("[one.vm.novnctoken] "), res
    t0 = time.monotonic()
    json_error(api_mint(b, 7, "alice"), 503)
    json_error(requests.get(f"{b.api_url}/sessions", auth=("alice", PW["alice"]), timeout=T), 503)
    assert time.monotonic() - t0 < 6.0
    b.assert_alive()


def test_oned_slow_times_out_and_broker_keeps_working(broker_factory, oned):
    oned.add_vm(7, form="raw", owner="alice", port=5907, delay=3.0)
    oned.add_vm(8, form="raw", owner="alice", port=5908, hosts=["fast-host"])
    b = start_on(broker_factory, oned.url, timeout_ms=1000)
    t0 = time.monotonic()
    with pytest.raises(pyone.OneInternalException):
        one(b, "alice").vm.novnctoken(7)
    elapsed = time.monotonic() - t0
    assert 0.8 <= elapsed < 2.5, f"answered after {elapsed:.2f}s with timeout_ms 1000"
    assert token_count(b, 7) == 0
    # The broker still works, while the slow call is still pending in oned.
    t0 = time.monotonic()
    res = one(b, "alice").vm.novnctoken(8)
    assert time.monotonic() - t0 < 1.5
    assert token_row(b, res["token"])[1:3] == ("fast-host", 5908)
    # The JSON API says 503 for the same timeout.
    t0 = time.monotonic()
    json_error(api_mint(b, 7, "alice"), 503)
    assert time.monotonic() - t0 < 2.5
    b.assert_alive()


# ---------------------------------------------------------------------------
# JSON API with HTTP Basic auth

def test_json_api_statuses(broker_factory, oned):
    oned.add_vm(7, form="pretty", owner="alice", port=5907, hosts=["h7"])
    oned.add_vm(8, form="raw", owner="alice", state=3, lcm_state=1)   # PROLOG
    oned.add_vm(9, form="raw", owner="alice", graphics="SDL")
    b = start_on(broker_factory, oned.url)

    r = api_mint(b, 7, "alice", ttl=120, single_use=True)
    assert r.status_code == 201, r.text
    check_token_result(r.json(), vm_id=7, ttl=120, single_use=True)
    assert token_row(b, r.json()["token"])[1:3] == ("h7", 5907)
    assert oned.calls_of("one.vm.info")[-1].params[:2] == (sess("alice"), 7)

    r = api_mint(b, 7, "alice", "wrong-password")
    json_error(r, 401)
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("basic"), r.headers
    r = requests.post(f"{b.api_url}/vms/7/console-tokens", timeout=T)
    json_error(r, 401)
    assert "WWW-Authenticate" in r.headers
    json_error(api_mint(b, 7, "bob"), 403)
    json_error(api_mint(b, 999, "alice"), 404)
    json_error(api_mint(b, 9, "alice"), 404)
    json_error(api_mint(b, 8, "alice"), 409)
    assert token_count(b, 8) == 0 and token_count(b, 9) == 0


def test_json_api_503_when_oned_down(broker_factory):
    b = start_on(broker_factory, closed_endpoint())
    err = json_error(api_mint(b, 7, "alice"), 503)
    assert PW["alice"] not in err["message"]


def test_sessions_list_uses_user_info(broker_factory, oned):
    b = start_on(broker_factory, oned.url)
    for user in ("oneadmin", "alice"):
        r = requests.get(f"{b.api_url}/sessions", auth=(user, PW[user]), timeout=T)
        assert r.status_code == 200, r.text
        assert r.json() == {"sessions": []}
        assert oned.calls_of("one.user.info")[-1].params == (sess(user), -1)
    r = requests.get(f"{b.api_url}/sessions", auth=("alice", "wrong-password"), timeout=T)
    json_error(r, 401)
    assert "WWW-Authenticate" in r.headers
    json_error(requests.get(f"{b.api_url}/sessions", auth=("mallory", "x"), timeout=T), 401)


# ---------------------------------------------------------------------------
# End to end through the proxy, with a real VNC server

def rfb_client_handshake(ws: WsClient) -> tuple[int, int, bytes]:
    """The browser's side of RFB 3.8 after the proxy answered the VNC password:
    it must be offered only security type None. Returns (width, height, name)."""
    assert ws.recv_exact(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    n = ws.recv_exact(1)[0]
    assert n > 0, f"server refused: {ws.recv_exact(struct.unpack('>I', ws.recv_exact(4))[0])!r}"
    assert list(ws.recv_exact(n)) == [1], "the browser must be offered exactly [None]"
    ws.send(b"\x01")
    assert ws.recv_exact(4) == b"\x00\x00\x00\x00", "SecurityResult must be OK"
    ws.send(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", ws.recv_exact(4))
    ws.recv_exact(16)  # pixel format
    name = ws.recv_exact(struct.unpack(">I", ws.recv_exact(4))[0])
    return width, height, name


def wait_sessions(b, user: str, pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        rows = requests.get(f"{b.api_url}/sessions", auth=(user, PW[user]), timeout=T).json()["sessions"]
        if pred(rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def test_end_to_end_with_xvnc(broker_factory, oned, xvnc):
    oned.add_vm(30, form="raw", owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = start_on(broker_factory, oned.url)
    res = one(b, "alice").vm.novnctoken(30)
    assert token_row(b, res["token"]) == (30, "127.0.0.1", xvnc.port, Sealed(VNC_PW), "alice")

    ws = WsClient(b.port, "/" + res["path"])
    assert ws.status == 101, ws.head
    width, height, _ = rfb_client_handshake(ws)
    assert (width, height) == (640, 480)
    ws.close()

    # oneadmin (group 0) sees alice's session, bob sees none, alice hers.
    rows = wait_sessions(b, "oneadmin", lambda rows: rows and rows[0]["ended_at"] is not None)
    assert [(r["vm_id"], r["user"]) for r in rows] == [(30, "alice")]
    assert [r["vm_id"] for r in wait_sessions(b, "alice", lambda rows: True)] == [30]
    assert wait_sessions(b, "bob", lambda rows: True) == []

    log = b.log_text()
    assert VNC_PW not in log, "the VNC password leaked into the log"
    assert PW["alice"] not in log and PW["oneadmin"] not in log
    assert res["token"] not in log


def test_invalid_token_closes_4401(broker_factory, oned):
    b = start_on(broker_factory, oned.url)
    for tok in ("x" * 43, "nonsense"):
        ws = WsClient(b.port, f"/websockify?token={tok}")
        assert ws.status == 101
        code, _ = ws.wait_close(stop_on_data=True)
        assert code == 4401, code


def test_connect_time_revalidation(broker_factory, oned, xvnc):
    """With service_session set, the proxy re-reads the VM from oned (as the
    service account) when a token is redeemed, and refuses with 4409 if the
    VM's host, port or console type changed since minting; 4503 if oned cannot be asked."""
    oned.add_vm(30, form="pretty", owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = start_on(broker_factory, oned.url, service_session=sess("oneadmin"))
    alice = one(b, "alice")

    # Unchanged: the token works, and oned was asked as the service account.
    tok1 = alice.vm.novnctoken(30)
    n = len(oned.calls_of("one.vm.info"))
    ws = WsClient(b.port, "/" + tok1["path"])
    assert rfb_client_handshake(ws)[:2] == (640, 480)
    ws.close()
    at_connect = oned.calls_of("one.vm.info")[n:]
    assert [c.params[:2] for c in at_connect] == [(sess("oneadmin"), 30)]

    # Migrated to another host (same port): the old token is refused.
    tok2 = alice.vm.novnctoken(30)
    oned.migrate(30, "localhost")
    ws = WsClient(b.port, "/" + tok2["path"])
    code, reason = ws.wait_close(stop_on_data=True)
    assert code == 4409 and reason.startswith("console unavailable: the VM moved since this link was made"), \
        (code, reason)
    assert ws.data == b"", "no VNC bytes may pass for a moved VM"
    # A fresh token follows the VM and works.
    tok3 = alice.vm.novnctoken(30)
    assert token_row(b, tok3["token"])[1:3] == ("localhost", xvnc.port)
    ws = WsClient(b.port, "/" + tok3["path"])
    assert rfb_client_handshake(ws)[:2] == (640, 480)
    ws.close()

    # The console became SPICE on the same port: a VNC token is refused,
    # and no VNC bytes go to a server that speaks something else.
    oned.update_vm(30, graphics="SPICE")
    ws = WsClient(b.port, "/" + tok3["path"])
    assert ws.wait_close(stop_on_data=True)[0] == 4409
    assert ws.data == b""
    oned.update_vm(30, graphics="VNC")

    # The port changed: refused again.
    oned.update_vm(30, port=free_port())
    ws = WsClient(b.port, "/" + tok3["path"])
    assert ws.wait_close(stop_on_data=True)[0] == 4409

    # oned cannot be asked at connect time: 4503.
    oned.update_vm(30, port=xvnc.port)
    tok4 = alice.vm.novnctoken(30)
    oned.close()
    ws = WsClient(b.port, "/" + tok4["path"])
    assert ws.wait_close(stop_on_data=True)[0] == 4503
    b.assert_alive()
    log = b.log_text()
    assert PW["oneadmin"] not in log and VNC_PW not in log


def test_without_service_session_no_revalidation(broker_factory, oned, xvnc):
    """Without service_session the proxy cannot re-read the VM (it has no
    session of its own), so a token minted before a migration still goes to
    the target fixed at mint time: here the old host:port, where Xvnc still
    listens, so the session succeeds; and oned is not asked at connect time."""
    oned.add_vm(30, form="raw", owner="alice", port=xvnc.port, passwd=VNC_PW, hosts=["127.0.0.1"])
    b = start_on(broker_factory, oned.url)
    tok = one(b, "alice").vm.novnctoken(30)
    oned.migrate(30, "elsewhere.test", port=free_port())
    n = len(oned.calls)
    ws = WsClient(b.port, "/" + tok["path"])
    assert rfb_client_handshake(ws)[:2] == (640, 480)
    ws.close()
    assert oned.calls[n:] == [], "no oned call expected at connect time without service_session"
