"""one.vm.novnctoken / one.vm.token / one.vm.novnctokenrevoke through pyone,
the official OpenNebula Python bindings."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import time

import pyone
import pytest
import requests

from conftest import (
    DEFAULT_TTL,
    MAX_TTL,
    PASSWORDS,
    SEEN_TOKENS,
    VNC_PASSWORD_VM9,
    check_token_result,
    record_token,
    token_policy,
)


def one(broker, user, password=None):
    pw = PASSWORDS[user] if password is None else password
    return pyone.OneServer(broker.rpc_url, session=f"{user}:{pw}")


def mint(server, *args):
    return record_token(server.vm.novnctoken(*args))


def test_novnctoken_fields_and_types(broker):
    res = mint(one(broker, "alice"), 7)
    check_token_result(res, vm_id=7, ttl=DEFAULT_TTL, single_use=False)


def test_novnctoken_ttl_and_single_use(broker):
    res = mint(one(broker, "alice"), 7, 60, True)
    check_token_result(res, vm_id=7, ttl=60, single_use=True)


def test_novnctoken_explicit_single_use_false(broker):
    res = mint(one(broker, "alice"), 7, 120, False)
    check_token_result(res, vm_id=7, ttl=120, single_use=False)


def test_novnctoken_ttl_only(broker):
    res = mint(one(broker, "alice"), 7, 90)
    check_token_result(res, vm_id=7, ttl=90, single_use=False)


def test_novnctoken_view_only(broker):
    # pyone passes the fifth boolean through unchanged; ttl 0 means the default.
    res = mint(one(broker, "alice"), 7, 0, False, True)
    check_token_result(res, vm_id=7, ttl=DEFAULT_TTL, single_use=False, view_only=True)
    assert res["url"].endswith("&view_only=1"), res["url"]
    # VM 7 has no settings of its own: the config's defaults, plus view-only.
    assert token_policy(broker.db_path, res["token"]) == {
        "view_only": 1, "exclusive": 0, "clipboard": "both", "record": 0}


def test_novnctoken_view_only_false(broker):
    res = mint(one(broker, "alice"), 7, 60, True, False)
    check_token_result(res, vm_id=7, ttl=60, single_use=True, view_only=False)
    assert token_policy(broker.db_path, res["token"])["view_only"] == 0


def test_novnctoken_without_view_only_is_not_view_only(broker):
    res = mint(one(broker, "alice"), 7, 60, True)
    check_token_result(res, vm_id=7, ttl=60, single_use=True)
    assert token_policy(broker.db_path, res["token"])["view_only"] == 0


def test_novnctoken_view_only_not_a_boolean(broker):
    with pytest.raises(pyone.OneApiException) as ei:
        one(broker, "alice").vm.novnctoken(7, 0, False, "yes")
    assert str(ei.value) == "[one.vm.novnctoken] Parameter 5 (view_only) must be a boolean, got string", \
        str(ei.value)


def test_novnctoken_six_parameters(broker):
    with pytest.raises(pyone.OneApiException) as ei:
        one(broker, "alice").vm.novnctoken(7, 0, False, True, True)
    assert str(ei.value) == "[one.vm.novnctoken] Wrong number of parameters: expected 2 to 5, got 6", \
        str(ei.value)


def test_allowed_user_can_mint(broker):
    res = mint(one(broker, "bob"), 7)
    check_token_result(res, vm_id=7)


def test_owner_with_vnc_password_vm(broker):
    res = mint(one(broker, "bob"), 9)
    check_token_result(res, vm_id=9)
    # The VNC password is never part of the answer.
    assert VNC_PASSWORD_VM9 not in repr(res)


def test_not_allowed_user_is_refused(broker):
    with pytest.raises(pyone.OneAuthorizationException) as ei:
        one(broker, "carol").vm.novnctoken(7)
    assert str(ei.value).startswith("[one.vm.novnctoken]"), str(ei.value)


def test_allow_list_is_not_transitive(broker):
    # bob is allowed on 7 (alice's), but not on 8 (carol's).
    with pytest.raises(pyone.OneAuthorizationException):
        one(broker, "bob").vm.novnctoken(8)


def test_admin_can_mint_for_any_vm(broker):
    res = mint(one(broker, "root"), 8)
    check_token_result(res, vm_id=8)


def test_wrong_password(broker):
    with pytest.raises(pyone.OneAuthenticationException) as ei:
        one(broker, "alice", "not-the-password").vm.novnctoken(7)
    assert str(ei.value).startswith("[one.vm.novnctoken]"), str(ei.value)


def test_unknown_user(broker):
    with pytest.raises(pyone.OneAuthenticationException):
        one(broker, "mallory", "whatever").vm.novnctoken(7)


def test_empty_password(broker):
    with pytest.raises(pyone.OneAuthenticationException):
        one(broker, "alice", "").vm.novnctoken(7)


def test_no_such_vm(broker):
    with pytest.raises(pyone.OneNoExistsException) as ei:
        one(broker, "alice").vm.novnctoken(999)
    assert str(ei.value).startswith("[one.vm.novnctoken]"), str(ei.value)


def test_no_such_vm_for_admin(broker):
    with pytest.raises(pyone.OneNoExistsException):
        one(broker, "root").vm.novnctoken(999)


def test_removed_vm_does_not_exist(broker):
    # VM 50 was added then removed with `vm rm` before the server started.
    with pytest.raises(pyone.OneNoExistsException):
        one(broker, "alice").vm.novnctoken(50)


@pytest.mark.parametrize("ttl", [0, -5])
def test_non_positive_ttl_means_default(broker, ttl):
    res = mint(one(broker, "alice"), 7, ttl)
    check_token_result(res, vm_id=7, ttl=DEFAULT_TTL)


def test_ttl_equal_to_max_is_accepted(broker):
    res = mint(one(broker, "alice"), 7, MAX_TTL)
    check_token_result(res, vm_id=7, ttl=MAX_TTL)


@pytest.mark.parametrize("ttl", [MAX_TTL + 1, 10**6])
def test_ttl_above_max_is_bad_parameter(broker, ttl):
    with pytest.raises(pyone.OneApiException) as ei:
        one(broker, "alice").vm.novnctoken(7, ttl)
    assert str(ei.value).startswith("[one.vm.novnctoken]"), str(ei.value)


def test_two_mints_give_different_tokens(broker):
    s = one(broker, "alice")
    a = mint(s, 7)
    b = mint(s, 7)
    assert a["token"] != b["token"]


def test_alias_one_vm_token(broker):
    res = record_token(one(broker, "alice").vm.token(7))
    check_token_result(res, vm_id=7)


def test_alias_one_vm_token_with_args(broker):
    res = record_token(one(broker, "alice").vm.token(7, 30, True))
    check_token_result(res, vm_id=7, ttl=30, single_use=True)


def test_revoke_counts_live_tokens(broker):
    s = one(broker, "alice")
    # VM 12 has never had a token.
    tokens = {mint(s, 12)["token"] for _ in range(3)}
    assert len(tokens) == 3
    assert s.vm.novnctokenrevoke(12) == 3
    assert s.vm.novnctokenrevoke(12) == 0
    # New tokens can be minted after a revoke and are counted again.
    mint(s, 12)
    assert s.vm.novnctokenrevoke(12) == 1


def test_revoke_result_is_int(broker):
    n = one(broker, "alice").vm.novnctokenrevoke(7)
    assert isinstance(n, int) and not isinstance(n, bool) and n >= 0


def test_revoke_not_allowed(broker):
    with pytest.raises(pyone.OneAuthorizationException) as ei:
        one(broker, "carol").vm.novnctokenrevoke(7)
    assert str(ei.value).startswith("[one.vm.novnctokenrevoke]"), str(ei.value)


def test_revoke_wrong_password(broker):
    with pytest.raises(pyone.OneAuthenticationException):
        one(broker, "alice", "nope").vm.novnctokenrevoke(7)


def test_revoke_no_such_vm(broker):
    with pytest.raises(pyone.OneNoExistsException):
        one(broker, "alice").vm.novnctokenrevoke(999)


def test_admin_can_revoke(broker):
    s = one(broker, "root")
    mint(s, 8)
    assert s.vm.novnctokenrevoke(8) >= 1


# --- secrets ---------------------------------------------------------------

LEAK_WRONG_PASSWORD = "wrong-Pw-LeakCheck-91"


def test_secrets_not_in_server_log(broker):
    """After a run of mints (this test's and every earlier test's), the server's
    stderr contains neither a minted token nor any password."""
    for user, vm in (("alice", 7), ("bob", 7), ("bob", 9), ("root", 8), ("carol", 8)):
        mint(one(broker, user), vm)
        mint(one(broker, user), vm, 60, True)
        record_token(one(broker, user).vm.token(vm))
    for user, vm in (("alice", 7), ("carol", 8)):
        r = requests.post(f"{broker.api_url}/vms/{vm}/console-tokens",
                          auth=(user, PASSWORDS[user]), json={"ttl": 60}, timeout=10)
        assert r.status_code == 201, r.text
        record_token(r.json())
    # Failed logins must not log the attempted password either.
    with pytest.raises(pyone.OneAuthenticationException):
        one(broker, "alice", LEAK_WRONG_PASSWORD).vm.novnctoken(7)
    r = requests.post(f"{broker.api_url}/vms/7/console-tokens",
                      auth=("alice", LEAK_WRONG_PASSWORD), timeout=10)
    assert r.status_code == 401

    time.sleep(0.3)  # let the server flush its log lines
    log = broker.log_text()
    assert SEEN_TOKENS, "no tokens were minted"
    leaked_tokens = [t for t in set(SEEN_TOKENS) if t in log]
    assert not leaked_tokens, f"{len(leaked_tokens)} minted token(s) found in the server log, e.g. {leaked_tokens[0]}"

    secrets = dict(PASSWORDS)
    secrets["vnc password of VM 9"] = VNC_PASSWORD_VM9
    secrets["wrong password"] = LEAK_WRONG_PASSWORD
    for user in PASSWORDS:
        secrets[f"basic auth header of {user}"] = base64.b64encode(
            f"{user}:{PASSWORDS[user]}".encode()).decode()
    secrets["basic auth header of wrong password"] = base64.b64encode(
        f"alice:{LEAK_WRONG_PASSWORD}".encode()).decode()
    leaked = [name for name, value in secrets.items() if value in log]
    assert not leaked, f"secrets found in the server log: {leaked}"


# --- persistence -----------------------------------------------------------

def _db_files(db_path):
    return [p for p in (db_path, db_path.with_name(db_path.name + "-wal"),
                        db_path.with_name(db_path.name + "-shm")) if p.exists()]


def test_tokens_persist_across_restart_hashed_only(broker_factory):
    env = broker_factory.env(relative_db=True)  # sqlite://vncbroker.db relative to the cwd
    env.add_user("alice", PASSWORDS["alice"])
    env.add_vm(7, "alice", 5907)
    assert env.db_path.exists(), f"relative database URL {env.db_url} did not create {env.db_path}"

    first = broker_factory.start(env, log_name="first.log")
    s = pyone.OneServer(first.rpc_url, session=f"alice:{PASSWORDS['alice']}")
    res = record_token(s.vm.novnctoken(7))
    check_token_result(res, vm_id=7)
    token = res["token"]

    # SIGTERM stops the server (on its own, without needing SIGKILL).
    first.proc.terminate()
    try:
        first.proc.wait(timeout=10)
    except Exception:
        pytest.fail("server did not exit within 10 s of SIGTERM")
    # `serve` prints exactly one line on stdout (logs go to stderr).
    time.sleep(0.1)
    assert "".join(first.stdout_lines).strip() == "", f"extra stdout from serve: {first.stdout_lines!r}"

    second = broker_factory.start(env, log_name="second.log")
    second.assert_alive()

    raw = base64.urlsafe_b64decode(token + "=")
    with sqlite3.connect(f"file:{env.db_path}?mode=ro", uri=True, timeout=5) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM tokens").fetchone()
        assert count == 1, f"expected exactly the one minted token in `tokens`, found {count} rows"
        cols = [r[1] for r in conn.execute("PRAGMA table_info(tokens)")]
        assert "token_hash" in cols, f"tokens columns: {cols}"
        hashes = [r[0] for r in conn.execute("SELECT token_hash FROM tokens")]
    conn.close()
    for h in hashes:
        assert isinstance(h, bytes) and len(h) == 32, f"token_hash is not a 32-byte blob: {h!r}"
    assert hashlib.sha256(token.encode()).digest() in hashes, "no row with token_hash = sha256(token)"

    forms = {
        "token text": token.encode(),
        "standard base64 of token bytes": base64.b64encode(raw).rstrip(b"="),
        "hex of token bytes": raw.hex().encode(),
        "raw token bytes": raw,
    }
    for path in _db_files(env.db_path):
        data = path.read_bytes()
        for what, needle in forms.items():
            assert needle not in data, f"{what} found in {path.name}"

    # The token survived the restart as a live token.
    s2 = pyone.OneServer(second.rpc_url, session=f"alice:{PASSWORDS['alice']}")
    assert s2.vm.novnctokenrevoke(7) == 1
