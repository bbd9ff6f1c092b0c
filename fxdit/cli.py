"""The ``fxdit`` command line.

    fxdit --version
    fxdit dump --model dit-tiny --out fxdit_dump
    fxdit <command> --help

Each subcommand lives in ``fxdit/commands/<name>.py`` and exposes ``add_parser(subparsers)`` (registering its
arguments, with ``help=`` and ``description=``) and ``run(args) -> int``. Command modules keep their top-level
imports light (torch and models are imported inside ``run``), so ``fxdit --help`` stays fast. The names are
listed in :data:`_COMMANDS`; a command whose module fails to import is left out of the parser with a logged
warning, so one broken command never takes the others down.

Exit codes: 0 success, 1 unexpected error, 2 bad usage or bad input (:class:`~fxdit.errors.FxditError`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)

#: Subcommand names, each implemented by ``fxdit.commands.<name>`` (``-`` in a name maps to ``_``).
_COMMANDS: tuple[str, ...] = ("dump", "calibrate", "demo", "eval", "tune")


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"fxdit.commands.{name.replace('-', '_')}")
    except Exception as exc:  # noqa: BLE001 - one broken command must not break the others
        log.warning("fxdit: command %r is unavailable (%s: %s)", name, type(exc).__name__, exc)
        return None


def build_parser() -> argparse.ArgumentParser:
    """The ``fxdit`` argument parser with every loadable subcommand registered."""
    from fxdit import __version__

    parser = argparse.ArgumentParser(
        prog="fxdit",
        description="fxdit: a torch.compile backend that makes Diffusion Transformers cheaper to sample from "
                    "(grouped block-sparse attention, increment-calibrated caching). "
                    "Run 'fxdit <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fxdit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log fxdit's progress (-v: info, -vv: debug, with tracebacks on errors)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name in _COMMANDS:
        module = _load(name)
        if module is None:
            continue
        cmd = module.add_parser(sub)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxdit`` command line; returns the process exit code.

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    from fxdit.errors import FxditError

    try:
        return int(run(args) or 0)
    except FxditError as exc:
        print(f"fxdit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports, the traceback is behind -vv
        if args.verbose > 1:
            raise
        print(f"fxdit {args.command}: {type(exc).__name__}: {exc} (run with -vv for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
