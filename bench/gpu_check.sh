#!/usr/bin/env bash
# The GPU check of issue 12, prepared for a session that has a GPU (one H200 in this project): about 9 minutes
# of steps, each with its own time limit, every log in $OUT/all.log and the figures in $OUT/figures.txt.
#
# Before the run, on the development machine (see ../shared/gpu/ and its WHEELS.txt):
#   mkdir -p .gpu/whl .gpu/tok                     # .gpu/ is git-ignored; pass it with carry: [".gpu"]
#   cp ../shared/gpu/mk_model.py .gpu/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .gpu/whl <the packages WHEELS.txt lists>
#   cp ~/.cache/persona/models/smollm2-135m/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tok/
# Then: run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=600) and read $OUT/figures.txt.
#
# What it must show (README, "Measured performance"): steer bench compiled path >= 50 % of the bandwidth bound at
# batch 64 on the 7B shape, steered/unsteered <= 1.05; extract bench >= 3x the seed's method (loop alone) with
# vectors within 1e-3 (bf16); the gpu-marked tests pass; persona fit runs under both FSDP strategies.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
G=$PWD/.gpu; M=/tmp/rand7b; T7=/tmp/tiny; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FIG=$OUT/figures.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
step() {  # step NAME SECONDS command...: run with a time limit, keep the log, show its tail
  local name=$1 limit=$2; shift 2; echo "=== $name (limit $limit s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "/tmp/$name.log" 2>&1; local rc=$?
  echo "rc=$rc $((SECONDS - t0)) s" | tee -a "$FIG"
  (echo "=== $name rc=$rc"; cat "/tmp/$name.log") >> "$OUT/all.log"
  grep -v "it/s\]\|━\|Tip:\|TPU\|deprecated\|warn\|Warning" "/tmp/$name.log" | tail -n "${TAILN:-14}" | tee -a "$FIG"; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
  git log --oneline -1; } | tee "$FIG"

step mkmodel 120 bash -c "python3 '$G/mk_model.py' $M 7b '$G/tok' && python3 '$G/mk_model.py' $T7 tiny '$G/tok'"
# The headline: generation speed and the cost of steering, eager vs static cache + compiled decode step.
step steer 330 python3 bench/steer.py --model $M --device cuda --dtype bfloat16 --batch 64 --new-tokens 128 \
  --paths eager,compile --repeats 2
step gpu_tests 180 python3 -m pytest tests -m gpu -q -p no:cacheprovider -x
step extract 120 python3 bench/extract.py --model $M --device cuda --dtype bfloat16 --samples 64 --max_batch_tokens 16384
step project 90 python3 bench/project.py --model $M --device cuda --dtype bfloat16 --samples 64 --layer 20 \
  --max_batch_tokens 16384
# persona fit with the callbacks under Lightning's FSDP strategies, on the tiny model (mechanics, one GPU).
python3 - <<'EOF'
import torch
from persona.vectors import save_vector
save_vector(torch.randn(5, 64), "/tmp/tiny_evil_response_avg_diff.pt")  # tiny: 4 blocks, hidden 64
EOF
python3 -m persona.cli dataset build --trait evil --output_dir /tmp/chat --mix 0.5 --n 32 > /dev/null 2>&1
cat > /tmp/fit_tiny.yaml <<EOF
seed_everything: 0
model:
  class_path: persona.training.LoRAFineTune
  init_args: {model: $T7, dtype: bfloat16, r: 8, lora_alpha: 16, learning_rate: 1.0e-3, warmup_steps: 1}
data:
  class_path: persona.training.ChatDataModule
  init_args: {model: $T7, train_files: [/tmp/chat/mix_0.5.jsonl], val_fraction: 0.125, batch_size: 4, max_length: 256}
trainer:
  accelerator: gpu
  devices: 1
  precision: bf16-true
  max_steps: 4
  default_root_dir: /tmp/fit
  callbacks:
    - class_path: persona.training.callbacks.PreventativeSteering
      init_args: {vector_path: /tmp/tiny_evil_response_avg_diff.pt, layers: [2], coef: 2.0}
    - class_path: persona.training.monitor.ActivationMonitor
      init_args: {vector_paths: [/tmp/tiny_evil_response_avg_diff.pt], layers: [2], prompts: [Hi, How are you?], every_n_steps: 2}
EOF
step fit_fsdp 90 python3 -m persona.cli fit -c /tmp/fit_tiny.yaml --trainer.strategy fsdp \
  --model.init_args.adapter_dir /tmp/fit/adapter_fsdp
cat > /tmp/fsdp2.yaml <<EOF
trainer:
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {data_parallel_size: 1, tensor_parallel_size: 1, save_distributed_checkpoint: false}
EOF
step fit_fsdp2 90 python3 -m persona.cli fit -c /tmp/fit_tiny.yaml -c /tmp/fsdp2.yaml \
  --model.init_args.adapter_dir /tmp/fit/adapter_fsdp2
ls /tmp/fit/adapter_fsdp /tmp/fit/adapter_fsdp2 2>&1 | tee -a "$FIG"
cp /tmp/*.log "$OUT/" 2>/dev/null
echo "=== done: $FIG"
