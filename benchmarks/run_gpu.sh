#!/usr/bin/env bash
# Produce the GPU rows of benchmarks/RESULTS.md on one NVIDIA H100 (torch 2.11, no network needed).
#
#   bash benchmarks/run_gpu.sh            # the full run: writes benchmarks/results-gpu/*.json and *.txt
#   bash benchmarks/run_gpu.sh --quick    # the targets only, in under 8 minutes (python -m benchmarks.gpu_quick)
#
# --quick takes the flags of `python -m benchmarks.gpu_quick` (--budget-s, --steps, --models, --out-dir, ...;
# `bash benchmarks/run_gpu.sh --quick --help` lists them). It answers the targets on DiT-B/2 (batch 256) and
# DiT-XL/2 (batch 128): dense vs treadfx vs the hand-written reference under torch.compile(model), 20 interleaved
# timed steps each. It writes dit-b2.json, dit-xl2.json, quick.json and quick.txt, and prints PASS/FAIL per target.
#
# The full run takes no flags. Needs: a CUDA build of torch (2.11 is what the anchor numbers in RESULTS.md used),
# networkx, diffusers (for the flux row), and treadfx installed (`pip install --no-index --no-deps
# --no-build-isolation -e .` works offline; the script does it if `import treadfx.models.dit` fails).  Total wall
# time on an H100: roughly 30-40 minutes, most of it cold torch.compile time (each variant compiles from scratch;
# inductor caches are off unless --warm-cache).
set -euo pipefail
export TREADFX_QUICK_T0=$(date +%s.%N)  # --quick counts its --budget-s from here
quick=0
args=()
for a in "$@"; do
  if [[ $a == --quick ]]; then quick=1; else args+=("$a"); fi
done
if (( ! quick && ${#args[@]} > 0 )); then
  echo "run_gpu.sh: unknown argument '${args[0]}': the full run takes no arguments; for the short check of the" \
       "targets use --quick [flags of python -m benchmarks.gpu_quick]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT_DIR:-benchmarks/results-gpu}
if (( quick )); then  # treadfx is imported from the repository root; the module makes its own fresh caches
  exec "$PY" -m benchmarks.gpu_quick --quick --out-dir "$OUT" ${args[@]+"${args[@]}"}
fi
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}

if ! "$PY" -c "import treadfx.models.dit" 2>/dev/null; then
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >/dev/null
fi
"$PY" - <<'EOF' | tee "$OUT/env.txt"
import torch, treadfx
assert torch.cuda.is_available(), "no CUDA device: this script produces the GPU table"
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), "| treadfx", treadfx.__version__)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$OUT/env.txt" || true

run() {  # name, then flags for benchmarks.step
  local name=$1; shift
  echo "=== $name: python -m benchmarks.step $*"
  "$PY" -m benchmarks.step --device cuda "$@" --out "$OUT/$name.json" | tee "$OUT/$name.txt"
}

# 1. DiT-B/2, batch 256, 256 px: dense vs reference vs treadfx, each with and without the official fp32 block,
#    under every compile setting (none, torch.compile(model), per-block compile as in the official code)
run dit-b2 --model dit-b2 --batch 256 --compile all --official-fp32 --steps 50 --warmup 10
# 2. DiT-XL/2, batch 128, 256 px
run dit-xl2 --model dit-xl2 --batch 128 --compile all --official-fp32 --steps 50 --warmup 10
# 3. Flux (2 double + 4 single blocks, width 3072, 1024 image + 256 text tokens), batch 4
run flux --model flux --batch 4 --compile all --steps 30 --warmup 10
# 4. where the time of a routed step goes (eager and compiled)
run profile-xl2-none --model dit-xl2 --batch 128 --compile none --variants treadfx --profile --steps 20 --warmup 5
run profile-xl2-model --model dit-xl2 --batch 128 --compile model --variants treadfx --profile --steps 20 --warmup 5
# 5. route ops at B16 N1024 D1152 vs one DiT-XL block
echo "=== route_ops: python -m benchmarks.route_ops --device cuda"
"$PY" -m benchmarks.route_ops --device cuda --batch 16 --tokens 1024 --dim 1152 --steps 100 --warmup 20 \
  --out "$OUT/route_ops.json" | tee "$OUT/route_ops.txt"
# 6. transform (trace + rewrite) time of DiT-XL/2 on this machine's CPU (target < 2 s)
"$PY" -m benchmarks.step --device cpu --model dit-xl2 --batch 128 --transform-only --out "$OUT/xl2-transform.json" \
  | tee "$OUT/xl2-transform.txt"
echo "results in $OUT"
