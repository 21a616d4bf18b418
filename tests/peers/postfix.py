"""A throwaway Postfix instance on loopback, in front of a milter, and ``swaks`` to talk to it.

Typical use in a trial test::

    mta = yield start_postfix(reactor, milter="inet:127.0.0.1:%d" % milter_port)
    self.addCleanup(mta.stop)
    code, out, err = yield swaks(reactor, mta.port, MESSAGE)
    path = yield mta.wait_delivered(queue_id)

What the helper does (see ``/work/shared/PEERS.md``):

* writes ``main.cf``/``master.cf`` into a fresh directory under ``/tmp`` and
  runs ``postfix -c DIR/etc start`` (``/etc/postfix`` is never touched), with
  its own queue and data directories, ``inet_interfaces = 127.0.0.1``, one
  ``smtpd`` on a free port, ``smtpd_milters`` = the given milter speaking
  protocol 6, Postfix's usual macros, ``milter_default_action = tempfail``;
* relays every recipient (clients in ``127.0.0.0/8`` may) through a ``pipe(8)``
  transport running ``tee`` as ``nobody`` into ``DIR/delivered/<queue id>``:
  nothing leaves the machine;
* logs to ``DIR/maillog`` through ``postlogd`` (containers have no syslog);
* waits, polling with ``deferLater`` and bounded, until the smtpd port
  accepts connections; :meth:`PostfixPeer.stop` runs ``postfix stop`` and
  waits for the master to exit.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue

__all__ = [
    "POSTFIX",
    "SWAKS",
    "PostfixPeer",
    "PostfixStartError",
    "SwaksResult",
    "skip_unless_postfix",
    "smtp_session",
    "start_postfix",
    "swaks",
]

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
_POLL_INTERVAL = 0.2

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.rspamd-tx.test
mydomain = rspamd-tx.test
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
default_transport = filedrop
relay_transport = filedrop
local_transport = filedrop
filedrop_destination_recipient_limit = 1
smtputf8_enable = no
biff = no
append_dot_mydomain = no
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
smtpd_milters = {milter}
non_smtpd_milters =
milter_protocol = 6
milter_mail_macros = i {{mail_addr}} {{client_addr}} {{client_name}} {{auth_authen}}
milter_default_action = {default_action}
milter_connect_timeout = 10s
milter_command_timeout = 10s
milter_content_timeout = {content_timeout}s
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
filedrop  unix  - n n - - pipe user=nobody argv=/usr/bin/tee {dir}/delivered/${{queue_id}}
"""


class PostfixStartError(Exception):
    """Postfix did not start or its smtpd did not come up in time."""


def skip_unless_postfix() -> str | None:
    """A trial ``skip`` reason when Postfix or swaks is missing, else ``None``."""
    for program in (POSTFIX, SWAKS):
        if not os.access(program, os.X_OK):
            return f"{program} is not installed"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _run(reactor: Any, args: list[str]) -> tuple[int, bytes, bytes]:
    out, err, code = await getProcessOutputAndValue(args[0], args[1:], env=dict(os.environ),
                                                    reactor=reactor)
    return code, out, err


async def _accepts(reactor: Any, port: int) -> bool:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
    try:
        connected = await connectProtocol(endpoint, protocol.Protocol())
    except Exception:
        return False
    assert connected.transport is not None
    connected.transport.loseConnection()
    return True


@dataclass
class PostfixPeer:
    """A running private Postfix.

    Attributes:
        directory: the instance's directory (``etc``, ``queue``, ``data``,
            ``delivered``, ``maillog`` inside).
        port: the loopback port of its smtpd.
    """

    reactor: Any
    directory: str
    port: int
    keep_directory: bool = False
    _stopping: defer.Deferred[None] | None = field(default=None, repr=False)

    @property
    def delivered_dir(self) -> str:
        """Where the ``filedrop`` transport writes one file per queue id."""
        return os.path.join(self.directory, "delivered")

    def read_log(self) -> str:
        """Postfix's log so far."""
        try:
            with open(os.path.join(self.directory, "maillog"), encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def wait_delivered(self, queue_id: str, timeout: float = 30.0) -> defer.Deferred[bytes]:
        """Fire with the delivered message of ``queue_id``; fail after ``timeout`` seconds."""
        return defer.ensureDeferred(self._wait_delivered(queue_id, timeout))

    async def _wait_delivered(self, queue_id: str, timeout: float) -> bytes:
        path = os.path.join(self.delivered_dir, queue_id)
        waited = 0.0
        while waited < timeout:
            if os.path.exists(path) and queue_id not in self._active_queue():
                with open(path, "rb") as handle:
                    return handle.read()
            await task.deferLater(self.reactor, _POLL_INTERVAL, lambda: None)
            waited += _POLL_INTERVAL
        raise TimeoutError(f"{queue_id} not delivered in {timeout:g} s\n{self.read_log()[-3000:]}")

    def _active_queue(self) -> set[str]:
        """Queue ids still in the active queue (delivery not finished)."""
        found: set[str] = set()
        for _, _, files in os.walk(os.path.join(self.directory, "queue", "active")):
            found.update(files)
        return found

    def stop(self, timeout: float = 20.0) -> defer.Deferred[None]:
        """``postfix stop``, wait for the master to exit, remove the directory."""
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop(timeout))
        return self._stopping

    async def _stop(self, timeout: float) -> None:
        pid = self._master_pid()
        await _run(self.reactor, [POSTFIX, "-c", os.path.join(self.directory, "etc"), "stop"])
        waited = 0.0
        while pid is not None and _alive(pid) and waited < timeout:
            await task.deferLater(self.reactor, _POLL_INTERVAL, lambda: None)
            waited += _POLL_INTERVAL
        if pid is not None and _alive(pid):
            os.kill(pid, 9)
        if not self.keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.directory, "queue", "pid", "master.pid")) as handle:
                return int(handle.read().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_postfix(
    reactor: Any,
    milter: str,
    *,
    default_action: str = "tempfail",
    content_timeout: int = 60,
    timeout: float = 60.0,
    keep_directory: bool = False,
) -> defer.Deferred[PostfixPeer]:
    """Start a private Postfix whose smtpd uses ``milter`` (``inet:127.0.0.1:PORT``).

    ``default_action`` is ``milter_default_action``; ``content_timeout`` is
    ``milter_content_timeout`` in seconds.  Fails with :class:`PostfixStartError`
    if Postfix does not start or its smtpd does not accept within ``timeout``.
    Always ``addCleanup(peer.stop)``.
    """
    return defer.ensureDeferred(
        _start(reactor, milter, default_action, content_timeout, timeout, keep_directory)
    )


async def _start(reactor: Any, milter: str, default_action: str, content_timeout: int,
                 timeout: float, keep_directory: bool) -> PostfixPeer:
    directory = tempfile.mkdtemp(prefix="rspamd-tx-postfix-")
    os.chmod(directory, 0o755)
    port = _free_port()
    etc = os.path.join(directory, "etc")
    for sub in ("etc", "queue", "data", "delivered"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    os.chmod(os.path.join(directory, "delivered"), 0o1777)
    owner = pwd.getpwnam("postfix")
    os.chown(os.path.join(directory, "data"), owner.pw_uid, owner.pw_gid)
    values = {"dir": directory, "milter": milter, "port": port, "default_action": default_action,
              "content_timeout": content_timeout}
    with open(os.path.join(etc, "main.cf"), "w") as handle:
        handle.write(MAIN_CF.format(**values))
    with open(os.path.join(etc, "master.cf"), "w") as handle:
        handle.write(MASTER_CF.format(**values))
    peer = PostfixPeer(reactor, directory, port, keep_directory)
    code, out, err = await _run(reactor, [POSTFIX, "-c", etc, "start"])
    if code != 0:
        log = peer.read_log()
        await peer.stop()
        raise PostfixStartError(f"postfix start failed ({code}): {out!r} {err!r}\n{log[-3000:]}")
    waited = 0.0
    while waited < timeout:
        if await _accepts(reactor, port):
            return peer
        await task.deferLater(reactor, _POLL_INTERVAL, lambda: None)
        waited += _POLL_INTERVAL
    log = peer.read_log()
    await peer.stop()
    raise PostfixStartError(f"smtpd did not accept on port {port} in {timeout:g} s\n{log[-3000:]}")


@dataclass(frozen=True)
class SwaksResult:
    """What ``swaks`` reported.

    Attributes:
        code: its exit code (0: message accepted).
        output: its SMTP transcript.
        data_reply: the server's reply to the end of DATA (e.g. ``554 5.7.1 Gtube pattern``).
        queue_id: the queue id of an accepted message.
    """

    code: int
    output: str
    data_reply: str
    queue_id: str | None


_QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")


def swaks(reactor: Any, port: int, message: bytes, sender: str = "sender@example.net",
          recipient: str = "rcpt@example.org") -> defer.Deferred[SwaksResult]:
    """Send ``message`` with ``swaks`` to the smtpd on ``port``."""
    return defer.ensureDeferred(_swaks(reactor, port, message, sender, recipient))


async def _swaks(reactor: Any, port: int, message: bytes, sender: str, recipient: str) -> SwaksResult:
    handle, path = tempfile.mkstemp(suffix=".eml")
    try:
        os.write(handle, message)
        os.close(handle)
        code, out, err = await _run(reactor, [
            SWAKS, "--server", f"127.0.0.1:{port}", "--from", sender, "--to", recipient,
            "--helo", "client.rspamd-tx.test", "--data", path, "--timeout", "90",
        ])
    finally:
        os.unlink(path)
    output = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
    data_reply = ""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(" -> .") and index + 1 < len(lines):
            data_reply = re.sub(r"^<[-*~ ]+\s*", "", lines[index + 1]).strip()
    queued = _QUEUED.search(data_reply)
    return SwaksResult(code, output, data_reply, queued.group(1) if queued else None)


class _SmtpClient(protocol.Protocol):
    """Sends SMTP commands one at a time and collects the final line of each reply."""

    def __init__(self, commands: list[bytes]) -> None:
        self.commands = list(commands)
        self.buffer = b""
        self.replies: list[str] = []
        self.done: defer.Deferred[list[str]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if len(line) >= 4 and line[3:4] == b"-":
                continue
            self.replies.append(line.decode("utf-8", "replace"))
            if self.commands:
                self.transport.write(self.commands.pop(0))
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.replies)


def smtp_session(reactor: Any, port: int, commands: list[bytes]) -> defer.Deferred[list[str]]:
    """Play ``commands`` (each a complete command, or a whole DATA block ending in
    ``\\r\\n.\\r\\n``) one per reply; fire with the final line of every reply, greeting first."""
    client = _SmtpClient(commands)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    return defer.ensureDeferred(_smtp_session(endpoint, client))


async def _smtp_session(endpoint: TCP4ClientEndpoint, client: _SmtpClient) -> list[str]:
    await connectProtocol(endpoint, client)
    return await client.done
