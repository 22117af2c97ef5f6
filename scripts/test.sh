#!/usr/bin/env bash
# The one test command: set up, lint, type-check, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
.venv/bin/ruff check .
.venv/bin/mypy lotcast broadcaster relay
.venv/bin/python -m pytest "$@"
