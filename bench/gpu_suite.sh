#!/usr/bin/env bash
# One prepared speed suite for a lent GPU (about 6 minutes on one H100-class card), printing one JSON table:
# each method's ViT-B training step (the recipes' models, batch 256, bf16, synthetic device-resident data)
# as written (the plain AdamW loop, a host sync every step), then with fused AdamW, with no host sync in
# the step, compiled (MAE, LUT), with CUDA graphs (MAE) and in float8 (MAE, with FLOAT8=1), each with a
# profile of three steps (device time by kind of work, host syncs, idle time); the training loader alone
# on this machine's cores (JPEGs at 224 px, decoded by the workers or on the device); and a short demo
# CIFAR-10 run per pixel method, all three at once on the one device, each ending in a k-NN accuracy.
#
#   bash bench/gpu_suite.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_suite.sh --small    # the same steps shrunk to run in a few minutes on a CPU
#   FLOAT8=1 bash bench/gpu_suite.sh   # also MAE compiled in float8 (torchao; about a minute more)
#
# Each step's JSON (or its error) is kept in $OUT (default: a new temporary folder); the table is printed
# last and written to $OUT/suite.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
SMALL=0
[[ "${1:-}" == "--small" ]] && SMALL=1
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

python - <<'PY' > "$OUT/env.json" || exit 1
import json, os, torch, torchvision, timm
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cores": len(os.sched_getaffinity(0)),
}))
PY

if [[ $SMALL == 1 ]]; then
  SIZE=(--arch vit_tiny --batch 8 --steps 2 --warmup 2 --profile 2 --precision fp32 model.depth=2 model.embed_dim=64
        model.num_heads=2 method.decoder_depth=1 method.decoder_embed_dim=32 method.decoder_num_heads=2)
  PIX=(--img 32 --patch 4); TOK=(--img 8 --patch 2 --token-grid 8 --vocab 32)
  EXTRA_mae=,compiled; EXTRA_lut=; LOADER=(--images 128 --workers 0,1 --batch 32 --decode cpu,device)
  DEMO=(optim.epochs=1 optim.warmup_epochs=0 data.max_images=64 optim.batch_size=32)
  STEP_LIMIT=300
else
  SIZE=(--batch 256 --steps 20 --warmup 5 --profile 3 --precision bf16 --peak-tflops "${PEAK_TFLOPS:-790}")
  PIX=(); TOK=()
  EXTRA_mae=,compiled,cudagraphs${FLOAT8:+,float8}; EXTRA_lut=,compiled
  LOADER=(--images 4096 --workers "0,4,8,$(nproc)" --batch 256 --decode cpu,device); DEMO=(optim.epochs=40)
  STEP_LIMIT=300
fi

step() {  # name, command...: the command's JSON lines into $OUT/name.json, or the error
  local name=$1; shift
  timeout "$STEP_LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  grep '^{' "$OUT/$name.log" > "$OUT/$name.json"
  if (( status != 0 )); then
    printf '{"error": "exit %s", "log": "%s"}\n' "$status" "$OUT/$name.log" >> "$OUT/$name.json"
  fi
  echo "done: $name" >&2
}

for method in mae lut latent_mim mtm; do
  shape=("${PIX[@]}"); [[ $method == mtm ]] && shape=("${TOK[@]}")
  extra="EXTRA_$method"
  step "step_${method}" python bench/throughput.py --config "${method}_vit_base_imagenet" "${shape[@]}" \
    "${SIZE[@]}" --variants "baseline,fused,sync_free${!extra:-}"
done

step loader python bench/loader.py "${LOADER[@]}"

# the demo runs share the device: three processes at once, each with its share of the cores for loading
workers=$(( $(nproc) / 3 )); (( workers < 1 )) && workers=1
for method in mae lut latent_mim; do
  ( timeout 180 python -m mimkit pretrain "method=$method" --out "$OUT/demo_$method" \
      "data.num_workers=$workers" run.progress=false eval.every_epochs=0 "${DEMO[@]}" \
      > "$OUT/demo_$method.log" 2>&1 ) &
done
wait
echo "done: demo runs" >&2

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
table = {"env": read(out / "env.json"), "steps": [], "loader": read(out / "loader.json"), "demo": []}
keep = ("variant", "images_per_s", "mfu", "gflops_per_image", "peak_memory_gib", "step_ms", "profile", "error")
for path in sorted(out.glob("step_*.json")):
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError as err:
            row = {"error": f"{type(err).__name__}: {err}"}
        table["steps"].append({"method": path.stem[5:], **{k: row[k] for k in keep if k in row}})
for method in ("mae", "lut", "latent_mim"):
    summary = read(out / f"demo_{method}" / "summary.json")
    knn = summary.get("knn") or {}
    table["demo"].append({"method": method, "knn_top1": knn.get("top1"), "seconds": summary.get("seconds"),
                          "error": summary.get("error")})
(out / "suite.json").write_text(json.dumps(table, indent=1) + "\n")
print(json.dumps(table))
PY
