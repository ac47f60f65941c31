"""benchmarks/reproduce.py: the grid's order and filters, and the report built from finished run folders;
benchmarks/throughput.py: one floor per counted iteration, of its own work; benchmarks/critic_fit.py: the linear
ceiling on known data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import critic_fit  # noqa: E402
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


def _fake_run(runs_dir: Path, name: str, initial: float, final: float, middle: float | None = None):
    """A finished run: eval.json, and metrics.jsonl with 4 iterations, evaluated at 0 and 4 (and at 2: `middle`)."""
    d = runs_dir / name
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"initial": {"reward": initial, "kl": 0.0},
                                             "final": {"reward": final, "kl": 1.0}}))
    guided = not name.startswith("ppo-")
    train = [{"step": i, "time/iteration": 1.0, "objective/reward": 0.1 * i, "train/response_length": 48.0,
              "value/explained_variance": 0.2 * i, **({"guide/learner_tokens": 20.0 + i} if guided else {})}
             for i in (1, 2, 3, 4)]
    lines = [{"step": 0, "eval/reward": initial}, *train, {"step": 4, "eval/reward": final}]
    if middle is not None:
        lines.insert(3, {"step": 2, "eval/reward": middle})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def _table_after(text: str, caption: str) -> dict[str, list[str]]:
    """The Markdown table that follows the line starting with `caption`: first cell -> the row's cells."""
    lines = text[text.index(caption):].splitlines()[1:]
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_report_tables_means_and_plots(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    runs = tmp_path / "runs"
    _fake_run(runs, "ppo-none-imdb-seed1", 0.5, 0.6)
    _fake_run(runs, "ppo-none-imdb-seed2", 0.5, 0.8)
    _fake_run(runs, "ppo-none-imdb-seed3", 0.5, 0.7)
    _fake_run(runs, "d2lols-model-imdb-seed1", 0.5, 0.9)
    (runs / "ppo-none-imdb-seed2" / "args.json").write_text(json.dumps({"resume": str(runs / "ppo-none-imdb-seed2")}))
    (runs / "ppo-none-imdb-seed3" / "args.json").write_text(json.dumps({"resume": None}))
    res = tmp_path / "res"
    res.mkdir()
    (res / "guides.json").write_text(json.dumps({"imdb/model": {"reward": 0.65, "kl": None}}))
    # hand-written notes below the mark survive the regeneration; the generated part above it is replaced
    (res / "README.md").write_text("old generated table\n" + reproduce.NOTES_MARK + "\nWhy: a reading.\n")
    bands = []
    real_fill = Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between", lambda self, x, lo, hi, **kw: (
        bands.append((list(x), list(lo), list(hi))), real_fill(self, x, lo, hi, **kw))[1])
    args = reproduce.Args(tasks=["imdb"], seeds=[1, 2, 3], algos=["ppo", "d2lols"], runs_dir=str(runs),
                          results_dir=str(res), report_only=True)
    reproduce.report(args)
    text = (res / "README.md").read_text()
    assert "old generated table" not in text and text.endswith(reproduce.NOTES_MARK + "\nWhy: a reading.\n")

    # 0.6, 0.8, 0.7: mean 0.7, sample std 0.1, standard error 0.1 / sqrt(3) = 0.0577
    final = _table_after(text, "Final validation metrics")
    assert final["ppo"][:4] == ["ppo", "-", "3", "0.700 ± 0.058"]
    assert final["d2lols"][:4] == ["d2lols", "model", "1", "0.900"]
    assert final["the guide alone"][3] == "0.650"
    assert final["initial policy"][3] == "0.500 ± 0.000"  # the same evaluation in every run
    per_seed = _table_after(text, "Per seed")
    assert per_seed["ppo"][2:5] == ["1, 2, 3", "0.600 / 0.800 / 0.700", "0.700 ± 0.058"]
    assert per_seed["d2lols"][2:5] == ["1", "0.900", "0.900"]
    comparison = _table_after(text, "Final validation value")
    assert comparison["ppo"][1] == "0.700 ± 0.058" and comparison["d2lols"][1] == "0.900"
    assert comparison["the guide alone"][1] == "0.650"  # one guide per task: one row per algorithm
    # the runs resumed after an interruption are named (args.json's `resume`), the others not
    assert "(`resume` in their args.json): ppo seed 2. A resumed run" in text

    # the plot: a band from the lowest to the highest seed for the 3-seed configuration, none for one seed
    assert (res / "imdb.png").stat().st_size > 1000
    assert len(bands) == 1
    steps, lo, hi = bands[0]
    assert steps == [0, 4] and lo == [0.5, 0.6] and hi == [0.5, 0.8]

    # diagnostics: PPO trains every token, a guided run its learner tokens (all iterations); the critic and the
    # training reward over the second half of training (iterations 3 and 4); early: iterations 1-4, up to the first
    # evaluation after the start (step 4)
    diag = _table_after(text, "Training diagnostics")
    assert diag["ppo"][2:] == ["48.000 ± 0.000", "0.700 ± 0.000", "0.350 ± 0.000", "-", "0.250 ± 0.000", "-"]
    assert diag["d2lols"][2:] == ["22.500", "0.700", "0.350", "-", "0.250", "-"]


def test_report_keeps_a_hand_written_head_on_top(tmp_path):
    """Above HEAD_MARK: kept as it is, its own title in place of the generated one; below NOTES_MARK: kept."""
    runs = tmp_path / "runs"
    _fake_run(runs, "ppo-none-imdb-seed1", 0.5, 0.6)
    res = tmp_path / "res"
    res.mkdir()
    args = reproduce.Args(tasks=["imdb"], seeds=[1], algos=["ppo"], runs_dir=str(runs), results_dir=str(res),
                          report_only=True)
    reproduce.report(args)
    plain = (res / "README.md").read_text()
    assert plain.startswith("# Results: the paper's comparison in miniature\n\nGenerated by")
    head = "# Results: a headline\n\nWhat the runs show.\n" + reproduce.HEAD_MARK
    (res / "README.md").write_text(head + "\nold generated table\n" + reproduce.NOTES_MARK + "\nWhy: a reading.\n")
    reproduce.report(args)
    generated = plain[plain.index("Generated by"):plain.index(reproduce.NOTES_MARK)]
    assert (res / "README.md").read_text() == (head + "\n\n" + generated + reproduce.NOTES_MARK
                                                + "\nWhy: a reading.\n")


def test_report_tables_the_learning_curves(tmp_path):
    """Mean over seeds at each evaluated iteration, the peak, and the last mean against the peak and the one before."""
    runs = tmp_path / "runs"
    for seed, (mid, end) in enumerate(((0.9, 0.7), (0.7, 0.6), (0.8, 0.8)), start=1):  # means 0.8 at 2, 0.7 at 4
        _fake_run(runs, f"ppo-none-imdb-seed{seed}", 0.5, end, middle=mid)
    _fake_run(runs, "d2lols-model-imdb-seed1", 0.5, 0.9, middle=0.6)
    res = tmp_path / "res"
    res.mkdir()
    (res / "guides.json").write_text(json.dumps({"imdb/model": {"reward": 0.65}}))
    reproduce.report(reproduce.Args(tasks=["imdb"], seeds=[1, 2, 3], algos=["ppo", "d2lols"], runs_dir=str(runs),
                                    results_dir=str(res), report_only=True))
    text = (res / "README.md").read_text()
    assert "Learning curves: the periodic evaluation's `reward`" in text
    curves = _table_after(text, "Learning curves")
    assert curves["ppo"][2:] == ["3", "0.500", "0.800", "0.700", "2 (0.800)", "-0.100", "-0.100"]
    assert curves["d2lols"][2:] == ["1", "0.500", "0.600", "0.900", "4 (0.900)", "+0.000", "+0.300"]
    # early diagnostics: the iterations up to the first evaluation after the start, here 1 and 2
    diag = _table_after(text, "Training diagnostics")
    assert diag["ppo"][-2] == "0.150 ± 0.000" and diag["d2lols"][-2] == "0.150"


def test_report_names_the_moving_guide_alone_as_the_learners_start(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "ppo-none-imdb-seed1", 0.5, 0.6)
    _fake_run(runs, "ppo_plus_plus-learner-imdb-seed1", 0.5, 0.7)
    res = tmp_path / "res"
    res.mkdir()
    (res / "guides.json").write_text(json.dumps({"imdb/learner": {"reward": 0.45}}))
    reproduce.report(reproduce.Args(tasks=["imdb"], seeds=[1], algos=["ppo", "ppo_plus_plus"], guides=["learner"],
                                    runs_dir=str(runs), results_dir=str(res), report_only=True))
    final = _table_after((res / "README.md").read_text(), "Final validation metrics")
    assert final["the guide alone"][1:4] == ["learner, at the start", "-", "0.450"]
    assert final["ppo_plus_plus"][1:4] == ["learner", "1", "0.700"]


def test_t_distribution_against_textbook_values():
    # two-sided 95% critical values from any t table; Cauchy (df 1): P(T <= 2) = 1/2 + atan(2)/pi by hand
    for df, crit in ((1, 12.7062047), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)):
        assert reproduce.t_ppf(0.975, df) == pytest.approx(crit, abs=1e-6)
        assert reproduce.t_cdf(crit, df) == pytest.approx(0.975, abs=1e-7)
    assert reproduce.t_cdf(2.0, 1) == pytest.approx(0.5 + np.arctan(2.0) / np.pi, abs=1e-12)
    assert reproduce.t_cdf(0.0, 7) == 0.5 and reproduce.t_ppf(0.8, 4) == pytest.approx(0.9409646, abs=1e-6)
    # the regularized incomplete beta by hand: I_x(1, 1) = x, I_x(2, 1) = x^2, I_x(1, 2) = 1 - (1 - x)^2
    assert reproduce.betainc(1, 1, 0.3) == pytest.approx(0.3) and reproduce.betainc(2, 1, 0.3) == pytest.approx(0.09)
    assert reproduce.betainc(1, 2, 0.3) == pytest.approx(0.51)


def test_welch_interval_p_value_and_detectable_difference():
    # by hand: means 2 and 3, variances 1 and 1, n 3 and 3: difference 1, SE sqrt(2/3), df 4 (equal variances and
    # sizes), t = 1.2247; the interval is 1 +- 2.7764 * 0.8165; p = 2 P(T_4 > 1.2247) = 0.28786 (t_4 in closed form:
    # P(T_4 <= t) = 1/2 + t (t^2 + 6) / (2 (t^2 + 4)^1.5))
    w = reproduce.welch([1, 2, 3], [2, 3, 4])
    assert w["diff"] == pytest.approx(1.0) and w["df"] == pytest.approx(4.0)
    half = 2.7764451052 * np.sqrt(2 / 3)
    assert (w["low"], w["high"]) == (pytest.approx(1 - half, abs=1e-8), pytest.approx(1 + half, abs=1e-8))
    t = 1 / np.sqrt(2 / 3)
    assert w["p"] == pytest.approx(2 * (0.5 - t * (t * t + 6) / (2 * (t * t + 4) ** 1.5)), abs=1e-10)
    # unequal variances: scipy.stats.ttest_ind(b, a, equal_var=False) gives t -2.459748, df 3.965316, p 0.070261
    w = reproduce.welch([0.61, 0.70, 0.64], [0.50, 0.60, 0.56])
    assert w["diff"] == pytest.approx(-0.0966667, abs=1e-7) and w["df"] == pytest.approx(3.9653155, abs=1e-6)
    assert w["p"] == pytest.approx(0.0702613, abs=1e-6) and w["low"] < w["diff"] < w["high"] < 0.0129
    assert reproduce.welch([1.0], [2.0, 3.0]) is None  # one seed: no interval
    # pooled SD by hand: groups (1, 2, 3) and (2, 4): (2 * 1 + 1 * 2) / 3 = 4/3
    assert reproduce.pooled_sd([[1, 2, 3], [2, 4], [5]]) == pytest.approx(np.sqrt(4 / 3))
    # 80% power at alpha 0.05, 3 seeds against 3: (t_0.975,4 + t_0.8,4) sd sqrt(2/3)
    assert reproduce.min_detectable(1.0, 3, 3) == pytest.approx((2.7764451 + 0.9409646) * np.sqrt(2 / 3), abs=1e-6)


def test_report_sets_each_guided_configuration_against_ppo(tmp_path):
    runs = tmp_path / "runs"
    for seed, (p, g) in enumerate(((0.6, 0.5), (0.8, 0.6), (0.7, 0.55)), start=1):
        _fake_run(runs, f"ppo-none-imdb-seed{seed}", 0.5, p)
        _fake_run(runs, f"ppo_plus_plus-model-imdb-seed{seed}", 0.5, g)
    res = tmp_path / "res"
    res.mkdir()
    (res / "guides.json").write_text(json.dumps({"imdb/model": {"reward": 0.65}}))
    reproduce.report(reproduce.Args(tasks=["imdb"], seeds=[1, 2, 3], algos=["ppo", "ppo_plus_plus"],
                                    runs_dir=str(runs), results_dir=str(res), report_only=True))
    row = _table_after((res / "README.md").read_text(), "Each guided configuration against PPO")
    w = reproduce.welch([0.6, 0.8, 0.7], [0.5, 0.6, 0.55])
    mdd = reproduce.min_detectable(reproduce.pooled_sd([[0.6, 0.8, 0.7], [0.5, 0.6, 0.55]]), 3, 3)
    assert row["ppo_plus_plus (model guide)"][1:] == [  # one configuration against PPO: Holm leaves its p as it is
        "3", f"{w['diff']:+.3f}", f"[{w['low']:+.3f}, {w['high']:+.3f}]", f"{w['p']:.3f}", f"{w['p']:.3f}",
        f"{mdd:.3f}"]


def test_holm_adjusts_the_p_values_of_comparisons_made_together():
    # by hand, m = 4: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, then made
    # non-decreasing: 0.02, 0.03, 0.06, 0.06 (statsmodels' multipletests(method="holm") gives the same)
    assert reproduce.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reproduce.holm([0.5, 0.9]) == [1.0, 1.0] and reproduce.holm([0.2]) == [0.2] and reproduce.holm([]) == []


def test_report_adjusts_p_by_holm_over_every_configuration_against_ppo(tmp_path):
    runs = tmp_path / "runs"
    guided = {"ppo_plus_plus": (0.5, 0.6, 0.55), "aggrevated": (0.62, 0.79, 0.71)}
    for seed, p in enumerate((0.6, 0.8, 0.7), start=1):
        _fake_run(runs, f"ppo-none-imdb-seed{seed}", 0.5, p)
        for algo, values in guided.items():
            _fake_run(runs, f"{algo}-model-imdb-seed{seed}", 0.5, values[seed - 1])
    res = tmp_path / "res"
    res.mkdir()
    (res / "guides.json").write_text(json.dumps({"imdb/model": {"reward": 0.65}}))
    reproduce.report(reproduce.Args(tasks=["imdb"], seeds=[1, 2, 3], algos=["ppo", "ppo_plus_plus", "aggrevated"],
                                    runs_dir=str(runs), results_dir=str(res), report_only=True))
    row = _table_after((res / "README.md").read_text(), "Each guided configuration against PPO")
    ps = [reproduce.welch([0.6, 0.8, 0.7], guided[a])["p"] for a in ("ppo_plus_plus", "aggrevated")]
    assert ps[0] < ps[1]  # so Holm doubles the smaller and keeps the larger (at least the doubled smaller)
    assert row["ppo_plus_plus (model guide)"][4:6] == [f"{ps[0]:.3f}", f"{2 * ps[0]:.3f}"]
    assert row["aggrevated (model guide)"][4:6] == [f"{ps[1]:.3f}", f"{max(ps[1], 2 * ps[0]):.3f}"]


def test_throughput_sets_each_iteration_against_the_floor_of_its_own_work(tmp_path, monkeypatch):
    """benchmarks/throughput.py on a tiny model (no embedded build): one floor per counted iteration, made of that
    iteration's sampling calls and batch, and the ratio is the median of iteration time / its own floor."""
    from _tiny import build_tiny, has_data

    if not has_data("commongen"):
        pytest.skip("the local CommonGen data (../shared/data/common_gen) is absent")
    from common import embedded
    from common.embedded import EmbeddedModels

    tiny = str(build_tiny("commongen", tmp_path / "tiny"))
    fake = lambda task, data_dir, *a, **kw: EmbeddedModels(tiny, tiny, embedded.EMBEDDED[task.name])  # noqa: E731
    monkeypatch.setattr(embedded, "embedded_models", fake)
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


def test_guide_rows_are_scored_again_on_another_prompt_count(tmp_path, monkeypatch):
    (tmp_path / "guides.json").write_text(json.dumps({
        "commongen/rule": {"reward": 0.1, "prompts": 100},  # another count: scored again
        "commongen/model": {"reward": 0.2, "prompts": 993},  # this count: kept
        "imdb/model": {"reward": 0.3}}))  # recorded before counts were: kept as it is
    monkeypatch.setattr(reproduce, "guide_prompts", lambda args, task: 993)
    monkeypatch.setattr(reproduce, "guide_alone", lambda args, task, kind: {"reward": 0.9, "prompts": 993})
    monkeypatch.setattr(reproduce, "start_alone", lambda args, task: {"reward": 0.5, "prompts": 993.0})
    args = reproduce.Args(results_dir=str(tmp_path))
    out = reproduce.guide_baselines(args, [("commongen", "rule"), ("commongen", "model"), ("imdb", "model"),
                                           ("commongen", reproduce.START)])
    assert out["commongen/rule"]["reward"] == 0.9 and out["commongen/model"]["reward"] == 0.2
    assert out["imdb/model"] == {"reward": 0.3} and out["commongen/start"]["reward"] == 0.5
    assert json.loads((tmp_path / "guides.json").read_text()) == out


def test_named_grid_runs_its_configurations_with_their_own_seeds_in_its_order():
    args = reproduce.apply_grid(reproduce.Args(grid="smollm2-paper-protocol"))
    grid = list(reproduce.configs(args))
    guide = reproduce.PROTOCOL_GUIDE
    # seed 1 first, PPO, PPO++ and D2LOLS with the chosen guide ahead of the rest
    assert [(a, g) for _, a, g, s in grid[:3]] == [("ppo", "-"), ("ppo_plus_plus", guide), ("d2lols", guide)]
    assert [s for *_, s in grid] == sorted(s for *_, s in grid)
    count = {}
    for _, a, g, _ in grid:
        count[(a, g)] = count.get((a, g), 0) + 1
    assert count == {("ppo", "-"): 5, ("ppo_plus_plus", guide): 5, ("d2lols", guide): 5, ("aggrevated", guide): 3,
                     ("lols", guide): 3, ("ppo_plus_plus", "learner"): 3, ("d2lols", "learner"): 3}
    assert args.keep_policy and args.iterations == 40 and args.policy_model == "smollm2"
    cmd = reproduce.run_command(args, "commongen", "ppo_plus_plus", guide, 1)
    assert cmd[-2:] == ["--lr-schedule", "constant"] and "--guide-top-k" in cmd
    # --seeds keeps only those of the grid's seeds; --extra comes after the grid's own flags
    args = reproduce.apply_grid(reproduce.Args(grid="smollm2-paper-protocol", seeds=[4], extra="--eval-samples 8"))
    assert {(a, g) for _, a, g, _ in reproduce.configs(args)} == {("ppo", "-"), ("ppo_plus_plus", guide),
                                                                   ("d2lols", guide)}
    assert args.extra == "--lr-schedule constant --eval-samples 8"
    with pytest.raises(SystemExit):
        reproduce.apply_grid(reproduce.Args(grid="nope"))


def test_the_reproduction_grid_asks_for_the_committed_runs_settings():
    args = reproduce.apply_grid(reproduce.Args(grid="smollm2-reproduce"))
    assert [reproduce.run_name(*c) for c in reproduce.configs(args)] == [
        "ppo-none-commongen-seed1", "ppo_plus_plus-fewshot-commongen-seed1"]
    for run in ("ppo-none-commongen-seed1", "ppo_plus_plus-fewshot-commongen-seed1"):
        saved = json.loads((REPO / "results/smollm2/runs" / run / "args.json").read_text())
        assert saved["policy_model"] == "smollm2" and saved["iterations"] == 20 and saved["critic"] is None
    assert args.extra.split() == ["--critic", "separate", "--eval-decoding", "sample", "--final-eval-samples", "None"]


def test_compare_to_lists_every_difference_with_another_runs_folder(tmp_path, capsys):
    for folder in ("a", "b"):
        _fake_run(tmp_path / folder, "ppo-none-imdb-seed1", 0.5, 0.6)
        _fake_run(tmp_path / folder, "d2lols-model-imdb-seed1", 0.5, 0.9 if folder == "a" else 0.8)
    args = reproduce.Args(tasks=["imdb"], seeds=[1], algos=["ppo", "d2lols"], guides=["model"],
                          runs_dir=str(tmp_path / "b"), compare_to=str(tmp_path / "a"))
    out = reproduce.compare_runs(args)
    assert out["ppo-none-imdb-seed1"] == []
    assert sorted(out["d2lols-model-imdb-seed1"]) == ["/eval/final/reward: 0.9 before, 0.8 after",
                                                     "/metrics[5]/eval/reward: 0.9 before, 0.8 after"]
    assert "the same numbers" in capsys.readouterr().out


def test_compare_to_names_keys_only_the_rerun_has_apart_from_differences(tmp_path, capsys):
    _fake_run(tmp_path / "a", "ppo-none-imdb-seed1", 0.5, 0.6)
    _fake_run(tmp_path / "b", "ppo-none-imdb-seed1", 0.5, 0.6)
    ev = tmp_path / "b" / "ppo-none-imdb-seed1" / "eval.json"
    ev.write_text(json.dumps({**json.loads(ev.read_text()), "evaluation": {"decoding": "sample"}}))
    args = reproduce.Args(tasks=["imdb"], seeds=[1], algos=["ppo"], runs_dir=str(tmp_path / "b"),
                          compare_to=str(tmp_path / "a"))
    assert reproduce.compare_runs(args) == {"ppo-none-imdb-seed1": ["/eval/evaluation: only after"]}
    assert "the same numbers (keys only in the rerun: /eval/evaluation)" in capsys.readouterr().out


def test_a_grid_run_copies_the_start_evaluations_of_a_finished_run_and_falls_back_to_its_own(tmp_path, monkeypatch):
    """--share-start-eval: a fresh run gets --start-eval-from the first finished run of its task that evaluated
    its own start (not one that copied it, not another task's); one refused by the script runs again without."""
    args = reproduce.Args(tasks=["commongen", "imdb"], seeds=[1, 2], algos=["ppo"], runs_dir=str(tmp_path))
    name = lambda task, seed: reproduce.run_name(task, "ppo", "-", seed)  # noqa: E731
    def finished(task, seed, copied=None):
        run = tmp_path / name(task, seed)
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({"evaluation": {"start_copied_from": copied} if copied else {}}))
        return run
    cmd = reproduce.run_command(args, "commongen", "ppo", "-", 2)
    assert "--start-eval-from" not in cmd  # nothing finished yet: the run evaluates its own start
    finished("commongen", 2, copied="x")
    finished("imdb", 1)
    assert "--start-eval-from" not in reproduce.run_command(args, "commongen", "ppo", "-", 3)
    source = finished("commongen", 1)
    cmd = reproduce.run_command(args, "commongen", "ppo", "-", 3)
    assert cmd[cmd.index("--start-eval-from") + 1] == str(source)
    assert "--start-eval-from" not in reproduce.run_command(args, "commongen", "ppo", "-", 3, share_start_eval=False)
    args.share_start_eval = False
    assert "--start-eval-from" not in reproduce.run_command(args, "commongen", "ppo", "-", 3)
    args.share_start_eval = True
    calls = []
    def fake_run(cmd, **kw):
        calls.append(cmd)
        refused = "--start-eval-from" in cmd
        err = "error: --start-eval-from x: that run's start was evaluated with other settings" if refused else ""
        if not refused:
            (tmp_path / name("commongen", 3) / "eval.json").parent.mkdir(exist_ok=True)
        return subprocess.CompletedProcess(cmd, 2 if refused else 0, "", err)
    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    monkeypatch.setattr(reproduce, "prune_run", lambda *a, **k: None)
    assert reproduce._run_locked(args, "commongen", "ppo", "-", 3)
    assert ["--start-eval-from" in c for c in calls] == [True, False]
    calls.clear()  # any other failure is not retried
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1, "", "RuntimeError: boom"))
    assert not reproduce._run_locked(args, "commongen", "ppo", "-", 4) and len(calls) == 1


@pytest.mark.parametrize("signal", [1.0, 0.0])
def test_the_critics_linear_ceiling_on_known_data(signal):
    """Returns = w.h + noise with var(w.h) = signal, var(noise) = 1: the held-out explained variance of the best
    linear head is signal / (signal + 1) (0.5 and 0), and fitting on more batches does not lower it. Responses of
    two tokens with no KL reward and gamma 1, so each position's return is the rollout's reward: the function must
    sum the rewards that follow a position (a return read at the wrong position would score the noise)."""
    g = torch.Generator().manual_seed(0)
    dim, w = 8, torch.randn(8, generator=torch.Generator().manual_seed(1))
    w = w / w.norm() * signal ** 0.5
    batches = []
    for _ in range(10):
        h = torch.randn(300, 2, dim, generator=g)
        reward = h[:, 0] @ w + torch.randn(300, generator=g)  # the first position's state decides the reward
        h[:, 1] = h[:, 0]  # the second position sees the same state
        rewards = torch.zeros(300, 2)
        rewards[:, 1] = reward
        batches.append(dict(hidden=h, rm=torch.ones(300, 2, dtype=torch.long), rewards=rewards))
    out = critic_fit.linear_ceiling(batches, gamma=1.0, alphas=(1.0,))
    expected = signal / (signal + 1)
    assert out["leave_one_batch_out"][1.0] == pytest.approx(expected, abs=0.04)
    grow = out["by_training_batches"][1.0]
    assert list(grow) == [1, 2, 4, 8] and grow[8] == pytest.approx(expected, abs=0.06)
