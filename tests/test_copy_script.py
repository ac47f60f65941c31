"""common/ in layers: a script copied into another project with only the core of common/ (common.CORE) runs, with
resume.py added it resumes, and a run without any extra's flag imports none of the extras (common.EXTRAS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny import build_tiny, has_data
from common import CORE, EXTRAS, GUIDED
from conftest import DATA, REPO

pytestmark = pytest.mark.skipif(not has_data("commongen"), reason=f"local CommonGen data in {DATA} is absent")

RUN = ["--task", "commongen", "--iterations", "1", "--rollouts-per-iteration", "4", "--minibatch-size", "2",
       "--eval-samples", "2", "--final-eval-samples", "2", "--data-dir", str(DATA), "--run-name", "run"]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, RLGF_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def test_the_layers_name_every_module_of_common_once():
    from common.embedded import PRETRAINED
    from common.models import MODEL_ALIASES

    files = sorted(p.name for p in (REPO / "common").glob("*.py"))
    named = [*CORE, *GUIDED, *EXTRAS]
    assert sorted(named) == files and len(set(named)) == len(named)
    assert tuple(PRETRAINED) == MODEL_ALIASES  # the aliases core recognises without importing common.embedded


def _copy_ppo(project: Path, extras: tuple[str, ...] = ()) -> None:
    """ppo.py and the core of common/ (and `extras`) into an empty folder."""
    (project / "common").mkdir(parents=True)
    shutil.copy(REPO / "ppo.py", project)
    for name in (*CORE, *extras):
        shutil.copy(REPO / "common" / name, project / "common" / name)


def test_ppo_copied_with_only_the_core_runs_one_iteration(tmp_path):
    project = tmp_path / "project"
    _copy_ppo(project)
    model = build_tiny("commongen", tmp_path / "model")
    out = tmp_path / "runs"
    res = subprocess.run([sys.executable, "ppo.py", *RUN, "--policy-model", str(model), "--output-dir", str(out)],
                         cwd=project, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "initial" in json.loads((out / "run" / "eval.json").read_text())
    assert sorted(p.name for p in (project / "common").glob("*.py")) == sorted(CORE)  # nothing else appeared


_IMPORTS = """
import atexit, json, runpy, sys
sys.path.insert(0, {repo!r})
atexit.register(lambda: print("IMPORTED " + json.dumps(sorted(m for m in sys.modules if m.startswith("common."))),
                              file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _imported(stderr: str) -> set[str]:
    """The modules of common/ a run made with _IMPORTS imported, as file names."""
    line = [x for x in stderr.splitlines() if x.startswith("IMPORTED ")][-1]
    return {m.removeprefix("common.") + ".py" for m in json.loads(line.removeprefix("IMPORTED "))}


def test_ppo_copied_with_the_core_and_resume_py_resumes_its_run(tmp_path):
    project = tmp_path / "project"
    _copy_ppo(project, extras=("resume.py",))
    model = build_tiny("commongen", tmp_path / "model")
    out = tmp_path / "runs"
    first = subprocess.run([sys.executable, "ppo.py", *RUN, "--policy-model", str(model), "--output-dir", str(out),
                            "--keep-checkpoint"], cwd=project, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "run" / "checkpoint.pt").is_file()
    res = subprocess.run([sys.executable, "-c", _IMPORTS.format(repo=str(project)), "ppo.py", "--resume",
                          str(out / "run"), "--iterations", "2"], cwd=project, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from iteration 1" in res.stdout
    steps = {json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()}
    assert {1, 2} <= steps
    imported = _imported(res.stderr)
    assert "resume.py" in imported and imported <= {*CORE, "resume.py"}, imported  # --resume: its extra alone


@pytest.mark.parametrize("script", ["ppo", "ppo_plus_plus"])
def test_a_run_without_their_flags_imports_none_of_the_extras(tmp_path, script):
    model = build_tiny("commongen", tmp_path / "model")
    res = subprocess.run([sys.executable, "-c", _IMPORTS.format(repo=str(REPO)), str(REPO / f"{script}.py"), *RUN,
                          "--policy-model", str(model), "--output-dir", str(tmp_path / "runs")],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    imported = _imported(res.stderr)
    allowed = set(CORE) | (set(GUIDED) if script != "ppo" else set())
    assert imported <= allowed, imported - allowed
    assert not imported & set(EXTRAS)
    assert not imported & {"resume.py", "seq2seq.py", "chat_template.py", "fsdp.py"}  # those of flags not given
