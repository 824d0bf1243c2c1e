"""`python -m trainer.train`: train students from a teacher cache (the teacher is never loaded).

One command trains every (student, loss) run of the config from the same cache and
prints one comparison table. Each run keeps its best-on-dev student (safetensors +
JSON), a resumable checkpoint, metrics.jsonl/metrics.csv and its resolved config.
This module holds the configs and the plan; the steps of training are in trainer/steps.py, and
trainer/together.py drives them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data.config import parse_cli, save_config
from data.io import atomic_write_text, run_cli
from trainer.distributed import cleanup
from trainer.evaluate import result_table
from trainer.run_key import check_config, check_run_dirs
from trainer.stages import Stage
from trainer.run_setup import local_caches
from trainer.steps import set_up
from trainer.together import train_group, train_runs
from trainer.sweep import expand, named, setting_of, summarise, summary_markdown, twin_tags, write_summary


@dataclass
class RunSpec:
    """One student trained with one loss (or a staged schedule)."""

    student: str = "bilstm"
    loss: str = "hinton"
    name: str = ""  # default: <student>-<loss>
    student_params: dict = field(default_factory=dict)  # fields of the student's config dataclass
    loss_params: dict = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)  # empty: the loss's own schedule (one stage, or TinyBERT's two)
    epochs: int = 0  # 0: TrainConfig.epochs
    lr: float = 0.0  # 0: the student's default_lr (BiLSTM 2e-3, TextCNN 1e-3, small-BERT 1e-4)
    overrides: dict = field(default_factory=dict)  # TrainConfig settings of this run only (seed, label_budget, ...)


@dataclass
class TrainConfig:
    cache: str = "work/cache/minilm-tweets"
    cache2: str = ""  # a second teacher's cache of the same rows (Dynamic KD)
    students: list[str] = field(default_factory=lambda: ["bilstm"])  # grid: students × losses
    losses: list[str] = field(default_factory=lambda: ["hinton"])
    runs: list[RunSpec] = field(default_factory=list)  # explicit runs (replace the grid)
    seeds: list[int] = field(default_factory=list)  # repeat every run per seed (empty: just `seed`); trainer/sweep.py
    sweep: dict = field(default_factory=dict)  # run setting -> values, crossed: {loss_params.t: [2, 4], lr: [...]}
    train_sets: list[str] = field(default_factory=list)  # empty: train + every aug-* set
    use_augmented: bool = True
    label_budget: int = 0  # >0: keep gold labels of only this many train rows (few-labels regime)
    dev_set: str = "dev"
    test_set: str = "test"
    epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 0.0
    schedule: str = "linear"  # linear: warm-up then linear decay to 0 | constant: warm-up then a flat lr
    warmup_ratio: float = 0.05
    shuffle_rows: int = 0  # training stream's shuffle buffer; 0: the whole stream for row-level losses,
    #                        16,384 rows for stages reading token-level fields (hidden/attention/values)
    bucket_by_length: bool = False  # length-homogeneous batches: ~20% faster epochs, lower accuracy
    grad_clip: float = 5.0
    ema_decay: float = 0.0  # >0: dev, best/ and test use an exponential moving average of the weights (Polyak),
    #                         updated every step with this decay; 0: the weights as trained (docs/methods.md)
    patience: int = 3  # epochs without a better dev accuracy before stopping
    seed: int = 0
    embeddings: str = "glove50"  # word students: glove50 (shipped) or a GloVe/word2vec file
    min_freq: int = 1
    oov_min_freq: int = 2  # a word without a pretrained vector needs this many occurrences in the rows before
    #                        augmentation, else it reads <unk> (docs/methods.md)
    oov_std: float = 0.0  # std of the random rows of words without a vector (and <unk>); 0: the vectors' std
    workers: int = 0  # DataLoader worker processes
    verify: bool | str = True  # true: checksum the shards whose files changed since last verified | full: all | false
    device: str = "auto"
    out_dir: str = "work/students"
    resume: bool = True  # only ever a checkpoint of this very run (same run key, trainer/run_key.py)
    on_change: str = "new"  # <out_dir>/<name> holds a run with other settings: new (<name>-<key>) | refuse | overwrite
    log_every: int = 50
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (0: epoch ends only)
    max_steps_per_epoch: int = 0  # 0 = whole epoch (benchmarks and tests cut it)
    measure_latency: bool = True
    baseline: bool = True  # add each distilled student's plain `ce` twin (gold rows only) to the table
    tensorboard: bool = True  # training curves in <run>/tensorboard/ (trainer/curves.py)
    together: int = 8  # runs that read the very same batches (same sets, seed, stream, epochs, vocabulary) train in
    #                    one pass over the cache, up to this many at a time; each ends as it would alone; 1: one by one


def plan_runs(cfg: TrainConfig) -> list[RunSpec]:
    """The grid or the explicit runs × the seeds and sweep (trainer/sweep.py); with `baseline`, each distilled
    student gets its plain `ce` twin (same student, params and seed, gold rows only) first, so the table shows
    what distillation bought."""
    runs = expand(cfg.runs or [RunSpec(student=s, loss=l) for s in cfg.students for l in cfg.losses], cfg)
    if cfg.baseline:
        planned = []
        for r, tags in runs:
            twin = RunSpec(student=r.student, loss="ce", student_params=dict(r.student_params), epochs=r.epochs,
                           lr=r.lr, overrides=dict(r.overrides),
                           name="" if not r.student_params else f"{r.name or r.student}-ce")
            if r.loss != "ce" and not any(_same_student(q, twin) and q.loss == "ce" for q, _ in runs + planned):
                planned.append((twin, twin_tags(tags)))
            planned.append((r, tags))
        runs = planned
    return named(runs)


def _same_student(a: RunSpec, b: RunSpec) -> bool:
    """Same student, params and per-run settings (seed, label budget): a twin, whatever the loss."""
    return a.student == b.student and a.student_params == b.student_params and a.overrides == b.overrides


def train_run(run: RunSpec, cfg: TrainConfig) -> dict | None:
    """Train one student (every stage), keep the best on dev, measure it. Rank 0 returns the result."""
    return train_group([set_up(run, cfg)])[0]


def train_all(cfg: TrainConfig) -> list[dict]:
    runs = plan_runs(cfg)
    check_config(cfg, runs)  # every run's names and settings, before anything is written
    local = local_caches(cfg)  # pull remote caches once for every run
    check_run_dirs(local, runs)
    results = train_runs(runs, local)
    cleanup()  # torchrun: every rank is past its last collective
    if results and results[0] is None:  # not rank 0: rank 0 writes the table
        return []
    for run, result in zip(runs, results):  # what distillation bought: test accuracy minus the ce twin's
        twin = next((t for q, t in zip(runs, results) if q.loss == "ce" and _same_student(q, run)), None)
        result["vs_ce"] = result["test_accuracy"] - twin["test_accuracy"] if twin and run.loss != "ce" else None
        result["ce_twin"] = twin["run"] if twin and run.loss != "ce" else None
        result["setting"] = setting_of(run)  # what repeats over seeds share
    out = Path(cfg.out_dir)
    table = result_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    save_config(cfg, out)
    if cfg.seeds or cfg.sweep:
        write_summary(out, results)
    return results


def main(argv: list[str]) -> int:
    cfg = parse_cli(TrainConfig, argv)
    results = train_all(cfg)
    if not results:  # a rank other than 0
        return 0
    print(result_table(results))
    if cfg.seeds or cfg.sweep:
        print("\n" + summary_markdown(summarise(results)))
    if cfg.measure_latency:  # the table's latency is eager PyTorch; the serving forms and the teacher are one step away
        print(f"\nlatency as served (TorchScript, ONNX, int8) beside the teacher: python -m trainer.latency "
              f"{Path(cfg.out_dir) / results[-1]['run']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
