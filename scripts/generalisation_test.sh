#!/usr/bin/env bash
# The final evaluation of the generalisation experiment (docs/generalisation.md, "Results"), one run per family
# of configs/generalisation/test_eval.yaml (its held_out specs split by family, so each family gets its own
# episode count; episode seeds depend on (seed, spec, index) only, so a family's run plays the same episodes as
# the all-family config), then the per-family tables and figure with paired bootstrap intervals.
# Needs the RMs the config names: python -m agentrm.fit --config configs/generalisation/tiny_value_rm.yaml, then
# bench/generalisation_export_best.py for the epoch selected on val_unseen/auroc (docs/generalisation.md).
# Every run resumes (rerun after an interruption).
# Beam search costs most (TextWorld ~30 s, ScienceWorld several minutes per episode and scorer on one core), so
# it runs on the first TEXTWORLD_BEAM_EPISODES episodes of TextWorld and SCIWORLD_BEAM (a list of [W, K]; [] skips
# it) on ScienceWorld; the settings of the committed results are the defaults:
#   bash scripts/generalisation_test.sh                      # ~28 min on one core (measured: 598 + 646 + 353 s)
#   FAMILIES=babyai bash scripts/generalisation_test.sh      # one family (the report covers every family run so far)
#   FAMILIES= bash scripts/generalisation_test.sh            # the report only
# CFG_EXTRA names a second config composed on top (other scorers, out_dir: scripts/generalisation_backbones.sh),
# OUT the run directory, PNG the figure (default: docs/img/generalisation_test.png for the default OUT, else
# $OUT/families.png, so another run never replaces the committed figure), REFERENCE_SCORER a scorer every other one is also compared with, JOIN
# other run directories (space-separated) whose Best-of-N / beam rows on the same episodes join the report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CFG=configs/generalisation/test_eval.yaml
CONFIGS=(--config "$CFG"); [ -n "${CFG_EXTRA:-}" ] && CONFIGS+=(--config "$CFG_EXTRA")
OUT=${OUT:-runs/generalisation/test_eval}
# the committed figure is the default run's; another run directory gets its figure beside its report
if [ "$OUT" = runs/generalisation/test_eval ]; then PNG=${PNG:-docs/img/generalisation_test.png}; else PNG=${PNG:-$OUT/families.png}; fi
EPISODES=${EPISODES:-30}
TEXTWORLD_BEAM_EPISODES=${TEXTWORLD_BEAM_EPISODES:-12}
SCIWORLD_EPISODES=${SCIWORLD_EPISODES:-6}
SCIWORLD_BEAM=${SCIWORLD_BEAM:-[]}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
run() {  # name, held_out list, extra flags
    local name=$1 specs=$2; shift 2
    echo "== $name ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
    /usr/bin/time -f "$name: %e s wall, %U+%S s cpu" $PY -m agentrm.search "${CONFIGS[@]}" --held_out "$specs" \
        --out_dir "$OUT/$name" --progress false "$@"
}
FAMILIES=${FAMILIES-babyai textworld sciworld}
for fam in $FAMILIES; do case $fam in
babyai) run babyai '[babyai:OpenDoor?max_steps=24, babyai:OpenDoorLoc?max_steps=24, babyai:UnlockLocal?max_steps=40]' \
    --episodes "$EPISODES" ;;
textworld) run textworld '[textworld:cooking@test?games=30]' --episodes "$EPISODES" \
    --beam_episodes "$TEXTWORLD_BEAM_EPISODES" ;;
sciworld) run sciworld '[sciworld:measure-melting-point-known-substance@test?max_steps=45, sciworld:power-component@test?max_steps=35, sciworld:power-component-renewable-vs-nonrenewable-energy@test?max_steps=35, sciworld:chemistry-mix@test?max_steps=45, sciworld:chemistry-mix-paint-secondary-color@test?max_steps=45]' \
    --episodes "$SCIWORLD_EPISODES" --beam "$SCIWORLD_BEAM" ;;
*) echo "unknown family $fam" >&2; exit 2 ;;
esac; done
runs=(); for fam in babyai textworld sciworld; do [ -f "$OUT/$fam/episodes.jsonl" ] && runs+=("$OUT/$fam"); done
REFERENCE=(); [ -n "${REFERENCE_SCORER:-}" ] && REFERENCE=(--reference_scorer "$REFERENCE_SCORER")
JOINED=(); [ -n "${JOIN:-}" ] && read -r -a JOINED <<< "$JOIN" && JOINED=(--join "${JOINED[@]}")
$PY bench/generalisation_report.py "${runs[@]}" \
    --md "$OUT/report.md" --png "$PNG" "${REFERENCE[@]}" "${JOINED[@]}"
