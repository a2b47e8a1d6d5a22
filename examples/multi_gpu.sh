#!/usr/bin/env bash
# lorashear on several GPUs of one machine: the prune stage (LHSPG) runs data-parallel (DDP) under
# `accelerate launch`; the knowledge analysis, recovery and evaluation run in one process before and after.
#
#   NPROC=8 CONFIG=examples/configs/llama3-8b-r20.yaml bash examples/multi_gpu.sh
#
# Every process holds the whole model and LoRA factors and reads its own share of each step's batch, so one
# step sees NPROC x batch_size x grad_accum sequences: divide `steps` (or `grad_accum`) by NPROC in the config
# to keep the token budget of the one-GPU run. The same command runs on CPUs (gloo): the test
# tests/test_run_pipeline.py::test_run_prune_stage_under_accelerate_launch runs it with 2 CPU processes on a
# tiny model. FSDP (sharded parameters) is not supported: it is untested, and LHSPG's per-structure updates
# need whole parameter rows on every process.
set -euo pipefail
CONFIG="${CONFIG:-examples/configs/llama3-8b-r20.yaml}"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[ "${NPROC:-0}" -ge 1 ] || { echo "multi_gpu.sh: no GPU found; set NPROC" >&2; exit 2; }

lorashear run --config "$CONFIG" --stages analyze
accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision bf16 \
    -m lorashear run --config "$CONFIG" --stages prune
lorashear run --config "$CONFIG" --stages recover,eval
