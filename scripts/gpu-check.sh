#!/usr/bin/env bash
# The checks that need a real GPU: the CUDA tests, a probe with its noise scale and suggested
# ranges, and short studies on cuda (one of them measuring the noise scale in bf16).
# Run on a CUDA machine from the repository root, with tuner importable; writes under ${OUT:-.}.
set -uo pipefail
out=${OUT:-.}
db="sqlite:///$out/gpu.db"
nvidia-smi -L
python3 -c "import torch, optuna; print('torch', torch.__version__, 'optuna', optuna.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider -rA tests/gpu 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 -m tuner probe studies/digits-cnn.yaml --device cuda --storage "$db" --suggest 2>&1 | tee "$out/gpu-probe.log"
timeout 240 python3 -m tuner run studies/demo.yaml --workers 2 --device cuda --storage "$db" 2>&1 | tail -15 | tee "$out/gpu-run.log"
sed 's/^measure_noise_scale: true/&\nprecision: bf16/' studies/digits-tradeoff.yaml > "$out/tradeoff-bf16.yaml"
timeout 240 python3 -m tuner run "$out/tradeoff-bf16.yaml" --workers 2 --device cuda --storage "$db" 2>&1 | tail -15 | tee -a "$out/gpu-run.log"
python3 - "$db" <<'PY' | tee -a "$out/gpu-run.log"
import sys, optuna
for name in ("demo", "digits-tradeoff"):
    trials = optuna.load_study(study_name=name, storage=sys.argv[1]).trials
    attrs = [t.user_attrs for t in trials]
    print(name, len(trials), "trials;", sorted({(a.get("device"), a.get("device_name"), a.get("precision")) for a in attrs}))
    noise = [a["gradient_noise_scale"] for a in attrs if a.get("gradient_noise_scale")]
    print("  noise scale of the first trials that measured it:", noise[:3])
PY
exit "$tests"
