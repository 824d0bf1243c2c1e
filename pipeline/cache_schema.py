"""The teacher-cache contract, written down once (docs/cache-format.md explains it).

Writer (pipeline.cache_writer) and reader (pipeline.cache_reader) both build on these
definitions. This module imports neither torch nor transformers: stage two reads caches
without any model code.

A cache folder `<root>/<teacher-name>/` holds `manifest.json`, `tokenizer/` (the teacher's tokenizer files) and,
per shard `<set>-NNNNN`:
  shards/<shard>.arrow  Arrow IPC file, one record per row (ROW_COLUMNS + logits/cls)
  shards/<shard>.zarr/  Zarr v3 group of ragged arrays flattened along a position axis:
      hidden     (Σ len,  n_hidden_layers, d)      fp16  row r: [tok_offset, tok_offset+len)
      attention  (Σ len², n_attention_layers, H)   fp16  row r: [att_offset, att_offset+len²)
                                                          reshaped (len, len, layers, H)
      values     (Σ len,  d)                       fp16  last layer value vectors (MiniLM)
  With `layout.quantize == "int8"` (schema version 2) the three arrays are int8 and each has a fp16 scale array
  beside it: hidden_scale (Σ len, n_hidden_layers) and values_scale (Σ len,), one absmax scale per token vector;
  attention_scale (rows, n_attention_layers, H), one per row's block of each layer and head. float = int8 × scale.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from data.io import UserError, atomic_write_text

SCHEMA_VERSION = 1  # caches stored as fp16
QUANTIZED_VERSION = 2  # caches with int8 token-level fields (layout.quantize); a reader understands both
READABLE_VERSIONS = (SCHEMA_VERSION, QUANTIZED_VERSION)
QUANTIZE = ("none", "int8")
INT8_MISSING = -128  # fill value of int8 arrays: quantized values stay in [-127, 127], so it marks a lost chunk
MANIFEST = "manifest.json"
STAMP = "verified.json"  # shard -> digest of its files' names, sizes and mtimes when last checksummed
SHARD_DIR = "shards"
DATA_INFO = "data.json"  # what the data step read and quarantined (from the prepared data's meta.json)
TOKENIZER_DIR = "tokenizer"  # the teacher's tokenizer files, whose checksum is teacher.tokenizer_sha256
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "sentencepiece.bpe.model")

# Field groups a loss can ask for. Arrow-backed groups are cheap; Zarr-backed ones are
# only opened when asked for.
ARROW_FIELDS = ("logits", "cls", "input_ids")
ZARR_FIELDS = ("hidden", "attention", "values")
ALL_FIELDS = ARROW_FIELDS + ZARR_FIELDS


def row_columns(num_labels: int, cls_width: int) -> pa.Schema:
    """Arrow schema of one shard; cls_width = len(cls layers) * hidden size (0: no cls)."""
    fields = [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("set", pa.string(), nullable=False),  # "train", "dev", "test" or "aug-<name>"
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_id", pa.string()),
        pa.field("method", pa.string(), nullable=False),
        pa.field("provenance", pa.string()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("text_b", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("length", pa.int32(), nullable=False),  # teacher tokens incl. specials
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("logits", pa.list_(pa.float32(), num_labels), nullable=False),
        pa.field("tok_offset", pa.int64(), nullable=False),
        pa.field("att_offset", pa.int64(), nullable=False),
    ]
    if cls_width:
        fields.append(pa.field("cls", pa.list_(pa.float16(), cls_width), nullable=False))
    return pa.schema(fields)


@dataclass
class TeacherInfo:
    name: str
    path: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_labels: int
    weights_sha256: str
    tokenizer_sha256: str
    logits_from: str = "teacher"  # "teacher", or "data:<column>" (the user's own teacher logits, cache.logits_from=data)


@dataclass
class FieldLayout:
    """Which layers are stored. Hidden layer 0 is the embedding output; attention and
    values layers are 1-based encoder layers."""

    cls_layers: list[int] = field(default_factory=list)
    hidden_layers: list[int] = field(default_factory=list)
    attention_layers: list[int] = field(default_factory=list)
    values_layer: int | None = None
    float_dtype: str = "float16"
    zarr_codec: str = "zstd"
    quantize: str = "none"  # none | int8 (hidden, attention, values; see the module docstring)

    def stored(self) -> set[str]:
        out = {"logits", "input_ids"}
        if self.cls_layers:
            out.add("cls")
        if self.hidden_layers:
            out.add("hidden")
        if self.attention_layers:
            out.add("attention")
        if self.values_layer is not None:
            out.add("values")
        return out


@dataclass
class ShardInfo:
    name: str
    set: str
    rows: int
    tokens: int
    arrow_sha256: str
    zarr_sha256: str | None


@dataclass
class Manifest:
    teacher: TeacherInfo
    layout: FieldLayout
    max_length: int
    label_names: list[str]
    data_name: str
    sets: dict[str, dict] = field(default_factory=dict)  # set -> {rows, fingerprint}
    shards: list[ShardInfo] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    created_by: str = "distil-cache"

    def __post_init__(self):
        check_quantize(self.layout.quantize)
        self.schema_version = SCHEMA_VERSION if self.layout.quantize == "none" else QUANTIZED_VERSION

    def to_json(self) -> str:
        """An fp16 cache is written exactly as version 1 (no quantize key), so earlier readers still open it."""
        d = asdict(self)
        if d["layout"]["quantize"] == "none":
            del d["layout"]["quantize"]
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: manifest is not valid JSON ({e.msg} at line {e.lineno})") from None
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise UserError(f"{where}: cache schema version {version}, this reader understands "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}; "
                            "rebuild the cache with `make teacher-cache`")
        try:
            return cls(
                teacher=TeacherInfo(**d["teacher"]),
                layout=FieldLayout(**d["layout"]),
                max_length=d["max_length"],
                label_names=d["label_names"],
                data_name=d["data_name"],
                sets=d["sets"],
                shards=[ShardInfo(**s) for s in d["shards"]],
                schema_version=version,
                created_by=d.get("created_by", ""),
            )
        except (KeyError, TypeError) as e:
            raise UserError(f"{where}: manifest is missing or has a malformed field ({e})") from None

    def save(self, cache_dir: Path) -> None:
        atomic_write_text(cache_dir / MANIFEST, self.to_json())

    @classmethod
    def load(cls, cache_dir: Path) -> "Manifest":
        path = Path(cache_dir) / MANIFEST
        if not path.is_file():
            raise UserError(f"{cache_dir}: no {MANIFEST}; not a teacher cache (run `make teacher-cache`)")
        return cls.from_json(path.read_text(), str(path))


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE:
        raise UserError(f"cache.quantize: {quantize!r} is not one of {', '.join(QUANTIZE)}")


def segment_ids(input_ids, sep_id: int | None):
    """The token types the teacher saw, derived from the stored input_ids (they are not stored): 1 after the first
    [SEP] — a pair's second sentence, or a single sentence's padding, which the attention mask hides — else 0.
    A student on the teacher's ids must see the same (trainer/students/smallbert.py)."""
    if sep_id is None:
        return input_ids * 0
    is_sep = (input_ids == sep_id).long()
    return ((is_sep.cumsum(1) - is_sep) > 0).long()


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of a model folder that define its tokenizer (hashed into teacher.tokenizer_sha256)."""
    return sorted(p for p in Path(folder).iterdir() if p.name in TOKENIZER_FILES)


def arrow_path(cache_dir: Path, shard: str) -> Path:
    return Path(cache_dir) / SHARD_DIR / f"{shard}.arrow"


def zarr_path(cache_dir: Path, shard: str) -> Path:
    return Path(cache_dir) / SHARD_DIR / f"{shard}.zarr"


def record_path(cache_dir: Path, shard: str) -> Path:
    """The shard's commit record (its ShardInfo as JSON): present = committed."""
    return Path(cache_dir) / SHARD_DIR / f"{shard}.json"


def chunk_positions(bytes_per_position: int, positions: int, target_bytes: int = 4 << 20) -> int:
    """Positions per Zarr chunk: about `target_bytes` a chunk (readers slice whole chunks), evened out over the
    array so the last chunk is nearly full (Zarr stores an edge chunk at full size, padded: uncompressed, a
    small shard would otherwise take a whole 4 MB chunk per array)."""
    per_chunk = max(1024, target_bytes // max(1, bytes_per_position))
    n_chunks = max(1, -(-positions // per_chunk))
    return max(1, -(-positions // n_chunks))
