#!/usr/bin/env bash
# The GPU checks, as one short script (about 3 minutes on one H200): what CPU CI cannot cover.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh cpu        # the same steps on the CPU (fp32 only), to try the script
#
# 1. AMP training: the tiny config trained for a few steps with train.precision bf16, fp16 (GradScaler)
#    and fp32, each followed by `tgated predict` + `tgated evaluate` of its model on the GPU;
# 2. benchmarks/bench_encoder_sharing.py with the full-size rd64 architecture (random weights, bf16);
# 3. benchmarks/bench_token_cache.py with the small model.
#
# Needs tgated's dependencies importable. A machine without them (no network) can get them as wheels
# carried in .whl/ (monai, nibabel, SimpleITK, platformdirs): the script installs those into
# /tmp/site first. The log goes to $OUT/gpu_check.log when $OUT is set (the device tool), else to
# ./gpu_check.log. Exits non-zero at the first failing step.
set -euo pipefail
device=${1:-cuda}
log=${OUT:-.}/gpu_check.log
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

{
    echo "== environment"
    python3 -c "import torch, transformers, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', transformers.__version__,
      'monai', monai.__version__)"
    python3 -m tgated phantom "$work/data" --cases 4 --size 64 --quiet

    precisions="bf16 fp16 fp32"
    [ "$device" = cpu ] && precisions="fp32"
    for p in $precisions; do
        echo "== train, precision $p"
        python3 -m tgated train configs/tiny_cpu.yaml --out "$work/run_$p" --quiet \
            --set "data.root=$work/data" --set "train.device=$device" --set "train.precision=$p" \
            --set "model.organs=[liver]" --set train.lr_decoder=1e-2 --set train.lr_adapter=1e-2
        cut -d, -f1,6,10 "$work/run_$p/log.csv"
        python3 -m tgated predict --model "$work/run_$p" --input "$work/data/images" \
            --output "$work/pred_$p" --device "$device" --quiet
        python3 -m tgated evaluate --pred "$work/pred_$p" --gt "$work/data" --dataset flare22 \
            --out "$work/eval_$p" --quiet
        python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print('mean Dice', s['mean_dice'])" \
            "$work/eval_$p/summary.json"
    done

    echo "== encoder sharing at prediction"
    if [ "$device" = cpu ]; then
        python3 benchmarks/bench_encoder_sharing.py --models tiny --device cpu
    else
        python3 benchmarks/bench_encoder_sharing.py --models tiny,full --device "$device" --dtype bf16 \
            --slices 64 --repeat 3
    fi

    echo "== token cache in training"
    python3 benchmarks/bench_token_cache.py --model small --device "$device" --steps 20
    echo "== all GPU checks passed"
} 2>&1 | tee "$log"
