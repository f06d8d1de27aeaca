"""The ``samlm`` command: a thin argparse layer over the library.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; its docstring's first line is the command's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

COMMANDS = {
    "pretrain": "samlm.train.pretrain",
    "finetune": "samlm.finetune.harness",
    "compare": "samlm.compare",
    "finetune-compare": "samlm.finetune.compare",
    "sharpness": "samlm.sharpness_cli",
    "bench": "samlm.bench",
    "demo": "samlm.demo",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one line naming it (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"samlm: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="samlm", description="Sharpness-aware optimization for language models.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"samlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
                continue  # command not built in this installation
            raise
        doc = (module.__doc__ or name).strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"samlm: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("samlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
