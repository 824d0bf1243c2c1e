"""`--help` / `-h` on every entry point: one implementation (data.config.parse_cli) generated from the
config dataclasses, so every field shows with its type, default and source comment, and exits 0."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys

import pytest

from data.io import run_cli
from tests.conftest import REPO

# entry point -> lines its help must hold (fields with their defaults and comments, sections)
EXPECTED = {
    "trainer.train": [
        'cache2: str = ""  # a second teacher\'s cache of the same rows (Dynamic KD)',
        "runs[].* (RunSpec):",
        "runs[].stages[].* (DistillStage):",
        "  loss: str  (required)",
        "  lr: float = 0.0  # 0: the student's default",
    ],
    "recipes.compare": [
        'teacher_config: str = "configs/cpu.yaml"  # stage-one config of the primary (strong) teacher',
        "train: TrainConfig  (section train.*)",
        "train.runs[].* (RunSpec):",
        "  epochs: int = 5",
    ],
    "augment.run": [
        'methods: list[str] = ["tang"]',
        "tang.* (TangParams):",
        "  p_mask: float = 0.1  # word -> [MASK]",
        "tinybert.* (TinyBertParams):",
    ],
    "pipeline.train_teacher": [
        "`--data-only` stops after the split",
        "teacher.* (TeacherConfig):",
        "  lr: float = 5e-05",
        # a comment continued on a comment-only line is joined
        '  logits_from: str = "teacher"  # teacher | data: logits from data.logits_column (the encoder still '
        "tokenises and gives any [CLS]/hidden/attention fields)",
    ],
    "pipeline.teacher_cache": [
        "cache.* (CacheConfig):",
        '  attention_layers: str = "auto"  # auto = 4 evenly spaced | none | comma list (1-based)',
        "data.* (DataConfig):",
    ],
    "data.prepare": [
        "  text_b_column: str | None = null  # second sentence of a pair (e.g. hypothesis)",
        "  seed: int = 13",
    ],
}


def help_of(module: str, *args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        run_cli(importlib.import_module(module).main, list(args))
    assert e.value.code == 0
    return out.getvalue()


def test_every_parse_cli_entry_point_is_covered():
    """A new entry point on the shared parser gets its help checked here."""
    callers = {".".join(p.relative_to(REPO).with_suffix("").parts)
               for d in ("data", "pipeline", "trainer", "augment", "recipes") for p in (REPO / d).rglob("*.py")
               if re.search(r"\bparse_cli\(\w+", p.read_text()) and p.name != "config.py"}
    assert callers == set(EXPECTED)


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_help_lists_fields_with_defaults_and_comments(module):
    text = help_of(module, "--help")
    assert text.startswith(f"usage: python -m {module} [--config FILE.yaml] [key=value ...]\n")
    for line in EXPECTED[module]:
        assert line in text, f"{module} --help lacks {line!r}"


def test_short_flag_wins_over_bad_overrides():
    """-h anywhere prints the help, even beside an override that would be refused."""
    assert help_of("data.prepare", "no_such_key=1", "-h") == help_of("data.prepare", "--help")


def test_help_from_the_real_command():
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m trainer.train ") and "  batch_size: int = 64" in r.stdout


@pytest.mark.parametrize("module", ["pipeline.inspect", "trainer.latency", "trainer.export", "pipeline.cache_sync"])
def test_positional_commands_answer_help(module):
    """The commands that take a folder or URL (argparse) answer --help with their usage and docstring."""
    text = help_of(module, "--help")
    assert text.startswith(f"usage: python -m {module} ") and "positional arguments:" in text
