#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions the test suite passes with.
#
# Resolves the newest versions that pyproject.toml's ranges allow (under constraints.in's torch pin) in a fresh
# virtualenv, runs lint and the default test suite there, and only if both pass writes constraints.txt. Upgrades are
# deliberate: review `git diff constraints.txt`, then commit it. Run as `make lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LOCK_VENV:-.venv-lock}
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -c constraints.in torch
"$py" -m pip install -q -c constraints.in -e ".[dev,diffusers]"
new=$(mktemp)
{
  echo "# Exact versions the test suite passed with: written by 'make lock' (tools/lock.sh) on $(date -u +%Y-%m-%d),"
  echo "# Python $("$py" -c 'import platform; print(platform.python_version())'), $(uname -m). Used as pip constraints by 'make setup';"
  echo "# pyproject.toml keeps ranges for users installing fxdit into their own environments."
  "$py" -m pip freeze --exclude-editable | grep -v '^fxdit' | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' | LC_ALL=C sort -f
} > "$new"
"$venv/bin/ruff" check .
"$py" -m pytest -q
mv "$new" constraints.txt
echo "constraints.txt refreshed; review with: git diff constraints.txt"
