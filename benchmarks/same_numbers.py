"""Record what the five scripts compute, and check later that a change left it value for value the same.

    python benchmarks/same_numbers.py record numbers.json     # run every case, write its numbers
    python benchmarks/same_numbers.py compare numbers.json    # run every case again, list each difference
    python benchmarks/same_numbers.py compare numbers.json --cases ppo-imdb lols-tldr
    python benchmarks/same_numbers.py compare numbers.json --old-evaluation --allow-added evaluation eval/prompts

Each case is a short run (2 iterations, 16 evaluation prompts, 2 torch threads) of one script from the command
line, in a fresh process: the five scripts on the three tasks with the embedded default models, and, on tiny models
made here from configs, PPO++ with LoRA, PPO and D2LOLS with a T5 policy, and PPO++ and AggreVaTeD with an
OpenAI-compatible server as the guide (tests/openai_server.py, fixed text). Its numbers are every row of
metrics.jsonl (time/* and */*_per_second left out: they measure the machine) and eval.json. Float kernels differ between CPUs, so a
recording is compared on the machine that made it (RLGF_DATA_DIR and the embedded-model cache as they were).

A change that adds what runs report (a new key in eval.json or metrics.jsonl) passes with `--allow-added KEY ...`;
`--old-evaluation` runs the cases that name a model (whose preset is the paper's) with the evaluation the embedded
preset keeps, one sample per prompt on --eval-samples (`--eval-decoding sample --final-eval-samples None`), for a
recording made before the paper's evaluation protocol became that preset's default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("ppo", "ppo_plus_plus", "aggrevated", "lols", "d2lols")
TASKS = ("imdb", "commongen", "tldr")
SHORT = ["--iterations", "2", "--eval-interval", "2", "--eval-samples", "16", "--seed", "3"]
PHASES = {"lols": ["--p-ppo-pp", "0.5"], "d2lols": ["--tau", "1"]}  # both kinds of iteration in 2 iterations


def cases(tiny: Path, server_url: str | None) -> dict[str, list[str]]:
    out = {}
    for task in TASKS:
        for s in SCRIPTS:
            out[f"{s}-{task}"] = [f"{s}.py", "--task", task, *SHORT, *PHASES.get(s, [])]
    small = ["--task", "commongen", *SHORT, "--rollouts-per-iteration", "8", "--minibatch-size", "4",
             "--lr", "1e-3"]
    out["ppo_plus_plus-lora"] = ["ppo_plus_plus.py", *small, "--policy-model", str(tiny / "gpt2"),
                                 "--lora-r", "4", "--lora-alpha", "8", "--beta", "1.0"]
    out["ppo-t5"] = ["ppo.py", *small, "--policy-model", str(tiny / "t5")]
    out["d2lols-t5"] = ["d2lols.py", *small, "--policy-model", str(tiny / "t5"), "--tau", "1"]
    if server_url:
        for s in ("ppo_plus_plus", "aggrevated"):
            out[f"{s}-server"] = [f"{s}.py", *small, "--policy-model", str(tiny / "gpt2"), "--guide", server_url,
                                  "--beta", "1.0", "--guide-max-concurrency", "1"]
    return out


def make_tiny(folder: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from _tiny import build_tiny, build_tiny_t5

    if not (folder / "gpt2" / "config.json").exists():
        build_tiny("commongen", folder / "gpt2")
    if not (folder / "t5" / "config.json").exists():
        build_tiny_t5("commongen", folder / "t5")


def start_server(folder: Path):
    port_file = folder / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "openai_server.py"), "--port", "0", "--port-file",
                             str(port_file), "--fixed-text", "a dog runs across the green field with a ball"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if port_file.exists() and port_file.read_text().strip():
            return proc, f"http://127.0.0.1:{port_file.read_text().strip()}/v1"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the test server did not start")


def machine_free(rows: list[dict]) -> list[dict]:
    """The rows without what measures the machine (time/*, */*_per_second)."""
    return [{k: v for k, v in r.items() if not (k.startswith("time/") or k.endswith("_per_second"))} for r in rows]


def numbers_of(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"metrics": machine_free(rows), "eval": json.loads((run / "eval.json").read_text())}


def run_case(name: str, cmd: list[str], out_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    p = subprocess.run([sys.executable, *cmd, "--output-dir", str(out_dir), "--run-name", name], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    print(f"  {name}: {time.time() - t0:.0f}s", flush=True)
    return numbers_of(out_dir / name)


def diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only before" for k in a.keys() - b.keys()]
        out += [f"{where}/{k}: only after" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += diff(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} rows before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here
    return [] if same else [f"{where}: {a!r} before, {b!r} after"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("file")
    p.add_argument("--cases", nargs="*", help="only these cases (default: all)")
    p.add_argument("--allow-added", nargs="*", default=[], help="keys that may appear only in the new numbers")
    p.add_argument("--old-evaluation", action="store_true", help="cases naming a model: sampled evaluation on "
                   "--eval-samples (the recording's protocol)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="same-numbers-"))
    tiny = Path(os.environ.get("RLGF_CACHE_DIR") or Path.home() / ".cache" / "rlgf") / "same-numbers-tiny"
    make_tiny(tiny)
    server, url = start_server(work)
    try:
        todo = cases(tiny, url)
        if a.old_evaluation:
            todo = {k: v + (["--eval-decoding", "sample", "--final-eval-samples", "None"] if "--policy-model" in v
                            else []) for k, v in todo.items()}
        if a.cases:
            unknown = set(a.cases) - todo.keys()
            if unknown:
                raise SystemExit(f"unknown cases {sorted(unknown)}; known: {sorted(todo)}")
            todo = {k: v for k, v in todo.items() if k in a.cases}
        recorded = json.loads(Path(a.file).read_text()) if a.mode == "compare" else {}
        got, problems = {}, []
        for name, cmd in todo.items():
            got[name] = run_case(name, cmd, work)
            if a.mode == "compare":
                before = recorded.get(name)
                if before is not None:
                    before = {**before, "metrics": machine_free(before["metrics"])}
                d = diff(before, got[name], name) if name in recorded else [f"{name}: not recorded"]
                d = [x for x in d if not (x.endswith(": only after") and x.split("/")[-1].split(":")[0]
                                          in {k.split("/")[-1] for k in a.allow_added})]
                problems += d
                print(f"  {name}: {'same' if not d else f'{len(d)} differences'}", flush=True)
        if a.mode == "record":
            Path(a.file).write_text(json.dumps(got, indent=1) + "\n")
            print(f"{len(got)} cases recorded in {a.file}")
            return 0
        for line in problems[:50]:
            print(line)
        print(f"{len(got)} cases: {len(got) - len({x.split('/')[0].split('[')[0] for x in problems})} the same")
        return 1 if problems else 0
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
