#!/bin/bash
# The paper's own GSM8K schedule on the embedded SmolLM2-135M, on one GPU: the GPU part of the
# longer-training study (results/README.md). Prepared and smoke-tested on a CPU; not yet run on a GPU.
#
#   all 7,473 train problems, 3 epochs, batch 32 (702 steps, the paper's schedule: 5.5x the steps and
#   22x the examples of the 128-step CPU study), ID-LoRA r=128 k=4 and LoRA r=16, each at the lr
#   it chose in the 128-step study, seed 0, float32 like every CPU result; then greedy accuracy on
#   all 1,319 test problems.
#
#   bash experiments/gsm8k_paper_gpu.sh IDLORA_LR LORA_LR          # the chosen lrs: 6e-4 2e-3
#   SMOKE=1 bash experiments/gsm8k_paper_gpu.sh 6e-4 2e-3          # the same steps, tiny, on a CPU
#
# Writes results/gpu/gsm8k-paper/: each method's training metrics and eval.py's accuracy file, and
# times.tsv (seconds of training and of scoring per method, and the device). The runs themselves
# (adapters) stay in runs/gsm8k-paper/.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash $0 IDLORA_LR LORA_LR" >&2; exit 2; }
out=results/gpu/gsm8k-paper
train=(--epochs 3 --batch-size 32 --micro-batch-size 32 --dtype fp32 --no-grad-ckpt)
score=(--dtype fp32 --batch-size 128 --max-new-tokens 256)
if [ -n "${SMOKE:-}" ]; then              # the same script end to end on a CPU: later flags win
  out=runs/gsm8k-paper-smoke/results
  train+=(--max-examples 8 --epochs 1 --batch-size 4 --micro-batch-size 4 --device cpu)
  score+=(--limit 2 --batch-size 2 --max-new-tokens 8 --device cpu)
fi
mkdir -p "$out"
device=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
printf "method\tlr\ttrain_s\tscore_s\tdevice\n" > "$out/times.tsv"
for spec in "idlora 128 $1" "lora 16 $2"; do
  read -r method rank lr <<< "$spec"
  run=runs/gsm8k-paper${SMOKE:+-smoke}/$method-r$rank
  t0=$(date +%s)
  python train.py --task gsm8k --method "$method" --rank "$rank" --lr "$lr" --seed 0 "${train[@]}" \
      --output-dir "$run" $([ -f "$run/state.pt" ] && echo --resume)
  t1=$(date +%s)
  python eval.py --task gsm8k --adapter "$run" "${score[@]}" --output-dir "$out/$method-r$rank"
  t2=$(date +%s)
  cp "$run/metrics.jsonl" "$run/args.json" "$out/$method-r$rank/"
  printf "%s\t%s\t%s\t%s\t%s\n" "$method-r$rank" "$lr" $((t1 - t0)) $((t2 - t1)) "$device" >> "$out/times.tsv"
done
cat "$out/times.tsv"
