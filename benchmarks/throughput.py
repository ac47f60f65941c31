"""Where each iteration's time goes, and how far it is from the compute floor.

For every algorithm and task (embedded default models, each task's default settings) this runs a few
iterations of the real script and reads its per-phase timings, then, in the same process and with the same
models and batch shapes, measures the compute floor of the same work:

- the bare `generate` calls that produce the same number of tokens (the guide's too, for guided algorithms),
  counted from the script's own sampling calls: a guide roll-in is generated in full before the switch point
  can be drawn (SPEC section 2), so all of its tokens count, not only the prefix that is kept; the learner's
  with its full distribution, the guide's with its own top-k / top-p (its nucleus is part of its work),
- one no-grad forward of the reference model over the batch (logits at the response positions),
- the reward computation alone,
- n_epochs forward and backward passes of the trained model(s) (policy and critic) over the same tokens.

The floor is measured for every counted iteration on that iteration's own work: its batch (prompts and
responses as its reference forward saw them) and its sampling calls, so a batch of longer responses costs the
floor what it costs the script. The ratio is the median over the counted iterations of iteration time / its
floor. (One floor, of one batch, set against every iteration would move the ratio with that batch: CommonGen's
mean response length varies by ~20% from one iteration to the next.)

It prints per iteration: wall time split into phases, generated tokens per second, peak memory, and the
ratio iteration time / floor (the figure we track). Each (task, algorithm) runs in its own subprocess so
peak memory is its own: the process's resident high-water mark, and on a GPU also the peak of its allocated
tensors there, which is then the figure the memory ratio reads.

    RLGF_DATA_DIR=../shared/data python benchmarks/throughput.py
    RLGF_DATA_DIR=../shared/data python benchmarks/throughput.py --tasks imdb --algos ppo d2lols --iterations 4
    RLGF_DATA_DIR=../shared/data python benchmarks/throughput.py --tasks imdb --script-args="--gradient-checkpointing"
    RLGF_DATA_DIR=../shared/data python benchmarks/throughput.py --tasks commongen --runs 3   # median of 3 processes
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALGOS = ["ppo", "ppo_plus_plus", "aggrevated", "lols", "d2lols"]
# what the scripts import on first use, inside main: TensorBoard's writer, the progress bar, the packages of the
# metrics and rewards
LAZY_LIBRARIES = ["torch.utils.tensorboard", "tqdm.auto", "sacrebleu", "nltk.stem", "rouge_score.rouge_scorer",
                  "pycocoevalcap.cider.cider_scorer", "vaderSentiment.vaderSentiment"]


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["imdb", "commongen", "tldr"])
    """tasks to measure"""
    algos: list[str] = field(default_factory=lambda: list(ALGOS))
    """algorithms to measure"""
    iterations: int = 6
    """iterations per run; the first is a warm-up and is not counted, each phase of the others counts by its
    median"""
    device: str = "auto"
    """auto, cpu or cuda"""
    floor_repeats: int = 1
    """each part of each iteration's floor is timed this many times and its median counts (the median over the
    iterations already keeps one slow call on a shared machine from moving the ratio much)"""
    script_args: str = ""
    """extra flags for every script run, e.g. --script-args="--micro-batch-size 4 --gradient-checkpointing" (the
    memory trades of README: Memory); the floor stays the plain work of the default settings"""
    one: str | None = None
    """internal: 'task:algo' runs one measurement in this process and prints JSON"""
    runs: int = 1
    """measure every (task, algorithm) this many times, each in a fresh process, rounds in turn (the whole grid,
    then again); with more than one, a summary gives the median ratio and peak of the runs. On this shared 2-core
    VM a process runs ~10-15% faster or slower than the next for the same work, and its script and its floor do
    not always share the luck"""
    json_out: str | None = None
    """write all results as JSON here"""


def _status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (the resident high-water mark) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Start a new high-water mark from the memory resident now (Linux: clear_refs 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_one(task_name: str, algo: str, iterations: int, device_name: str, floor_repeats: int = 1,
                script_args: str = "") -> dict:
    import numpy as np
    import torch

    import common.guides as guides_mod
    from common import runtime as rt
    from common.generation import decode, forward_response, used_columns
    from common.embedded import embedded_models
    from common.models import load_causal_lm, load_tokenizer
    from common.presets import EMBEDDED
    from common.tasks import get_task

    rt.quiet_libraries()
    task = get_task(task_name)
    data_dir = os.environ.get("RLGF_DATA_DIR")
    em = embedded_models(task, data_dir)  # built (or loaded) before the baseline is read
    load_causal_lm(em.policy, load_tokenizer(em.policy), "cpu")  # imports the model classes; the model is dropped
    # the script, and the libraries it imports on first use (logging, metrics, rewards), before the baseline too:
    # their code is library memory, not the script's (nltk alone is ~36 MiB, tensorboard ~14, sacrebleu ~6)
    mod = importlib.import_module(algo)
    for name in LAZY_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional metric's package; the script skips that metric too
            pass
    import gc

    gc.collect()
    # the baseline: what is resident now (imports, data of the process so far); the peak is the script's own
    # high-water mark above it (ru_maxrss would keep an earlier, higher mark and hide the script's)
    base_rss = _status_mib("VmRSS")
    if not _reset_peak():
        base_rss = _status_mib("VmHWM")
    # on a GPU the models live in its memory: the goal is read there (allocated tensors, peak above the start)
    on_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()

    # ---- 1. the real script, a few iterations, evaluation only at start and end ----------------------
    out_dir = tempfile.mkdtemp(prefix="rlgf-bench-")
    preset = EMBEDDED[task_name]
    extra = {"tau": max(1, iterations // 2)} if algo == "d2lols" else {}
    args = mod.Args(task=task_name, data_dir=data_dir, iterations=iterations, eval_interval=10**6, eval_samples=4,
                    output_dir=out_dir, run_name="bench", device=device_name, **extra)
    if script_args:
        args = tyro.cli(mod.Args, args=shlex.split(script_args), default=args)
    # count what every training-time `sample` call generates (rows, new tokens): the learner's in the script,
    # the model guide's in common.guides (evaluation samples through common.runtime and is not counted)
    calls = {"learner": [], "guide": []}

    def counting(fn, role):
        def wrapped(model, queries, **kw):
            out = fn(model, queries, **kw)
            calls[role].append((len(queries), sum(len(t) for t in out.tokens)))
            return out
        return wrapped

    # the tokens the script trains on, iteration by iteration: the full batch its reference forward scored (no
    # grad, once an iteration) and how many sampling calls had run by then; the floor of each iteration runs on
    # its own batch and its own calls
    batches: list[dict] = []

    def recording(fn):
        def wrapped(model, query_ids, query_mask, response_ids, response_mask, **kw):
            if not torch.is_grad_enabled() and len(query_ids) == EMBEDDED[task_name]["rollouts_per_iteration"]:
                batches.append(dict(qi=query_ids.clone(), qm=query_mask.clone(), ri=response_ids.clone(),
                                    rm=response_mask.clone(), learner=len(calls["learner"]),
                                    guide=len(calls["guide"])))
            return fn(model, query_ids, query_mask, response_ids, response_mask, **kw)
        return wrapped

    saved = mod.sample, guides_mod.sample, mod.forward_response
    mod.sample, guides_mod.sample = counting(saved[0], "learner"), counting(saved[1], "guide")
    mod.forward_response = recording(saved[2])
    try:
        mod.main(args)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        mod.sample, guides_mod.sample, mod.forward_response = saved
    peak = _status_mib("VmHWM") - base_rss  # the script's own high-water mark, before the floor loads its copies
    peak_gpu = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20 if on_cuda else None
    rows = [json.loads(l) for l in (Path(out_dir) / "bench" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out_dir, ignore_errors=True)  # its checkpoints: ~200 MiB a run, 15 runs a benchmark
    all_rows = [r for r in rows if "time/iteration" in r]
    if len(batches) != len(all_rows):
        raise RuntimeError(f"{algo}: {len(batches)} full-batch reference forwards in {len(all_rows)} iterations; the "
                           "benchmark reads each iteration's batch from its one reference forward")
    it_rows = all_rows[1:]  # drop the warm-up iteration
    # each phase by its median over the counted iterations
    median = lambda k: float(np.median([r.get(k, 0.0) for r in it_rows]))  # noqa: E731
    phases = {k.split("/")[1]: median(k) for k in ("time/iteration", "time/guide_generate", "time/generate",
                                                   "time/forward", "time/reward", "time/update")}
    resp_len = float(np.mean([r["train/response_length"] for r in it_rows]))

    # ---- 2. the compute floor of the same work, same models and shapes, iteration by iteration ----------
    _, _, device = rt.setup_device(device_name)
    tok = load_tokenizer(em.policy)
    policy = load_causal_lm(em.policy, tok, device)
    ref = load_causal_lm(em.policy, tok, device)
    critic = rt.make_critic(em.policy, tok, device)
    guide = load_causal_lm(em.guide, tok, device) if calls["guide"] else None
    B = preset["rollouts_per_iteration"]
    train = task.load("train", data_dir, limit=B)  # the reward's examples (its cost is the texts')
    reward_fn = rt.make_reward(task, None, task.load("train", data_dir), device)
    gen_kwargs = dict(do_sample=True, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    # the learner samples from its full distribution; a model guide with its own settings (SPEC: top-p 0.92,
    # IMDB also top-k 50), so its floor is `generate` with those settings: the nucleus is part of its work
    settings = {"learner": dict(top_k=0, top_p=1.0),
                "guide": dict(top_k=preset["guide_top_k"], top_p=preset["guide_top_p"])}
    mb = preset["minibatch_size"]

    def timed(fn):
        times = []
        for _ in range(max(1, floor_repeats)):
            _sync(device)
            t0 = time.time()
            fn()
            _sync(device)
            times.append(time.time() - t0)
        return float(np.median(times))

    def floor_of(i: int) -> dict:
        """The floor of iteration i (0 = the warm-up): its batch, its sampling calls."""
        it, first = batches[i], batches[i - 1] if i > 0 else {"learner": 0, "guide": 0}
        qi, qm, ri, rm = it["qi"], it["qm"], it["ri"], it["rm"]

        def bare_generate(model, role):
            """Bare `generate` calls producing the tokens this iteration's calls of `role` produced: same number
            of calls, rows per call and new tokens per row (all rows run the mean length)."""
            mine = calls[role][first[role]:it[role]]
            new = round(sum(n for _, n in mine) / max(1, sum(r for r, _ in mine)))
            if not mine or new < 1:
                return 0.0
            rows = max(1, min(B, round(np.mean([r for r, _ in mine]))))
            return len(mine) * timed(lambda: model.generate(
                input_ids=qi[:rows], attention_mask=qm[:rows], max_new_tokens=new, min_new_tokens=new,
                **{**gen_kwargs, **settings[role]}))

        def train_passes():
            for _ in range(preset["n_epochs"]):
                for s in range(0, B, mb):
                    q, t = used_columns(qm[s:s + mb], rm[s:s + mb])  # as the script: no all-padding columns
                    part = qi[s:s + mb, q], qm[s:s + mb, q], ri[s:s + mb, t], rm[s:s + mb, t]
                    lp, _ = forward_response(policy, *part, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                             min_new_tokens=0)
                    v = critic(*part)
                    (lp.mean() + v.mean()).backward()

        with torch.no_grad():
            f = {"generate": bare_generate(policy, "learner"),
                 "guide_generate": bare_generate(guide, "guide") if guide is not None else 0.0,
                 # the LM head only on the response positions, as the script's forward does: a bare forward with
                 # logits at every prompt position too would inflate the floor (TL;DR's prompts are 256 tokens)
                 "ref_forward": timed(lambda: ref(input_ids=torch.cat([qi, ri], 1),
                                                  attention_mask=torch.cat([qm, rm], 1),
                                                  logits_to_keep=ri.shape[1] + 1).logits)}
        texts = decode(tok, [[t for t, m in zip(row, mrow) if m] for row, mrow in zip(ri.tolist(), rm.tolist())])
        f["reward"] = timed(lambda: reward_fn([e.prompt for e in train], texts, [e.references for e in train]))
        f["train"] = timed(train_passes)
        return f

    floor_of(1)  # warm-up, not counted (the script's first iteration is not counted either)
    floors = [floor_of(i) for i in range(1, len(batches))]
    totals = [sum(f.values()) for f in floors]
    # the figure: the median over the counted iterations of (iteration time / the floor of its own work). A batch
    # of longer responses costs script and floor alike; one slow iteration or floor call on a shared machine moves
    # the median little
    ratios = [r["time/iteration"] / t for r, t in zip(it_rows, totals)]
    fl = {k: float(np.median([f[k] for f in floors])) for k in floors[0]}
    params = sum(p.numel() for p in policy.parameters())
    n_models = {"ppo": 3, "ppo_plus_plus": 4, "aggrevated": 4, "lols": 5, "d2lols": 5}[algo]  # policy, ref, critic(s), guide
    # models + grads + AdamW states (2) of the trained ones, weights of the frozen ones, fp32
    trained = 3 if algo in ("lols", "d2lols") else 2
    model_mib = params * 4 * (trained * 4 + (n_models - trained)) / 2**20
    return {"task": task_name, "algo": algo, **{f"t_{k}": v for k, v in phases.items()},
            "tokens_per_s": B * resp_len / max(phases["iteration"], 1e-9),
            "floor": float(np.median(totals)), **{f"floor_{k}": v for k, v in fl.items()},
            "ratio": float(np.median(ratios)), "ratios": ratios, "floors": floors,
            "iterations": [{k.split("/")[1]: r.get(k, 0.0) for k in r if k.startswith("time/")} for r in it_rows],
            "peak_mib_above_imports": peak, "peak_gpu_mib": peak_gpu, "model_state_mib": model_mib,
            "memory_ratio": (peak_gpu if on_cuda else peak) / model_mib,
            "device": torch.cuda.get_device_name(device) if on_cuda else str(device)}


def main(args: Args):
    if args.iterations < 2:
        raise SystemExit("--iterations must be at least 2: the first is a warm-up and is not counted")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if args.one:
        task, algo = args.one.split(":")
        print("RESULT " + json.dumps(measure_one(task, algo, args.iterations, args.device, args.floor_repeats,
                                                 args.script_args)), flush=True)
        return
    results = []
    for run, task, algo in ((r, t, a) for r in range(args.runs) for t in args.tasks for a in args.algos):
        cmd = [sys.executable, __file__, "--one", f"{task}:{algo}", "--iterations", str(args.iterations),
               "--device", args.device, "--floor-repeats", str(args.floor_repeats),
               f"--script-args={args.script_args}"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{task}/{algo}: failed:\n  " + "\n  ".join(res.stderr.strip().splitlines()[-5:]), flush=True)
            continue
        r = {**json.loads(line[0][7:]), "run": run}
        results.append(r)
        print(f"{task:<10}{algo:<14} iter {r['t_iteration']:6.2f}s = guide {r['t_guide_generate']:5.2f} + gen "
              f"{r['t_generate']:5.2f} + fwd {r['t_forward']:5.2f} + reward {r['t_reward']:5.2f} + update "
              f"{r['t_update']:5.2f} | floor {r['floor']:6.2f}s (gen {r['floor_generate']:.2f}, guide "
              f"{r['floor_guide_generate']:.2f}, ref {r['floor_ref_forward']:.2f}, reward {r['floor_reward']:.2f}, "
              f"train {r['floor_train']:.2f}) | ratio {r['ratio']:.2f} | {r['tokens_per_s']:.0f} tok/s | "
              f"peak {r['peak_mib_above_imports']:.0f} MiB"
              + (f" (GPU {r['peak_gpu_mib']:.0f} MiB)" if r["peak_gpu_mib"] is not None else "")
              + f" vs models {r['model_state_mib']:.0f} MiB ({r['memory_ratio']:.1f}x) | {r['device']}", flush=True)
        if args.json_out:  # after every run: an interrupted benchmark keeps what it measured
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    if args.runs > 1:
        import statistics

        print(f"median of {args.runs} runs: ratio [each run], peak MiB above imports [each run] (x models + optimiser)")
        for task, algo in ((t, a) for t in args.tasks for a in args.algos):
            mine = [r for r in results if r["task"] == task and r["algo"] == algo]
            if mine:
                ratios, peaks = [r["ratio"] for r in mine], [r["peak_mib_above_imports"] for r in mine]
                print(f"{task:<10}{algo:<14} ratio {statistics.median(ratios):.2f} [{', '.join(f'{x:.2f}' for x in ratios)}]"
                      f" | peak {statistics.median(peaks):.0f} MiB [{', '.join(f'{x:.0f}' for x in peaks)}] "
                      f"({statistics.median(peaks) / mine[0]['model_state_mib']:.2f}x)", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
