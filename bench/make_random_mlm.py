"""A randomly initialised BertForMaskedLM folder, for timing the TinyBERT augmenter only.

`python bench/make_random_mlm.py OUT_DIR [size=minilm|base] [--tokenizer DIR]`

minilm: the shipped all-MiniLM-L6-v2 shape (hidden 384, 6 layers, 12 heads, intermediate
1536); base: bert-base shape (hidden 768, 12 layers, 12 heads, intermediate 3072). The
config is built here and no model weights are read, so it runs on a machine that has
only the tokenizer files (vocab.txt, tokenizer.json, tokenizer_config.json,
special_tokens_map.json): `--tokenizer DIR` names their folder (default: the shipped
MiniLM, data.assets.minilm_path()). Weights come from torch.manual_seed(0); the folder is
saved with save_pretrained (safetensors) with the tokenizer files copied beside it, and
checked to load through augment.mlm.load_mlm (all masked-LM head keys present).
Its predictions are meaningless: use it for speed, never for candidates' quality.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SIZES = {  # the shipped MiniLM's config.json, and bert-base-uncased's shape
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def build(out: Path, size: str, tokenizer_dir: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from augment.mlm import load_mlm, quiet_transformers

    quiet_transformers()
    present = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if "vocab.txt" not in present and "tokenizer.json" not in present:
        raise SystemExit(f"error: {tokenizer_dir} holds neither vocab.txt nor tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    for f in present:
        shutil.copyfile(tokenizer_dir / f, out / f)
    tok = AutoTokenizer.from_pretrained(out)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12,
                        initializer_range=0.02, pad_token_id=tok.pad_token_id or 0,
                        position_embedding_type="absolute", **SIZES[size])
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(out)  # safetensors (the default)
    info = {"what": "randomly initialised BertForMaskedLM (timing only)", "size": size, "seed": 0,
            "parameters": sum(p.numel() for p in model.parameters()), "tokenizer_from": str(tokenizer_dir),
            "tokenizer_files": present, **SIZES[size]}
    (out / "random_mlm.json").write_text(json.dumps(info, indent=2))
    loaded, _, ident = load_mlm(str(out))  # raises when masked-LM head keys are missing
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    if not same:
        raise SystemExit(f"error: {out} does not load back with the weights just saved")
    return dict(info, identity=ident)


def main(argv: list[str]) -> int:
    pos, opts, tokenizer = [], {}, None
    it = iter(argv)
    for a in it:
        if a == "--tokenizer":
            tokenizer = next(it, None)
        elif a.startswith("--tokenizer="):
            tokenizer = a.split("=", 1)[1]
        elif "=" in a:
            k, v = a.split("=", 1)
            opts[k] = v
        else:
            pos.append(a)
    size = opts.pop("size", "minilm")
    if len(pos) != 1 or opts or size not in SIZES or (tokenizer is None and "--tokenizer" in argv):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    if tokenizer is None:
        from data.assets import minilm_path

        tokenizer = minilm_path()
    info = build(Path(pos[0]), size, Path(tokenizer))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
