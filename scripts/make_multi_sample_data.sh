#!/usr/bin/env bash
# Regenerates the ScienceWorld and TextWorld samples beside agentrm/assets/babyai_sample.jsonl
# (deterministic given the seed; each command resumes if interrupted), then the tokenizer that
# covers all three families (agentrm/assets/multi_tokenizer).  ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# held-in ScienceWorld task types (train variations only): Monte-Carlo step values, one sibling branch per episode
$PY -m agentrm.collect --out agentrm/assets/sciworld_sample.jsonl \
  --envs '[sciworld:find-living-thing?max_steps=30, sciworld:lifespan-longest-lived?max_steps=30, sciworld:use-thermometer?max_steps=40]' \
  --episodes 16 --error_rate 0.4 --rollouts 3 --siblings 1 --seed 0 --workers 2 "$@"
# TextWorld games (train split): a sample for users; the cross-task evaluation keeps TextWorld held out
$PY -m agentrm.collect --out agentrm/assets/textworld_sample.jsonl \
  --envs '[textworld:cooking?games=8, textworld:custom?games=8]' \
  --episodes 16 --error_rate 0.4 --rollouts 3 --siblings 1 --seed 0 --workers 2 "$@"
$PY -m agentrm.data.tiny_tokenizer agentrm/assets/babyai_sample.jsonl agentrm/assets/sciworld_sample.jsonl \
  agentrm/assets/textworld_sample.jsonl agentrm/assets/multi_tokenizer --vocab-size 2048
