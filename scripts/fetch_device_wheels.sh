#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels that the lent GPU machine's image lacks, for Python 3.12,
# manylinux x86_64, pinned to versions that work with its torch 2.11 / triton 3.6: one command, here.
#
#   bash scripts/fetch_device_wheels.sh [DEST]        # DEST defaults to .whl
#
# Then one device call runs everything (see scripts/device_check.sh): run with carry [".whl"] and
#   bash scripts/device_check.sh
#
# What is fetched and why (the image already holds einops, msgpack, ninja, py-cpuinfo, psutil, packaging,
# numpy, tqdm, nvidia-ml-py, typing-extensions, pyyaml, pytest, pytest-timeout and pytest-xdist):
# * jsonargparse + docstring-parser + typeshed-client: LightningCLI (`python -m agentrm.fit`), i.e. the
#   DeepSpeed and DDP tests;
# * deepspeed (a source distribution on PyPI: its wheel is built here with DS_BUILD_OPS=0, so no op is
#   precompiled; ops JIT-compile on the lent machine, which has nvcc) + hjson, pydantic, pydantic-core,
#   annotated-types, typing-inspection;
# * liger-kernel, cut-cross-entropy: the peers in the kernel sweep;
# * bitsandbytes: its PyPI wheel carries libraries for every CUDA 11.8-13.2, ROCm and XPU build and is over
#   the budget alone, so it is repacked here keeping only the CUDA 13.0 library (the lent machine's torch is
#   +cu130) and the CPU library; the original and repacked sizes are printed. If even that did not fit, it
#   would be left out and the nf4/int8 GPU tests would be reported as not run.
# The total must stay under BUDGET_MB (40 MB): a device call carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
BUDGET_MB=40
BNB_KEEP_CUDA=${BNB_KEEP_CUDA:-130}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PINS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
      liger-kernel==0.8.5 cut-cross-entropy==25.1.1
      hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
DEEPSPEED=deepspeed==0.19.8
BNB=bitsandbytes==0.50.2

mkdir -p "$DEST"
old=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%f ')
if [ -n "$old" ]; then
  # every wheel there travels and is installed: two versions of one package stop the install
  echo "fetch_device_wheels: replacing the wheels already in $DEST: $old"
  rm -f "$DEST"/*.whl
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "fetch_device_wheels: downloading ${#PINS[@]} wheels for cp312 manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PINS[@]}"

echo "fetch_device_wheels: building the $DEEPSPEED wheel from its source distribution (DS_BUILD_OPS=0)"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$TMP/sdist" "$DEEPSPEED"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
  "$TMP"/sdist/deepspeed-*.tar.gz > "$TMP/deepspeed-build.log" 2>&1 || {
    tail -20 "$TMP/deepspeed-build.log"; echo "fetch_device_wheels: the deepspeed wheel did not build" >&2; exit 1; }

echo "fetch_device_wheels: $BNB"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$TMP/bnb" "$BNB"
"$PY" - "$TMP"/bnb/bitsandbytes-*.whl "$DEST" "$BUDGET_MB" "$BNB_KEEP_CUDA" <<'EOF'
"""Keep bitsandbytes if it fits the budget left; else repack it with one CUDA library and the CPU one."""
import base64
import hashlib
import os
import re
import sys
import zipfile
from pathlib import Path

src, dest, budget_mb, keep = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
used = sum(p.stat().st_size for p in dest.glob("*.whl"))
left = budget_mb * 1e6 - used
size = src.stat().st_size
print(f"  {src.name}: {size / 1e6:.1f} MB as published; {left / 1e6:.1f} MB of the {budget_mb:g} MB budget left")
if size <= left:
    os.replace(src, dest / src.name)
    print("  kept as published")
    sys.exit(0)
keep_lib = re.compile(rf"bitsandbytes/libbitsandbytes_(cuda{keep}|cpu)\.so$")
drop = re.compile(r"bitsandbytes/libbitsandbytes_\w+\.so$")
out = dest / src.name
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if not drop.search(n) or keep_lib.search(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for n in names:
        if n == record:
            continue
        data = zin.read(n)
        zout.writestr(zin.getinfo(n), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{n},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
dropped = sorted(set(zipfile.ZipFile(src).namelist()) - set(names))
new = out.stat().st_size
if new > left:
    out.unlink()
    print(f"  repacked it is still {new / 1e6:.1f} MB: left out; the nf4/int8 GPU tests will be reported as not run")
    sys.exit(0)
print(f"  repacked to {new / 1e6:.1f} MB: kept libbitsandbytes_cuda{keep}.so and libbitsandbytes_cpu.so, "
      f"dropped {len(dropped)} other libraries ({', '.join(Path(d).name for d in dropped)})")
EOF

echo "fetch_device_wheels: $DEST holds"
"$PY" - "$DEST" "$BUDGET_MB" <<'EOF'
import sys
from pathlib import Path

dest, budget = Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted(dest.glob("*.whl"))
for w in wheels:
    print(f"  {w.stat().st_size / 1e6:7.2f} MB  {w.name}")
total = sum(w.stat().st_size for w in wheels)
print(f"  {total / 1e6:7.2f} MB  total ({len(wheels)} wheels; budget {budget:g} MB)")
if total > budget * 1e6:
    sys.exit(f"fetch_device_wheels: {total / 1e6:.1f} MB is over the {budget:g} MB budget")
EOF
