"""benchmarks/reproduce.py: the grid's order and filters, and the report built from finished run folders;
benchmarks/throughput.py: one floor per counted iteration, of its own work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402
import throughput  # noqa: E402


def test_grid_is_seed_major_and_filters_guides():
    args = reproduce.Args(tasks=["imdb", "tldr"], seeds=[1, 2], model_guide_tasks=["imdb"])
    grid = list(reproduce.configs(args))
    # every configuration's first seed comes before any second seed
    assert [s for *_, s in grid] == sorted(s for *_, s in grid)
    first = {(t, a, g) for t, a, g, s in grid if s == 1}
    assert first == {(t, a, g) for t, a, g, s in grid if s == 2}
    # PPO has no guide; the rule guide only where one exists; the model guide only where asked
    assert ("imdb", "ppo", "-") in first and ("tldr", "ppo", "-") in first
    assert {g for t, a, g in first if t == "imdb" and a != "ppo"} == {"model"}
    assert {g for t, a, g in first if t == "tldr" and a != "ppo"} == {"rule"}
    assert len(first) == 2 * (1 + len(reproduce.GUIDED))


def _fake_run(runs_dir: Path, name: str, initial: float, final: float):
    d = runs_dir / name
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"initial": {"reward": initial, "kl": 0.0},
                                             "final": {"reward": final, "kl": 1.0}}))
    guided = not name.startswith("ppo-")
    train = [{"step": i, "time/iteration": 1.0, "objective/reward": 0.1 * i, "train/response_length": 48.0,
              "value/explained_variance": 0.2 * i, **({"guide/learner_tokens": 20.0 + i} if guided else {})}
             for i in (1, 2, 3, 4)]
    lines = [{"step": 0, "eval/reward": initial}, *train, {"step": 4, "eval/reward": final}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_report_tables_means_and_plots(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "ppo-none-imdb-seed1", 0.5, 0.6)
    _fake_run(runs, "ppo-none-imdb-seed2", 0.5, 0.8)
    _fake_run(runs, "d2lols-model-imdb-seed1", 0.5, 0.9)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "guides.json").write_text(json.dumps({"imdb/model": {"reward": 0.65, "kl": None}}))
    args = reproduce.Args(tasks=["imdb"], seeds=[1, 2], algos=["ppo", "d2lols"], runs_dir=str(runs),
                          results_dir=str(tmp_path / "res"), report_only=True)
    reproduce.report(args)
    table = (tmp_path / "res" / "README.md").read_text()
    results, diag = table.split("Training diagnostics")
    rows = {line.split("|")[1].strip(): line for line in results.splitlines() if line.startswith("| ")}
    drows = {line.split("|")[1].strip(): line for line in diag.splitlines() if line.startswith("| ")}
    assert "| 2 | 0.700 ± 0.100 |" in rows["ppo"]  # mean ± standard error over the two seeds
    assert "| 1 | 0.900 |" in rows["d2lols"]
    assert "0.650" in rows["the guide alone"]
    assert "| - | 0.500 ± 0.000 |" in rows["initial policy"]  # the same evaluation in every run
    assert (tmp_path / "res" / "imdb.png").stat().st_size > 1000
    # diagnostics: PPO trains every token, a guided run its learner tokens (all iterations); the critic and the
    # training reward over the second half of training (iterations 3 and 4)
    assert "| 48.000 ± 0.000 | 0.700 ± 0.000 | 0.350 ± 0.000 | - |" in drows["ppo"]
    assert "| 22.500 | 0.700 | 0.350 | - |" in drows["d2lols"]


def test_throughput_sets_each_iteration_against_the_floor_of_its_own_work(tmp_path, monkeypatch):
    """benchmarks/throughput.py on a tiny model (no embedded build): one floor per counted iteration, made of that
    iteration's sampling calls and batch, and the ratio is the median of iteration time / its own floor."""
    from _tiny import build_tiny, has_data

    if not has_data("commongen"):
        pytest.skip("the local CommonGen data (../shared/data/common_gen) is absent")
    from common import models, runtime
    from common.models import EmbeddedModels

    tiny = str(build_tiny("commongen", tmp_path / "tiny"))
    fake = lambda task, data_dir, *a, **kw: EmbeddedModels(tiny, tiny, models.EMBEDDED[task.name])  # noqa: E731
    monkeypatch.setattr(models, "embedded_models", fake)
    monkeypatch.setattr(runtime, "embedded_models", fake)
    monkeypatch.setenv("RLGF_DATA_DIR", str(REPO.parent / "shared" / "data"))
    threads = torch.get_num_threads()
    try:
        r = throughput.measure_one("commongen", "lols", iterations=4, device_name="cpu")
    finally:
        torch.set_num_threads(threads)
    assert len(r["ratios"]) == len(r["floors"]) == len(r["iterations"]) == 3  # the warm-up iteration is not counted
    for it, floor, ratio in zip(r["iterations"], r["floors"], r["ratios"]):
        assert set(floor) == {"generate", "guide_generate", "ref_forward", "reward", "train"}
        assert all(v > 0 for v in floor.values()), floor  # LOLS samples from the guide in every iteration
        assert ratio == pytest.approx(it["iteration"] / sum(floor.values()))
    assert r["ratio"] == pytest.approx(float(np.median(r["ratios"])))
    assert r["floor_train"] == pytest.approx(float(np.median([f["train"] for f in r["floors"]])))
    assert r["model_state_mib"] > 0 and r["peak_mib_above_imports"] > 0 and r["tokens_per_s"] > 0
