#!/usr/bin/env bash
# The checks that need a real GPU: the CUDA tests, a probe and a short study on cuda.
# Run on a CUDA machine from the repository root, with tuner importable; writes under ${OUT:-.}.
set -uo pipefail
out=${OUT:-.}
nvidia-smi -L
python3 -c "import torch, optuna; print('torch', torch.__version__, 'optuna', optuna.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider -rA tests/gpu 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 -m tuner probe studies/digits-cnn.yaml --device cuda --storage "sqlite:///$out/gpu.db" 2>&1 | tee "$out/gpu-probe.log"
timeout 300 python3 -m tuner run studies/demo.yaml --workers 2 --device cuda --storage "sqlite:///$out/gpu.db" 2>&1 | tail -40 | tee "$out/gpu-run.log"
python3 -m tuner trials --study demo --storage "sqlite:///$out/gpu.db" --format csv > "$out/gpu-trials.csv"
exit "$tests"
