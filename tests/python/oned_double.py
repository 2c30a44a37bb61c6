"""A test double of OpenNebula's oned, for the broker's OpenNebula inventory.

oned itself cannot be installed here, so this is an XML-RPC server
(xmlrpc.server.SimpleXMLRPCServer, one thread per request so that a slow VM
does not hold up other calls) with the two methods the broker calls:

- ``one.vm.info(session, vm_id[, decrypt])`` -> ``[True, "<VM>...</VM>", 0]``
- ``one.user.info(session, -1)``             -> ``[True, "<USER>...</USER>", 0]``

and oned's real refusal shapes:

- bad session:    ``[False, "[one.vm.info] User couldn't be authenticated, aborting call.", 0x100, -1]``
- no permission:  ``[False, "[one.vm.info] User [<uid>] : Not authorized to perform USE VM [<id>].", 0x200, <id>]``
- missing VM:     ``[False, "[one.vm.info] Error getting virtual machine [<id>].", 0x400, <id>]``

VM documents are never written by hand: each is one of the real oned
documents in tests/fixtures/opennebula/ (see its README), edited with
targeted substitutions, each of which must match exactly as often as
expected (a fixture that stops matching fails loudly instead of silently
producing a document oned never would).

Users: oneadmin (uid 0, gid 0: the oneadmin group, i.e. admin), alice
(uid 3, gid 1), bob (uid 4, gid 1). Sessions are "name:password". A user may
USE a VM if they own it or are in group 0.
"""

from __future__ import annotations

import re
import socketserver
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from xml.sax.saxutils import escape
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "opennebula"

# form -> fixture file
FORMS = {
    "pretty": "01-docs-sd-rst-vm-800-opennebula-6.99.xml",   # pretty-printed, no CDATA
    "raw": "02-quattor-rpcdata-one.vm.info-raw-cdata.xml",   # one line, CDATA values
    "onedock": "03-onedock-testing-vm-keymap.xml",           # CDATA, STATE 3 / LCM_STATE 2 (BOOT)
    "legacy": "04-opennebula-one-oca-ruby-fixture-vm.xml",   # no GRAPHICS, bare <HISTORY>
}

AUTH_FAILED = 0x0100
AUTHORIZATION = 0x0200
NO_EXISTS = 0x0400

# The LCM states (with STATE 3, ACTIVE) in which a console is live.
LIVE_LCM_STATES = [3, 4, 12, 13, 16, 17, 18, 24, 25, 26, 27, 28, 29, 57, 58, 62]


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    gname: str
    name: str


USERS = {
    "oneadmin": User(0, 0, "oneadmin", "oneadmin"),
    "alice": User(3, 1, "users", "alice"),
    "bob": User(4, 1, "users", "bob"),
}


@dataclass
class VmSpec:
    """What a registered VM looks like; the document is built from it on every call.

    form:      "raw" (document 02), "pretty" (01), "onedock" (03) or "legacy" (04)
    graphics:  the GRAPHICS TYPE ("VNC", "vnc", "SPICE", ...), None or "none"
               to remove the GRAPHICS element, or "keep" to leave the fixture's as it is
               (document 04 has none at all)
    port:      GRAPHICS PORT (None keeps the fixture's)
    passwd:    GRAPHICS PASSWD (None: no PASSWD element)
    hosts:     HOSTNAME of each HISTORY record, oldest first; the last one is
               where the VM runs now. None keeps the fixture's history.
    state, lcm_state: None keeps the fixture's values
    delay:     seconds one.vm.info sleeps before answering for this VM
    service_delay: the same, only when oneadmin asks (the broker's service
               session), so the caller's own calls stay fast
    vncbroker: attributes of a TEMPLATE/VNCBROKER vector (the broker's
               console policy: CONTROL, CLIPBOARD, RECORD, and for SPICE
               USB_REDIRECT, MICROPHONE), None for none
    user_vncbroker: the same vector in USER_TEMPLATE, which the VM's owner
               can edit (and the broker must ignore)
    """

    vm_id: int
    owner: str = "alice"
    form: str = "raw"
    state: int | None = 3
    lcm_state: int | None = 3
    graphics: str | None = "VNC"
    port: int | None = 5900
    passwd: str | None = None
    hosts: list[str] | None = field(default_factory=lambda: ["node-1.test"])
    delay: float = 0.0
    service_delay: float = 0.0
    name: str | None = None
    vncbroker: dict[str, str] | None = None
    user_vncbroker: dict[str, str] | None = None


# ---------------------------------------------------------------------------
# Document editing

def _sub(text: str, pattern: str, repl, *, count: int = 1, expect: int | None = 1, flags=0) -> str:
    """re.subn that insists on the number of matches (expect=None: any >= 1)."""
    new, n = re.subn(pattern, repl, text, count=count, flags=flags)
    if expect is not None and n != expect:
        raise AssertionError(f"fixture edit {pattern!r}: {n} matches, expected {expect}")
    if expect is None and n == 0:
        raise AssertionError(f"fixture edit {pattern!r}: no match")
    return new


def _set_value(text: str, tag: str, value, *, count: int = 1, expect: int | None = 1) -> str:
    """Sets the text of <tag>…</tag>, keeping the fixture's style: CDATA stays CDATA."""
    pattern = rf"<{tag}>(<!\[CDATA\[)?([^<]*?)(\]\]>)?</{tag}>"

    def repl(m):
        if m.group(1):
            return f"<{tag}><![CDATA[{value}]]></{tag}>"
        return f"<{tag}>{escape(str(value))}</{tag}>"

    return _sub(text, pattern, repl, count=count, expect=expect)


def _uses_cdata(block: str) -> bool:
    return "<![CDATA[" in block


def _graphics(doc: str, spec: VmSpec) -> str:
    m = re.search(r"(\n?[ \t]*)<GRAPHICS>(.*?)</GRAPHICS>", doc, flags=re.S)
    if spec.graphics == "keep":
        return doc
    if spec.graphics is not None and spec.graphics.lower() == "none":
        spec = replace(spec, graphics=None)
    if m is None:
        if spec.graphics is None:
            return doc
        raise AssertionError(f"form {spec.form!r} has no GRAPHICS element to edit")
    if spec.graphics is None:
        return doc[:m.start()] + doc[m.end():]
    block = m.group(2)
    block = _set_value(block, "TYPE", spec.graphics)
    if spec.port is not None:
        block = _set_value(block, "PORT", spec.port)
    if spec.passwd is not None:
        # oned keeps template attributes sorted: LISTEN, PASSWD, PORT, TYPE.
        pm = re.search(r"([ \t]*)<PORT>", block)
        indent = pm.group(1)
        sep = "\n" + indent if "\n" in block else ""
        if _uses_cdata(block):
            el = f"<PASSWD><![CDATA[{spec.passwd}]]></PASSWD>"
        else:
            el = f"<PASSWD>{escape(spec.passwd)}</PASSWD>"
        block = block[:pm.end() - len("<PORT>")] + el + sep + block[pm.end() - len("<PORT>"):]
    return doc[:m.start()] + f"{m.group(1)}<GRAPHICS>{block}</GRAPHICS>" + doc[m.end():]


def _history(doc: str, spec: VmSpec) -> str:
    if spec.hosts is None:
        return doc
    if not spec.hosts:
        raise ValueError("hosts must name at least one host (the last is the current one)")
    m = list(re.finditer(r"([ \t]*)<HISTORY>(.*?)</HISTORY>", doc, flags=re.S))
    if len(m) != 1:
        raise AssertionError(f"form {spec.form!r}: expected one HISTORY record, found {len(m)}")
    m = m[0]
    indent, template = m.group(1), m.group(2)
    seq0 = int(re.search(r"<SEQ>(\d+)</SEQ>", template).group(1))
    stime0 = int(re.search(r"<STIME>(\d+)</STIME>", template).group(1))
    records = []
    last = len(spec.hosts) - 1
    for i, host in enumerate(spec.hosts):
        rec = _set_value(template, "SEQ", seq0 + i)
        rec = _set_value(rec, "HOSTNAME", host)
        rec = _set_value(rec, "HID", 100 + i)
        rec = _set_value(rec, "STIME", stime0 + 3600 * i)
        # Closed records (the VM moved on) have an end time; the current one has 0.
        rec = _set_value(rec, "ETIME", 0 if i == last else stime0 + 3600 * (i + 1))
        if "<OID>" in rec:
            rec = _set_value(rec, "OID", spec.vm_id)
        records.append(f"{indent}<HISTORY>{rec}</HISTORY>")
    joiner = "\n" if "\n" in m.group(0) or "\n" in doc[m.start() - 1:m.start()] else ""
    return doc[:m.start()] + joiner.join(records) + doc[m.end():]


def _indent_step(block: str) -> str:
    """The fixture's indentation step, from its CONTEXT vector and first child."""
    m = re.search(r"\n([ \t]*)<CONTEXT>\n([ \t]*)<", block)
    if m is None or not m.group(2).startswith(m.group(1)):
        raise AssertionError("fixture edit: cannot tell the indentation step from CONTEXT")
    return m.group(2)[len(m.group(1)):]


def _vector(name: str, attrs: dict[str, str], *, cdata: bool, indent: str | None, step: str) -> str:
    """A template vector attribute in the fixture's style: its children sorted
    by name (as oned keeps template attributes), CDATA values if the
    fixture's template has them, one line or indented like the fixture."""
    def value(v) -> str:
        return f"<![CDATA[{v}]]>" if cdata else escape(str(v))

    items = [f"<{k}>{value(v)}</{k}>" for k, v in sorted(attrs.items())]
    if indent is None:
        return f"<{name}>{''.join(items)}</{name}>"
    inner = "".join(f"\n{indent}{step}{item}" for item in items)
    return f"<{name}>{inner}\n{indent}</{name}>"


def _vncbroker(doc: str, spec: VmSpec) -> str:
    """Adds the VNCBROKER vector to TEMPLATE and/or USER_TEMPLATE."""
    if spec.vncbroker is None and spec.user_vncbroker is None:
        return doc
    t = re.search(r"<TEMPLATE>(.*?)</TEMPLATE>", doc, flags=re.S)
    if t is None:
        raise AssertionError(f"form {spec.form!r} has no TEMPLATE")
    block = t.group(1)
    cdata = _uses_cdata(block)
    pretty = "\n" in block
    step = _indent_step(block) if pretty else ""
    if spec.vncbroker is not None:
        # VNCBROKER sorts right after VMID, the last attribute of every fixture's TEMPLATE.
        vm = list(re.finditer(r"(\n([ \t]*))?<VMID>.*?</VMID>", block))
        if len(vm) != 1:
            raise AssertionError(f"form {spec.form!r}: expected one TEMPLATE/VMID, found {len(vm)}")
        vm = vm[0]
        rest = block[vm.end():]
        if rest.strip():
            raise AssertionError(f"form {spec.form!r}: TEMPLATE/VMID is not the last attribute")
        indent = vm.group(2) if pretty else None
        vec = _vector("VNCBROKER", spec.vncbroker, cdata=cdata, indent=indent, step=step)
        block = block[:vm.end()] + (f"\n{indent}" if pretty else "") + vec + rest
        doc = doc[:t.start(1)] + block + doc[t.end(1):]
    if spec.user_vncbroker is not None:
        m = re.search(r"(\n([ \t]*))?<USER_TEMPLATE/>", doc)
        if m is not None:
            # An empty USER_TEMPLATE (document 03) gets its first attribute.
            indent = m.group(2) if pretty else None
            child = None if indent is None else indent + step
            vec = _vector("VNCBROKER", spec.user_vncbroker, cdata=cdata, indent=child, step=step)
            body = f"\n{child}{vec}\n{indent}" if pretty else vec
            return doc[:m.end() - len("<USER_TEMPLATE/>")] + f"<USER_TEMPLATE>{body}</USER_TEMPLATE>" + doc[m.end():]
        m = re.search(r"(\n([ \t]*))?</USER_TEMPLATE>", doc)
        if m is None:
            raise AssertionError(f"form {spec.form!r} has no USER_TEMPLATE")
        # VNCBROKER sorts after the fixtures' user attributes (ARCH; QUATTOR, SCHED_MESSAGE).
        child = None if not pretty else m.group(2) + step
        vec = _vector("VNCBROKER", spec.user_vncbroker, cdata=cdata, indent=child, step=step)
        doc = doc[:m.start()] + (f"\n{child}" if pretty else "") + vec + doc[m.start():]
    return doc


def build_vm_document(spec: VmSpec) -> str:
    """The one.vm.info document for spec, from its fixture file."""
    if spec.form not in FORMS:
        raise ValueError(f"unknown form {spec.form!r}; one of {sorted(FORMS)}")
    owner = USERS[spec.owner]
    doc = (FIXTURES / FORMS[spec.form]).read_text()
    # The fixture files are cut out of their hosts: indented, with a newline at the end.
    doc = doc.strip()
    if spec.form == "onedock":
        doc = _sub(doc, r"%%VMID%%", str(spec.vm_id), count=0, expect=3)
    # VM-level elements come before TEMPLATE, so the first match is the VM's own.
    doc = _set_value(doc, "ID", spec.vm_id)
    doc = _set_value(doc, "UID", owner.uid)
    if "<UNAME>" in doc:  # document 04 predates UNAME/GID/GNAME
        doc = _set_value(doc, "UNAME", owner.name)
        doc = _set_value(doc, "GID", owner.gid)
        doc = _set_value(doc, "GNAME", owner.gname)
    if spec.name is not None:
        doc = _set_value(doc, "NAME", spec.name)
    if re.search(r"<VMID>", doc):
        doc = _set_value(doc, "VMID", spec.vm_id)
    if spec.state is not None:
        doc = _set_value(doc, "STATE", spec.state)
    if spec.lcm_state is not None:
        doc = _set_value(doc, "LCM_STATE", spec.lcm_state)
    doc = _graphics(doc, spec)
    doc = _history(doc, spec)
    doc = _vncbroker(doc, spec)
    return doc


def user_document(user: User) -> str:
    """A one.user.info document in oned's raw form."""
    return (
        f"<USER><ID>{user.uid}</ID><GID>{user.gid}</GID><GROUPS><ID>{user.gid}</ID></GROUPS>"
        f"<GNAME>{user.gname}</GNAME><NAME>{user.name}</NAME>"
        f"<PASSWORD>{'0' * 64}</PASSWORD><AUTH_DRIVER>core</AUTH_DRIVER><ENABLED>1</ENABLED>"
        f"<LOGIN_TOKEN></LOGIN_TOKEN><TEMPLATE><TOKEN_PASSWORD><![CDATA[x]]></TOKEN_PASSWORD></TEMPLATE>"
        f"<DATASTORE_QUOTA></DATASTORE_QUOTA><NETWORK_QUOTA></NETWORK_QUOTA><VM_QUOTA></VM_QUOTA>"
        f"<IMAGE_QUOTA></IMAGE_QUOTA><DEFAULT_USER_QUOTAS></DEFAULT_USER_QUOTAS></USER>"
    )


# ---------------------------------------------------------------------------
# The server

class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Call:
    method: str
    params: tuple
    at: float


class OnedDouble:
    """The oned test double. Use as a context manager or call close()."""

    def __init__(self, passwords: dict[str, str]):
        unknown = set(passwords) - set(USERS)
        if unknown:
            raise ValueError(f"unknown users {unknown}; the double knows {sorted(USERS)}")
        self.passwords = dict(passwords)
        self._vms: dict[int, VmSpec] = {}
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self._closed = False
        self._server = _Server(("127.0.0.1", 0), requestHandler=_Handler,
                               allow_none=False, logRequests=False)
        self._server.register_function(self._vm_info, "one.vm.info")
        self._server.register_function(self._user_info, "one.user.info")
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/RPC2"

    def close(self) -> None:
        """Stops answering (new connections are refused). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- registry ----------------------------------------------------------

    def add_vm(self, vm_id: int, **kw) -> VmSpec:
        spec = VmSpec(vm_id=vm_id, **kw)
        if spec.owner not in USERS:
            raise ValueError(f"unknown owner {spec.owner!r}")
        build_vm_document(spec)  # fail now, not inside the server thread
        with self._lock:
            self._vms[vm_id] = spec
        return spec

    def update_vm(self, vm_id: int, **changes) -> VmSpec:
        """Changes a registered VM while the broker runs (e.g. a migration:
        update_vm(7, hosts=[old, new], port=new_port))."""
        with self._lock:
            spec = replace(self._vms[vm_id], **changes)
        build_vm_document(spec)
        with self._lock:
            self._vms[vm_id] = spec
        return spec

    def migrate(self, vm_id: int, host: str, port: int | None = None) -> VmSpec:
        """Appends a HISTORY record on host (and sets a new GRAPHICS port)."""
        spec = self._vms[vm_id]
        changes = {"hosts": list(spec.hosts or []) + [host]}
        if port is not None:
            changes["port"] = port
        return self.update_vm(vm_id, **changes)

    def remove_vm(self, vm_id: int) -> None:
        with self._lock:
            del self._vms[vm_id]

    def document(self, vm_id: int) -> str:
        with self._lock:
            spec = self._vms[vm_id]
        return build_vm_document(spec)

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in list(self.calls) if c.method == method]

    # -- oned methods --------------------------------------------------------

    def _authenticate(self, session) -> User | None:
        if not isinstance(session, str) or ":" not in session:
            return None
        name, _, password = session.partition(":")
        if name in self.passwords and self.passwords[name] == password:
            return USERS[name]
        return None

    def _vm_info(self, session, vm_id, *rest):
        self.calls.append(Call("one.vm.info", (session, vm_id, *rest), time.time()))
        if not isinstance(vm_id, int) or len(rest) > 1 or (rest and not isinstance(rest[0], bool)):
            # oned (xmlrpc-c) answers a signature mismatch with a fault.
            raise TypeError(f"one.vm.info: bad parameters {(type(session).__name__, vm_id, *rest)!r}")
        user = self._authenticate(session)
        if user is None:
            return [False, "[one.vm.info] User couldn't be authenticated, aborting call.", AUTH_FAILED, -1]
        with self._lock:
            spec = self._vms.get(vm_id)
        if spec is not None and spec.delay:
            time.sleep(spec.delay)
        if spec is not None and spec.service_delay and user.name == "oneadmin":
            time.sleep(spec.service_delay)
        if spec is None:
            return [False, f"[one.vm.info] Error getting virtual machine [{vm_id}].", NO_EXISTS, vm_id]
        if not (USERS[spec.owner] == user or user.gid == 0):
            return [False, f"[one.vm.info] User [{user.uid}] : Not authorized to perform USE VM [{vm_id}].",
                    AUTHORIZATION, vm_id]
        return [True, build_vm_document(spec), 0]

    def _user_info(self, session, user_id, *rest):
        self.calls.append(Call("one.user.info", (session, user_id, *rest), time.time()))
        if not isinstance(user_id, int) or rest:
            raise TypeError("one.user.info: bad parameters")
        user = self._authenticate(session)
        if user is None:
            return [False, "[one.user.info] User couldn't be authenticated, aborting call.", AUTH_FAILED, -1]
        if user_id == -1:
            return [True, user_document(user), 0]
        other = next((u for u in USERS.values() if u.uid == user_id), None)
        if other is None:
            return [False, f"[one.user.info] Error getting user [{user_id}].", NO_EXISTS, user_id]
        if other != user and user.gid != 0:
            return [False, f"[one.user.info] User [{user.uid}] : Not authorized to perform USE USER [{user_id}].",
                    AUTHORIZATION, user_id]
        return [True, user_document(other), 0]
