"""The paper's comparison: the initial policy, PPO, PPO++, AggreVaTeD, LOLS and D2LOLS on each task, with the
same iteration budget and several seeds; by default on each task's embedded model, with --policy-model on a
real one (smollm2, docs/real-model.md).

Writes `<results-dir>/README.md` (final validation reward and metrics: every seed's value, mean ± standard error
over seeds; training diagnostics) and one PNG of learning curves per task (mean over seeds with a band from the
lowest to the highest seed). The hand-written text at the end of the README, below the line `NOTES_MARK`, is
kept as it is, and so is a hand-written head (a headline) above the line `HEAD_MARK`, where the README has one. Resumable: every run lives in `<runs-dir>/<algo>-<guide>-<task>-seed<s>`; a finished run
(eval.json present) is skipped, an interrupted one continues from its last checkpoint, so re-running the same
command picks up where it stopped. Several grid commands may share a runs folder (the same command started
twice runs two at once, like --workers 2): a run another one is doing is skipped. A finished run keeps only
args.json, eval.json and metrics.jsonl (unless --keep-weights; --keep-policy keeps its final policy too, so
that --rescore can evaluate it again with another decoding or prompt set without training). The report sets
every guided configuration against PPO (Welch's interval and p-value, the smallest detectable difference).
Each run gets one torch thread.

    RLGF_DATA_DIR=../shared/data python benchmarks/reproduce.py                      # the full grid (hours)
    RLGF_DATA_DIR=../shared/data python benchmarks/reproduce.py --tasks imdb --seeds 1 2 3
    python benchmarks/reproduce.py --report-only                                     # tables and plots only
    python benchmarks/reproduce.py --keep-policy ...    # the grid, keeping each run's final policy (policy/)
    python benchmarks/reproduce.py --rescore --rescore-decoding greedy ...   # kept policies, evaluated again
    RLGF_DATA_DIR=../shared/data python benchmarks/reproduce.py --policy-model smollm2 --tasks commongen \
        --guides model fewshot --runs-dir results/smollm2/runs --results-dir results/smollm2
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
GUIDE_FLAGS = {
    "model": ["--guide", "model"],  # the paper's guide: the model guide with the preset's sampling (top-p 0.92)
    "greedy": ["--guide", "model", "--guide-top-k", "1"],  # the same model guide, decoded greedily: stronger
    "fewshot": ["--guide", "model"],  # + --guide-model ALIAS-TASK-5shot: the same model, 5 solved train examples
    "fewshot-greedy": ["--guide", "model", "--guide-top-k", "1"],  # the few-shot guide decoded greedily
    "rule": ["--guide", "rule"],  # our rule-based guide (commongen, tldr)
    # the official code's moving guide (its defect, SPEC 5.1): the current learner with the guide's sampling
    "learner": ["--guide", "learner"],
}
FEW_SHOT = 5
MODEL_GUIDES = ("model", "greedy", "fewshot", "fewshot-greedy", "learner")
START = "start"  # guides.json's entry for the start model under the runs' final evaluation (--score-guides)


def guide_flags(args: "Args", task: str, guide: str) -> list[str]:
    if guide in ("fewshot", "fewshot-greedy"):
        if not args.policy_model:
            raise SystemExit("error: the fewshot guide needs --policy-model (a model alias such as smollm2)")
        return GUIDE_FLAGS[guide] + ["--guide-model", few_shot_name(args, task)]
    return GUIDE_FLAGS[guide]


def few_shot_name(args: "Args", task: str) -> str:
    return f"{args.policy_model}-{task}-{FEW_SHOT}shot"
KEPT = ("args.json", "eval.json", "metrics.jsonl")  # what a finished run keeps (see .gitignore)

# Named grids (--grid NAME): the configurations with their own seeds, in the order given (seed-major over them),
# and the settings every run of the grid gets. results/smollm2-paper-protocol/README.md says why these.
PROTOCOL_GUIDE = "fewshot-greedy"  # the strongest candidate alone, scored as the runs' final evaluation scores
GRIDS = {
    # results/smollm2's PPO and PPO++ (few-shot guide), seed 1, with their committed settings (the full separate
    # critic, one sample per prompt on the first 100 validation prompts), to show they reproduce; policies kept
    # for --rescore under the paper's decoding
    "smollm2-reproduce": dict(
        policy_model="smollm2", tasks=["commongen"], keep_policy=True, guide_samples=100,
        extra="--critic separate --eval-decoding sample --final-eval-samples None",
        cells=[("ppo", "-", [1]), ("ppo_plus_plus", "fewshot", [1])]),
    # the paper's evaluation (the smollm2 preset: CommonGen beam 5 on all 993 concept sets, curves on the first
    # 100), its reference-head critic, full fine-tuning at lr 1e-5 held constant for 40 iterations
    "smollm2-paper-protocol": dict(
        policy_model="smollm2", tasks=["commongen"], keep_policy=True, iterations=40,
        extra="--lr-schedule constant",
        cells=[("ppo", "-", [1, 2, 3, 4, 5]), ("ppo_plus_plus", PROTOCOL_GUIDE, [1, 2, 3, 4, 5]),
               ("d2lols", PROTOCOL_GUIDE, [1, 2, 3, 4, 5]), ("aggrevated", PROTOCOL_GUIDE, [1, 2, 3]),
               ("lols", PROTOCOL_GUIDE, [1, 2, 3]), ("ppo_plus_plus", "learner", [1, 2, 3]),
               ("d2lols", "learner", [1, 2, 3])]),
}
RESCORED = "rescore-"  # <run>/rescore-<decoding>-<prompts>.json: a kept policy evaluated again (--rescore), kept too


@dataclass
class Args:
    grid: str | None = None
    """a named grid (""" + ", ".join(GRIDS) + """): its configurations, each with its own seeds, and its
    settings (policy model, tasks, iterations, extra flags, --keep-policy, --guide-samples); --seeds keeps only
    those of its seeds, --extra is added after its own flags (the last of a repeated flag wins)"""
    tasks: list[str] = field(default_factory=lambda: ["imdb", "commongen", "tldr"])
    """tasks to run"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds per configuration"""
    algos: list[str] = field(default_factory=lambda: list(ALGOS))
    """algorithms to run"""
    guides: list[str] = field(default_factory=lambda: ["model", "rule"])
    """guides for the guided algorithms: model (the paper's: the guide model sampled with the preset's top-p),
    greedy (the same model decoded greedily, --guide-top-k 1), fewshot (the --policy-model alias with 5 solved
    training examples in its chat template: --guide-model ALIAS-TASK-5shot), fewshot-greedy (that guide decoded
    greedily), rule (commongen and tldr only),
    learner (the official code's moving guide: the current learner sampled with the guide's settings)"""
    model_guide_tasks: list[str] = field(default_factory=lambda: ["imdb", "commongen", "tldr"])
    """tasks on which the model, greedy and fewshot guides run (on CommonGen and TL;DR the embedded guide is the learner's
    own start model, so only the rule guide is better than the learner there)"""
    policy_model: str | None = None
    """the learner's start model of every run (and its guide), e.g. smollm2; default: each task's embedded model"""
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
    """runs at once"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS); 0 = cores / workers. On a loaded 2-core CPU a SmolLM2 run with
    torch's default 2 threads was 5x slower than with 1"""
    keep_weights: bool = False
    """keep a finished run's policy, critic, checkpoint and TensorBoard files (default: only """ + ", ".join(KEPT) + """)"""
    keep_policy: bool = False
    """keep a finished run's final policy (policy/: with LoRA only the adapter) besides """ + ", ".join(KEPT) + """,
    for --rescore; not its checkpoint, critic or TensorBoard files"""
    share_start_eval: bool = True
    """a fresh run copies its start's evaluations from a finished run of the same task in --runs-dir that made
    them (the scripts' --start-eval-from, which checks that the start and the evaluation settings are the same;
    where they are not, the run evaluates its own): a grid's runs share one start, evaluated once"""
    rescore: bool = False
    """evaluate the kept policies (run folders with policy/) of the grid's finished runs again, without training:
    with --rescore-decoding on --rescore-samples validation prompts, and the start model the same way; written to
    <run>/rescore-<decoding>-<prompts>.json and summarised"""
    rescore_decoding: str = "beam"
    """--rescore: sample, greedy or beam"""
    rescore_num_beams: int = 5
    """--rescore: beams of beam search"""
    rescore_samples: int = 0
    """--rescore: the first this many validation prompts; 0 = the whole split"""
    zero_shot: bool = False
    """only evaluate the start policy zero-shot (learner sampling, chat template on and off) and the guides
    alone on each task's validation prompts; written to <results-dir>/zero_shot.json"""
    zero_shot_samples: int | None = None
    """validation prompts of --zero-shot (default: the preset's eval_samples)"""
    compare_to: str | None = None
    """only compare each finished run of the grid with the run of the same name in this runs folder (e.g. the
    committed results/smollm2/runs): every row of metrics.jsonl (time/* and */*_per_second left out) and eval.json,
    value for value; lists each difference"""
    score_guides: bool = False
    """only score the start model (decoded as the runs' final evaluation decodes) and each of --guides alone (as it
    decodes when it guides) on the runs' final evaluation prompts, into <results-dir>/guides.json (cached)"""
    guide_samples: int | None = None
    """validation prompts on which the guides alone and the start model are scored (--score-guides and the
    report's guide rows): default the runs' final evaluation set (the preset's final_eval_samples; 0 = the whole
    split, the paper's protocol; unset = eval_samples); a cached entry scored on another count is scored again"""


def apply_grid(args: Args) -> Args:
    """`--grid NAME`: the named grid's settings on `args` (see GRIDS); `args` as it is without one."""
    if args.grid is None:
        return args
    if args.grid not in GRIDS:
        raise SystemExit(f"error: --grid must be one of {', '.join(GRIDS)}, not {args.grid!r}")
    g = GRIDS[args.grid]
    args.policy_model, args.tasks = g["policy_model"], list(g["tasks"])
    args.iterations = g.get("iterations", args.iterations)
    args.keep_policy = args.keep_policy or g.get("keep_policy", False)
    if args.guide_samples is None:
        args.guide_samples = g.get("guide_samples")
    args.extra = " ".join(x for x in (g.get("extra", ""), args.extra) if x)
    default_seeds = Args().seeds
    wanted = None if args.seeds == default_seeds else set(args.seeds)
    args.cells = [(a, gd, [s for s in seeds if wanted is None or s in wanted]) for a, gd, seeds in g["cells"]]
    args.seeds = sorted({s for _, _, seeds in args.cells for s in seeds})
    args.algos = [a for a in ALGOS if any(a == c[0] for c in args.cells)]
    args.guides = list(dict.fromkeys(gd for _, gd, _ in args.cells if gd != "-"))
    return args


def configs(args: Args):
    """Seed-major order: every configuration's first seed, then every second seed, ... so that a grid stopped
    early still covers every algorithm. A named grid (--grid): its configurations in its order, each with its
    own seeds."""
    cells = getattr(args, "cells", None)
    if cells is not None:
        for seed in args.seeds:
            for task in args.tasks:
                for algo, guide, seeds in cells:
                    if seed in seeds:
                        yield task, algo, guide, seed
        return
    for seed in args.seeds:
        for task in args.tasks:
            for algo in args.algos:
                guides = ["-"] if algo == "ppo" else [
                    g for g in args.guides
                    if (g in MODEL_GUIDES and task in args.model_guide_tasks) or (g == "rule" and task in RULE_TASKS)]
                for guide in guides:
                    yield task, algo, guide, seed


def run_name(task, algo, guide, seed):
    return f"{algo}-{guide.strip('-') or 'none'}-{task}-seed{seed}"


def start_eval_source(args: Args, task, run_dir: Path) -> Path | None:
    """--share-start-eval: the first finished run of `task` in the grid's order that evaluated its own start."""
    for t, algo, guide, seed in configs(args):
        other = Path(args.runs_dir) / run_name(t, algo, guide, seed)
        if t != task or other == run_dir or not (other / "eval.json").exists():
            continue
        if "start_copied_from" not in json.loads((other / "eval.json").read_text()).get("evaluation", {}):
            return other
    return None


def run_command(args: Args, task, algo, guide, seed, share_start_eval: bool = True) -> list[str]:
    """The script's command line for one run: a fresh start (with --share-start-eval, copying the start's
    evaluations of another run), or --resume from the run's last checkpoint."""
    run_dir = Path(args.runs_dir) / run_name(task, algo, guide, seed)
    cmd = [sys.executable, str(ROOT / f"{algo}.py"), "--task", task, "--seed", str(seed)]
    if (run_dir / "checkpoint.pt").exists():
        cmd += ["--resume", str(run_dir)]
    else:
        if run_dir.exists():  # a run killed before its first checkpoint: nothing to keep, and a new run refuses it
            shutil.rmtree(run_dir)
        cmd += ["--output-dir", args.runs_dir, "--run-name", run_dir.name]
        source = start_eval_source(args, task, run_dir) if args.share_start_eval and share_start_eval else None
        if source is not None:
            cmd += ["--start-eval-from", str(source)]
    if args.policy_model:
        cmd += ["--policy-model", args.policy_model]
    if guide != "-":
        cmd += guide_flags(args, task, guide)
    if args.iterations:
        cmd += ["--iterations", str(args.iterations)]
    return cmd + shlex.split(args.extra)


def prune_run(run_dir: Path, finished: bool = True, keep_policy: bool = False) -> None:
    """A finished run keeps only its arguments, metrics and evaluations (re-scorings too): no weights (a SmolLM2
    run writes ~4 GB) but, with `keep_policy`, its final policy (policy/); an interrupted one also its last
    checkpoint and TensorBoard files (the policy and critic saved on an interrupt are made again at the end)."""
    import shutil

    kept = KEPT + (("policy",) if keep_policy and finished else ())
    for p in run_dir.iterdir():
        if p.name in kept or p.name.startswith(RESCORED):
            continue
        if finished or not (p.name == "checkpoint.pt" or p.name.startswith("events.")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_one(args: Args, task, algo, guide, seed) -> bool:
    """One run, under a lock (`<runs-dir>/.locks/<run>.lock`, an flock the system drops when the process ends):
    a run that another grid command is doing right now is skipped, so several grids may share a runs folder."""
    import fcntl

    locks = Path(args.runs_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{run_name(task, algo, guide, seed)}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{time.strftime('%H:%M:%S')}] skip {run_name(task, algo, guide, seed)}: another grid is running it",
                  flush=True)
            return False
        return _run_locked(args, task, algo, guide, seed)


def _run_locked(args: Args, task, algo, guide, seed) -> bool:
    run_dir = Path(args.runs_dir) / run_name(task, algo, guide, seed)
    if (run_dir / "eval.json").exists():
        if not args.keep_weights:
            prune_run(run_dir, keep_policy=args.keep_policy)  # e.g. a run that finished while the grid was stopped
        return True
    if run_dir.is_dir() and not args.keep_weights:  # an interrupted run: only its checkpoint matters
        prune_run(run_dir, finished=False)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    for share in (True, False):
        cmd = run_command(args, task, algo, guide, seed, share_start_eval=share)
        print(f"[{time.strftime('%H:%M:%S')}] start {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
        if res.returncode == 0:
            break
        print(f"  {run_dir.name} failed ({res.returncode}): {last}", flush=True)
        if not ("--start-eval-from" in cmd and last.startswith("error: --start-eval-from")):
            return False  # else: once more, evaluating its own start
    if not args.keep_weights:
        prune_run(run_dir, keep_policy=args.keep_policy)
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
        saved = run_dir / "args.json"
        run_args = json.loads(saved.read_text()) if saved.exists() else {}
        rows.setdefault((task, algo, guide), []).append({"seed": seed, **ev, "curves": curves, "args": run_args,
                                                         "resumed": bool(run_args.get("resume")),  # its last --resume
                                                         "diag": diagnostics(metrics)})
    return rows


def diagnostics(metrics: list[dict]) -> dict:
    """Training-side figures that help explain the final numbers: how many tokens per rollout got the policy
    loss (PPO: all; guided: the learner's part), and, over the second half of training, how well the critic
    predicted the returns, the training reward, and the reward of the guide's own samples; the last two also
    early, over the iterations up to the first periodic evaluation after the start (rollouts are sampled as
    training samples them, so they compare with each other, not with the evaluation's decoding)."""
    train = [r for r in metrics if "time/iteration" in r]
    late = train[len(train) // 2:]
    first_eval = min((r["step"] for r in metrics if r.get("step", 0) > 0 and "eval/reward" in r), default=None)
    early = [r for r in train if first_eval is None or r["step"] <= first_eval]
    def mean(rows, k):  # over the iterations that logged a finite value (guide-only reward: only when there was one)
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        return float(np.mean(vals)) if vals else None

    guided = any("guide/learner_tokens" in r for r in train)
    return {"policy tokens / rollout": mean(train, "guide/learner_tokens" if guided else "train/response_length"),
            "critic explained variance": mean(late, "value/explained_variance"),
            "training reward": mean(late, "objective/reward"),
            "guide-only reward": mean(late, "guide/reward_guide_only"),
            "training reward, early": mean(early, "objective/reward"),
            "guide-only reward, early": mean(early, "guide/reward_guide_only")}


def _setting(args: Args, task_name: str) -> tuple:
    """(preset settings, policy folder, guide folder, data folder) of a task's runs."""
    from common import runtime as rt
    from common.presets import PRESETS, preset_for
    from common.tasks import get_task, resolve_data_dir

    task, data_dir = get_task(task_name), resolve_data_dir(None)
    policy_path, guide_path = rt.resolve_models(task, args.policy_model, None, data_dir, 0, 1, need_guide=True)
    return PRESETS[preset_for(args.policy_model)][task_name], policy_path, guide_path, data_dir


def guide_baselines(args: Args, tasks_guides) -> dict:
    """The guide alone on the validation prompts of the runs' final evaluation (the same prompts, reward and
    metrics): the paper's premise is a guide better than the learner's start. Cached in <results-dir>/guides.json;
    an entry that records another prompt count than `guide_prompts` gives is scored again (entries from before
    the prompt count was recorded are kept as they are)."""
    path = Path(args.results_dir) / "guides.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    def stale(task_name, kind):
        entry = cache.get(f"{task_name}/{kind}")
        return entry is None or ("prompts" in entry and entry["prompts"] != guide_prompts(args, task_name))
    todo = [(t, g) for t, g in tasks_guides if stale(t, g)]
    for task_name, kind in todo:
        t0 = time.time()
        m = start_alone(args, task_name) if kind == START else guide_alone(args, task_name, kind)
        cache[f"{task_name}/{kind}"] = m = {**m, "seconds": round(time.time() - t0, 1)}
        print(f"[{time.strftime('%H:%M:%S')}] guide {task_name}/{kind}: {m}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")  # after each: a long scoring keeps what it did
    return cache


def guide_prompts(args: Args, task_name: str) -> int:
    """How many validation prompts the guides alone are scored on: --guide-samples, else the runs' final
    evaluation set (the preset's final_eval_samples: 0 = the whole split; unset = its eval_samples)."""
    from common.tasks import get_task, resolve_data_dir

    if args.guide_samples is not None:
        n = args.guide_samples
    else:
        pre = _setting_values(args, task_name)
        n = pre.get("final_eval_samples")
        n = pre["eval_samples"] if n is None else n
    return len(get_task(task_name).load("validation", resolve_data_dir(None), limit=n or None))


def _setting_values(args: Args, task_name: str) -> dict:
    from common.presets import PRESETS, preset_for

    return PRESETS[preset_for(args.policy_model)][task_name]


def guide_alone(args: Args, task_name: str, kind: str, n: int | None = None) -> dict:
    """One guide (model, greedy, fewshot, fewshot-greedy or rule) writing whole responses to the first `n`
    (default: `guide_prompts`) validation prompts, given the prompt text exactly as the runs' guides get it (cut to
    prompt_tokens, without the learner's chat template; a model guide adds its own), decoded as it decodes when it
    guides (the preset's top-p, or greedily), 32 prompts at a time."""
    import torch

    from common import runtime as rt
    from common.chat import setup_chat, task_ids
    from common.guides import build_guide
    from common.metrics import compute_metrics
    from common.models import is_encoder_decoder
    from common.tasks import get_task

    task = get_task(task_name)
    pre, policy_path, guide_path, data_dir = _setting(args, task_name)
    if kind in ("fewshot", "fewshot-greedy"):
        from common.embedded import resolve_model_alias

        guide_path = resolve_model_alias(few_shot_name(args, task_name), data_dir=data_dir)
    elif kind == "learner":  # the moving guide alone: before any training it is the learner's start model
        guide_path = policy_path
    greedy = kind in ("greedy", "fewshot-greedy")
    guide = build_guide("rule" if kind == "rule" else "model", task, guide_path, None, torch.device("cpu"),
                        top_p=pre["guide_top_p"], top_k=1 if greedy else pre["guide_top_k"],
                        temperature=1.0, min_new_tokens=task.min_new_tokens, chat_template="auto")
    val = task.load("validation", data_dir, limit=(guide_prompts(args, task_name) if n is None else n) or None)
    tok = rt.load_tokenizer(policy_path)  # the prompts exactly as the learner sees them (cut to prompt_tokens)
    setup_chat(tok, "auto", encoder_decoder=is_encoder_decoder(policy_path))
    seen = [tok.decode(task_ids(tok, q)) for q in rt.encode_prompts(task, tok, val, pre["prompt_tokens"])]
    prompts, refs = [e.prompt for e in val], [e.references for e in val]  # as the runs' evaluation
    torch.manual_seed(1234)
    done = []
    for i in range(0, len(val), 32):
        chunk = seen[i: i + 32]
        done += guide.complete(chunk, [""] * len(chunk), [task.max_new_tokens] * len(chunk))
    responses = [text for text, _ in done]
    reward_fn = rt.make_reward(task, None, task.load("train", data_dir), "cpu", log=lambda *a: None)
    m = {"reward": float(np.mean(reward_fn(prompts, responses, refs)))}
    m.update(compute_metrics(task_name, prompts, responses, refs, [e.meta for e in val]))
    # in the learner's tokens, its EOS counted where the guide ended the text, as the runs' evaluation counts
    m["response_length"] = float(np.mean([len(tok(t, add_special_tokens=False)["input_ids"]) + int(end)
                                          for t, end in done]))
    how = "rule" if kind == "rule" else ("greedy" if greedy else
                                         f"sample top-p {pre['guide_top_p']} top-k {pre['guide_top_k']}")
    return {**m, "prompts": len(val), "decoding": how}


def start_alone(args: Args, task_name: str, n: int | None = None) -> dict:
    """The start model evaluated exactly as a run's final evaluation evaluates (`common.runtime.evaluate` with the
    preset's eval_decoding and beams, lengths, prompt cut and chat template) on the first `n` (default:
    `guide_prompts`) validation prompts: with the preset's whole final set, the "initial" of every run's
    eval.json."""
    import types

    import torch

    from common import runtime as rt
    from common.chat import setup_chat
    from common.models import is_encoder_decoder
    from common.tasks import get_task

    task = get_task(task_name)
    pre, policy_path, _, data_dir = _setting(args, task_name)
    tok = rt.load_tokenizer(policy_path)
    setup_chat(tok, "auto", encoder_decoder=is_encoder_decoder(policy_path))
    policy = rt.load_causal_lm(policy_path, tok, torch.device("cpu"))
    settings = types.SimpleNamespace(prompt_tokens=pre["prompt_tokens"], max_new_tokens=task.max_new_tokens,
                                     min_new_tokens=task.min_new_tokens, temperature=1.0,
                                     eval_decoding=pre.get("eval_decoding"), eval_num_beams=pre.get("eval_num_beams"))
    val = task.load("validation", data_dir, limit=(guide_prompts(args, task_name) if n is None else n) or None)
    reward_fn = rt.make_reward(task, None, task.load("train", data_dir), "cpu", log=lambda *a: None)
    m, _ = rt.evaluate(policy, policy, tok, task, val, reward_fn, settings, torch.device("cpu"))
    decoding, beams = rt.eval_decoding(settings)
    return {**m, "decoding": decoding + (f" {beams} beams" if decoding == "beam" else "")}


def zero_shot(args: Args) -> dict:
    """The start policy sampled as the learner samples (temperature 1, top_k 0, top_p 1), chat template on and
    off, and the guides alone, on each task's first eval_samples validation prompts (the runs' evaluation)."""
    import types

    import torch

    from common import runtime as rt
    from common.chat import has_chat_template, setup_chat
    from common.models import is_encoder_decoder
    from common.tasks import get_task

    out = {}
    for task_name in args.tasks:
        task = get_task(task_name)
        pre, policy_path, _, data_dir = _setting(args, task_name)
        val = task.load("validation", data_dir, limit=args.zero_shot_samples or pre["eval_samples"])
        reward_fn = rt.make_reward(task, None, task.load("train", data_dir), "cpu", log=lambda *a: None)
        tok = rt.load_tokenizer(policy_path)
        policy = rt.load_causal_lm(policy_path, tok, torch.device("cpu"))
        for mode in (("on", "off") if has_chat_template(tok) else ("off",)):
            tok = rt.load_tokenizer(policy_path)
            setup_chat(tok, mode, encoder_decoder=is_encoder_decoder(policy_path))
            settings = types.SimpleNamespace(prompt_tokens=pre["prompt_tokens"], max_new_tokens=task.max_new_tokens,
                                             min_new_tokens=task.min_new_tokens, temperature=1.0)
            t0 = time.time()
            m, _ = rt.evaluate(policy, policy, tok, task, val, reward_fn, settings, torch.device("cpu"))
            out[f"{task_name}/learner/chat-{mode}"] = {**m, "seconds": round(time.time() - t0, 1)}
            print(f"{task_name} learner chat {mode}: {out[f'{task_name}/learner/chat-{mode}']}", flush=True)
        guides = [g for g in args.guides if g != "rule" or task_name in RULE_TASKS]
        for kind in guides:
            t0 = time.time()
            m = guide_alone(args, task_name, kind, args.zero_shot_samples or pre["eval_samples"])
            out[f"{task_name}/guide/{kind}"] = {**m, "seconds": round(time.time() - t0, 1)}
            print(f"{task_name} guide {kind}: {out[f'{task_name}/guide/{kind}']}", flush=True)
    path = Path(args.results_dir) / "zero_shot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"policy_model": args.policy_model, "results": out}, indent=1) + "\n")
    return out


def compare_runs(args: Args) -> dict:
    """--compare-to: the grid's finished runs against the runs of the same names in another folder, value for value
    (benchmarks/same_numbers.py's comparison): {run: [differences]}; keys an older run does not have (e.g. evaluation
    in eval.json, final_eval/* and */prompts rows written by a newer version) are listed as "only after"."""
    from same_numbers import diff, numbers_of

    out = {}
    for task, algo, guide, seed in configs(args):
        name = run_name(task, algo, guide, seed)
        mine, theirs = Path(args.runs_dir) / name, Path(args.compare_to) / name
        if not (mine / "eval.json").is_file() or not (theirs / "eval.json").is_file():
            continue
        out[name] = d = diff(numbers_of(theirs), numbers_of(mine))
        added = sorted({line.split("[")[-1].split("]/", 1)[-1][:-len(": only after")]
                        for line in d if line.endswith(": only after")})
        changed = [line for line in d if not line.endswith(": only after")]
        print(f"{name}: {'the same numbers' if not changed else f'{len(changed)} differences'}"
              + (f" (keys only in the rerun: {', '.join(added)})" if added else ""), flush=True)
        for line in changed[:40]:
            print(f"  {line}")
    if not out:
        print(f"nothing to compare: no finished run in {args.runs_dir} has one of the same name in {args.compare_to}")
    return out


def rescore_run(run_dir: Path, decoding: str, num_beams: int, samples: int, cache: dict | None = None) -> dict:
    """A finished run's kept policy (`run_dir/policy`: a model folder, or a LoRA adapter on the run's start
    model) evaluated again by `common.runtime.evaluate`, as the run would evaluate with `--eval-decoding
    decoding --eval-num-beams num_beams --final-eval-samples samples` (the run's own lengths, prompt cut, chat
    template and reward), and the start model the same way (`cache`: start-model results by setting, shared
    between runs). Written to `run_dir/rescore-<decoding>-<prompts>.json` as {"evaluation", "initial", "final"}."""
    import types

    import torch

    from common import runtime as rt
    from common.chat import setup_chat
    from common.models import is_encoder_decoder, load_causal_lm, load_tokenizer
    from common.tasks import get_task, resolve_data_dir

    saved = json.loads((run_dir / "args.json").read_text())
    task, data_dir = get_task(saved["task"]), resolve_data_dir(saved.get("data_dir"))
    device = torch.device("cpu")
    policy_path, _ = rt.resolve_models(task, saved.get("policy_model"), None, data_dir, 0, 1, log=lambda *a: None)
    tok = load_tokenizer(policy_path)
    setup_chat(tok, saved.get("chat_template") or "off", encoder_decoder=is_encoder_decoder(policy_path))
    ref = load_causal_lm(policy_path, tok, device)
    folder = run_dir / "policy"
    if (folder / "adapter_config.json").is_file():  # LoRA: the adapter on a fresh copy of the start model
        from peft import PeftModel

        policy = PeftModel.from_pretrained(load_causal_lm(policy_path, tok, device), str(folder)).merge_and_unload()
    else:
        policy = load_causal_lm(str(folder), tok, device)
    settings = types.SimpleNamespace(**{k: saved[k] for k in ("prompt_tokens", "min_new_tokens", "max_new_tokens",
                                                              "temperature")},
                                     eval_decoding=decoding, eval_num_beams=num_beams)
    val = task.load("validation", data_dir, limit=samples or None)
    reward_fn = rt.make_reward(task, saved.get("reward_model"), task.load("train", data_dir), device,
                               log=lambda *a: None)
    protocol = rt.eval_protocol(settings, len(val), len(val))
    key = json.dumps([policy_path, protocol, saved.get("chat_template"), saved["prompt_tokens"]])
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = rt.evaluate(ref, ref, tok, task, val, reward_fn, settings, device)[0]
    final, _ = rt.evaluate(policy, ref, tok, task, val, reward_fn, settings, device)
    out = {"evaluation": protocol, "initial": cache[key], "final": final}
    name = f"{RESCORED}{decoding}{num_beams if decoding == 'beam' else ''}-{len(val)}.json"
    (run_dir / name).write_text(json.dumps(out, indent=1) + "\n")
    return out


def rescore(args: Args) -> dict:
    """--rescore: every finished run of the grid that kept its policy, evaluated again (`rescore_run`)."""
    cache, out = {}, {}
    for task, algo, guide, seed in configs(args):
        run_dir = Path(args.runs_dir) / run_name(task, algo, guide, seed)
        if not (run_dir / "eval.json").is_file() or not (run_dir / "policy").is_dir():
            continue
        t0 = time.time()
        r = rescore_run(run_dir, args.rescore_decoding, args.rescore_num_beams, args.rescore_samples, cache)
        out[run_dir.name] = r
        print(f"[{time.strftime('%H:%M:%S')}] {run_dir.name}: reward {r['initial']['reward']:.3f} -> "
              f"{r['final']['reward']:.3f} ({r['evaluation']['decoding']}, {r['evaluation']['final_prompts']:.0f} "
              f"prompts, {time.time() - t0:.0f} s)", flush=True)
    if not out:
        print(f"nothing to re-score: no finished run in {args.runs_dir} kept its policy (grid flag --keep-policy)")
    return out


# ---------------------------------------------------------------------------------------------------
# statistics over seeds: Welch's t interval and test, and the smallest difference the design can detect
# ---------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    import math

    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (not necessarily whole) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The `q` quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`)."""
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


def welch(a, b, level: float = 0.95) -> dict | None:
    """Welch's unequal-variance comparison of the means of `b` and `a` (here: a configuration's seeds and PPO's):
    the difference mean(b) - mean(a), its `level` confidence interval, the two-sided p-value and the
    Welch-Satterthwaite degrees of freedom. None with fewer than 2 values in either group."""
    import math

    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff, se = float(np.mean(b) - np.mean(a)), math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "low": diff, "high": diff, "p": 0.0 if diff else 1.0, "df": float("nan")}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_ppf(0.5 + level / 2, df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "p": float(2.0 * t_cdf(-abs(diff / se), df)),
            "df": float(df)}


def pooled_sd(groups) -> float | None:
    """The pooled standard deviation of several groups: sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))."""
    groups = [finite(g) for g in groups]
    groups = [g for g in groups if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return None
    return float(np.sqrt(sum((len(g) - 1) * np.var(g, ddof=1) for g in groups) / dof))


def min_detectable(sd: float, n1: int, n2: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference of means a two-sided t test at `alpha` detects with probability `power`,
    for two groups of n1 and n2 seeds with standard deviation `sd` (the usual approximation with the central t
    quantiles at n1 + n2 - 2 degrees of freedom: (t_{1 - alpha/2} + t_{power}) * sd * sqrt(1/n1 + 1/n2))."""
    df = n1 + n2 - 2
    return (t_ppf(1 - alpha / 2, df) + t_ppf(power, df)) * sd * float(np.sqrt(1 / n1 + 1 / n2))


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of the p-values of m comparisons made together (here: every guided
    configuration against PPO): sorted ascending, the i-th (from 0) becomes max over j <= i of min(1, (m - j) p_(j)).
    An adjusted p below alpha controls the chance of any false finding among the m at alpha."""
    order, out, running = sorted(range(len(ps)), key=lambda i: ps[i]), [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def comparison_lines(cells, metric: str) -> list[str]:
    """The table of every guided configuration against PPO on `metric`: difference of means with Welch's 95%
    interval and p-value, that p-value adjusted by Holm over the configurations of the table, and the smallest
    difference the design detects (80% power, alpha 0.05; the SD pooled over every configuration of the task)."""
    runs = dict(cells)
    ppo = next((v for k, v in runs.items() if k[1] == "ppo"), None)
    if not ppo:
        return []
    values = {k: [r["final"].get(metric) for r in v] for k, v in runs.items()}
    sd = pooled_sd(values.values())
    lines = [f"| configuration | seeds | {metric}: guided - PPO | 95% interval (Welch) | p (Welch, two-sided) | "
             "p (Holm) | smallest detectable difference |", "|---|---|---|---|---|---|---|"]
    base = values[next(k for k in runs if k[1] == "ppo")]
    rows = [(k, welch(base, values[k])) for k, _ in by_algo(cells) if k[1] != "ppo"]
    tested = [w["p"] for _, w in rows if w is not None]
    adjusted = iter(holm(tested))
    for (task, algo, guide), w in rows:
        n1, n2 = len(finite(base)), len(finite(values[(task, algo, guide)]))
        mdd = f"{min_detectable(sd, n1, n2):.3f}" if sd is not None and n1 > 1 and n2 > 1 else "-"
        if w is None:
            lines.append(f"| {label(algo, guide)} | {n2} | - | - | - | - | {mdd} |")
            continue
        lines.append(f"| {label(algo, guide)} | {n2} | {w['diff']:+.3f} | [{w['low']:+.3f}, {w['high']:+.3f}] | "
                     f"{w['p']:.3f} | {next(adjusted):.3f} | {mdd} |")
    return lines


# the metrics a task's headline tables and plots show, besides the reward (TL;DR's offline reward is ROUGE-L)
KEY_METRICS = {"imdb": ["reward"], "commongen": ["reward", "cider", "rougeL", "bleu"], "tldr": ["reward"]}
CURVE_METRIC = {"commongen": "cider"}
"""the metric of the learning-curve table (default: reward); CommonGen's CIDEr-D with the evaluated prompts' own
document frequencies"""
NOTES_MARK = "<!-- written by hand below this line: reproduce.py keeps it as it is -->"
HEAD_MARK = "<!-- written by hand above this line: reproduce.py keeps it as it is -->"


def seed_values(runs, metric: str) -> tuple[list, list[list]]:
    """The evaluated iterations of `runs`' curves of `metric`, and at each the values of the seeds that have one."""
    curves = [dict(r["curves"].get(metric, [])) for r in runs]
    steps = sorted({s for c in curves for s in c})
    return steps, [[c[s] for c in curves if s in c] for s in steps]


def curve_lines(cells, metric: str) -> list[str]:
    """The learning curves as a table: each configuration's periodic evaluation of `metric`, mean over seeds at
    each evaluated iteration (an iteration only some seeds reached: their mean), the iteration of the highest mean,
    and the last mean less the highest and less the one before it: where a curve flattens, both are near 0."""
    steps = sorted({s for _, runs in cells for r in runs for s, _ in r["curves"].get(metric, [])})
    if not steps:
        return []
    lines = ["| algorithm | guide | seeds | " + " | ".join(f"it. {s}" for s in steps)
             + " | peak: iteration (mean) | last - peak | last - previous |",
             "|---|---|---|" + "---|" * (len(steps) + 3)]
    for (_, algo, guide), runs in by_algo(cells):
        means = {s: float(np.mean(f)) for s, v in zip(*seed_values(runs, metric)) if (f := finite(v))}
        if not means:
            continue
        peak = max(means, key=means.get)
        done = sorted(means)
        last = means[done[-1]]
        before = f"{last - means[done[-2]]:+.3f}" if len(done) > 1 else "-"
        lines.append(f"| {algo} | {guide} | {len(runs)} | "
                     + " | ".join(f"{means[s]:.3f}" if s in means else "-" for s in steps)
                     + f" | {peak} ({means[peak]:.3f}) | {last - means[peak]:+.3f} | {before} |")
    return lines


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


def alone(kind: str) -> str:
    """A guide's name in the guide-alone rows: the moving guide alone is the learner's start (it moves with it)."""
    return "learner, at the start" if kind == "learner" else kind


def label(algo, guide) -> str:
    return algo if guide == "-" else f"{algo} ({guide} guide)"


def report(args: Args):
    rows = load_runs(args)
    guides = guide_baselines(args, sorted({(t, g) for t, a, g in rows if g != "-"}))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks if any(k[0] == t for k in rows)]
    kinds = sorted({g for (_, _, g) in rows if g != "-"})
    model = f"`{args.policy_model}` as the start model and guide" if args.policy_model else "each task's embedded default models"
    lines = ["# Results: the paper's comparison" + ("" if args.policy_model else " in miniature"), "",
             f"Generated by `benchmarks/reproduce.py` from the run folders in `{args.runs_dir}/` (`eval.json`, "
             f"`metrics.jsonl`, `args.json`): final validation metrics with {model}, "
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
            lines.append(f"| the guide alone{'' if kind is None else f' ({alone(kind)})'} | " + " | ".join(
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
        final = cells[0][1][0]["final"]  # the task's metrics, then the responses' mean length in tokens
        metric_keys = ([m for m in final if m not in ("response_length", "prompts")]
                       + [m for m in final if m == "response_length"])
        keys = ("iterations", "rollouts_per_iteration", "minibatch_size", "n_epochs", "lr", "kl_coef", "eval_samples",
                "eval_decoding", "eval_num_beams", "final_eval_samples", "bf16", "chat_template", "guide_top_p")
        seen = {k: [] for k in keys}
        for _, runs in cells:
            for r in runs:
                for k in keys:
                    if k in r["args"] and r["args"][k] not in seen[k]:
                        seen[k].append(r["args"][k])
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
                lines.append(f"| the guide alone | {alone(kind)} | - | "
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
        lines += ["", "Each guided configuration against PPO (final validation value): the difference of the means "
                  "over seeds with Welch's 95% t interval and two-sided p-value, that p-value adjusted by Holm's "
                  "method over the configurations of the table (set against PPO together, one of them falls below "
                  "0.05 by chance far more often than 5% of the time; a Holm p below 0.05 keeps that chance for all "
                  "of them at 5%), and the smallest difference this design detects with 80% power at alpha 0.05 "
                  "(two-sided t test; the SD pooled over every configuration of the task, the two configurations' "
                  "seeds). An interval that contains 0 means these seeds cannot tell the configuration from PPO."]
        for m in key:
            table = comparison_lines(cells, m)
            if table:
                lines += [""] + table
        diag_keys = list(cells[0][1][0]["diag"])
        lines += ["", "Training diagnostics, mean ± SE over seeds (second half of training, except the token count; "
                  "early: the iterations up to the first periodic evaluation after the start). Training rewards are "
                  "of the rollouts as sampled in training, the guide's as the guide decodes, not as the evaluation "
                  "decodes:",
                  "", "| algorithm | guide | " + " | ".join(diag_keys) + " |", "|---|---|" + "---|" * len(diag_keys)]
        for (_, algo, guide), runs in by_algo(cells):
            lines.append(f"| {algo} | {guide} | " + " | ".join(fmt([r["diag"][k] for r in runs]) for k in diag_keys) + " |")
        curve_metric = CURVE_METRIC.get(task, "reward")
        table = curve_lines(cells, curve_metric)
        if table:
            how = cells[0][1][0].get("evaluation", {})
            prompts = f" on {how['periodic_prompts']} prompts" if how.get("periodic_prompts") else ""
            lines += ["", f"Learning curves: the periodic evaluation's `{curve_metric}`{prompts}, mean over seeds at "
                      "each evaluated iteration; peak: the iteration with the highest mean; where a curve flattens, "
                      "the last two columns are near 0:", ""] + table
        resumed = [f"{label(a, g)} seed {r['seed']}" for (_, a, g), runs in by_algo(cells)
                   for r in runs if r["resumed"]]
        lines += ["", "Runs resumed from their last checkpoint after an interruption (`resume` in their args.json): "
                  + (", ".join(resumed) if resumed else "none") + ". A resumed run restores the models, optimiser and "
                  "every random state and repeats the iterations after its checkpoint; in tests/test_reliability.py::"
                  "test_sigterm_mid_run_then_resume_gives_the_uninterrupted_numbers that gives an uninterrupted run's "
                  "numbers exactly."]
        lines.append("")
        def on(n):  # the prompts a level was scored on
            return f", {n:.0f} prompts" if n else ""
        levels = {m: [(f"the guide alone ({alone(kind)}{on(guides[f'{task}/{kind}'].get('prompts'))})",
                       guides[f"{task}/{kind}"].get(m)) for kind in kinds if f"{task}/{kind}" in guides]
                  + [(f"the start model{on(init[0].get('prompts') if init else None)}",
                      mean_se([i.get(m) for i in init]))]
                  for m in key}
        plot(task, cells, out / f"{task}.png", key, levels)
    readme = out / "README.md"
    old = readme.read_text() if readme.exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else NOTES_MARK + "\n"
    head = old[:old.index(HEAD_MARK) + len(HEAD_MARK)] + "\n\n" if HEAD_MARK in old else ""
    readme.write_text(head + "\n".join(lines[2:] if head else lines) + "\n" + notes)  # a head has its own title
    print("\n".join(lines))


def plot(task, cells, path: Path, metrics=("reward",), levels: dict | None = None):
    """One panel per metric: each configuration's mean over seeds, and a band from the lowest to the highest seed
    at each evaluation (so the spread between seeds is visible next to the differences between algorithms);
    `levels`: metric -> [(name, value or (mean, SE))], drawn as labelled horizontal lines (the guides alone, the
    start model as eval.json scored it). Where the runs' final evaluation used other prompts than the curves (the
    paper's protocol: the whole split), each configuration's final value is a star at the last iteration, its
    bar from the lowest to the highest seed: the levels compare with the stars, not with the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(2, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    final_note, curve_note = "", "band: min to max"
    for ax, metric in zip(axes.flat, metrics):
        for i, ((_, algo, guide), runs) in enumerate(by_algo(cells)):
            steps, vals = seed_values(runs, metric)
            color = f"C{i}"
            ax.plot(steps, [np.mean(v) for v in vals], marker="o", ms=3, color=color,
                    label=f"{label(algo, guide)}, {len(runs)} seed{'s' if len(runs) > 1 else ''}",
                    ls="-" if guide != "rule" else "--")
            if len(runs) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.12, lw=0)
            how = runs[0].get("evaluation", {})
            finals = [r["final"].get(metric) for r in runs]
            if how.get("final_prompts") not in (None, how.get("periodic_prompts")) and None not in finals and steps:
                mean = float(np.mean(finals))
                ax.errorbar([steps[-1] + 0.4 * (i + 1)], [mean], yerr=[[mean - min(finals)], [max(finals) - mean]],
                            fmt="*", ms=9, color=color, capsize=2, lw=0.9)
                final_note = f"; stars: the final evaluation on {how['final_prompts']} prompts"
                curve_note = f"curves on {how['periodic_prompts']} prompts"
        for j, (name, value) in enumerate((levels or {}).get(metric, [])):
            value = value[0] if isinstance(value, tuple) else value
            if value is not None and np.isfinite(value):
                ax.axhline(value, color="0.35", lw=0.9, ls=(0, (1, 2)) if "start" in name else (0, (5, 3 + 2 * j)),
                           label=f"{name}: {value:.3f}")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"{task}: {metric}, mean over seeds ({curve_note})", fontsize=10)
    axes[0][0].legend(fontsize=7)
    if final_note:
        fig.suptitle(f"bands: the lowest to the highest seed{final_note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args):
    if args.zero_shot:
        zero_shot(args)
        return
    if args.rescore:
        rescore(args)
        return
    if args.compare_to:
        compare_runs(args)
        return
    if args.score_guides:
        guides = [g for g in args.guides if g != "-"]
        guide_baselines(args, [(t, g) for t in args.tasks for g in [START] + guides
                               if g != "rule" or t in RULE_TASKS])
        return
    if not args.report_only:
        if args.policy_model:  # a model alias is made once, before runs race to make it
            from common.embedded import resolve_model_alias

            resolve_model_alias(args.policy_model)
            if {"fewshot", "fewshot-greedy"} & set(args.guides):
                for task in args.tasks:
                    resolve_model_alias(few_shot_name(args, task))
        elif args.workers > 1:  # build each task's embedded models once, before runs race to build them
            from common.embedded import embedded_models
            from common.tasks import get_task, resolve_data_dir

            for task in args.tasks:
                embedded_models(get_task(task), resolve_data_dir(None))
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            list(pool.map(lambda c: run_one(args, *c), configs(args)))
    report(args)


if __name__ == "__main__":
    main(apply_grid(tyro.cli(Args)))
