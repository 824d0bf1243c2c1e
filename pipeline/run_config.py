"""The stage-one config: data, teacher and cache sections of one YAML file."""
from __future__ import annotations

from dataclasses import dataclass, field

from data.io import UserError
from data.prepare import DataConfig
from pipeline.cache_schema import check_quantize
from pipeline.cache_writer import zarr_codecs
from pipeline.teacher import TeacherConfig


@dataclass
class CacheConfig:
    root: str = "work/cache"
    name: str = ""  # cache folder under root; default: the teacher folder's name
    splits: list[str] = field(default_factory=lambda: ["train", "dev", "test"])
    augment_dir: str = "work/augment"  # every <method>.parquet there becomes set "aug-<method>"
    use_augmented: bool = True  # cache the augmented sets found in augment_dir
    augment_sets: list[str] = field(default_factory=list)  # empty: every method's set present (not their union)
    cls_layers: str = "all"  # all | none | comma list (0 = embeddings)
    hidden_layers: str = "auto"  # auto = embeddings + 4 evenly spaced | none | comma list
    attention_layers: str = "auto"  # auto = 4 evenly spaced | none | comma list (1-based)
    store_values: bool = True  # last layer's value vectors (MiniLM value relation)
    batch_size: int = 64
    shard_rows: int = 2048
    zarr_codec: str = "none"  # none | zstd | blosc-lz4: fp16 teacher outputs shrink ~8% (docs/scaling.md)
    quantize: str = "none"  # none | int8: hidden states, values and attention as int8 + fp16 scales (half the bytes)
    max_rows: int = 0  # 0 = every row; else at most this many rows per set (tests, demos)
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on GPU (CPU runs fp32)
    writer_queue: int = 4  # batches in flight between the teacher and the writer thread
    logits_from: str = "teacher"  # teacher | data: logits from data.logits_column (the encoder still tokenises
    #                               and gives any [CLS]/hidden/attention fields)
    commit_threads: int = 2  # shards encoded and written at once (raise it on a many-core GPU host)
    rank: int = -1  # -1: torchrun's RANK (0 alone); set it to resume one rank of a multi-rank job alone
    world_size: int = 0  # 0: torchrun's WORLD_SIZE (1 alone)
    push_to: str = ""  # fsspec URL (s3://bucket/x, ...): after a complete build, push the cache there (manifest last)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def check_settings(cfg: CacheConfig) -> None:
    """Refuse bad cache settings before anything is written: caught at the first shard, after the
    manifest was saved, they would leave a cache the corrected command refuses."""
    for key in ("batch_size", "shard_rows", "writer_queue", "commit_threads"):
        if getattr(cfg, key) < 1:
            raise UserError(f"cache.{key}: {getattr(cfg, key)} is not a positive number")
    if cfg.max_rows < 0:
        raise UserError(f"cache.max_rows: {cfg.max_rows} is negative (0 = every row)")
    if cfg.logits_from not in ("teacher", "data"):
        raise UserError(f"cache.logits_from: {cfg.logits_from!r} is not 'teacher' or 'data'")
    zarr_codecs(cfg.zarr_codec)
    check_quantize(cfg.quantize)


def evenly_spaced(num_layers: int, k: int = 4) -> list[int]:
    return sorted({max(1, round(num_layers * i / k)) for i in range(1, k + 1)})


def parse_layers(spec: str, num_layers: int, *, auto: list[int], lowest: int, what: str) -> list[int]:
    """'all' | 'none' | 'auto' | '1,3,5' (negative counts from the top: -1 = last layer)."""
    spec = str(spec).strip().lower()
    if spec in ("none", ""):
        return []
    if spec == "all":
        return list(range(lowest, num_layers + 1))
    if spec == "auto":
        return auto
    try:
        layers = [int(x) for x in spec.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"cache.{what}: {spec!r} is not all/none/auto or a comma list of layer numbers") from None
    layers = sorted({num_layers + 1 + x if x < 0 else x for x in layers})
    bad = [x for x in layers if not lowest <= x <= num_layers]
    if bad:
        raise UserError(f"cache.{what}: layer(s) {bad} outside {lowest}..{num_layers} for this teacher")
    return layers
