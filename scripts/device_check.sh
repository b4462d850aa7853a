#!/usr/bin/env bash
# The GPU check in one call on a bare lent GPU machine (torch, triton, transformers, lightning, peft there;
# no agentrm install, no network). Here, once: `bash scripts/fetch_device_wheels.sh` (fills .whl/). Then
# one device call, with carry [".whl"]:
#
#   bash scripts/device_check.sh                 # the GPU tests + the kernel sweep, < 8 minutes
#   bash scripts/device_check.sh --dry-run       # no GPU needed: lists every test and sweep row (CI runs it)
#
# Steps: installs the wheels in .whl/ (if any) into a temporary site (pip --no-index --no-deps --target);
# imports agentrm from this tree through scripts/device_site/sitecustomize.py on PYTHONPATH (kernels/ ->
# agentrm.kernels, as pyproject's package-dir does; subprocesses inherit it); unsets TRITON_INTERPRET; runs
# `python bench/gpu_check.py --out DIR` under a time limit. DIR (default: $OUT when set, else
# runs/device_check) receives device_check.log, wheels.txt and gpu_check's pytest.log, gpu_tests.xml,
# sweep.csv and results_block.md; back here, `python bench/gpu_check.py --apply <that folder>` writes the
# block into bench/RESULTS.md and the rows into bench/results/kernels.csv.
#
# Options: --out DIR, --wheels DIR (default .whl), --limit-s S (whole GPU run, default 450),
#          --tests-timeout-s S (default 240), --budget-s S (sweep, default 150).
# Environment: PYTHON (default: .venv/bin/python if present, else python3), AGENTRM_COMMIT (the commit
# recorded in the results; a tree copied without .git has none).
# Exit status: gpu_check's (0 all passed and targets met, 1 a failure or a missed target, 2 no CUDA), 124 when
# the time limit stopped it, 3 when the wheels did not install.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=0
OUT_DIR=${OUT:-$ROOT/runs/device_check}
WHEELS=$ROOT/.whl
LIMIT_S=450
TESTS_S=240
BUDGET_S=150
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --limit-s) LIMIT_S=$2; shift ;;
    --tests-timeout-s) TESTS_S=$2; shift ;;
    --budget-s) BUDGET_S=$2; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "device_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
START=$(date +%s)
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/device_check.log
: > "$LOG"
say() { echo "device_check: $*" | tee -a "$LOG"; }

SITE=$(mktemp -d "${TMPDIR:-/tmp}/agentrm_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
{
  echo "# wheels from $WHEELS installed into a temporary site ($(date -u +%FT%TZ))"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    du -b "$WHEELS"/*.whl | awk '{printf "%8.2f MB  %s\n", $1 / 1e6, $2; t += $1} END {printf "%8.2f MB  total\n", t / 1e6}'
  else
    echo "(none: $WHEELS holds no wheels; run scripts/fetch_device_wheels.sh here first)"
  fi
} > "$OUT_DIR/wheels.txt"
tee -a "$LOG" < "$OUT_DIR/wheels.txt"
install_wheels() {  # install_wheels [pip flags...]: the wheels into $SITE
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" \
    "$WHEELS"/*.whl >> "$OUT_DIR/wheels.txt" 2>&1
}
USE_SITE=1
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if install_wheels; then
    say "installed $(ls "$WHEELS"/*.whl | wc -l) wheels in $(( $(date +%s) - START )) s"
  elif [ "$DRY" = 1 ]; then
    # a dry run on another interpreter still checks that the set installs for the lent machine's CPython
    # 3.12, but does not import it here
    rm -rf "${SITE:?}"/*
    if ! install_wheels --python-version 3.12 --implementation cp --abi cp312 --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64; then
      tail -5 "$OUT_DIR/wheels.txt" | tee -a "$LOG"; say "the wheels did not install (see wheels.txt)"; exit 3
    fi
    USE_SITE=0
    say "the wheels install for CPython 3.12 manylinux x86_64, not for this interpreter: the dry run does not import them"
  else
    tail -5 "$OUT_DIR/wheels.txt" | tee -a "$LOG"; say "the wheels did not install (see wheels.txt)"; exit 3
  fi
fi
# the tree's import bootstrap first (sitecustomize maps agentrm and agentrm.kernels to the tree), then the
# carried packages; not the tree root itself, where the folder kernels/ would shadow a package of that name
if [ "$USE_SITE" = 1 ]; then SITE_PATH=:$SITE; else SITE_PATH=; fi
export PYTHONPATH="$ROOT/scripts/device_site$SITE_PATH${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET AGENTRM_KERNEL_BACKEND
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
say "python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])') at $PYTHON; results in $OUT_DIR"

if [ "$DRY" = 1 ]; then
  "$PYTHON" bench/gpu_check.py --dry-run --budget-s "$BUDGET_S" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "dry run finished with status $rc in $(( $(date +%s) - START )) s"
  exit "$rc"
fi

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | sed 's/^/device_check: gpu: /' | tee -a "$LOG"
timeout --kill-after=15 "$LIMIT_S" "$PYTHON" bench/gpu_check.py --out "$OUT_DIR" \
  --tests-timeout-s "$TESTS_S" --budget-s "$BUDGET_S" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && say "stopped by the ${LIMIT_S} s limit"
say "finished with status $rc in $(( $(date +%s) - START )) s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$rc"
