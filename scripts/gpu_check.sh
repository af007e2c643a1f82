#!/usr/bin/env bash
# The Triton backend on a real GPU, in one run of about 8 minutes at most:
#   1. the environment (GPU, driver, torch, triton);
#   2. the Triton tests with compiled kernels (no interpreter), slow ones included; without
#      pytest and hypothesis, a short differential check against torch instead;
#   3. registers and spills of the fullest kernel forms (ptxas, sm_90);
#   4. `batchnorm bench --device cuda`: ours against torch, and shares of the copy bandwidth.
#
# For the GPU machine: torch and triton preinstalled, no network, this repository copied there
# without its virtual environment. Runs with the system python (PYTHON to choose another):
#
#     OUT=/path/to/results scripts/gpu_check.sh
#
# Writes into $OUT (a temporary folder when unset): environment.txt, tests.txt (and junit.xml),
# compile.txt, bench.txt, bench.md and summary.txt.
# Exit status: 0 all ran and passed; 1 a test failed; 2 the bench failed; 3 no CUDA device or
# no importable triton (nothing was checked).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET BATCHNORM_BACKEND
: > "$OUT/summary.txt"

say() { echo "$*" | tee -a "$OUT/summary.txt"; }
seconds() { date +%s; }
start=$(seconds)

# -- 1. environment -----------------------------------------------------------------------------
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
for name in ("triton", "numpy", "pytest", "hypothesis", "numba"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "unavailable:", repr(error))
EOF
} > "$OUT/environment.txt" 2>&1

missing=$("$PYTHON" - 2>&1 <<'EOF'
try:
    import torch
except Exception as error:  # noqa: BLE001
    print(f"torch does not import ({error!r})")
else:
    if not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False)")
    else:
        try:
            import triton  # noqa: F401
        except Exception as error:  # noqa: BLE001
            print(f"triton does not import ({error!r})")
EOF
)
if [ -n "$missing" ]; then
    say "gpu_check: $missing: nothing checked; see $OUT/environment.txt"
    exit 3
fi
say "gpu_check: $(grep -m1 '^device' "$OUT/environment.txt" | cut -c1-120)"

# -- 2. tests -----------------------------------------------------------------------------------
tests_status=0
if "$PYTHON" -c "import pytest, hypothesis" 2>/dev/null; then
    # every test of the Triton backend and of the CUDA bench, the slow ones too, except the
    # CPU-side compilation of every launch (the launches here compile for this very GPU)
    timeout 210 "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
        -k "not every_launch_compiles" --junitxml="$OUT/junit.xml" \
        tests/backends/test_triton.py tests/bench/test_cuda_bench.py > "$OUT/tests.txt" 2>&1
    tests_status=$?
else
    timeout 210 "$PYTHON" - > "$OUT/tests.txt" 2>&1 <<'EOF'
# pytest or hypothesis missing: a short differential check of the compiled kernels against
# torch in float64, forward and backward, training and eval, every dtype and layout
import torch
from torch.nn import functional as F

import batchnorm
from batchnorm.backends import triton as backend

failures = 0
for size, layout in [((32, 64, 28, 28), "contiguous"), ((32, 64, 28, 28), "channels_last"),
                     ((20, 6, 65536), "contiguous"), ((3, 1000, 1, 2), "channels_last"),
                     ((3, 7, 5, 3), "contiguous"), ((256, 1000), "contiguous")]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for activation in ("identity", "relu"):
            x = torch.randn(size, device="cuda").mul(2).add(0.5).to(dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            g = torch.randn_like(x)
            weight = torch.rand(size[1], device="cuda") + 0.5
            bias = torch.randn(size[1], device="cuda")
            assert batchnorm.select_backend(x).name == "triton"
            y, mean, var = backend.forward(x, weight, bias, 1e-5, activation=activation)
            dx, dw, db, _ = backend.backward(g, x, mean, var, weight, bias, 1e-5,
                                             (True, True, True), train=True,
                                             activation=activation)
            leaves = [t.double().requires_grad_(True) for t in (x, weight, bias)]
            expected = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True)
            expected = torch.relu(expected) if activation == "relu" else expected
            grads = torch.autograd.grad(expected, leaves, g.double())
            tolerance = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
            for name, ours, theirs in (("y", y, expected), ("dx", dx, grads[0]),
                                       ("dweight", dw, grads[1]), ("dbias", db, grads[2])):
                scale = theirs.abs().max().item() + 1
                error = (ours.double() - theirs.detach()).abs().max().item() / scale
                if not error <= tolerance:
                    failures += 1
                    print("FAILED", size, layout, dtype, activation, name, error)
print("fallback check:", "failed" if failures else "passed", f"({failures} failures)")
raise SystemExit(1 if failures else 0)
EOF
    tests_status=$?
fi
say "tests: $(tail -n 1 "$OUT/tests.txt") (exit $tests_status, $(( $(seconds) - start )) s so far)"

# -- 3. registers and spills ----------------------------------------------------------------------
timeout 45 "$PYTHON" -m tests.backends.triton_compile --quick --fullest > "$OUT/compile.txt" 2>&1
say "compile: $(tail -n 1 "$OUT/compile.txt") (exit $?)"

# -- 4. bench -----------------------------------------------------------------------------------
timeout 210 "$PYTHON" -m batchnorm bench --device cuda --rounds 9 --markdown "$OUT/bench.md" \
    > "$OUT/bench.txt" 2>&1
bench_status=$?
say "bench: exit $bench_status, table in $OUT/bench.md ($(( $(seconds) - start )) s in all)"

if [ "$tests_status" -ne 0 ]; then
    exit 1
fi
if [ "$bench_status" -ne 0 ]; then
    exit 2
fi
exit 0
