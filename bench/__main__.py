"""``python -m bench {http,milter,fuzzy,all} [--quick] [options]``: side-by-side benchmarks.

Runs our workers and real Rspamd 3.4 on loopback with the same input in one
run, prints req/s, p50/p99 and the ratio ours ÷ Rspamd per case.  ``--quick``
is a smoke run (about two seconds per case); the default run gives each case
ten seconds and stays under ten minutes for ``all``.  See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.internet import defer, task

from bench import fuzzy_bench, http_bench, milter_bench
from bench.report import Report, Settings, brief

BENCHES = {"http": http_bench, "milter": milter_bench, "fuzzy": fuzzy_bench}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; exits with a usage message when it is wrong."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmarks: rspamd-tx vs Rspamd 3.4 on loopback.")
    parser.add_argument("which", choices=[*BENCHES, "all"], help="benchmark to run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few seconds per case")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per case (default 10, quick 2)")
    parser.add_argument("--slices", type=int, default=None,
                        help="rounds each case is split into, targets taking turns "
                             "(default 3, quick 1)")
    parser.add_argument("--sessions", type=int, default=None,
                        help="milter sessions of the memory-growth run "
                             "(default 5000, quick 1500; the full check is 100000)")
    parser.add_argument("--generators", type=int, default=1,
                        help="load generator processes per case (default 1)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's :class:`Settings`: defaults or quick, then the explicit options."""
    settings = Settings.quick_run() if args.quick else Settings()
    if args.duration is not None:
        settings = replace(settings, duration=args.duration)
    if args.slices is not None:
        settings = replace(settings, slices=max(args.slices, 1))
    if args.sessions is not None:
        settings = replace(settings, sessions=args.sessions)
    return replace(settings, generators=max(args.generators, 1))


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


async def run_all(reactor: Any, names: Sequence[str], settings: Settings) -> Report:
    """Run the named benchmarks in turn; one that breaks leaves a note and the rest go on.

    The machine's load average before and after is noted: other work on the
    machine shows in the numbers.
    """
    report = Report()
    report.note(f"load average (1, 5, 15 min) before: {_load()}")
    for name in names:
        started = reactor.seconds()
        try:
            await BENCHES[name].run(reactor, settings, report)
        except Exception as exc:  # one broken benchmark must not hide the others
            report.note(f"{name}: aborted: {brief(exc)}")
        report.note(f"{name}: took {reactor.seconds() - started:.0f} s")
    report.note(f"load average (1, 5, 15 min) after: {_load()}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmarks named on the command line and print the report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = settings_from(args)
    names = list(BENCHES) if args.which == "all" else [args.which]
    os.environ.setdefault("RSPAMD_TX_HS_CACHE", "/var/tmp/rspamd-tx-hs-cache")
    print(f"bench: {', '.join(names)}; {settings.duration:g} s per case"
          f"{' (quick smoke run)' if settings.quick else ''}; "
          f"{os.cpu_count()} CPUs", flush=True)

    async def go(reactor: Any) -> None:
        report = await run_all(reactor, names, settings)
        for name in names:
            BENCHES[name].print_report(report)
        if report.notes:
            print("\nnotes:")
            for line in report.notes:
                print(f"  - {line}")
        if args.json:
            with open(args.json, "w") as f:
                f.write(report.to_json())

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
