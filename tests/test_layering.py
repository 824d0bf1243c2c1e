"""Stage two never imports teacher code: a student trains from a cache on a machine where the teacher and its
stage-one code are never loaded. trainer/ may read the cache contract (pipeline.cache_*) and the model-side
attention capture; the recipes that run both stages live in recipes/."""
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import trainer

ROOT = Path(__file__).resolve().parent.parent
STAGE_ONE = ("pipeline.teacher", "pipeline.teacher_runner", "pipeline.teacher_cache", "pipeline.train_teacher",
             "pipeline.cache_writer", "pipeline.run_config", "augment")

PROBE = """
import importlib, json, sys
blame = {}
for name in sys.argv[2:]:
    before = set(sys.modules)
    importlib.import_module(name)
    new = [m for m in set(sys.modules) - before if m.startswith(tuple(sys.argv[1].split(",")))]
    if new:
        blame[name] = sorted(new)
print(json.dumps(blame))
"""


def stage_two_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(trainer.__path__, "trainer.") if m.name != "trainer.__main__")


def test_no_stage_two_module_imports_teacher_code():
    modules = stage_two_modules()
    assert "trainer.train" in modules and "trainer.students.smallbert" in modules
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(STAGE_ONE), *modules], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {}, f"stage-two modules import stage-one code: {out}"


def test_the_probe_sees_a_stage_one_import():
    """The check above can fail: the end-to-end compare recipe does load the teacher code."""
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(STAGE_ONE), "recipes.compare"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    assert "pipeline.teacher" in json.loads(out.strip().splitlines()[-1])["recipes.compare"]
