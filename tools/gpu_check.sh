#!/usr/bin/env bash
# The speed issue's GPU check, for a lent CUDA machine (not CI), which reaches no package index: it
# uses that machine's own Python with a CUDA build of torch, diffusers and transformers, writes random
# SD1.5-layout weights, then runs tools/gpu_check.py once. Prints (and writes to $OUT/gpu.json when
# $OUT is set) the fp16 it/s against diffusers, the low_memory peak and fp16/fp32 parity.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import sys; sys.path.insert(0, "tests")
import reference, safetensors.torch as st
st.save_file(reference.random_sd15_state_dict(0), "/tmp/random-v1-5.safetensors")
PY
python tools/gpu_check.py --ckpt /tmp/random-v1-5.safetensors --json "${OUT:-/tmp}/gpu.json"
