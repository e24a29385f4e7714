#!/usr/bin/env bash
# GPU check of megasae's kernels, self-contained for a machine with a CUDA GPU, python3 with
# PyTorch, nvcc and ninja, and nothing to download (no pip, no network):
#
#   1. builds megasae._C in place for this GPU's architecture (setup.py build_ext --inplace);
#   2. runs the CUDA cases of the kernel tests (tests/test_ops.py, tests/test_topk_encode.py);
#   3. runs `megasae bench kernels --profile` in bf16, fp32 and tf32 on the GPU (the issue's target shape
#      N=8192 d=4096 M=131072 k=64 and two smaller ones), next to sparsify when it imports;
#   4. runs tests/test_cuda.py: training, eval and --compile on the GPU against the same CPU runs.
#
# Usage: launch/gpu_check.sh [OUT_DIR]       (default: $OUT if set, else out/gpu_check)
# Everything it prints also lands in OUT_DIR (build.log, tests.log, bench_*.json, bench_*.log,
# env.txt). Sized to finish in about 6 minutes on an H100/H200; each stage has its own time limit,
# and a failing stage does not stop the later ones (the exit status says whether any failed).
# Python packages missing there (tyro, gguf, eai-sparsify and its dependencies, or megasae's pinned
# peft/transformers) can travel as wheels in .gpu_wheels/ (`make gpu-wheels` fills it here);
# they are installed into a private folder, never into the machine's Python. If megasae's
# dependencies still fail to import, the kernels are imported without the package __init__
# (see megasae_gpu_stub below) and step 4 fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-out/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1
# tests/conftest.py turns on torch.use_deterministic_algorithms, which cuBLAS only allows with this.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
stage() { echo; echo "=== $* ($(date +%T))"; }

stage "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  command -v nvcc && nvcc --version | tail -n 2
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT_DIR/env.txt"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" | tee -a "$OUT_DIR/env.txt"

if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
  stage "carried wheels"
  SITE=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl 2>&1 | tail -n 5
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

stage "build (setup.py build_ext --inplace)"
rm -f megasae/_C*.so
timeout 300 $PY setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1
rc=$?
tail -n 15 "$OUT_DIR/build.log"
if [ $rc -ne 0 ]; then
  echo "gpu_check: the build failed (exit $rc); see $OUT_DIR/build.log"
  grep -n -E "error|Error" "$OUT_DIR/build.log" | head -n 40
  exit 1
fi

# Imports the full package when its dependencies allow, else only megasae.ops and megasae.bench
# (neither needs peft or transformers): a package module without running megasae/__init__.py.
STUB_DIR=$(mktemp -d)
cat >"$STUB_DIR/megasae_gpu_stub.py" <<EOF
import sys, types
try:
    import megasae  # noqa: F401
except Exception as e:  # missing or too old dependencies of the PEFT side
    for name in [n for n in sys.modules if n == "megasae" or n.startswith("megasae.")]:
        del sys.modules[name]
    package = types.ModuleType("megasae")
    package.__path__ = ["$ROOT/megasae"]
    sys.modules["megasae"] = package
    print(f"megasae_gpu_stub: importing the kernels without megasae/__init__.py ({type(e).__name__}: {e})")
EOF
export PYTHONPATH="$STUB_DIR:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

stage "the extension"
timeout 120 $PY -c "
import megasae_gpu_stub, torch
import megasae._C as C
from megasae import ops
print('with_cuda', C.with_cuda, 'backend', ops.backend())
assert C.with_cuda and ops.backend() == 'cuda', 'the CUDA kernels are not in use'
x = torch.randn(64, 32, device='cuda'); W = torch.randn(1000, 32, device='cuda')
v, i = ops.topk_encode(x, W, torch.zeros(1000, device='cuda'), None, 8)
ref = (x @ W.T).topk(8)
assert torch.equal(i, ref.indices), 'topk_encode disagrees with torch.topk'
print('smoke test ok')
" 2>&1 | tee "$OUT_DIR/smoke.log" || status=1

stage "kernel tests (the CUDA cases)"
timeout 240 $PY -m pytest -q -p megasae_gpu_stub -p no:cacheprovider tests/test_ops.py tests/test_topk_encode.py \
  -k cuda -rfEs 2>&1 | tee "$OUT_DIR/tests.log" | tail -n 40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {  # bench DTYPE SHAPES...
  local dtype=$1
  shift
  stage "megasae bench kernels --dtype $dtype"
  timeout 150 $PY -c "
import sys, megasae_gpu_stub
from megasae.bench.kernels import main
main(sys.argv[1:])
" --device cuda --dtype "$dtype" --profile --repeats 10 --warmup 3 --shapes "$@" --json "$OUT_DIR/bench_$dtype.json" \
    2>&1 | tee "$OUT_DIR/bench_$dtype.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
bench bf16 8192x4096x131072x64 8192x2048x65536x32 4096x576x18432x32

stage "training, eval and --compile on the GPU against the CPU (tests/test_cuda.py)"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rfEs 2>&1 | tee "$OUT_DIR/test_cuda.log" | tail -n 40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench fp32 8192x4096x131072x64 4096x576x18432x32
bench tf32 8192x4096x131072x64 4096x576x18432x32

stage "done: status $status (0: every stage passed); outputs in $OUT_DIR"
rm -rf "$STUB_DIR"
exit $status
