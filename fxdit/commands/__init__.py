"""Subcommands of the ``fxdit`` CLI, one module each (see :mod:`fxdit.cli`).

A command module exposes ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``, keeps
its top-level imports light, and prints only here, in the CLI layer (library code logs).
"""
