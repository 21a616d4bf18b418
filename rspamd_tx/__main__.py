"""Command line of rspamd-tx: ``python -m rspamd_tx <command>`` (also ``rspamd-tx``).

Commands:

* ``configtest [-c DIR] [--var NAME=VALUE]...``: load the configuration
  (:func:`rspamd_tx.config.loader.load_config`: the shipped defaults with
  ``DIR/local.d`` and ``DIR/override.d`` layered over them, or
  ``DIR/rspamd.conf``), check it, print warnings as
  ``file:line:col: warning: message``, then ``syntax OK`` (exit 0) or every
  error as ``file:line:col: message`` (exit 1).
* ``confighelp [SECTION]``: every option of every section and worker (or of
  one: ``options``, ``logging``, ``worker``, ``rspamd_proxy``, ``fuzzy``,
  ``normal``, ``controller``) with its type, default and doc.

Exit status 2 means a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rspamd_tx.config import loader
from rspamd_tx.config.schema import Diagnostic, Schema
from rspamd_tx.config.tree import ConfigError
from rspamd_tx.config.workers import COMMON_SCHEMA, SECTION_SCHEMAS, WORKER_SCHEMAS, check_config

__all__ = ["main"]


def _help_sections() -> dict[str, tuple[str, Schema]]:
    sections: dict[str, tuple[str, Schema]] = {
        name: (f"{name} {{ }}", schema) for name, schema in SECTION_SCHEMAS.items()
    }
    sections["worker"] = ('worker "TYPE" { } (options of every worker)', COMMON_SCHEMA)
    for name, schema in WORKER_SCHEMAS.items():
        sections[name] = (f'worker "{name}" {{ }}', schema)
    return sections


def _print_schema(schema: Schema, indent: str) -> None:
    for opt in schema.options:
        default = opt.type.format_default(opt.default)
        if default:
            line = f"{indent}{opt.name} ({opt.type.label}, default {default})"
        else:
            line = f"{indent}{opt.name} ({opt.type.label})"
        if opt.required:
            line += " required"
        print(line)
        doc = opt.doc
        if opt.aliases:
            doc += f" [aliases: {', '.join(opt.aliases)}]"
        print(f"{indent}    {doc}")
        child = opt.type.children()
        if child is not None:
            _print_schema(child, indent + "    ")


def _confighelp(args: argparse.Namespace) -> int:
    sections = _help_sections()
    if args.section is not None and args.section not in sections:
        print(
            f"unknown section {args.section!r}; known: {', '.join(sections)}",
            file=sys.stderr,
        )
        return 2
    if args.section is None:
        names = list(sections)
    elif args.section in WORKER_SCHEMAS:
        names = ["worker", args.section]
    else:
        names = [args.section]
    for index, name in enumerate(names):
        title, schema = sections[name]
        if index:
            print()
        print(f"{title}: {schema.doc}")
        _print_schema(schema, "  ")
    return 0


def _parse_var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _position(diagnostic: Diagnostic) -> tuple[bool, str, int, int]:
    """Sort key: by file, line and column; findings without a location last."""
    location = diagnostic.location
    if location is None:
        return (True, "", 0, 0)
    return (False, location.filename, location.line, location.column)


def _configtest(args: argparse.Namespace) -> int:
    try:
        tree = loader.load_config(args.config_dir, variables=dict(args.var))
    except ConfigError as exc:
        print(exc)
        return 1
    _, diagnostics = check_config(tree)
    diagnostics.sort(key=_position)
    errors = [d for d in diagnostics if d.severity == "error"]
    for diagnostic in diagnostics:
        if diagnostic.severity == "warning":
            print(diagnostic)
    for diagnostic in errors:
        print(diagnostic)
    if errors:
        return 1
    print("syntax OK")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rspamd-tx", description="rspamd-tx tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    test = commands.add_parser("configtest", help="check a configuration directory")
    test.add_argument(
        "-c",
        "--config",
        dest="config_dir",
        default=None,
        metavar="DIR",
        help="directory laid out like /etc/rspamd whose local.d/ and override.d/ are "
        "layered over the shipped defaults (default: the shipped defaults alone)",
    )
    test.add_argument(
        "--var",
        action="append",
        default=[],
        type=_parse_var,
        metavar="NAME=VALUE",
        help="set a configuration variable such as LOCAL_CONFDIR or DBDIR (repeatable)",
    )
    test.set_defaults(run=_configtest)

    help_ = commands.add_parser("confighelp", help="describe every configuration option")
    help_.add_argument("section", nargs="?", help="one section or worker type")
    help_.set_defaults(run=_confighelp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
