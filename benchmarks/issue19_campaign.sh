#!/usr/bin/env bash
# The ABXI campaign on Food-Kitchen (issue 19; docs/results.md "ABXI: reproduction, regimes,
# presets and the leaderboard"). Every command resumes an interrupted run from its checkpoint
# and skips a finished one, so re-running this script continues where the last one stopped.
#
#   bash benchmarks/issue19_campaign.sh              # all stages, one command at a time
#   JOBS=2 bash benchmarks/issue19_campaign.sh       # two at once (threads split between them)
#   STAGES="repro fast" bash benchmarks/issue19_campaign.sh
#
# Stages: repro (abxi-paper, 3 seeds), fast (abxi-fast, 3 seeds), gca (abxi-gca-fast: GCA over
# ABXI in the abxi-fast regime, 3 seeds), autocdsr (L_cd scale: query vs cell, 3 seeds each),
# tune (an Optuna study per model, same trial budget), tuned (3 seeds of each tuned model).
# Logs: runs/campaign/*.log.
set -euo pipefail
D=amazon-food-kitchen-benchmark
JOBS=${JOBS:-1}
STAGES=${STAGES:-"repro fast gca autocdsr tune tuned"}
TRIALS=${TRIALS:-20}
MODELS=${MODELS:-"sasrec bert4rec hstu hstu_cd gca dpg autocdsr_sasrec autocdsr_bert4rec autocdsr_plus abxi abxi_gca"}
THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
mkdir -p runs/campaign
cdsr data build --dataset "$D" > runs/campaign/data.log 2>&1

Q="cdsr study run autocdsr --dataset $D"

cmds=()
for stage in $STAGES; do
  case $stage in
    repro) for s in 1 2 3; do cmds+=("cdsr train --dataset $D --preset abxi-paper --seed $s"); done ;;
    fast) for s in 1 2 3; do cmds+=("cdsr train --dataset $D --preset abxi-fast --seed $s"); done ;;
    gca) for s in 1 2 3; do cmds+=("cdsr train --dataset $D --preset abxi-gca-fast --seed $s"); done ;;
    autocdsr) for s in 1 2 3; do
                cmds+=("$Q --seeds $s --variants autocdsr_sasrec-merged" "$Q --seeds $s --variants autocdsr_sasrec-merged-cell")
              done ;;
    tune) for m in $MODELS; do cmds+=("cdsr tune --dataset $D --model $m --trials $TRIALS"); done ;;
    tuned) for m in $MODELS; do for s in 1 2 3; do
             cmds+=("cdsr train --dataset $D --model $m --seed $s --tuned tuned/$D/$m.json")
           done; done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done

run() {  # one command, its output in its own log
  log="runs/campaign/$(echo "$1" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-80)-$(echo "$1" | md5sum | cut -c1-8).log"
  echo "$(date +%H:%M:%S) start $1"
  if OMP_NUM_THREADS=$THREADS bash -c "$1" > "$log" 2>&1; then echo "$(date +%H:%M:%S) done  $1"
  else echo "$(date +%H:%M:%S) FAILED $1 (see $log)"; fi
}
export -f run
export THREADS
printf '%s\0' "${cmds[@]}" | xargs -0 -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
cdsr leaderboard --dataset "$D" --runs "runs/$D" --runs runs/autocdsr --out "runs/campaign/leaderboard.md"
