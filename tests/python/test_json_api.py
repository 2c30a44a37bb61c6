"""JSON API at /api/v1 (HTTP Basic auth) and the CLI's JSON output."""

from __future__ import annotations

import json
import re

import pytest
import requests

from conftest import (
    DEFAULT_TTL,
    MAX_BODY_BYTES,
    MAX_TTL,
    basic,
    check_token_result,
    record_token,
    token_policy,
)

T = 10  # request timeout


def url(broker, vm_id) -> str:
    return f"{broker.api_url}/vms/{vm_id}/console-tokens"


def assert_json_error(r: requests.Response, status: int):
    assert r.status_code == status, f"status {r.status_code} != {status}: {r.text[:500]}"
    try:
        body = r.json()
    except ValueError:
        pytest.fail(f"error body is not JSON: {r.headers.get('Content-Type')} {r.text[:500]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    return err


def test_mint_201_with_fields(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), json={}, timeout=T)
    assert r.status_code == 201, r.text
    assert r.headers.get("Content-Type", "").startswith("application/json")
    check_token_result(record_token(r.json()), vm_id=7, ttl=DEFAULT_TTL, single_use=False)


def test_mint_with_ttl_and_single_use(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), json={"ttl": 120, "single_use": True}, timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7, ttl=120, single_use=True)


def test_mint_with_only_single_use(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), json={"single_use": True}, timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7, ttl=DEFAULT_TTL, single_use=True)


@pytest.mark.parametrize("view_only", [True, False, None], ids=["true", "false", "absent"])
def test_mint_view_only(broker, view_only):
    body = {"ttl": 120} if view_only is None else {"ttl": 120, "view_only": view_only}
    r = requests.post(url(broker, 7), auth=basic("alice"), json=body, timeout=T)
    assert r.status_code == 201, r.text
    res = record_token(r.json())
    check_token_result(res, vm_id=7, ttl=120, view_only=bool(view_only))
    assert token_policy(broker.db_path, res["token"])["view_only"] == (1 if view_only else 0)


@pytest.mark.parametrize("value,shown", [("yes", 'string "yes"'), (1, "integer `1`")], ids=["string", "int"])
def test_mint_view_only_not_a_boolean_400(broker, value, shown):
    r = requests.post(url(broker, 7), auth=basic("alice"), json={"view_only": value}, timeout=T)
    err = assert_json_error(r, 400)
    assert err["code"] == "bad_request", err
    # The message says what was wrong: the value given and that a boolean was expected.
    assert err["message"].startswith("invalid JSON body: "), err
    assert shown in err["message"] and "expected a boolean" in err["message"], err


def test_mint_without_body(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7, ttl=DEFAULT_TTL)


def test_mint_empty_body_with_json_content_type(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), data=b"",
                      headers={"Content-Type": "application/json"}, timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7, ttl=DEFAULT_TTL)


@pytest.mark.parametrize("ttl", [0, -5])
def test_non_positive_ttl_means_default(broker, ttl):
    r = requests.post(url(broker, 7), auth=basic("alice"), json={"ttl": ttl}, timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7, ttl=DEFAULT_TTL)


def test_allowed_user_and_admin(broker):
    r = requests.post(url(broker, 7), auth=basic("bob"), timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7)
    r = requests.post(url(broker, 8), auth=basic("root"), timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=8)


def test_invalid_json_400(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), data=b'{"ttl": ',
                      headers={"Content-Type": "application/json"}, timeout=T)
    assert_json_error(r, 400)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"ttl": "60"}, id="ttl-string"),
        pytest.param({"ttl": 1.5}, id="ttl-float"),
        pytest.param({"single_use": "yes"}, id="single_use-string"),
        pytest.param([60], id="array-body"),
        pytest.param({"ttl": MAX_TTL + 1}, id="ttl-above-max"),
        pytest.param({"ttl": 10**6}, id="ttl-huge"),
        pytest.param({"ttl": 2**70}, id="ttl-overflow"),
    ],
)
def test_bad_body_400(broker, body):
    r = requests.post(url(broker, 7), auth=basic("alice"), json=body, timeout=T)
    assert_json_error(r, 400)


def test_ttl_equal_to_max_accepted(broker):
    r = requests.post(url(broker, 7), auth=basic("alice"), json={"ttl": MAX_TTL}, timeout=T)
    assert r.status_code == 201, r.text
    check_token_result(record_token(r.json()), vm_id=7, ttl=MAX_TTL)


def test_unknown_vm_404(broker):
    r = requests.post(url(broker, 999), auth=basic("alice"), timeout=T)
    assert_json_error(r, 404)


def test_removed_vm_404(broker):
    r = requests.post(url(broker, 50), auth=basic("alice"), timeout=T)
    assert_json_error(r, 404)


def test_no_auth_401(broker):
    r = requests.post(url(broker, 7), timeout=T)
    assert_json_error(r, 401)
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("basic"), r.headers


def test_wrong_password_401(broker):
    r = requests.post(url(broker, 7), auth=basic("alice", "wrong"), timeout=T)
    assert_json_error(r, 401)
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("basic"), r.headers


def test_unknown_user_401(broker):
    r = requests.post(url(broker, 7), auth=("mallory", "x"), timeout=T)
    assert_json_error(r, 401)


@pytest.mark.parametrize(
    "header",
    ["Basic !!!notbase64!!!", "Bearer abc", "Basic " + "YWxpY2U=", "Basic"],  # YWxpY2U= is 'alice' (no colon)
)
def test_malformed_authorization_401(broker, header):
    r = requests.post(url(broker, 7), headers={"Authorization": header}, timeout=T)
    assert_json_error(r, 401)


def test_not_allowed_403(broker):
    r = requests.post(url(broker, 7), auth=basic("carol"), timeout=T)
    assert_json_error(r, 403)


def test_delete_revokes(broker):
    for _ in range(2):
        r = requests.post(url(broker, 11), auth=basic("alice"), timeout=T)
        assert r.status_code == 201, r.text
        record_token(r.json())
    r = requests.delete(url(broker, 11), auth=basic("alice"), timeout=T)
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": 2, "sessions_ended": 0}
    r = requests.delete(url(broker, 11), auth=basic("alice"), timeout=T)
    assert r.status_code == 200, r.text
    assert r.json() == {"revoked": 0, "sessions_ended": 0}


def test_delete_errors(broker):
    assert_json_error(requests.delete(url(broker, 7), auth=basic("carol"), timeout=T), 403)
    assert_json_error(requests.delete(url(broker, 999), auth=basic("alice"), timeout=T), 404)
    r = requests.delete(url(broker, 7), timeout=T)
    assert_json_error(r, 401)
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("basic")


def test_body_too_large_413(broker):
    body = b'{"ttl": 60, "pad": "' + b"x" * (MAX_BODY_BYTES + 1024) + b'"}'
    try:
        r = requests.post(url(broker, 7), auth=basic("alice"), data=body,
                          headers={"Content-Type": "application/json"}, timeout=T)
    except requests.ConnectionError as e:
        pytest.fail(f"connection dropped instead of a 413 answer: {e}")
    assert_json_error(r, 413)
    broker.assert_healthy()


def test_openapi_document(broker):
    r = requests.get(f"{broker.api_url}/openapi.json", timeout=T)
    assert r.status_code == 200, r.text[:300]
    assert r.headers.get("Content-Type", "").startswith("application/json")
    doc = r.json()
    assert isinstance(doc.get("openapi"), str) and doc["openapi"].startswith("3."), doc.get("openapi")
    assert isinstance(doc.get("paths"), dict)
    path = doc["paths"].get("/api/v1/vms/{id}/console-tokens")
    assert isinstance(path, dict), sorted(doc["paths"])
    assert {"post", "delete"} <= set(path), sorted(path)


# --- CLI --------------------------------------------------------------------

def test_cli_lists(broker):
    users = broker.cli_outputs["user_list"]
    for name in ("root", "alice", "bob", "carol"):
        assert re.search(rf"\b{name}\b", users), f"{name} missing from `user list`:\n{users}"
    vms = broker.cli_outputs["vm_list"]
    for vm in ("7", "8", "9"):
        assert re.search(rf"\b{vm}\b", vms), f"VM {vm} missing from `vm list`:\n{vms}"
    assert not re.search(r"\b50\b", vms), f"removed VM 50 still in `vm list`:\n{vms}"


def vm_row(env, vm_id: int) -> dict:
    """A VM's row of `vm list`, by column name (ALLOWED may be empty)."""
    lines = env.cli("vm", "list").stdout.splitlines()
    head = lines[0].split()
    row = next(line.split() for line in lines[1:] if line.split()[0] == str(vm_id))
    return dict(zip(head, row))


def test_cli_protocol_and_spice_devices(broker_factory):
    env = broker_factory.env()
    env.add_user("alice", "alice-pw")
    env.cli("vm", "add", "60", "--host", "h", "--port", "5960", "--owner", "alice",
            "--protocol", "SPICE", "--usb-redirect", "yes")
    env.add_vm(61, "alice", 5961)
    assert (vm_row(env, 60)["PROTOCOL"], vm_row(env, 60)["USB"], vm_row(env, 60)["MIC"]) == \
        ("spice", "yes", "default")
    assert vm_row(env, 61)["PROTOCOL"] == "vnc"
    # `vm set` keeps the protocol unless told, and `default` unsets a device.
    env.cli("vm", "set", "60", "--microphone", "no", "--usb-redirect", "default")
    row = vm_row(env, 60)
    assert (row["PROTOCOL"], row["USB"], row["MIC"]) == ("spice", "default", "no"), row
    env.cli("vm", "set", "61", "--protocol", "spice")
    assert vm_row(env, 61)["PROTOCOL"] == "spice"
    for args, words in [
        (("--protocol", "rdp"), ("--protocol", "vnc, spice")),
        (("--usb-redirect", "maybe"), ("--usb-redirect", "yes, no", "default")),
        (("--microphone", ""), ("--microphone",)),
    ]:
        p = env.cli("vm", "set", "60", *args, check=False)
        assert p.returncode != 0 and all(w in p.stderr for w in words), (args, p.stderr)
    # A VNC VM has no USB or microphone channel: said, not refused.
    p = env.cli("vm", "add", "62", "--host", "h", "--port", "5962", "--owner", "alice", "--microphone", "yes")
    assert "SPICE channels" in p.stderr, p.stderr
    # The mint answer and the remote-viewer file.
    res = json.loads(env.cli("token", "mint", "60").stdout)
    check_token_result(res, vm_id=60, protocol="spice")
    vv = env.cli("token", "mint", "60", "--vv").stdout
    assert vv.startswith("[virt-viewer]\n") and "\ntype=spice\n" in vv and "password" not in vv, vv
    assert re.search(r"\nproxy=http://[0-9a-f]{64}@console\.example\.test:8640\n", vv), vv
    p = env.cli("token", "mint", "62", "--vv", check=False)
    assert p.returncode != 0 and "remote-viewer files are for SPICE consoles" in p.stderr, p.stderr


def test_cli_token_mint_json(broker):
    p = broker.env.cli("token", "mint", "7")
    res = json.loads(p.stdout)
    check_token_result(record_token(res), vm_id=7, ttl=DEFAULT_TTL, single_use=False)

    p = broker.env.cli("token", "mint", "9", "--ttl", "120", "--single-use")
    res = json.loads(p.stdout)
    check_token_result(record_token(res), vm_id=9, ttl=120, single_use=True)

    p = broker.env.cli("token", "mint", "9", "--view-only")
    res = json.loads(p.stdout)
    check_token_result(record_token(res), vm_id=9, ttl=DEFAULT_TTL, view_only=True)
    assert token_policy(broker.db_path, res["token"])["view_only"] == 1


def test_cli_token_mint_errors(broker):
    assert broker.env.cli("token", "mint", "999", check=False).returncode != 0
    assert broker.env.cli("token", "mint", "7", "--ttl", str(10**6), check=False).returncode != 0


def test_cli_token_counts_as_live_token(broker):
    # A token minted by the CLI lands in the same database the server uses.
    requests.delete(url(broker, 11), auth=basic("alice"), timeout=T)
    record_token(json.loads(broker.env.cli("token", "mint", "11").stdout))
    r = requests.delete(url(broker, 11), auth=basic("alice"), timeout=T)
    assert r.status_code == 200 and r.json() == {"revoked": 1, "sessions_ended": 0}, r.text
