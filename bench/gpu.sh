#!/usr/bin/env bash
# The GPU benchmark: every figure still missing from bench/README.md, in one run of at most 8 minutes,
# on real-size transformers with random weights built from the public configs of bench/configs/
# (no download). Each part's stdout goes to $OUT/<part>.txt (stderr to <part>.err), and the figure
# line of each (its last line) and its peak memory line to $OUT/summary.txt.
#
#   triton_step       the fused SDE step vs the eager torch step: worst difference, time per step on
#                     SD3.5-M-sized latents (8 x 16 x 128 x 128) and one Wan 480p 81-frame video
#                     latent (1 x 16 x 21 x 60 x 104), bf16
#   rollout           rollout with log-probs vs StableDiffusion3Pipeline.__call__ on SD3.5 Medium's
#                     transformer (tiny CLIP encoders and VAE; 128 px through the 2x VAE: 64 x 64
#                     latents, SD3.5-M's 512 px token count), eager (P1 on a GPU)
#   rollout_compiled  the same, ours compiled (run.compile's regional compile)
#   flow_grpo         one Flow-GRPO iteration, align vs bench/flow_grpo_iteration.py's reference-style
#                     loop, SD3.5 Medium's transformer with LoRA r32 (P2 on a GPU)
#   attention         SDPA / flash / sage / xformers where they import, on FLUX.1-dev's transformer
#                     with 5 + 10 of its 19 + 38 blocks (bench/configs/), 4096 + 512 tokens
#   expected          the memory table's expected static figures for SD3.5 Medium (bench/memory.py),
#                     and this run's own (bf16 transformer + LoRA states, counted from the config)
#
#   OUT=/tmp/out bash bench/gpu.sh           # on a CUDA machine
#   OUT=/tmp/out bash bench/gpu.sh --cpu-smoke   # every part at a tiny size on the CPU (the tests run it)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu-bench}"
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "usage: OUT=DIR bash bench/gpu.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done

SD35=bench/configs/sd35_medium_transformer.json
if [[ $SMOKE == 1 ]]; then
  TOTAL=300
  SD3_CONFIG=bench/configs/tiny_sd3_transformer.json
  FLUX_CONFIG=bench/configs/tiny_flux_transformer.json
  DEVICE=(--device cpu --dtype float32)
  TRITON=(--repeats 1 --shape 2,16,8,8 --shape 1,16,2,4,4 --dtype float32)
  ROLLOUT=(--size 32 --batch 1 --steps 2 --repeats 1)
  COMPILE=(--compile --compile-backend aot_eager)
  FLOW=(--size 32 --steps 2 --iterations 2)
  ATTENTION=(--tokens 64 --text 8 --repeats 1)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  # the parts start in children forked from one interpreter that has imported torch, diffusers and the
  # project (bench/fork_server.py): about 8 s of imports once instead of once per part. Triton reads
  # TRITON_INTERPRET when it loads, so the server sets it for triton_step's interpreted kernel
  export TRITON_INTERPRET=1
  SOCKET_DIR="$(mktemp -d)"
  SOCKET="$SOCKET_DIR/fork_server.sock"
  "$PYTHON" bench/fork_server.py serve "$SOCKET" &
  SERVER=$!
  trap 'kill "$SERVER" 2>/dev/null; rm -rf "$SOCKET_DIR"' EXIT
  RUN=("$PYTHON" bench/fork_server.py run "$SOCKET")
else
  TOTAL=460  # seconds for all the parts: the script stays under 8 minutes
  SD3_CONFIG=$SD35
  FLUX_CONFIG=bench/configs/flux1_dev_transformer_reduced.json
  DEVICE=(--device cuda --dtype bfloat16)
  TRITON=(--repeats 20 --shape 8,16,128,128 --shape 1,16,21,60,104 --dtype bfloat16)
  ROLLOUT=(--size 128 --batch 2 --steps 10 --repeats 2)
  COMPILE=(--compile)
  FLOW=(--size 128 --iterations 2)
  ATTENTION=(--tokens 4096 --text 512 --repeats 5)
  RUN=("$PYTHON")
fi

START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# run_part NAME LIMIT_S SCRIPT ARGS...: at most LIMIT_S seconds and no later than START + TOTAL
run_part() {
  local name=$1 limit=$2 left rc=0 began
  shift 2
  left=$((START + TOTAL - $(date +%s)))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    echo "$name: SKIPPED (the 8-minute budget is spent)" >>"$SUMMARY"
    return 0
  fi
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "${RUN[@]}" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err" || rc=$?
  local took=$(($(date +%s) - began))
  if ((rc != 0)); then
    local why="exit $rc"
    ((rc == 124 || rc == 137)) && why="timed out after ${limit} s"
    echo "$name: FAILED ($why; see $name.err)" >>"$SUMMARY"
    return 0
  fi
  echo "$name: $(grep -v '^[[:space:]]*$' "$OUT/$name.txt" | tail -n 1) (${took} s)" >>"$SUMMARY"
  local peak
  peak=$(grep -io 'peak [a-z ]*[0-9.]* GiB' "$OUT/$name.txt" | paste -sd ';' - || true)
  [[ -n $peak ]] && echo "$name memory: ${peak//;/; }" >>"$SUMMARY"
  return 0
}

run_part expected 60 - "$SD35" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, ".")
from bench.memory import REAL, expected_gib
from bench.real_models import RealModel, count_denoiser
from bench.rollout import transformer_config

config_path = sys.argv[1]
params, lora = count_denoiser(RealModel("SD3.5 Medium", "sd3", "SD3Transformer2DModel",
                                        transformer_config(config_path)), 32)
own = (params * 2 + lora * 16) / 2**30
print(f"SD3.5 Medium transformer of {Path(config_path).name}: {params / 1e9:.2f}B params counted "
      f"(memory table: {REAL['sd3'][1] / 1e9:.2f}B), LoRA r32 {lora / 1e6:.1f}M params")
print(f"memory table (bench/memory.py), SD3.5 Medium LoRA, static: {expected_gib('sd3', 'lora'):.1f} GiB with "
      f"its text encoders, {expected_gib('sd3', 'lora+offload'):.1f} GiB with them offloaded")
print(f"this run's models (tiny text encoders and VAE): bf16 transformer {params * 2 / 2**30:.2f} GiB per copy "
      f"(rollout holds 2 copies, without LoRA); + LoRA r32 fp32 weight, gradient, Adam moments = {own:.2f} GiB "
      f"for flow_grpo's trainer, activations on top")
print(f"expected_static_gib_sd35m_lora={own:.2f}")
PY
run_part triton_step 60 bench/triton_step.py "${TRITON[@]}"
run_part rollout 100 bench/rollout.py --transformer-config "$SD3_CONFIG" "${DEVICE[@]}" "${ROLLOUT[@]}"
run_part rollout_compiled 140 bench/rollout.py --transformer-config "$SD3_CONFIG" "${DEVICE[@]}" "${ROLLOUT[@]}" \
  "${COMPILE[@]}"
run_part flow_grpo 140 bench/flow_grpo_iteration.py --transformer-config "$SD3_CONFIG" "${DEVICE[@]}" "${FLOW[@]}"
run_part attention 60 bench/attention.py --config "$FLUX_CONFIG" "${DEVICE[@]}" "${ATTENTION[@]}"

echo "total: $(($(date +%s) - START)) s ($([[ $SMOKE == 1 ]] && echo 'CPU smoke, tiny configs' || echo 'GPU, real-size configs'))" \
  >>"$SUMMARY"
cat "$SUMMARY"
