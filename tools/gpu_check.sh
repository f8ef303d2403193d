#!/usr/bin/env bash
# For a machine with an NVIDIA GPU: run every GPU-dependent test (TensorRT engines, the
# torch CUDA reference path, ONNX Runtime's CUDA provider) and print a short summary.
# Usage: bash tools/gpu_check.sh   (inside the project's venv, with .[trt] and/or .[gpu])
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

"$PY" - <<'PYEOF'
import importlib.util

print("== environment")
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA available: {cuda}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if cuda else ""))
except ImportError:
    print("torch: not installed")
for mod in ("tensorrt", "onnxruntime"):
    spec = importlib.util.find_spec(mod)
    if spec is None:
        print(f"{mod}: not installed")
        continue
    m = __import__(mod)
    extra = f", providers {m.get_available_providers()}" if mod == "onnxruntime" else ""
    print(f"{mod} {m.__version__}{extra}")
PYEOF

echo "== GPU tests (a skip names what is missing)"
"$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/ 2>&1 | tee /tmp/gpu_check.log
status=${PIPESTATUS[0]}
echo "== summary"
grep -E "passed|failed|skipped|error" /tmp/gpu_check.log | tail -n 1
exit "$status"
