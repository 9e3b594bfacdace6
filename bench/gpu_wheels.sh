#!/usr/bin/env bash
# Wheels for the GPU check machine (Python 3.12; its image has torch, transformers, tokenizers, numpy,
# pyyaml, xxhash, psutil, einops, msgpack, ninja, py-cpuinfo, matplotlib, filelock, cloudpickle, but
# not the packages below). Written to .whl/ (git-ignored); bench/gpu_check.sh installs them there.
# Usage, from the repository root: bash bench/gpu_wheels.sh
set -euo pipefail
DEST=.whl
PY=${PY:-.venv/bin/python}
rm -rf "$DEST" && mkdir -p "$DEST"
# pydantic and pydantic-core must be a matching pair: take the venv's.
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PYDANTIC="pydantic==$(version pydantic) pydantic-core==$(version pydantic-core)"

# Pure-Python wheels, and binary ones for CPython 3.12 on x86-64 manylinux.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$DEST" \
    mosaicml-streaming==0.13.0 catalogue brotli python-snappy cramjam zstd \
    $PYDANTIC annotated-types typing-inspection typing-extensions hjson \
    omegaconf antlr4-python3-runtime submitit

# DeepSpeed is published as a source archive only: build a pure-Python wheel (no ops compiled; they
# are compiled just in time on the GPU machine when used).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8

ls -la "$DEST"
du -sh "$DEST"
