"""Milter sessions through a proxy: ours vs Rspamd 3.4's ``rspamd_proxy`` in milter mode.

One real Rspamd runs a normal worker (``count = 1``) and an ``rspamd_proxy``
worker with ``milter = yes`` (``count = 1``) in front of it; our proxy
(``twistd -n rspamd-proxy``, ``milter = yes``, ``count = 1``) runs in front of
the same normal worker.  Each case runs full milter sessions (negotiate,
connect, helo, mail, rcpt, headers, body, end of message, verdict, quit) of
a 2 KB ham and a 1 MB ham (text plus attachment) at concurrency 1 and 16.

Memory of our process (``/proc/PID/status``):

* before the cases: ``VmRSS`` at idle;
* per case: ``VmHWM`` after the case, the peak having been reset (``clear_refs``)
  before it, and that peak above idle -- the 1 MB case is the one to watch;
* growth: a fresh proxy runs 1000 sessions (2 KB, concurrency 16), then the
  rest up to ``--sessions`` (default 5000, quick 1500; 100000 for the full
  check); ``VmRSS`` after 1000 and after all of them, and the difference.

Rspamd's proxy worker's RSS is shown next to ours for context.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from bench.cases import CaseTarget, measure_case
from bench.http_bench import RSPAMD_NORMAL, proxy_options
from bench.loadgen import TargetSpec, run_target
from bench.messages import write_messages
from bench.peers import (
    Daemon,
    StartError,
    memory,
    reset_peak,
    rspamd_worker_pid,
    start_ours,
)
from bench.report import Report, Settings, brief
from tests.peers.rspamd import free_port, start_rspamd

__all__ = ["run"]

BENCH = "milter"
SIZES = ("2k", "1m")
CONCURRENCY = (1, 16)
GROWTH_FIRST = 1000


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


async def _start_ours(reactor: Any, normal: str) -> Daemon:
    port = free_port()
    return await start_ours(reactor, "rspamd-proxy", port, {
        "worker-proxy.inc": f'bind_socket = "127.0.0.1:{port}";\n'
                            + proxy_options(normal, True)})


async def run(reactor: Any, settings: Settings, report: Report) -> None:
    """Run the milter cases and the memory checks; results and notes go to ``report``."""
    workdir = tempfile.mkdtemp(prefix="rspamd-tx-bench-milter-")
    messages = write_messages(workdir, list(SIZES))
    print("milter: starting Rspamd (normal + rspamd_proxy in milter mode)", flush=True)
    try:
        rspamd = await start_rspamd(
            reactor, workers=("normal", "proxy"),
            worker_options={"normal": "count = 1;\n",
                            "proxy": proxy_options(RSPAMD_NORMAL, True)})
    except Exception as exc:
        report.note(f"milter: Rspamd did not start, nothing measured: {brief(exc)}")
        shutil.rmtree(workdir, ignore_errors=True)
        return
    normal = rspamd.address("normal")
    ours = None
    try:
        print("milter: starting our proxy", flush=True)
        try:
            ours = await _start_ours(reactor, normal)
        except StartError as exc:
            report.note(f"milter: our proxy did not start, its cases are missing: {brief(exc)}")
        rspamd_pid = rspamd_worker_pid(rspamd.pid, "rspamd_proxy")
        idle = memory(ours.pid).get("VmRSS") if ours is not None else None
        if ours is not None:
            report.note(f"milter: our proxy idle RSS {_mib(idle)}")
        targets = [("rspamd", rspamd.ports["proxy"], rspamd_pid)]
        if ours is not None:
            targets.append(("ours", ours.port, ours.pid))
        for size in SIZES:
            for concurrency in CONCURRENCY:
                case = f"{size} c{concurrency}"
                peak_reset = {pid: reset_peak(pid) for _, _, pid in targets if pid is not None}
                results = await measure_case(
                    reactor, report, settings, BENCH, case,
                    [CaseTarget(name, TargetSpec("milter", "127.0.0.1", port, messages[size]),
                                [pid] if pid is not None else [])
                     for name, port, pid in targets],
                    concurrency)
                for result, (name, _, pid) in zip(results, targets):
                    if pid is None:
                        continue
                    mem = memory(pid)
                    result.extra.update(rss_kib=mem.get("VmRSS"), hwm_kib=mem.get("VmHWM"),
                                        peak_reset=peak_reset[pid])
                    line = (f"milter {case} {name}: RSS after {_mib(mem.get('VmRSS'))}, "
                            f"peak {_mib(mem.get('VmHWM'))}"
                            f"{' (since the case began)' if peak_reset[pid] else ' (lifetime)'}")
                    if name == "ours" and idle is not None and "VmHWM" in mem:
                        line += f", peak above idle {_mib(mem['VmHWM'] - idle)}"
                    report.note(line)
        if ours is not None:
            await ours.stop()
            ours = None
        await _growth(reactor, settings, report, normal, messages["2k"])
    finally:
        if ours is not None:
            await ours.stop()
        await rspamd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def checkpoints(total: int) -> list[int]:
    """Session counts at which the growth run reads RSS: 1000, every power of ten
    between, and ``total`` (at least 1000)."""
    total = max(total, GROWTH_FIRST)
    points = []
    mark = GROWTH_FIRST
    while mark < total:
        points.append(mark)
        mark *= 10
    return points + [total]


async def _growth(reactor: Any, settings: Settings, report: Report, normal: str,
                  message: str) -> None:
    """RSS of a fresh proxy of ours after 1000 sessions and after ``settings.sessions``.

    Sessions of the 2 KB ham at concurrency 16; RSS is also read (and
    printed) at every :func:`checkpoints` mark in between.
    """
    marks = checkpoints(settings.sessions)
    total = marks[-1]
    try:
        ours = await _start_ours(reactor, normal)
    except StartError as exc:
        report.note(f"milter: memory growth not measured, our proxy did not start: {brief(exc)}")
        return
    readings: list[tuple[int, int | None]] = []
    errors = 0
    try:
        spec = TargetSpec("milter", "127.0.0.1", ours.port, message)
        print(f"milter: memory growth over {total} sessions", flush=True)
        done = 0
        for mark in marks:
            stats = await run_target(reactor, spec, 16, mark - done, None, settings.timeout)
            done, errors = mark, errors + stats.errors
            readings.append((mark, memory(ours.pid).get("VmRSS")))
            print(f"  after {mark} sessions: RSS {_mib(readings[-1][1])}", flush=True)
    finally:
        await ours.stop()
    first, last = readings[0][1], readings[-1][1]
    growth = None if first is None or last is None else last - first
    scale = ("" if total >= 100_000
             else f" (fewer than the 100000 of the full check: --sessions {total})")
    steps = ", ".join(f"{mark}: {_mib(rss)}" for mark, rss in readings)
    report.note(f"milter: our RSS after {GROWTH_FIRST} sessions {_mib(first)}, after {total} "
                f"{_mib(last)}, growth {_mib(growth)} ({steps}); {errors} failed "
                f"sessions{scale}")


def print_report(report: Report) -> None:
    """The milter tables: every run and ours ÷ Rspamd."""
    print("\n== milter sessions (rspamd = rspamd_proxy milter = yes, ours = rspamd-tx)")
    print(report.table(BENCH))
    print("\nours ÷ Rspamd (sessions/s: > 1 is faster; p99: < 1 is faster)")
    print(report.ratios(BENCH, "rspamd", ["ours"]))
