"""A randomly initialised encoder folder of a real teacher's shape, for timing on machines without its weights.

The GPU machine that runs the benchmarks has no hub access and no room for a 440 MB
checkpoint in transit, so `bench/teacher_cache.py` there times an all-mpnet-base-v2-shaped
(or MiniLM-shaped) encoder with random weights. Throughput depends on the shapes only;
no accuracy figure is ever taken from such a model.

    python bench/random_teacher.py OUT_DIR [shape=mpnet-base|minilm|tiny] [tokenizer=DIR]

The tokenizer folder (vocab.txt, tokenizer.json, ...) is copied beside the weights; by
default the shipped MiniLM's (a BERT WordPiece vocabulary; MPNet's has 5 more ids).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

SHAPES = {  # the published configs of the two default teachers
    "mpnet-base": dict(model_type="mpnet", vocab_size=30527, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                       relative_attention_num_buckets=32, layer_norm_eps=1e-5, pad_token_id=1),
    "minilm": dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                   num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512),
    # next to no arithmetic: what the caching pass costs besides the teacher (its ceiling on this host)
    "tiny": dict(model_type="bert", vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=128, max_position_embeddings=512),
}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(out_dir: Path, shape: str, tokenizer_dir: Path) -> None:
    from transformers import AutoConfig, AutoModel

    params = dict(SHAPES[shape])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    print(f"random {shape} encoder ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in {out_dir}")


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    opts = dict(a.split("=", 1) for a in argv[1:])
    tokenizer = opts.get("tokenizer")
    if tokenizer is None:
        from data.assets import minilm_path

        tokenizer = minilm_path()
    build(Path(argv[0]), opts.get("shape", "mpnet-base"), Path(tokenizer))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
