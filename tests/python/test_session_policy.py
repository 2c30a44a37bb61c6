"""Local VMs' console settings (`vm add/set --control/--clipboard/--record`)
and the session policy a token carries in its row.

A token minted for a VM copies the VM's settings into its row; a setting
left unset (or set back to `default`) takes the config's default
(`[proxy] clipboard`, `[recording] default`); exclusive = (control ==
exclusive); view_only is the caller's choice.
"""

from __future__ import annotations

import json

import pyone
import pytest
import requests

from conftest import PASSWORDS, basic, populate, record_token, session, token_policy

T = 10
CLIPBOARD_VALUES = "both, to-vm, from-vm, none"


def mint_json(b, vm_id: int = 7, user: str = "alice", **body) -> dict:
    r = requests.post(f"{b.api_url}/vms/{vm_id}/console-tokens", auth=basic(user), json=body or None, timeout=T)
    assert r.status_code == 201, r.text
    return record_token(r.json())


def policy_of_new_token(b, vm_id: int = 7, **body) -> dict:
    return token_policy(b.db_path, mint_json(b, vm_id, **body)["token"])


def vm_list_settings(env, vm_id: int) -> tuple[str, str, str]:
    """(CONTROL, CLIPBOARD, RECORD) of a VM's row in `vm list`."""
    lines = env.cli("vm", "list").stdout.splitlines()
    header = lines[0].split()
    assert header[5:8] == ["CONTROL", "CLIPBOARD", "RECORD"], lines[0]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0] == str(vm_id)]
    assert len(rows) == 1, lines
    return tuple(rows[0][5:8])


def policy(view_only=0, exclusive=0, clipboard="both", record=0) -> dict:
    return {"view_only": view_only, "exclusive": exclusive, "clipboard": clipboard, "record": record}


@pytest.fixture
def local(broker_factory):
    env = broker_factory.env()
    populate(env)
    return env, broker_factory.start(env)


def test_vm_settings_are_copied_into_tokens(local):
    env, b = local
    assert vm_list_settings(env, 7) == ("default", "default", "default")
    assert policy_of_new_token(b) == policy()

    out = env.cli("vm", "set", "7", "--clipboard", "none", "--record", "yes", "--control", "exclusive").stdout
    assert out.startswith("vm 7 updated"), out
    assert vm_list_settings(env, 7) == ("exclusive", "none", "yes")
    # The running server mints with the new settings, through both APIs and the CLI.
    assert policy_of_new_token(b) == policy(exclusive=1, clipboard="none", record=1)
    res = record_token(pyone.OneServer(b.rpc_url, session=session("alice")).vm.novnctoken(7, 0, False, True))
    assert res["view_only"] is True
    assert token_policy(b.db_path, res["token"]) == policy(view_only=1, exclusive=1, clipboard="none", record=1)
    res = record_token(json.loads(env.cli("token", "mint", "7").stdout))
    assert token_policy(b.db_path, res["token"]) == policy(exclusive=1, clipboard="none", record=1)
    # Other VMs keep the defaults.
    assert policy_of_new_token(b, 9, user="bob") == policy()

    # `default` resets one setting to the config's default, leaving the others.
    env.cli("vm", "set", "7", "--clipboard", "default")
    assert vm_list_settings(env, 7) == ("exclusive", "default", "yes")
    assert policy_of_new_token(b) == policy(exclusive=1, clipboard="both", record=1)

    env.cli("vm", "set", "7", "--control", "shared", "--record", "no", "--clipboard", "from-vm")
    assert vm_list_settings(env, 7) == ("shared", "from-vm", "no")
    assert policy_of_new_token(b) == policy(clipboard="from-vm")

    env.cli("vm", "set", "7", "--control", "default", "--record", "default", "--clipboard", "default")
    assert vm_list_settings(env, 7) == ("default", "default", "default")
    assert policy_of_new_token(b) == policy()


def test_vm_add_takes_settings(local):
    env, b = local
    env.cli("vm", "add", "30", "--host", "127.0.0.1", "--port", "5930", "--owner", "alice",
            "--control", "exclusive", "--clipboard", "to-vm", "--record", "yes")
    assert vm_list_settings(env, 30) == ("exclusive", "to-vm", "yes")
    assert policy_of_new_token(b, 30) == policy(exclusive=1, clipboard="to-vm", record=1)


@pytest.mark.parametrize("flag,value,accepted", [
    ("--clipboard", "sideways", CLIPBOARD_VALUES),
    ("--control", "sideways", "shared, exclusive"),
    ("--record", "maybe", "yes, no"),
])
def test_bad_setting_fails_and_changes_nothing(local, flag, value, accepted):
    env, b = local
    env.cli("vm", "set", "7", "--clipboard", "to-vm", "--control", "exclusive", "--record", "yes")
    before = env.cli("vm", "list").stdout

    p = env.cli("vm", "set", "7", flag, value, check=False)
    assert p.returncode != 0, p
    assert accepted in p.stderr and value in p.stderr, p.stderr
    assert env.cli("vm", "list").stdout == before
    assert policy_of_new_token(b) == policy(exclusive=1, clipboard="to-vm", record=1)

    # Nor does `vm add` with a bad value add the VM.
    p = env.cli("vm", "add", "31", "--host", "127.0.0.1", "--port", "5931", "--owner", "alice",
                flag, value, check=False)
    assert p.returncode != 0 and accepted in p.stderr, p.stderr
    assert env.cli("vm", "list").stdout == before
    r = requests.post(f"{b.api_url}/vms/31/console-tokens", auth=basic("alice"), timeout=T)
    assert r.status_code == 404, r.text


def test_unset_settings_take_the_config_defaults(broker_factory):
    env = broker_factory.env()
    env.config.write_text(env.config.read_text()
                          + '\n[proxy]\nclipboard = "from-vm"\n\n[recording]\ndefault = true\n')
    populate(env)
    b = broker_factory.start(env)
    assert policy_of_new_token(b) == policy(clipboard="from-vm", record=1)
    # A VM's own setting wins over the default, both ways.
    env.cli("vm", "set", "7", "--clipboard", "both", "--record", "no")
    assert policy_of_new_token(b) == policy(clipboard="both", record=0)
    env.cli("vm", "set", "7", "--clipboard", "default", "--record", "default")
    assert policy_of_new_token(b) == policy(clipboard="from-vm", record=1)
    assert PASSWORDS["alice"] not in b.log_text()
