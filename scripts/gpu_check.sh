#!/usr/bin/env bash
# GPU check (issue 15): on a fresh GPU machine, from the repo root, one command installs the
# carried wheels (.whl/, fetched beforehand with `python scripts/bench/gpu_check.py
# --fetch-wheels` where PyPI is reachable) and runs every GPU path of the harness and the speed
# benchmarks, each step timed and budgeted, in under 8 minutes on an H100/H200:
#
#     bash scripts/gpu_check.sh --out OUT       # OUT/gpu_check.{jsonl,md,log}
#     bash scripts/gpu_check.sh --dry-run       # the same steps on a CPU, tiny presets (CI)
#
# The steps and their figures: scripts/bench/gpu_check.py and docs/performance.md "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/bench/gpu_check.py "$@"
