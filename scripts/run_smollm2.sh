#!/usr/bin/env bash
# The whole SmolLM2 experiment (docs/real_models.md), CPU-cut to fit about 60 minutes on 2 cores:
#   bash scripts/setup.sh --models && bash scripts/run_smollm2.sh
# Stages (each skipped when its output exists; wall times go to runs/smollm2/times.tsv):
#   import the weights, tiny baselines if missing (value RM, SFT policy), SmolLM2 SFT policy (LoRA),
#   SmolLM2 value RM (LoRA + head), greedy evaluation of the three policies, Best-of-5 with the RMs and the judge.
# The implicit PRM config (configs/smollm2/implicit_prm.yaml) is not part of the 60-minute run.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
mkdir -p runs/smollm2
TIMES=runs/smollm2/times.tsv
stage() {  # stage NAME DONE_PATH CMD...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: done ($done)"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" | tee -a "$TIMES"
}
stage import "${AGENTRM_CACHE:-$HOME/.cache/agentrm}/models/smollm2-135m-instruct/agentrm_import.json" \
  $PY -m agentrm.models.import_gguf smollm2-135m-instruct
stage tiny_value_rm runs/tiny_value_rm/hf_model/agentrm_config.json $PY -m agentrm.fit
stage tiny_policy_sft runs/tiny_policy_sft/hf_model/config.json \
  $PY -m agentrm.fit --config configs/tiny/policy_sft.yaml
stage smollm2_policy_sft runs/smollm2/policy_sft/hf_model/config.json \
  $PY -m agentrm.fit --config configs/smollm2/policy_sft.yaml
stage smollm2_value_rm runs/smollm2/value_rm/hf_model/agentrm_config.json \
  $PY -m agentrm.fit --config configs/smollm2/value_rm.yaml
stage eval_smollm2_policy runs/smollm2/eval_policy/summary.csv \
  $PY -m agentrm.search --config configs/search/smollm2_policy.yaml
stage eval_tiny_policy runs/smollm2/eval_policy_tiny/summary.csv \
  $PY -m agentrm.search --config configs/search/smollm2_policy.yaml \
  --policy.model runs/tiny_policy_sft/hf_model --out_dir runs/smollm2/eval_policy_tiny
stage eval_scripted_policy runs/smollm2/eval_policy_scripted/summary.csv \
  $PY -m agentrm.search --config configs/search/smollm2_policy.yaml \
  --policy.kind expert --policy.error_rate 0.0 --out_dir runs/smollm2/eval_policy_scripted
stage eval_rm runs/smollm2/eval_rm/summary.csv $PY -m agentrm.search --config configs/search/smollm2_rm.yaml
for d in eval_policy eval_policy_tiny eval_policy_scripted eval_rm; do
  echo "== runs/smollm2/$d/summary.md"; cat "runs/smollm2/$d/summary.md"
done
echo "== stage wall times (s)"; cat "$TIMES"
