#!/usr/bin/env bash
# The one GPU measurement of the station (docs/gpu.md): tests/gpu, then bench/gpu.py (engine-only img/s FP16 vs
# FP32 for both models, verdict flips on the real images, inspectd serve end to end at saturation and at 100 fps
# and 80 % of saturation, where the time goes). Writes $OUT/gpu_check.json and $OUT/gpu_check.md (and the tests'
# output). Made for a fresh GPU machine whose Python has torch with CUDA, numpy, OpenCV and onnxruntime and
# nothing else of this project's: the wheels in .whl/ and the images in bench/gpu_images/ travel with the
# working tree (bash bench/gpu_wheels.sh makes both). About 5 minutes on a 16-core H200 station.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run            # here: every phase on the CPU, small (a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
IMAGES=()
[[ -d bench/gpu_images/good ]] && IMAGES=(--images bench/gpu_images)

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" -m bench.gpu --cpu-dry-run --out "$OUT" "${IMAGES[@]}" "${@:2}"
fi

# What the machine lacks, from the carried wheels, into a private folder (never over its own packages).
SITE=$(mktemp -d)/site
if compgen -G ".whl/*.whl" >/dev/null; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    # No pip (or it refused): a wheel is a zip of the files to put on the path; none of these needs more.
    echo "pip could not install the carried wheels; unpacking them instead" >&2
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
  fi
fi
export PYTHONPATH="$SITE:$PWD"
{ nvidia-smi || true; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'; } \
  > "$OUT/environment.txt" 2>&1

# The real-device tests first (they skip what the machine cannot run: TensorRT without tensorrt).
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="--strict-markers -ra" tests/gpu -s > "$OUT/pytest-gpu.txt" 2>&1
echo "tests/gpu exit code $?" | tee -a "$OUT/pytest-gpu.txt"
tail -3 "$OUT/pytest-gpu.txt"

timeout 420 "$PY" -m bench.gpu --out "$OUT" "${IMAGES[@]}" "$@" 2> "$OUT/gpu_check.log"
code=$?
tail -40 "$OUT/gpu_check.log"
exit $code
