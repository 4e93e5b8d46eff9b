#!/bin/sh
# Run the whole comparison suite (MUSE vs MLServer vs FastAPI) and show the
# targets.  Usage: bench/run_compare.sh [OUT_DIR] [extra `muse bench` flags]
# Takes 10-15 minutes on 2 cores; the first run also installs the peers'
# virtual environments (several minutes, from PyPI).
set -eu
out="${1:-bench-results}"
[ "$#" -gt 0 ] && shift
python="${PYTHON:-python}"
"$python" -m muse bench --compare --out "$out" "$@"
echo
echo "results: $out/results.md, $out/results.json, $out/latency.png"
