#!/usr/bin/env bash
# The Fashion-MNIST GPU run of bench/RESULTS.md on a machine without dvc or mlflow (the device
# machine): the pipeline's stages in dvc.yaml order, with time boxes so that each phase fits one
# 10-minute device call. Stages resume, so a phase run again continues where it stopped.
#   bash bench/gpu_fmnist.sh experts   # download, zca, experts (time-boxed) beside the full-set run
#   bash bench/gpu_fmnist.sh distill   # distill@1/10/50 side by side (time-boxed)
#   bash bench/gpu_fmnist.sh evaluate  # evaluate@1/10/50 side by side, then the summary
# Env: P (params), EXPERTS_S / DISTILL_S (time boxes, s), LOGS (log folder), PYTHON.
set -uo pipefail
P=${P:-bench/fashion_mnist_gpu_session.yaml}
LOGS=${LOGS:-logs}
PY=${PYTHON:-python3}
export DATM_TRACKING=off PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$LOGS"
ipcs=$($PY -c "from datm.config import load_params; print(*load_params('$P').ipcs)")
stamp() { echo "[$(date +%T)] $*"; }
# `side_by_side NAME CMD...`: CMD --ipc N --params P for every IPC at once (they share the GPU),
# logging to $LOGS/NAME_N.log.
side_by_side() {
  local name=$1 pids=() ipc pid
  shift
  for ipc in $ipcs; do
    "$@" --ipc "$ipc" --params "$P" >"$LOGS/${name}_$ipc.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || stamp "$name: pid $pid exit $?"; done
}

case "${1:-}" in
experts)
  stamp download+zca
  $PY -m stages.download --params "$P" && $PY -m stages.zca --params "$P" || exit 1
  stamp "fullset (background) and experts (time box ${EXPERTS_S:-420} s)"
  $PY -m stages.evaluate --fullset --params "$P" >"$LOGS/fullset.log" 2>&1 &
  full=$!
  # SIGINT: the stage stops between groups' writes; finished experts stay on disk.
  timeout -s INT "${EXPERTS_S:-420}" $PY -m stages.buffers --params "$P" >"$LOGS/buffers.log" 2>&1
  done_k=$(ls artifacts/buffers/expert_*.safetensors 2>/dev/null | wc -l)
  stamp "$done_k experts finished"
  [ "$done_k" -gt 0 ] || exit 1
  # Re-run with K = the experts that finished: it trains nothing and writes metrics/buffers.json.
  sed "s/num_experts: [0-9]*/num_experts: $done_k/" "$P" >"$LOGS/params_k.yaml"
  $PY -m stages.buffers --params "$LOGS/params_k.yaml" >>"$LOGS/buffers.log" 2>&1
  wait $full
  stamp "fullset exit $?"
  tail -n 3 "$LOGS/buffers.log" "$LOGS/fullset.log"
  ;;
distill)
  stamp "distill@{$ipcs} side by side (time box ${DISTILL_S:-300} s)"
  side_by_side distill timeout -s INT "${DISTILL_S:-300}" $PY -m stages.distill
  # A run stopped by the time box ends at its last checkpoint: the same run with `iterations`
  # set there resumes at its end and writes the distilled set.
  for ipc in $ipcs; do
    [ -f "artifacts/distilled/ipc_$ipc.safetensors" ] && continue
    $PY - "$P" "$ipc" "$LOGS/params_ipc$ipc.yaml" <<'PYEOF' || exit 1
import sys, yaml
from datm import artifacts
from datm.distill import CHECKPOINT
params, ipc, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
meta = artifacts.read_meta(f"checkpoints/distill_ipc_{ipc}.safetensors", CHECKPOINT)
raw = yaml.safe_load(open(params))
raw["distill"]["ipc"][ipc]["iterations"] = meta["iteration"]
yaml.safe_dump(raw, open(out, "w"))
print(f"ipc {ipc}: stopped at iteration {meta['iteration']}")
PYEOF
    $PY -m stages.distill --ipc "$ipc" --params "$LOGS/params_ipc$ipc.yaml" >>"$LOGS/distill_$ipc.log" 2>&1 || exit 1
  done
  stamp "distill done"
  tail -n 2 "$LOGS"/distill_*.log
  ;;
evaluate)
  side_by_side evaluate $PY -m stages.evaluate
  stamp "evaluate done"
  $PY -m stages.summary --params "$P" >"$LOGS/summary.log" 2>&1
  stamp "summary exit $?"
  tail -n 2 "$LOGS"/evaluate_*.log
  ;;
*) echo "usage: bench/gpu_fmnist.sh experts|distill|evaluate" >&2; exit 2 ;;
esac
