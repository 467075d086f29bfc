#!/usr/bin/env bash
# Wheels kdkit needs beyond a CUDA PyTorch image (pydantic and its parts), for a GPU machine
# without internet: downloaded here into .whl/ (Python 3.12, x86-64), installed there by
# scripts/gpu_check.sh. Keep .whl/ out of git (echo /.whl/ >> .git/info/exclude).
set -eu
PY=${PY:-.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing_extensions==4.16.0
ls .whl
