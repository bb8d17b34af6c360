#!/usr/bin/env bash
# Prepares, inside the working tree and ignored by git, what bench/gpu_check.sh carries to a fresh GPU machine
# (Python 3.12 with torch + CUDA, numpy, OpenCV and onnxruntime, nothing else of this project's):
#   .whl/              wheels (CPython 3.12, manylinux x86_64) of what such a machine lacks: the daemon's
#                      dependencies (pyzmq, watchdog, pydantic-settings, structlog, prometheus-client, …), onnx (the
#                      export and the FP16 graph) and pytest (tests/gpu)
#   bench/gpu_images/  24 good + 10 NG real screws (../shared/data/screws-300, or $INSPECTD_REALDATA)
# Each wheel is the version this project's tests run with (read from $PYTHON's environment: the project's
# venv) and is downloaded only when .whl/ lacks it. About 45 MB in all (the device runner carries ≤ 64 MiB).
#
#   PYTHON=/path/to/venv/bin/python bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${INSPECTD_REALDATA:-../shared/data/screws-300}
# Binary wheels (CPython 3.12 ABI) and pure-Python ones (py3-none-any).
BINARY="pyzmq pydantic-core watchdog onnx ml-dtypes protobuf"
PURE="pydantic pydantic-settings python-dotenv typing-extensions typing-inspection annotated-types structlog
prometheus-client pytest pluggy iniconfig packaging pytest-timeout"

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
have() { # a wheel of NAME==VERSION already in .whl/ (wheel names normalise - to _)
  local stem; stem=$(echo "$1" | tr '-' '_')
  compgen -G ".whl/${stem}-$2-*.whl" >/dev/null || compgen -G ".whl/$(echo "$stem" | tr 'A-Z' 'a-z')-$2-*.whl" >/dev/null
}
mkdir -p .whl
for name in $BINARY $PURE; do
  v=$(version "$name")
  if have "$name" "$v"; then continue; fi
  case " $BINARY " in
    *" $name "*) platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64) ;;
    *) platforms=(--platform any) ;;
  esac
  echo "downloading $name==$v" >&2
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$name==$v"
done

if [[ -d "$DATA/good" ]]; then
  rm -rf bench/gpu_images
  mkdir -p bench/gpu_images/good bench/gpu_images/not-good
  # Evenly over the sorted files, so every defect type of not-good/ has a chance.
  pick() { "$PY" -c 'import sys, numpy as np; f = sorted(sys.argv[2:]); n = int(sys.argv[1]);
print("\n".join(f[i] for i in sorted(set(np.linspace(0, len(f) - 1, n).round().astype(int)))))' "$@"; }
  pick 24 "$DATA"/good/*.png | xargs -I{} cp {} bench/gpu_images/good/
  pick 10 "$DATA"/not-good/*.png | xargs -I{} cp {} bench/gpu_images/not-good/
else
  echo "no real screws at $DATA: bench/gpu_check.sh will use rendered ones" >&2
fi
du -sh .whl bench/gpu_images 2>/dev/null || true
