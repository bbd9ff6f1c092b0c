"""The ``fxdit`` command line (placeholder until the dump tool lands)."""
from __future__ import annotations
import argparse

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fxdit")
    parser.add_subparsers(dest="command")
    parser.parse_args(argv)
    parser.print_help()
    return 0
