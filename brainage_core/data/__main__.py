"""``python -m brainage_core.data SUBCOMMAND ...``: the data command line.

Each sub-command lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches (modules are imported lazily, so
``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("brainage_core.data.prepare", "validate a cohort and write the prepared store"),
    "synth": ("brainage_core.data.synthetic", "generate the synthetic multi-site cohort"),
    "realism": ("brainage_core.data.realism", "site BAcc and internal/external MAE of linear baselines"),
    "ramp-rows": ("brainage_core.data.ramp_rows", "write the RAMP challenge-kit flat arrays from a store"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m brainage_core.data", description=__doc__.splitlines()[0],
        allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; expected one of {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"python -m brainage_core.data {name}", description=SUBCOMMANDS[name][1],
        allow_abbrev=False)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
