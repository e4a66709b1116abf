#!/usr/bin/env bash
# The one script for a GPU machine: every check CPU CI cannot make and every benchmark at full size in
# bf16, in one run (about 4-5 minutes on one H100/H200), one JSON file out.
#
#   bash benchmarks/gpu_check.sh                      # a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run            # the same steps on the CPU at tiny sizes (the tests run this)
#   bash benchmarks/gpu_check.sh --out results.json   # where the JSON goes (default $OUT/gpu_check.json
#                                                     # when $OUT is set, else ./gpu_check.json)
#
# Steps (each benchmark's figures go under "benchmarks" in the JSON; the log next to it, .log):
#  1. AMP training: the tiny config trained with train.precision bf16, fp16 (GradScaler) and fp32, each
#     followed by `tgated predict` and `tgated evaluate` of its test split on the GPU ("training": mean Dice per precision);
#  2. bench_encoder_sharing.py: shared encoder vs the published per-window, per-organ loop, full size;
#  3. encoder_floor.py: the vision encoder over 300 slices against the device's peak bf16 throughput;
#  4. whole_ct.py: a 512 x 512 x 300 CT, our predictor vs MONAI DynUNet sliding window, peak memory;
#  5. bench_token_cache.py: training with cached vision tokens vs recomputed (small model);
#  6. bench_metrics.py: our Dice / NSD / HD95 vs MONAI's on a 512 x 512 x 200 volume (CPU code);
#  7. bench_data_loading.py: full-size training batches prepared in the training process vs by 2, 4, 8
#     DataLoader workers (the machine's CPU cores; what train.num_workers: auto relies on).
#
# A bare CUDA machine needs only python3 and torch: any other dependency of tgated missing there is
# installed from wheels carried in .whl/ (no network), made beforehand on a machine with network:
#   pip download --only-binary=:all: --no-deps -d .whl --python-version 3.11 transformers tokenizers \
#       huggingface-hub safetensors monai nibabel SimpleITK scipy pyyaml tqdm platformdirs matplotlib \
#       regex filelock packaging typing-extensions fsspec hf-xet
# (one wheel per package; the python version of the GPU machine's interpreter). The script stops at the
# first failing step with its log; a missing module is named before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) mode=dry-run ;;
        --out) out=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument $1; expected --dry-run or --out FILE" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$out" ] || out=${OUT:-.}/gpu_check.json
log=${out%.json}.log
mkdir -p "$(dirname "$out")"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'EOF'
import importlib.util, sys
need = ["torch", "transformers", "safetensors", "monai", "nibabel", "SimpleITK", "numpy", "scipy", "yaml",
        "tqdm", "platformdirs", "matplotlib"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing Python modules {missing}; carry their wheels in .whl/ (see the script's header)")
EOF

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
parts=$work/parts
mkdir -p "$parts"
start=$(date +%s)

if [ "$mode" = gpu ]; then
    device=cuda
    precisions="bf16 fp16 fp32"
    train_steps=()
    sharing=(--models full --dtype bf16 --slices 64 --repeat 3)
    floor=(--model full --slices 300)
    whole=(--model full)
    cache=(--model small --steps 20)
    metrics=()
    loading=(--workers 0,2,4,8 --batches 24 --size 256)
else
    device=cpu
    precisions="fp32"
    train_steps=(--set train.epochs=1 --set train.steps_per_epoch=2)
    sharing=(--models tiny --slices 4 --organs 3 --context 3)
    floor=(--model tiny --slices 4 --repeat 1)
    whole=(--model tiny --size 64 --slices 8 --organs 3 --roi 32 --dynunet-windows 1 --our-slices 6)
    cache=(--model tiny --steps 2 --batch-size 2)
    metrics=(--shape 64 64 24 --spacing 1.5 1.5 3.0)
    loading=(--config configs/tiny_cpu.yaml --workers 0,1 --batches 2 --size 64)
fi

{
    echo "== environment ($mode)"
    python3 - "$parts/environment.json" "$mode" <<'EOF'
import json, platform, sys
import monai, torch, transformers
env = {"mode": sys.argv[2], "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "transformers": transformers.__version__, "monai": monai.__version__,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
       "cpu_threads": torch.get_num_threads()}
print(env)
json.dump(env, open(sys.argv[1], "w"))
EOF
    python3 -m tgated phantom "$work/data" --cases 4 --size 64 --quiet

    echo "{}" > "$parts/training.json"
    for p in $precisions; do
        echo "== train, precision $p"
        python3 -m tgated train configs/tiny_cpu.yaml --out "$work/run_$p" --quiet \
            --set "data.root=$work/data" --set "train.device=$device" --set "train.precision=$p" \
            --set "model.organs=[liver]" --set train.lr_decoder=1e-2 --set train.lr_adapter=1e-2 \
            ${train_steps[@]+"${train_steps[@]}"}
        python3 -m tgated predict --model "$work/run_$p" --input "$work/data/images" \
            --run "$work/run_$p" --split test --output "$work/pred_$p" --device "$device" --quiet
        python3 -m tgated evaluate --pred "$work/pred_$p" --gt "$work/data" --dataset flare22 \
            --out "$work/eval_$p" --quiet
        python3 - "$parts/training.json" "$p" "$work/eval_$p/summary.json" <<'EOF'
import json, sys
path, precision, summary = sys.argv[1:]
runs = json.load(open(path))
runs[precision] = {"mean_dice": json.load(open(summary))["mean_dice"]}
print(precision, runs[precision])
json.dump(runs, open(path, "w"))
EOF
    done

    echo "== encoder sharing at prediction"
    python3 benchmarks/bench_encoder_sharing.py --device "$device" "${sharing[@]}" --json "$parts/encoder_sharing.json"
    echo "== encoder floor"
    python3 benchmarks/encoder_floor.py --device "$device" "${floor[@]}" --json "$parts/encoder_floor.json"
    echo "== whole CT: ours vs DynUNet"
    python3 benchmarks/whole_ct.py --device "$device" "${whole[@]}" --json "$parts/whole_ct.json"
    echo "== token cache in training"
    python3 benchmarks/bench_token_cache.py --device "$device" "${cache[@]}" --json "$parts/token_cache.json"
    echo "== metrics"
    python3 benchmarks/bench_metrics.py ${metrics[@]+"${metrics[@]}"} --json "$parts/metrics.json"
    echo "== training input pipeline: DataLoader workers"
    python3 -W ignore::UserWarning benchmarks/bench_data_loading.py "${loading[@]}" --json "$parts/data_loading.json"

    python3 - "$parts" "$out" "$(( $(date +%s) - start ))" <<'EOF'
import json, pathlib, sys
parts, out, seconds = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
load = lambda name: json.loads((parts / f"{name}.json").read_text())
result = {
    "environment": load("environment"),
    "seconds": seconds,
    "training": load("training"),
    "benchmarks": {n: load(n) for n in ("encoder_sharing", "encoder_floor", "whole_ct", "token_cache", "metrics", "data_loading")},
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"== all checks passed in {seconds} s; figures in {out}")
EOF
} 2>&1 | tee "$log"
