"""The XML-RPC endpoint with the standard library client only (no pyone):
checks the raw oned-style response arrays."""

from __future__ import annotations

import time
import xmlrpc.client

import pytest
import requests

from conftest import (
    DEFAULT_TTL,
    E_API,
    E_AUTHENTICATION,
    E_AUTHORIZATION,
    E_NO_EXISTS,
    check_token_result,
    record_token,
    session,
)


def assert_error(res, method: str, code: int):
    """oned error array: [False, "[method] message", code, ...]."""
    assert isinstance(res, list), f"expected an array, got {res!r}"
    assert len(res) >= 3, res
    assert res[0] is False, res
    assert isinstance(res[1], str), res
    assert res[1].startswith(f"[{method}] "), f"message should start with '[{method}] ': {res[1]!r}"
    assert len(res[1]) > len(method) + 3, f"empty error message: {res[1]!r}"
    assert isinstance(res[2], int) and not isinstance(res[2], bool), res
    assert res[2] == code, f"code {res[2]:#06x} != expected {code:#06x}: {res[1]!r}"


def assert_fault_or_api_error(call, method: str):
    try:
        res = call()
    except xmlrpc.client.Fault:
        return
    assert_error(res, method, E_API)


def test_success_array(broker):
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), 7)
    assert isinstance(res, list) and len(res) == 3, res
    assert res[0] is True
    assert res[2] == 0 and isinstance(res[2], int) and not isinstance(res[2], bool)
    check_token_result(record_token(res[1]), vm_id=7, ttl=DEFAULT_TTL, single_use=False)


def test_success_with_ttl_and_single_use(broker):
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), 7, 45, True)
    assert res[0] is True, res
    check_token_result(record_token(res[1]), vm_id=7, ttl=45, single_use=True)


def test_alias_success_array(broker):
    res = broker.xmlrpc().one.vm.token(session("bob"), 7)
    assert res[0] is True and res[2] == 0, res
    check_token_result(record_token(res[1]), vm_id=7)


def test_response_is_xml(broker):
    body = xmlrpc.client.dumps((session("alice"), 7), "one.vm.novnctoken").encode()
    r = requests.post(broker.rpc_url, data=body, headers={"Content-Type": "text/xml"}, timeout=10)
    assert r.status_code == 200
    assert r.headers.get("Content-Type", "").split(";")[0].strip() in ("text/xml", "application/xml")
    (res,), method = xmlrpc.client.loads(r.content)
    assert method is None and res[0] is True
    record_token(res[1])


def test_wrong_password_code(broker):
    res = broker.xmlrpc().one.vm.novnctoken(session("alice", "wrong"), 7)
    assert_error(res, "one.vm.novnctoken", E_AUTHENTICATION)


def test_unknown_user_code(broker):
    res = broker.xmlrpc().one.vm.novnctoken("nobody:x", 7)
    assert_error(res, "one.vm.novnctoken", E_AUTHENTICATION)


def test_session_without_colon(broker):
    res = broker.xmlrpc().one.vm.novnctoken("alice", 7)
    assert_error(res, "one.vm.novnctoken", E_AUTHENTICATION)


def test_not_allowed_code(broker):
    res = broker.xmlrpc().one.vm.novnctoken(session("carol"), 7)
    assert_error(res, "one.vm.novnctoken", E_AUTHORIZATION)


def test_alias_error_uses_alias_name(broker):
    res = broker.xmlrpc().one.vm.token(session("carol"), 7)
    assert_error(res, "one.vm.token", E_AUTHORIZATION)


def test_no_such_vm_code(broker):
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), 999)
    assert_error(res, "one.vm.novnctoken", E_NO_EXISTS)


def test_ttl_too_large_code(broker):
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), 7, 10**6)
    assert_error(res, "one.vm.novnctoken", E_API)


def test_revoke_error_codes(broker):
    p = broker.xmlrpc()
    assert_error(p.one.vm.novnctokenrevoke(session("carol"), 7), "one.vm.novnctokenrevoke", E_AUTHORIZATION)
    assert_error(p.one.vm.novnctokenrevoke(session("alice", "bad"), 7), "one.vm.novnctokenrevoke",
                 E_AUTHENTICATION)
    assert_error(p.one.vm.novnctokenrevoke(session("alice"), 999), "one.vm.novnctokenrevoke", E_NO_EXISTS)


def test_revoke_success_array(broker):
    p = broker.xmlrpc()
    for _ in range(2):
        assert p.one.vm.novnctoken(session("alice"), 10)[0] is True
    res = p.one.vm.novnctokenrevoke(session("alice"), 10)
    assert res == [True, 2, 0], res
    assert p.one.vm.novnctokenrevoke(session("alice"), 10) == [True, 0, 0]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(("seven",), id="vm_id-string"),
        pytest.param((), id="missing-vm_id"),
        pytest.param((7, "60"), id="ttl-string"),
        pytest.param((7, 60, True, False, "extra"), id="too-many-params"),
        pytest.param((7, 60, True, "yes"), id="view_only-string"),
        pytest.param((7, 60, True, 1), id="view_only-int"),
        pytest.param((7.5,), id="vm_id-double"),
        pytest.param(([7],), id="vm_id-array"),
        pytest.param(({"id": 7},), id="vm_id-struct"),
        pytest.param((7, 60, "yes"), id="single_use-string"),
    ],
)
def test_bad_params_code(broker, params):
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), *params)
    assert_error(res, "one.vm.novnctoken", E_API)


@pytest.mark.parametrize(
    "params,message",
    [
        pytest.param((7, 60, "yes"), "Parameter 4 (single_use) must be a boolean, got string",
                     id="single_use-string"),
        pytest.param((7, 60, True, "yes"), "Parameter 5 (view_only) must be a boolean, got string",
                     id="view_only-string"),
        pytest.param((7, 0, False, 1), "Parameter 5 (view_only) must be a boolean, got int",
                     id="view_only-int"),
        pytest.param((7, 0, False, [True]), "Parameter 5 (view_only) must be a boolean, got array",
                     id="view_only-array"),
        pytest.param((7, 60, True, False, True), "Wrong number of parameters: expected 2 to 5, got 6",
                     id="six-params"),
    ],
)
def test_bad_param_messages(broker, params, message):
    """The exact error array, as oned answers a parameter it cannot take:
    [False, "[method] message", 0x1000], with no object id."""
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), *params)
    assert res == [False, f"[one.vm.novnctoken] {message}", E_API], res


def test_view_only_success_array(broker):
    p = broker.xmlrpc()
    res = p.one.vm.novnctoken(session("alice"), 7, 0, False, True)
    assert isinstance(res, list) and len(res) == 3 and res[0] is True and res[2] == 0, res
    check_token_result(record_token(res[1]), vm_id=7, ttl=DEFAULT_TTL, single_use=False, view_only=True)
    res = p.one.vm.novnctoken(session("alice"), 7, 45, True, False)
    assert res[0] is True, res
    check_token_result(record_token(res[1]), vm_id=7, ttl=45, single_use=True, view_only=False)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(("seven",), id="vm_id-string"),
        pytest.param((), id="missing-vm_id"),
        pytest.param((7, 1), id="too-many-params"),
    ],
)
def test_revoke_bad_params_code(broker, params):
    res = broker.xmlrpc().one.vm.novnctokenrevoke(session("alice"), *params)
    assert_error(res, "one.vm.novnctokenrevoke", E_API)


def test_no_params_at_all(broker):
    # Not even a session: cannot authenticate nor parse -> fault or bad-parameter array.
    assert_fault_or_api_error(lambda: broker.xmlrpc().one.vm.novnctoken(), "one.vm.novnctoken")
    broker.assert_healthy()


def test_session_not_a_string(broker):
    assert_fault_or_api_error(lambda: broker.xmlrpc().one.vm.novnctoken(12345, 7), "one.vm.novnctoken")


def test_single_use_as_int_is_bool_or_rejected(broker):
    # Not pinned by the contract: accepted as a boolean, or rejected as a bad parameter.
    res = broker.xmlrpc().one.vm.novnctoken(session("alice"), 7, 60, 1)
    if res[0] is True:
        check_token_result(record_token(res[1]), vm_id=7, ttl=60, single_use=True)
    else:
        assert_error(res, "one.vm.novnctoken", E_API)


@pytest.mark.parametrize("method", ["one.vm.nosuchmethod", "one.vm.info", "system.nothing", "novnctoken"])
def test_unknown_method(broker, method):
    proxy = broker.xmlrpc()
    try:
        res = getattr(proxy, method)(session("alice"), 7)
    except xmlrpc.client.Fault:
        pass
    else:
        assert isinstance(res, list) and res[0] is False and res[2] == E_API, res
    broker.assert_healthy()


@pytest.mark.parametrize("which", ["long-password", "long-user"])
def test_long_session_is_rejected_quickly(broker, which):
    big = "A" * (100 * 1024)
    sess = f"alice:{big}" if which == "long-password" else f"{big}:x"
    t0 = time.monotonic()
    res = broker.xmlrpc().one.vm.novnctoken(sess, 7)
    elapsed = time.monotonic() - t0
    assert_error(res, "one.vm.novnctoken", E_AUTHENTICATION)
    assert elapsed < 2.0, f"100 KB session took {elapsed:.2f}s"
    broker.assert_healthy()

