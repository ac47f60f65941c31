"""The paper's comparison, in miniature: the initial policy, PPO, PPO++, AggreVaTeD, LOLS and D2LOLS on each
task's embedded default, with the same iteration budget and several seeds.

Writes `results/README.md` (final validation reward and metrics, mean and std over seeds) and one PNG of
learning curves per task into `results/`. Resumable: every run lives in `<runs-dir>/<algo>-<guide>-<task>-seed<s>`;
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
        curve = [(r["step"], r["eval/reward"]) for r in metrics if "eval/reward" in r]
        rows.setdefault((task, algo, guide), []).append({"seed": seed, **ev, "curve": curve, "diag": diagnostics(metrics)})
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
            responses = guide.complete(seen, [""] * len(val), [task.max_new_tokens] * len(val))
            reward_fn = rt.make_reward(task, None, task.load("train", data_dir), "cpu", log=lambda *a: None)
            m = {"reward": float(np.mean(reward_fn(prompts, responses, refs)))}
            m.update(compute_metrics(task_name, prompts, responses, refs, [e.meta for e in val]))
            cache[f"{task_name}/{kind}"] = m
            print(f"guide {task_name}/{kind}: {m}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return cache


def fmt(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(args: Args):
    rows = load_runs(args)
    guides = guide_baselines(args, sorted({(t, g) for t, a, g in rows if g != "-"}))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Results: the paper's comparison in miniature", "",
             "Generated by `benchmarks/reproduce.py` from finished runs (mean ± std over seeds; validation split, "
             "embedded default models; `n` = seeds finished). Learning curves: `<task>.png`.", ""]
    for task in args.tasks:
        cells = [(k, v) for k, v in rows.items() if k[0] == task]
        if not cells:
            continue
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
        lines += [f"## {task}", "", settings, "", "| algorithm | guide | n | " + " | ".join(metric_keys) + " |",
                  "|---|---|---|" + "---|" * len(metric_keys)]
        init = [r["initial"] for (_, _, _), runs in cells for r in runs]
        lines.append("| initial policy | - | - | "
                     + " | ".join(fmt([i.get(m) for i in init]) for m in metric_keys) + " |")
        for kind in sorted({g for (_, _, g) in rows if g != "-"}):
            if f"{task}/{kind}" in guides:
                lines.append(f"| the guide alone | {kind} | - | "
                             + " | ".join(fmt([guides[f'{task}/{kind}'].get(m)]) for m in metric_keys) + " |")
        for (_, algo, guide), runs in sorted(cells, key=lambda kv: (ALGOS.index(kv[0][1]), kv[0][2])):
            lines.append(f"| {algo} | {guide} | {len(runs)} | "
                         + " | ".join(fmt([r["final"].get(m) for r in runs]) for m in metric_keys) + " |")
        diag_keys = list(cells[0][1][0]["diag"])
        lines += ["", "Training diagnostics (second half of training, except the token count):", "",
                  "| algorithm | guide | " + " | ".join(diag_keys) + " |", "|---|---|" + "---|" * len(diag_keys)]
        for (_, algo, guide), runs in sorted(cells, key=lambda kv: (ALGOS.index(kv[0][1]), kv[0][2])):
            lines.append(f"| {algo} | {guide} | " + " | ".join(fmt([r["diag"][k] for r in runs]) for k in diag_keys) + " |")
        lines.append("")
        plot(task, cells, out / f"{task}.png")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(task, cells, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (_, algo, guide), runs in sorted(cells, key=lambda kv: (ALGOS.index(kv[0][1]), kv[0][2])):
        steps = sorted({s for r in runs for s, _ in r["curve"]})
        mean = [np.mean([v for r in runs for s2, v in r["curve"] if s2 == s]) for s in steps]
        label = algo if guide == "-" else f"{algo} ({guide} guide)"
        ax.plot(steps, mean, marker="o", ms=3, label=label, ls="-" if guide != "rule" else "--")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation reward")
    ax.set_title(f"{task}: mean over seeds")
    ax.legend(fontsize=7)
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
