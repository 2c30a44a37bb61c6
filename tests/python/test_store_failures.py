"""The database going away: a locked SQLite file or an unusable path gives a
clear error quickly (0x2000 / 503, or a startup error), never a hang, and
the server recovers when the lock is released."""

import sqlite3
import subprocess
import time
import xmlrpc.client

import pyone
import pytest
import requests

from conftest import BIN, basic, child_env, populate, session


@pytest.fixture
def locked_broker(broker_factory):
    env = broker_factory.env()
    populate(env)
    b = broker_factory.start(env)
    return b


def hold_write_lock(db_path):
    """Takes SQLite's write lock from another connection, as another process would."""
    conn = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_locked_database_gives_internal_error_fast_and_recovers(locked_broker):
    b = locked_broker
    one = pyone.OneServer(b.rpc_url, session=session("alice"))
    one.vm.novnctoken(7)  # warm the credential cache: the failure is the write
    lock = hold_write_lock(b.db_path)
    try:
        t = time.monotonic()
        with pytest.raises(pyone.OneInternalException) as err:
            one.vm.novnctoken(7)
        assert time.monotonic() - t < 5.0
        assert "unavailable" in str(err.value).lower()
        # Raw shape: [false, "[one.vm.novnctoken] ...", 0x2000, 7]
        raw = xmlrpc.client.ServerProxy(b.rpc_url).one.vm.novnctoken(session("alice"), 7)
        assert raw[0] is False and raw[2] == 0x2000
        assert raw[1].startswith("[one.vm.novnctoken]")

        t = time.monotonic()
        r = requests.post(f"{b.api_url}/vms/7/console-tokens", auth=basic("alice"), timeout=10)
        assert time.monotonic() - t < 5.0
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "unavailable"
    finally:
        lock.rollback()
        lock.close()
    # The lock is gone: minting works again without a restart.
    assert len(one.vm.novnctoken(7)["token"]) == 43
    b.assert_alive()


def test_unusable_database_path_is_a_clear_startup_error(tmp_path):
    url = f"sqlite://{tmp_path}/no/such/dir/vncbroker.db"
    proc = subprocess.run(
        [str(BIN), "serve", "--listen", "127.0.0.1:0", "--database", url],
        capture_output=True, text=True, timeout=20, env=child_env(),
    )
    assert proc.returncode != 0
    assert "cannot open" in proc.stderr
    assert proc.stdout == ""


def test_unknown_database_scheme_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [str(BIN), "user", "list", "--database", "mysql://db/x"],
        capture_output=True, text=True, timeout=20, env=child_env(),
    )
    assert proc.returncode != 0
    assert "unsupported database URL scheme" in proc.stderr


def test_not_a_database_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database" * 100)
    proc = subprocess.run(
        [str(BIN), "user", "list", "--database", f"sqlite://{junk}"],
        capture_output=True, text=True, timeout=20, env=child_env(),
    )
    assert proc.returncode != 0
    assert "database" in proc.stderr.lower()
