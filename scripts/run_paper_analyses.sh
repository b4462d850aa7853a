#!/usr/bin/env bash
# The paper's analyses at laptop scale (docs/paper_comparison.md), each also runnable on its own:
#   bash scripts/setup.sh --models && bash scripts/run_paper_analyses.sh         (~1 h 45 min on 2 cores)
# Prerequisites are built when missing: the default pipeline (tree-target value RM), the tiny implicit PRM and
# the tiny SFT policy (the LM policy of the robustness study).
# Two lanes run side by side (one core each); every experiment writes its table and PNG under runs/paper/ or
# runs/study_targets/, and is skipped when its table exists.  Wall times: runs/paper/times.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
mkdir -p runs/paper
rm -f runs/paper/failed
TIMES=runs/paper/times.tsv
run() {  # run NAME DONE_PATH CMD...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: done ($done)"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS
  # a failed experiment is reported and the lane goes on with the next one; the script exits 1 at the end
  "$@" > "runs/paper/$name.log" 2>&1 || { echo "!! $name failed: see runs/paper/$name.log" | tee -a runs/paper/failed; return 0; }
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" | tee -a "$TIMES"
}
run pipeline runs/pipeline_tiny/eval/DONE $PY -m agentrm.pipeline --config configs/pipeline/tiny.yaml --progress false
run implicit_prm runs/tiny_implicit_prm/hf_model/agentrm_config.json \
  $PY -m agentrm.fit --config configs/tiny/implicit_prm.yaml --trainer.enable_progress_bar false
run tiny_policy_sft runs/tiny_policy_sft/hf_model/config.json \
  $PY -m agentrm.fit --config configs/tiny/policy_sft.yaml --trainer.enable_progress_bar false
[ -e runs/paper/failed ] && exit 1  # the experiments need these models
lane_a() {
  run study_targets runs/study_targets/results.md $PY bench/study_targets.py
  run main_table runs/paper/main_table/comparisons.md $PY -m agentrm.search --config configs/paper/main_table.yaml --progress false
  run data_scaling runs/paper/data_scaling/results.md $PY bench/data_scaling.py
  run judge runs/paper/judge/comparisons.md $PY -m agentrm.search --config configs/paper/judge.yaml --progress false
}
lane_b() {
  run test_time_scaling runs/paper/test_time_scaling/comparisons.md \
    $PY -m agentrm.search --config configs/paper/test_time_scaling.yaml --progress false
  run weak_to_strong runs/paper/weak_to_strong/comparisons.md \
    $PY -m agentrm.search --config configs/paper/weak_to_strong.yaml --progress false
  run robustness runs/paper/robustness/results.md $PY bench/robustness.py
  run task_specific runs/paper/task_specific/results.md $PY bench/task_specific.py
  run robustness_sft runs/paper/robustness_sft/results.md \
    $PY bench/robustness.py --policy runs/tiny_policy_sft/hf_model --episodes 6 --out runs/paper/robustness_sft
}
lane_a & a=$!
lane_b & b=$!
wait $a $b
status=0
[ -e runs/paper/failed ] && status=1
for f in runs/study_targets/results.md runs/paper/*/results.md runs/paper/*/comparisons.md; do
  [ -e "$f" ] && { echo "== $f"; cat "$f"; }
done
echo "== wall times (s)"; cat "$TIMES"
exit $status
