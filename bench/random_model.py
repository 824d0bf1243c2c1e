"""A randomly initialised model folder of a real model's shape, for timing on machines without its weights.

The GPU machine that runs the benchmarks has no hub access and no room for the checkpoints
in transit, so the benchmarks there time random weights of the right shapes: an encoder for
`bench/teacher_cache.py` (all-mpnet-base-v2 or MiniLM shaped; a fresh classification head
is added when it is loaded as a teacher) or a BERT masked LM for `bench/augment.py mlm=...`.
Throughput depends on the shapes only; no accuracy or candidate quality is ever taken from
such a model.

    python bench/random_model.py OUT_DIR [shape=mpnet-base|minilm|base|tiny] [head=encoder|mlm] [tokenizer=DIR]

The tokenizer folder (vocab.txt, tokenizer.json, ...; default: the shipped MiniLM's, a BERT
WordPiece vocabulary) is copied beside the weights; no model weights are read. Weights come
from torch.manual_seed(0). `head=mlm` needs a BERT shape and is checked to load through
augment.mlm.load_mlm (every masked-LM head key present).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_BERT = dict(model_type="bert", vocab_size=30522, max_position_embeddings=512)
SHAPES = {  # the published configs of the default teachers, bert-base's, and a next-to-free one
    "mpnet-base": dict(model_type="mpnet", vocab_size=30527, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                       relative_attention_num_buckets=32, layer_norm_eps=1e-5, pad_token_id=1),
    "minilm": dict(_BERT, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(_BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # next to no arithmetic: what the caching pass costs besides the teacher (its ceiling on this host)
    "tiny": dict(_BERT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(out_dir: Path, shape: str, head: str, tokenizer_dir: Path) -> dict:
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    params = dict(SHAPES[shape])
    if head == "mlm" and params["model_type"] != "bert":
        raise SystemExit(f"error: head=mlm needs a BERT shape (minilm, base, tiny), not {shape}")
    present = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if "vocab.txt" not in present and "tokenizer.json" not in present:
        raise SystemExit(f"error: {tokenizer_dir} holds neither vocab.txt nor tokenizer.json")
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    model = (AutoModelForMaskedLM if head == "mlm" else AutoModel).from_config(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors (the default)
    for name in present:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    info = {"what": f"randomly initialised {type(model).__name__} (timing only)", "shape": shape, "head": head,
            "seed": 0, "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer_from": str(tokenizer_dir), "tokenizer_files": present}
    if head == "mlm":
        from augment.mlm import load_mlm
        from data.io import quiet_transformers

        quiet_transformers()
        loaded, _, info["identity"] = load_mlm(str(out_dir))  # raises when masked-LM head keys are missing
        if not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())):
            raise SystemExit(f"error: {out_dir} does not load back with the weights just saved")
    return info


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    opts = dict(a.split("=", 1) for a in argv[1:])
    unknown = set(opts) - {"shape", "head", "tokenizer"}
    shape, head = opts.get("shape", "mpnet-base"), opts.get("head", "encoder")
    if unknown or shape not in SHAPES or head not in ("encoder", "mlm"):
        raise SystemExit(__doc__)
    tokenizer = opts.get("tokenizer")
    if tokenizer is None:
        from data.assets import minilm_path

        tokenizer = minilm_path()
    print(json.dumps(build(Path(argv[0]), shape, head, Path(tokenizer))))


if __name__ == "__main__":
    main(sys.argv[1:])
