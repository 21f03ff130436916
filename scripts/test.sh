#!/usr/bin/env bash
# The README's test command: lint, then the whole suite (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check agent tests bench
.venv/bin/mypy  # all of agent/ ([tool.mypy] in pyproject.toml)
exec .venv/bin/python -m pytest -q "$@"
