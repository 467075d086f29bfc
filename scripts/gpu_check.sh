#!/usr/bin/env bash
# kdkit's GPU check (issue 11): under 10 minutes on one GPU. Run from the repository root on
# a machine with a CUDA GPU and a CUDA build of torch (>= 2.4):
#
#   OUT=gpu-check bash scripts/gpu_check.sh
#
# 1. the device tests with --device cuda (placement, float tolerance against the CPU, exact
#    resume in fp32/bf16/fp16, the teacher-output cache on the device);
# 2. `kdkit bench --device cuda` in fp32 and bf16 on ResNet-56 -> ResNet-20, CIFAR-sized
#    random data (fake_cifar10: nothing to learn, only speed);
# 3. scripts/sync_check.py: one KD epoch under torch.cuda.set_sync_debug_mode("warn"),
#    every synchronising call listed with the kdkit line that made it.
# Everything lands in $OUT (default gpu-check/): device.txt, tests.txt, bench/bench.{json,md},
# sync-fp32.json, sync-bf16.json, vision.txt. Put the tables in docs/RESULTS.md#devices, GPU named.
#
# kdkit needs pydantic, pyyaml, safetensors, tqdm, scikit-learn and numpy beside torch. On a
# machine without internet, carry wheels in .whl/ (see the device README); they are
# installed into /tmp/site here when present (scripts/gpu_wheels.sh fetches them).
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0)); print('bf16', torch.cuda.is_bf16_supported())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
} | tee "$OUT/device.txt"

echo "== 1. device tests (cuda)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_device.py --device cuda 2>&1 \
  | tail -40 | tee "$OUT/tests.txt"

echo "== 2. bench: ResNet-56 -> ResNet-20, fake CIFAR-10, fp32 and bf16"
timeout 200 $PY -m kdkit bench --data fake_cifar10 --teacher resnet56 --student resnet20 \
  --teacher-epochs 1 --epochs 2 --batch-size 128 --device cuda --precision fp32,bf16 --repeats 2 \
  --out "$OUT/bench" 2>&1 | tail -30

echo "== 3. host syncs over one KD epoch"
for p in fp32 bf16; do
  timeout 50 $PY scripts/sync_check.py --out "$OUT/sync-$p.json" --precision "$p" 2>&1 | tail -20
done
echo "== 4. vision tests (torchvision and timm of the image, on its CPU)"
timeout 90 $PY -m pytest -q -p no:cacheprovider -m vision tests 2>&1 | tail -15 | tee "$OUT/vision.txt"
echo "done: $OUT"
