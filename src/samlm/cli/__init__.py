"""The ``samlm`` command: a thin argparse layer over the library.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; its docstring's first line is the command's help.

Exit codes (docs/reliability.md):

* ``0``   the command finished (a run: all its steps done);
* ``2``   a user mistake (bad flag, value, data file, model, run directory), a run that
  diverged under ``--nonfinite stop``, or the machine refusing (a file that cannot be written,
  out of memory): one line ``samlm: error: <message>`` on stderr, never a traceback;
* ``130`` stopped by SIGINT (Ctrl-C) or SIGTERM: a run finishes its current step, saves a
  checkpoint and exits; the same command with ``--resume`` continues it exactly;
* ``1``   only for a bug in samlm (a traceback). ``SAMLM_DEBUG=1`` shows the traceback of
  the errors above too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from samlm.errors import UserError

# The attribute of the parsed arguments that holds the subcommand's run function. Private, so
# that no subcommand flag (``samlm sharpness --run DIR``) can overwrite it.
_RUN_ATTR = "_samlm_command_run"
_STUB_ATTR = "_samlm_command_needs_extra"  # a command whose dependencies are not installed: takes any flags
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

COMMANDS = {
    "prepare": "samlm.cli.prepare",
    "pretrain": "samlm.cli.pretrain",
    "finetune": "samlm.cli.finetune",
    "compare": "samlm.cli.compare",
    "finetune-compare": "samlm.cli.finetune_compare",
    "sharpness": "samlm.cli.sharpness",
    "robustness": "samlm.cli.robustness",
    "bench": "samlm.cli.bench",
    "demo": "samlm.cli.demo",
    "study": "samlm.cli.study",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one line naming it (and exit code 2)."""

    def error(self, message):
        message = " ".join(str(message).split())  # a value with a newline must not break the line
        self.exit(2, f"samlm: error: {message} (see '{self.prog} --help')\n")

    def _get_values(self, action, arg_strings):
        # argparse drops a "--" given as an option's own value ("--steps=--") and then returns an
        # empty *list* for a one-value option, unconverted and unchecked; take it literally instead.
        if action.nargs is None and action.option_strings and list(arg_strings) == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="samlm", description="Sharpness-aware optimization for language models.")
    from samlm import __version__

    parser.add_argument("--version", action="version", version=f"samlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
                continue  # command not built in this installation
            if err.name and not err.name.startswith("samlm"):
                # ``pip install samlm`` is the torch-only core: the commands need the harness extra.
                command = sub.add_parser(name, help=f"(needs {err.name}: pip install 'samlm[harness]')")
                command.set_defaults(**{_RUN_ATTR: _needs_extra(name, err.name), _STUB_ATTR: True})
                continue
            raise
        doc = (module.__doc__ or name).strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(command)
        command.set_defaults(**{_RUN_ATTR: module.run})
    return parser


def _needs_extra(command: str, missing: str):
    def run(args) -> int:
        raise UserError(f"samlm {command} needs {missing}, which is not installed: pip install 'samlm[harness]'")

    return run


class _StderrHandler(logging.Handler):
    """Warnings of the ``samlm`` logger as ``samlm: warning: ...`` on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"samlm: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


# Loggers that speak when the environment has torchao and transformers imports it on a CPU-only machine (its CUDA kernels
# that cannot load here, torch's pytree deprecation notes): not the user's concern, and they
# would break the one-line error of a bad input.
def _setup_logging() -> None:
    from samlm.progress import quiet_third_party_loggers

    quiet_third_party_loggers()
    logger = logging.getLogger("samlm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler(logging.WARNING)
        logger.addHandler(handler)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str, code: int = EXIT_USER_ERROR) -> int:
    print(f"samlm: error: {_one_line(message)}", file=sys.stderr)
    return code


def _os_error_message(err: OSError) -> str:
    parts = [err.strerror or type(err).__name__]
    if err.filename is not None:
        parts.append(f"'{os.fsdecode(err.filename)}'")
    if getattr(err, "filename2", None) is not None:
        parts.append(f"-> '{os.fsdecode(err.filename2)}'")
    return "cannot access the file system: " + " ".join(parts)


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        if "samlm.integrations.distributed" in sys.modules:  # a process group joined under torchrun / accelerate launch
            sys.modules["samlm.integrations.distributed"].cleanup()


def _main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, _STUB_ATTR, False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command_run = getattr(args, _RUN_ATTR, None)
    if command_run is None:
        parser.error("a command is required: " + ", ".join(COMMANDS))
    _setup_logging()
    debug = bool(os.environ.get("SAMLM_DEBUG"))
    try:
        return int(command_run(args) or 0)
    except UserError as err:
        if debug:
            raise
        return _error(str(err), err.exit_code)
    except KeyboardInterrupt:
        print("samlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        if debug:
            raise
        return _error("out of memory; use a smaller model, --batch or --context")
    except OSError as err:
        # The machine said no: an unwritable or full disk, a path through a file, ... One line.
        if debug:
            raise
        return _error(_os_error_message(err))
    except RuntimeError as err:
        if debug or not _is_out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return _error(f"out of memory ({first[:200]}); use a smaller model, --batch or --context")


def _is_out_of_memory(err: RuntimeError) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
