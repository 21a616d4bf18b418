"""HTTP scans through a proxy: ours vs Rspamd 3.4's ``rspamd_proxy``, and direct.

One real Rspamd runs a normal worker (``count = 1``, network modules off, as
:func:`tests.peers.rspamd.start_rspamd` sets it up) and an ``rspamd_proxy``
worker (HTTP mode: ``milter = no``, ``count = 1``) in front of it.  Our proxy
(``twistd -n rspamd-proxy``, ``milter = no``, ``count = 1``) runs in front of
the same normal worker.  Every case loads, one after the other:

* ``direct`` -- the normal worker itself (no proxy);
* ``rspamd`` -- Rspamd's proxy;
* ``ours`` -- our proxy;

with ``POST /checkv2`` of a 2 KB and a 50 KB ham, at concurrency 1 and 16
(targets take turns in slices, see :mod:`bench.cases`).
The report gives req/s and p50/p99 of each, ours ÷ Rspamd per case, and the
p99 each proxy adds over scanning directly.  The target CPU column is the
proxy process's CPU (the normal worker's for ``direct``).
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from bench.cases import CaseTarget, measure_case
from bench.loadgen import TargetSpec
from bench.messages import write_messages
from bench.peers import StartError, rspamd_worker_pid, start_ours
from bench.report import Report, Settings, brief
from tests.peers.rspamd import free_port, start_rspamd

__all__ = ["run"]

BENCH = "http"
SIZES = ("2k", "50k")
CONCURRENCY = (1, 16)


#: The normal worker's address in a configuration written for Rspamd's helper.
RSPAMD_NORMAL = "127.0.0.1:@NORMAL_PORT@"


def proxy_options(normal: str, milter: bool) -> str:
    """A ``worker-proxy.inc`` body: one process, the scanner at ``normal`` as default upstream."""
    return (f"milter = {'yes' if milter else 'no'};\ncount = 1;\ntimeout = 120s;\n"
            f'upstream "local" {{ default = yes; hosts = "{normal}"; }}\n')


async def run(reactor: Any, settings: Settings, report: Report) -> None:
    """Run every HTTP case; results and notes go to ``report``."""
    workdir = tempfile.mkdtemp(prefix="rspamd-tx-bench-http-")
    messages = write_messages(workdir, list(SIZES))
    print("http: starting Rspamd (normal + rspamd_proxy)", flush=True)
    try:
        rspamd = await start_rspamd(
            reactor, workers=("normal", "proxy"),
            worker_options={"normal": "count = 1;\n",
                            "proxy": proxy_options(RSPAMD_NORMAL, False)})
    except Exception as exc:
        report.note(f"http: Rspamd did not start, nothing measured: {brief(exc)}")
        shutil.rmtree(workdir, ignore_errors=True)
        return
    ours = None
    try:
        port = free_port()
        print("http: starting our proxy", flush=True)
        try:
            ours = await start_ours(reactor, "rspamd-proxy", port, {
                "worker-proxy.inc": f'bind_socket = "127.0.0.1:{port}";\n'
                                    + proxy_options(rspamd.address("normal"), False)})
        except StartError as exc:
            report.note(f"http: our proxy did not start, its cases are missing: {brief(exc)}")
        targets = [("direct", rspamd.ports["normal"], rspamd_worker_pid(rspamd.pid, "normal")),
                   ("rspamd", rspamd.ports["proxy"],
                    rspamd_worker_pid(rspamd.pid, "rspamd_proxy"))]
        if ours is not None:
            targets.append(("ours", ours.port, ours.pid))
        for size in SIZES:
            for concurrency in CONCURRENCY:
                await measure_case(
                    reactor, report, settings, BENCH, f"{size} c{concurrency}",
                    [CaseTarget(name, TargetSpec("http", "127.0.0.1", port, messages[size]),
                                [pid] if pid is not None else [])
                     for name, port, pid in targets],
                    concurrency)
    finally:
        if ours is not None:
            await ours.stop()
        await rspamd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def print_report(report: Report) -> None:
    """The HTTP tables: every run, ours ÷ Rspamd, p99 added by each proxy."""
    print("\n== HTTP /checkv2 (direct = normal worker, rspamd = rspamd_proxy, ours = rspamd-tx)")
    print(report.table(BENCH))
    print("\nours ÷ Rspamd (req/s: > 1 is faster; p99: < 1 is faster)")
    print(report.ratios(BENCH, "rspamd", ["ours"]))
    print("\nlatency added by each proxy over scanning directly")
    print(report.added_p99(BENCH, "direct", ["rspamd", "ours"]))
