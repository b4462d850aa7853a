#!/usr/bin/env bash
# Pretrained backbones against the tiny RM on unseen task types (docs/generalisation.md, "Pretrained backbones
# against the tiny RM"): every step resumes or is skipped when done, so rerun it after an interruption.
#   1. a balanced 9k-state subsample of the training data (bench/generalisation_subsample.py: the precompute
#      costs one backbone forward per state, ~2 h of one core for the whole 33k-state set);
#   2. python -m agentrm.precompute over the subsample and the development set: SmolLM2-135M-Instruct
#      (blocks 8 and 15 of 30) and all-MiniLM-L6-v2 (blocks 3 and 6 of 6), the two in parallel, one core each;
#   3. four RMs on the same data, each selected on val_unseen/auroc (the development types): the tiny LLaMA
#      from scratch, an MLP head on each frozen backbone's cached states (configs/generalisation/backbones/;
#      the cached layer a config names was chosen on val_unseen/auroc too: the other one is fitted beside it, in
#      rm/<name>_l<layer>, from a copy of the config in layer_probe/), and LoRA on SmolLM2 blocks 9-10 over the
#      residual stream after block 8 (the frozen head's chosen layer), cached at every token by a third precompute
#      (--sequence_layers [8]);
#   4. the selected epoch of each exported (bench/generalisation_export_best.py);
#   5. the final evaluation on the unseen test types (scripts/generalisation_test.sh with
#      configs/generalisation/backbones/test_eval.yaml: greedy, Best-of-1 and Best-of-5 per RM, outcome-blind,
#      30 episodes per spec), two families at a time; the LoRA RM in its own run directory (lora_eval.yaml) on the
#      same episodes; then the report over all four (each pretrained RM's Best-of-5 also against the tiny RM's,
#      paired on the same episodes).
# Needs the generalisation data (bash scripts/generalisation_data.sh) and the models (bash scripts/setup.sh --models).
#   bash scripts/generalisation_backbones.sh          # measured: see docs/generalisation.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
B=runs/generalisation/backbones
D=runs/generalisation/data
CFG=configs/generalisation/backbones
STATES=${STATES:-9000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$B/logs"
stamp() { echo "== $1 ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"; }
timed() { local name=$1; shift; /usr/bin/time -f "$name: %e s wall, %U+%S s cpu" "$@"; }

[ -f "$B/train_sub.jsonl" ] || { stamp subsample; $PY bench/generalisation_subsample.py --states "$STATES" --out "$B/train_sub.jsonl"; }

precompute() {  # name, backbone, max_length, layers[, --sequence_layers: cache every token instead of step ends]
    timed "precompute $1" $PY -m agentrm.precompute --backbone "$2" --max_length "$3" "${5:---layers}" "$4" \
        --data "[$B/train_sub.jsonl,$D/dev_unseen.jsonl]" --shard_size 128 --threads 1 --progress false \
        --out "$B/features/$1" >> "$B/logs/precompute_$1.log" 2>&1
}
stamp precompute
precompute smollm2 smollm2-135m-instruct 1024 '[8,15]' & p1=$!
precompute minilm all-minilm-l6-v2 512 '[3,6]' & p2=$!
wait $p1; wait $p2
tail -n 2 "$B"/logs/precompute_*.log

fit_and_export() {  # name, module class path, max_length
    local rm=$B/rm/$1
    [ -d "$rm/hf_model_selected" ] && { echo "$1: exported already ($rm/hf_model_selected)"; return; }
    if [ ! -d "$rm/hf_model" ]; then
        local resume=(); [ -f "$rm/checkpoints/last.ckpt" ] && resume=(--ckpt_path last)
        stamp "fit $1"
        timed "fit $1" $PY -m agentrm.fit --config "$CFG/$1.yaml" --trainer.enable_progress_bar false "${resume[@]}" \
            2>&1 | tee -a "$B/logs/fit_$1.log"
    fi
    local best; best=$(ls "$rm"/checkpoints/epoch*-unseen_auroc*.ckpt | head -n 1)
    $PY bench/generalisation_export_best.py "$best" "$rm/hf_model_selected" --max_length "$3" --module "$2"
}
probe_layer() {  # name, the other cached layer: the same fit on it, for the layer choice the config records
    local name=$1_l$2 cfg=$B/layer_probe/$1_l$2.yaml
    [ -d "$B/rm/$name/hf_model" ] && return
    mkdir -p "$B/layer_probe"
    sed "s/$1/$name/g; s/^    layer: .*/    layer: $2/" "$CFG/$1.yaml" > "$cfg"
    $PY -m agentrm.fit --config "$cfg" --trainer.enable_progress_bar false 2>&1 | tee -a "$B/logs/fit_$name.log" \
        | grep "best val_unseen"
}
{ probe_layer frozen_smollm2 15; fit_and_export frozen_smollm2 agentrm.lit.head_module.FeatureHeadModule 1024; } & p1=$!
{ probe_layer frozen_minilm 6; fit_and_export frozen_minilm agentrm.lit.head_module.FeatureHeadModule 512; } & p2=$!
wait $p1; wait $p2
{ precompute smollm2_seq smollm2-135m-instruct 1024 '[8]' --sequence_layers
  fit_and_export lora_smollm2 agentrm.lit.head_module.TopLayersModule 1024; } & p1=$!
fit_and_export tiny agentrm.lit.value_module.ValueRMModule 1024
wait $p1

export REFERENCE_SCORER=tiny_sub SCIWORLD_EPISODES=30
evaluate() {  # run directory, config: BabyAI on one core, TextWorld then ScienceWorld on the other
    OUT=$B/$1 CFG_EXTRA=$CFG/$2 PNG=$B/$1/families.png FAMILIES=babyai bash scripts/generalisation_test.sh \
        > "$B/logs/$1_babyai.log" 2>&1 & local p=$!
    OUT=$B/$1 CFG_EXTRA=$CFG/$2 PNG=$B/$1/families.png FAMILIES="textworld sciworld" \
        bash scripts/generalisation_test.sh > "$B/logs/$1_tw_sw.log" 2>&1
    wait $p
    grep -h "s wall" "$B/logs/$1_babyai.log" "$B/logs/$1_tw_sw.log"
}
evaluate test_eval test_eval.yaml      # tiny_sub and the two frozen heads
evaluate lora_eval lora_eval.yaml      # the top-block LoRA RM, same episodes, its own run directory
# the report over all four RMs (the LoRA rows joined on the same episodes, checked episode by episode)
OUT=$B/test_eval PNG=docs/img/generalisation_backbones.png JOIN="$B/lora_eval/babyai $B/lora_eval/textworld \
    $B/lora_eval/sciworld" FAMILIES= bash scripts/generalisation_test.sh
