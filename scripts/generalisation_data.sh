#!/usr/bin/env bash
# Builds the data of the generalisation experiment (docs/generalisation.md): training data over 13
# ScienceWorld task types, TextWorld custom games and 10 BabyAI levels, and the development set of unseen
# task types (model selection). First checks that development and test task types are unseen in training
# (python -m agentrm.data.splits). Every command resumes: rerun this script after an interruption.
# Outputs (regenerated, not committed): runs/generalisation/data/*.jsonl with <file>.manifest.json beside
# each, logs in runs/generalisation/logs/. Extra arguments go to every collect command (e.g. --workers 4).
#   bash scripts/generalisation_data.sh            # measured on 2 free cores: 70 min, 63 of them the training data
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
G=configs/generalisation
DATA=runs/generalisation/data
LOGS=runs/generalisation/logs
mkdir -p "$DATA" "$LOGS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY -m agentrm.data.splits --train "[$G/train_sciworld.yaml, $G/train_textworld.yaml, $G/train_babyai.yaml]" \
    --dev "[$G/dev_data.yaml]" --test "[$G/test_eval.yaml]"
for name in train_babyai train_textworld train_sciworld dev_data; do
    echo "== $name ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
    $PY -m agentrm.collect --config "$G/$name.yaml" --progress false "$@" 2>&1 | tee -a "$LOGS/$name.log" \
        | { grep -v -i warn || true; }
done
$PY -m agentrm.data.manifest "$DATA"/train_sciworld.jsonl "$DATA"/train_textworld.jsonl "$DATA"/train_babyai.jsonl \
    "$DATA"/dev_unseen.jsonl | tee "$LOGS/summary.md"
