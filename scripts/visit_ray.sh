#!/usr/bin/env bash
# GPU visit for issue 22 / issue 18 item 7 (under 4 minutes on one H200):
# 1. run-batch on a GPU: when the first result lines appear and how the ETA compares with the
#    real end (scripts/run_batch_watch.py, dummy Qwen3-0.6B, 3000 requests);
# 2. when Ray is installed there (it usually is not): Ray Data with one GPU replica
#    (num_gpus=1), 64 rows, greedy.
# Run from the repository root: bash scripts/visit_ray.sh ; results under $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
echo "=== run-batch watch ($(date +%T))"
timeout 200 python3 scripts/run_batch_watch.py --requests 3000 --out "$OUT" 2>&1 | tail -15
echo "=== ray ($(date +%T))"
if ! python3 -c "import ray, ray.data" 2>/dev/null; then
  echo "ray is not installed here: Ray on GPU not checked"; exit 0
fi
timeout 150 python3 - "$OUT" <<'PY' 2>&1 | grep -vE "INFO|WARNING|^\s*$" | tail -15
import sys, os
from nanovllm import SamplingParams
from nanovllm import ray as nray
import ray
from nanovllm.utils.dummy import write_model_folder
model = write_model_folder(os.path.join(sys.argv[1], "qwen3-0.6b-ray"), "qwen3-0.6b")
kw = dict(load_format="dummy", max_model_len=1024, seed=0)
ray.init(include_dashboard=False)
prompts = [[100 + i, 200, 300 + i] for i in range(64)]
ds = ray.data.from_items([{"id": i, "prompt_token_ids": p} for i, p in enumerate(prompts)])
ds = ds.map_batches(nray.LLMPredictor, fn_constructor_kwargs=dict(model=model,
     sampling_params={"temperature": 0, "max_tokens": 16}, **kw), concurrency=1, num_gpus=1, batch_size=64)
got = sorted(ds.take_all(), key=lambda r: r["id"])
print("ray data on GPU rows:", len(got), "first tokens:", list(got[0]["generated_token_ids"])[:8])
PY
