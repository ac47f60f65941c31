"""The paper's comparison, in miniature: the initial policy, PPO, PPO++, AggreVaTeD, LOLS and D2LOLS on each
task's embedded default, with the same iteration budget and several seeds.

Writes `results/README.md` (final validation reward and metrics: every seed's value, mean ± standard error over
seeds; training diagnostics) and one PNG of learning curves per task into `results/` (mean over seeds with a band
from the lowest to the highest seed). The hand-written text at the end of `results/README.md`, below the line
`NOTES_MARK`, is kept as it is. Resumable: every run lives in `<runs-dir>/<algo>-<guide>-<task>-seed<s>`;
a finished run (eval.json present) is skipped, an interrupted one continues from its last checkpoint, so
re-running the same command picks up where it stopped.

    RLGF_DATA_DIR=../shared/data python benchmarks/reproduce.py                      # the full grid (hours)
    RLGF_DATA_DIR=../shared/data python benchmarks/reproduce.py --tasks imdb --seeds 1 2 3
    python benchmarks/reproduce.py --report-only                                     # tables and plots only
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALGOS = ["ppo", "ppo_plus_plus", "aggrevated", "lols", "d2lols"]
GUIDED = ALGOS[1:]
RULE_TASKS = ("commongen", "tldr")  # tasks with a rule-based guide (our addition)


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["imdb", "commongen", "tldr"])
    """tasks to run"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds per configuration"""
    algos: list[str] = field(default_factory=lambda: list(ALGOS))
    """algorithms to run"""
    guides: list[str] = field(default_factory=lambda: ["model", "rule"])
    """guides for the guided algorithms (rule only on commongen and tldr)"""
    model_guide_tasks: list[str] = field(default_factory=lambda: ["imdb", "commongen", "tldr"])
    """tasks on which the model guide runs (on CommonGen and TL;DR the embedded guide is the learner's own
    start model, so only the rule guide is better than the learner there)"""
    iterations: int | None = None
    """override every run's iteration budget (default: each task's embedded preset)"""
    runs_dir: str = "results/runs"
    """where the run folders go (TensorBoard logs, checkpoints, policies: not committed)"""
    results_dir: str = "results"
    """where the table and plots go"""
    report_only: bool = False
    """only rebuild the table and plots from finished runs (and the guide-alone rows, computed once)"""
    extra: str = ""
    """extra arguments passed to every script, e.g. --extra="--bf16 --eval-samples 32" """
    workers: int = 1
    """runs at once; each gets cores / workers threads (on a 2-core CPU, 2 workers of 1 thread finish the
    grid sooner than 1 worker of 2 threads)"""


def configs(args: Args):
    """Seed-major order: every configuration's first seed, then every second seed, ... so that a grid stopped
    early still covers every algorithm."""
    for seed in args.seeds:
        for task in args.tasks:
            for algo in args.algos:
                guides = ["-"] if algo == "ppo" else [
                    g for g in args.guides
                    if (g == "model" and task in args.model_guide_tasks) or (g == "rule" and task in RULE_TASKS)]
                for guide in guides:
                    yield task, algo, guide, seed


def run_name(task, algo, guide, seed):
    return f"{algo}-{guide.strip('-') or 'none'}-{task}-seed{seed}"


def run_one(args: Args, task, algo, guide, seed) -> bool:
    run_dir = Path(args.runs_dir) / run_name(task, algo, guide, seed)
    if (run_dir / "eval.json").exists():
        return True
    cmd = [sys.executable, str(ROOT / f"{algo}.py"), "--task", task, "--seed", str(seed)]
    if (run_dir / "checkpoint.pt").exists():
        cmd += ["--resume", str(run_dir)]
    else:
        if run_dir.exists():  # a run killed before its first checkpoint: nothing to keep, and a new run refuses it
            shutil.rmtree(run_dir)
        cmd += ["--output-dir", args.runs_dir, "--run-name", run_dir.name]
    if guide != "-":
        cmd += ["--guide", guide]
    if args.iterations:
        cmd += ["--iterations", str(args.iterations)]
    cmd += shlex.split(args.extra)
    print(f"[{time.strftime('%H:%M:%S')}] start {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if res.returncode != 0:
        print(f"  {run_dir.name} failed ({res.returncode}): "
              f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}", flush=True)
        return False
    print(f"[{time.strftime('%H:%M:%S')}] {run_dir.name} done in {time.time() - t0:.0f}s", flush=True)
    return True


def load_runs(args: Args):
    rows = {}
    for task, algo, guide, seed in configs(args):
        run_dir = Path(args.runs_dir) / run_name(task, algo, guide, seed)
        if not (run_dir / "eval.json").exists():
            continue
        ev = json.loads((run_dir / "eval.json").read_text())
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves = {k[len("eval/"):]: [(r["step"], r[k]) for r in metrics if k in r]
                  for k in {k for r in metrics for k in r if k.startswith("eval/")}}
        rows.setdefault((task, algo, guide), []).append({"seed": seed, **ev, "curves": curves,
                                                         "diag": diagnostics(metrics)})
    return rows


def diagnostics(metrics: list[dict]) -> dict:
    """Training-side figures that help explain the final numbers: how many tokens per rollout got the policy
    loss (PPO: all; guided: the learner's part), and, over the second half of training, how well the critic
    predicted the returns, the training reward, and the reward of the guide's own samples."""
    train = [r for r in metrics if "time/iteration" in r]
    late = train[len(train) // 2:]
    def mean(rows, k):  # over the iterations that logged a finite value (guide-only reward: only when there was one)
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        return float(np.mean(vals)) if vals else None

    guided = any("guide/learner_tokens" in r for r in train)
    return {"policy tokens / rollout": mean(train, "guide/learner_tokens" if guided else "train/response_length"),
            "critic explained variance": mean(late, "value/explained_variance"),
            "training reward": mean(late, "objective/reward"),
            "guide-only reward": mean(late, "guide/reward_guide_only")}


def guide_baselines(args: Args, tasks_guides) -> dict:
    """The guide alone on the validation prompts (the same prompts, reward and metrics as the runs' evaluation):
    the paper's premise is a guide better than the learner's start. Cached in results/guides.json."""
    path = Path(args.results_dir) / "guides.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    todo = [(t, g) for t, g in tasks_guides if f"{t}/{g}" not in cache]
    if todo:
        import torch

        from common import runtime as rt
        from common.metrics import compute_metrics
        from common.presets import EMBEDDED
        from common.tasks import get_task, resolve_data_dir

        for task_name, kind in todo:
            task, data_dir = get_task(task_name), resolve_data_dir(None)
            policy_path, guide_path = rt.resolve_models(task, None, None, data_dir, 0, 1, need_guide=True)
            pre = EMBEDDED[task_name]
            guide = rt.build_guide(kind, task, guide_path, None, torch.device("cpu"), top_p=pre["guide_top_p"],
                                   top_k=pre["guide_top_k"], temperature=1.0, min_new_tokens=task.min_new_tokens)
            val = task.load("validation", data_dir, limit=pre["eval_samples"])
            tok = rt.load_tokenizer(policy_path)  # the prompts exactly as the learner sees them (cut to prompt_tokens)
            seen = tok.batch_decode(rt.encode_prompts(task, tok, val, pre["prompt_tokens"]))
            prompts, refs = [e.prompt for e in val], [e.references for e in val]  # as the runs' evaluation
            torch.manual_seed(1234)
            responses = [text for text, _ in guide.complete(seen, [""] * len(val), [task.max_new_tokens] * len(val))]
            reward_fn = rt.make_reward(task, None, task.load("train", data_dir), "cpu", log=lambda *a: None)
            m = {"reward": float(np.mean(reward_fn(prompts, responses, refs)))}
            m.update(compute_metrics(task_name, prompts, responses, refs, [e.meta for e in val]))
            cache[f"{task_name}/{kind}"] = m
            print(f"guide {task_name}/{kind}: {m}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return cache


# the metrics a task's headline tables and plots show, besides the reward (TL;DR's offline reward is ROUGE-L)
KEY_METRICS = {"imdb": ["reward"], "commongen": ["reward", "cider", "rougeL", "bleu"], "tldr": ["reward"]}
NOTES_MARK = "<!-- written by hand below this line: reproduce.py keeps it as it is -->"


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def mean_se(values) -> tuple[float, float] | None:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)) over seeds; SE 0 for one seed."""
    values = finite(values)
    if not values:
        return None
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), se


def fmt(values):
    """`mean ± SE` over seeds, or the value alone when there is one."""
    values = finite(values)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    m, se = mean_se(values)
    return f"{m:.3f} ± {se:.3f}"


def fmt_seeds(runs, get) -> str:
    """Every seed's value, in seed order: `0.701 / 0.688 / 0.735`."""
    vals = [get(r) for r in sorted(runs, key=lambda r: r["seed"])]
    return " / ".join("-" if v is None or not np.isfinite(v) else f"{v:.3f}" for v in vals)


def by_algo(cells):
    return sorted(cells, key=lambda kv: (ALGOS.index(kv[0][1]), kv[0][2]))


def label(algo, guide) -> str:
    return algo if guide == "-" else f"{algo} ({guide} guide)"


def report(args: Args):
    rows = load_runs(args)
    guides = guide_baselines(args, sorted({(t, g) for t, a, g in rows if g != "-"}))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks if any(k[0] == t for k in rows)]
    kinds = sorted({g for (_, _, g) in rows if g != "-"})
    lines = ["# Results: the paper's comparison in miniature", "",
             "Generated by `benchmarks/reproduce.py` from the run folders in `results/runs/` (`eval.json`, "
             "`metrics.jsonl`, `args.json`): final validation metrics of each task's embedded default models, "
             "mean ± standard error over seeds (SE = sample standard deviation / sqrt(n), `n` = seeds finished), "
             "every seed's value, training diagnostics, and learning curves (`<task>.png`: the mean over seeds, "
             "the band from the lowest to the highest seed).", ""]
    # the comparison: one column per task and headline metric; one row per algorithm where every task ran one guide
    cols = [(t, m) for t in tasks for m in KEY_METRICS.get(t, ["reward"])]
    task_kinds = {t: sorted({g for (t2, _, g) in rows if t2 == t and g != "-"}) for t in tasks}
    one_guide = all(len(k) <= 1 for k in task_kinds.values())
    row_kinds = [None] if one_guide else kinds  # None: each task's own guide
    def kind_of(t, kind):
        return (task_kinds[t][0] if task_kinds[t] else None) if kind is None else kind
    if cols:
        lines += ["## Comparison", "", "Final validation value, mean ± SE over seeds"
                  + (" (guides: " + ", ".join(f"{t} {k[0]}" for t, k in task_kinds.items() if k) + ")."
                     if one_guide else "."), "",
                  "| | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|---|" + "---|" * len(cols)]
        init = {t: [r["initial"] for k, runs in rows.items() if k[0] == t for r in runs] for t in tasks}
        lines.append("| initial policy | " + " | ".join(fmt([i.get(m) for i in init[t]]) for t, m in cols) + " |")
        for kind in row_kinds:
            cells = [guides.get(f"{t}/{kind_of(t, kind)}") for t, _ in cols]
            lines.append(f"| the guide alone{'' if kind is None else f' ({kind})'} | " + " | ".join(
                fmt([c.get(m)]) if c else "-" for c, (_, m) in zip(cells, cols)) + " |")
        for algo in ALGOS:
            for kind in ["-"] if algo == "ppo" else row_kinds:
                configs_ = [rows.get((t, algo, "-" if algo == "ppo" else kind_of(t, kind)), []) for t, _ in cols]
                if not any(configs_):
                    continue
                name = algo if kind in ("-", None) else label(algo, kind)
                lines.append(f"| {name} | " + " | ".join(
                    fmt([r["final"].get(m) for r in runs]) for runs, (_, m) in zip(configs_, cols)) + " |")
        lines.append("")
    for task in tasks:
        cells = [(k, v) for k, v in rows.items() if k[0] == task]
        metric_keys = [m for m in cells[0][1][0]["final"] if m not in ("response_length",)]
        keys = ("iterations", "rollouts_per_iteration", "minibatch_size", "n_epochs", "lr", "kl_coef", "eval_samples",
                "bf16")
        seen = {k: [] for k in keys}
        for (_, a, g), runs in cells:
            for r in runs:
                f = Path(args.runs_dir) / run_name(task, a, g, r["seed"]) / "args.json"
                run_args = json.loads(f.read_text()) if f.exists() else {}
                for k in keys:
                    if k in run_args and run_args[k] not in seen[k]:
                        seen[k].append(run_args[k])
        settings = "Settings of the runs: " + ", ".join(
            f"{k} {' / '.join(map(str, v))}" + (" (differ between runs)" if len(v) > 1 else "")
            for k, v in seen.items() if v) + "."
        lines += [f"## {task}", "", settings, "", f"![{task}: validation curves]({task}.png)", "",
                  "Final validation metrics, mean ± SE over seeds:", "",
                  "| algorithm | guide | n | " + " | ".join(metric_keys) + " |",
                  "|---|---|---|" + "---|" * len(metric_keys)]
        init = [r["initial"] for (_, _, _), runs in cells for r in runs]
        lines.append("| initial policy | - | - | "
                     + " | ".join(fmt([i.get(m) for i in init]) for m in metric_keys) + " |")
        for kind in kinds:
            if f"{task}/{kind}" in guides:
                lines.append(f"| the guide alone | {kind} | - | "
                             + " | ".join(fmt([guides[f'{task}/{kind}'].get(m)]) for m in metric_keys) + " |")
        for (_, algo, guide), runs in by_algo(cells):
            lines.append(f"| {algo} | {guide} | {len(runs)} | "
                         + " | ".join(fmt([r["final"].get(m) for r in runs]) for m in metric_keys) + " |")
        key = [m for m in KEY_METRICS.get(task, ["reward"]) if m in metric_keys]
        lines += ["", "Per seed (seeds in increasing order), with mean ± SE:", "",
                  "| algorithm | guide | seeds | " + " | ".join(f"{m}: per seed | {m}: mean ± SE" for m in key) + " |",
                  "|---|---|---|" + "---|---|" * len(key)]
        for (_, algo, guide), runs in by_algo(cells):
            seeds = ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            lines.append(f"| {algo} | {guide} | {seeds} | " + " | ".join(
                f"{fmt_seeds(runs, lambda r: r['final'].get(m))} | {fmt([r['final'].get(m) for r in runs])}"
                for m in key) + " |")
        diag_keys = list(cells[0][1][0]["diag"])
        lines += ["", "Training diagnostics, mean ± SE over seeds (second half of training, except the token count):",
                  "", "| algorithm | guide | " + " | ".join(diag_keys) + " |", "|---|---|" + "---|" * len(diag_keys)]
        for (_, algo, guide), runs in by_algo(cells):
            lines.append(f"| {algo} | {guide} | " + " | ".join(fmt([r["diag"][k] for r in runs]) for k in diag_keys) + " |")
        lines.append("")
        plot(task, cells, out / f"{task}.png", key)
    readme = out / "README.md"
    old = readme.read_text() if readme.exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else NOTES_MARK + "\n"
    readme.write_text("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))


def plot(task, cells, path: Path, metrics=("reward",)):
    """One panel per metric: each configuration's mean over seeds, and a band from the lowest to the highest seed
    at each evaluation (so the spread between seeds is visible next to the differences between algorithms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(2, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for i, ((_, algo, guide), runs) in enumerate(by_algo(cells)):
            curves = [dict(r["curves"].get(metric, [])) for r in runs]
            steps = sorted({s for c in curves for s in c})
            vals = [[c[s] for c in curves if s in c] for s in steps]
            color = f"C{i}"
            ax.plot(steps, [np.mean(v) for v in vals], marker="o", ms=3, color=color,
                    label=f"{label(algo, guide)}, {len(runs)} seed{'s' if len(runs) > 1 else ''}",
                    ls="-" if guide != "rule" else "--")
            if len(runs) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.12, lw=0)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"{task}: {metric}, mean over seeds (band: min to max)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args):
    if not args.report_only:
        if args.workers > 1:  # build each task's embedded models once, before runs race to build them
            from common.models import embedded_models
            from common.tasks import get_task, resolve_data_dir

            for task in args.tasks:
                embedded_models(get_task(task), resolve_data_dir(None))
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            list(pool.map(lambda c: run_one(args, *c), configs(args)))
    report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
