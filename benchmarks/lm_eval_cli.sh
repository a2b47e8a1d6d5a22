#!/bin/bash
# lm-eval's own command line on a (pruned, possibly non-uniform) checkpoint, in a Python process where lorashear
# cannot be imported: the checkpoint loads through its own modelling file (trust_remote_code=True).
#   bash benchmarks/lm_eval_cli.sh runs/lorashear/pruned [TASK] [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(realpath "$1"); task=${2:-lorashear_zs_arc_easy}; limit=${3:-100}
tasks=$(mktemp -d)
trap 'rm -rf "$tasks"' EXIT
.venv/bin/python -c "
import sys
from lorashear.evaluation.tasks import write_task_yamls
write_task_yamls(sys.argv[1], names=[sys.argv[2]])" "$tasks" "$task"
HF_HUB_OFFLINE=1 .venv/bin/python -c \
  "import sys; sys.modules['lorashear'] = None; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \
  --model hf --model_args "pretrained=$model,trust_remote_code=True,dtype=float32" \
  --tasks "$task" --include_path "$tasks" --limit "$limit" --batch_size 8 --device cpu
