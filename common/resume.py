"""--resume: a run continued from its last checkpoint, with its own settings. Imported only under --resume (the
checkpoint itself is written by every run: `common.harness.Run._checkpoint`, `common.runtime.save_checkpoint`).

- Settings (`resume_settings`, called by `common.settings.finish_settings`): the run's own from its args.json; a
  flag given again may change only what RESUME_MAY_CHANGE names.
- State (`restore`, called by `common.harness.Run.iterations`): the models, optimiser, prompt sampler, the script's
  own state and every random state from checkpoint.pt, loaded with `weights_only=True`.
- Logs (`metrics_to_keep`, read by `common.runtime.RunLogger`): what an earlier run logged from the resumed
  iteration on is dropped, as those iterations are done again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import runtime as rt
from common.errors import UsageError
from common.settings import flag, given_fields


# ---------------------------------------------------------------------------------------------------
# settings: the run's own
# ---------------------------------------------------------------------------------------------------
_BEFORE_EVAL_SETTINGS = {"eval_decoding": lambda old: "sample",
                         "final_eval_samples": lambda old: old.get("eval_samples")}
"""a run whose args.json predates these settings evaluated this way: resumed, it goes on evaluating so"""
RESUME_MAY_CHANGE = ("iterations", "eval_interval", "save_interval", "sample_rows", "device", "micro_batch_size",
                     "gradient_checkpointing", "data_dir", "slow_metrics", "keep_checkpoint", "rebuild_models")
"""settings a resumed run may change (one printed line says which); any other that differs is refused"""
_RESUME_IGNORED = ("resume", "output_dir", "run_name")  # where the run is: --resume names the folder
def resume_settings(args, algo: str):
    """With --resume: the run's own settings from its args.json. A flag given again that differs from the run's
    value is taken where it is in RESUME_MAY_CHANGE (said in one line) and refused otherwise; a flag not given
    takes the run's value. A flag counts as given when it differs from the field's default or was named on the
    command line. A folder written by another script is refused."""
    if not args.resume:
        return args
    run_dir = Path(args.resume)
    saved = run_dir / "args.json"
    if not saved.is_file():
        raise UsageError(f"--resume {run_dir}: no args.json there; --resume takes the folder of a run this project wrote")
    try:
        old = json.loads(saved.read_text())
        assert isinstance(old, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise UsageError(f"--resume {run_dir}: its args.json is damaged (not a JSON object)") from None
    if old.get("script") != algo:
        made_by = f"{old['script']}.py" if old.get("script") else "another program"
        raise UsageError(f"--resume {run_dir}: that run was made by {made_by}, not {algo}.py: resume it with "
                         f"the script that made it")
    updates, changed, given_now = {}, [], given_fields(args)
    for f in dataclasses.fields(args):
        k = f.name
        if k in _BEFORE_EVAL_SETTINGS and k not in old:
            old[k] = _BEFORE_EVAL_SETTINGS[k](old)
        if k in _RESUME_IGNORED or k not in old:
            continue
        new, was = getattr(args, k), old[k]
        given = k in given_now
        if not given or new == was:
            updates[k] = was
        elif k in RESUME_MAY_CHANGE:
            updates[k] = new
            changed.append(f"{flag(k)} {new} (was {was})")
        else:
            raise UsageError(f"--resume {run_dir}: {flag(k)} was {was!r} in that run, not {new!r}; a resumed run "
                             f"keeps its settings (may change: {', '.join(flag(c) for c in RESUME_MAY_CHANGE)})")
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming {run_dir} with its own settings, except " + ", ".join(changed))
    return dataclasses.replace(args, **updates)


def saved_args(run_dir: str) -> dict | None:
    """The settings in a run folder's args.json, or None where it cannot be read (`resume_settings` says what is
    wrong, in one line)."""
    try:
        old = json.loads((Path(run_dir) / "args.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return old if isinstance(old, dict) else None


# ---------------------------------------------------------------------------------------------------
# state: the checkpoint's models, optimiser, sampler and random streams
# ---------------------------------------------------------------------------------------------------
def restore(run, state: dict) -> dict:
    """Load the last checkpoint of `run` (a `common.harness.Run`) into its models, optimiser and prompt sampler,
    the script's own `state` (by name) and the global random generators; returns the checkpoint. A checkpoint
    without one of these (written by another version of the script) is refused in one line."""
    ck = load_checkpoint(run.run_dir, run.algo)
    missing = [k for k in ("policy", "optimizer", "sampler", "rng", *run.critics, *state) if k not in ck]
    if missing:
        raise UsageError(f"--resume {run.run_dir}: its checkpoint.pt has no {', '.join(missing)} (written "
                         f"by another version of {run.algo}.py): start a new run")
    run.policy.load_state_dict(ck["policy"])
    for name, critic in run.critics.items():
        critic.load_state_dict(ck[name])
    run.optimizer.load_state_dict(ck["optimizer"]), run.sampler.load_state_dict(ck["sampler"])
    for name, obj in state.items():
        _set_state(obj, ck[name])
    set_rng_state(ck["rng"])
    return ck


def load_checkpoint(run_dir: Path, algo: str) -> dict:
    """The last checkpoint of `run_dir`, loaded with `weights_only=True`: tensors and plain Python values only,
    so a file that would run code when unpickled is refused, as is a damaged one (one line each)."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: no checkpoint.pt there (a finished run deletes it unless run with "
                         "--keep-checkpoint; a run stopped before its first checkpoint has none)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume {run_dir}: checkpoint.pt cannot be loaded safely ({type(e).__name__}): it is "
                         "damaged or was not written by this project") from None
    if not isinstance(ck, dict) or ck.get("script") != algo or "iteration" not in ck:
        made_by = ck.get("script") if isinstance(ck, dict) else None
        raise UsageError(f"--resume {run_dir}: checkpoint.pt was " + (f"written by {made_by}.py, not {algo}.py"
                         if made_by else "not written by this project"))
    check_resume_iterations(run_dir, ck["iteration"], rt._RUN.get("iterations"))
    run = rt.current_run()
    if run is not None:
        run.checkpoint = ck["iteration"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resumed from iteration {ck['iteration']}")
    return ck


def check_resume_iterations(run_dir: Path, done: int, iterations: int | None) -> None:
    """--resume with `iterations` in all: fewer than the `done` ones is refused; as many is allowed only where
    the run stopped after its last iteration, before writing its results (that resume writes them); a finished run
    (eval.json written after the checkpoint) is complete."""
    if iterations is None:
        return
    more = f"give --iterations above {done} to train it further"
    if iterations < done:
        raise UsageError(f"--resume {run_dir}: the run has done {done} iterations, more than --iterations "
                         f"{iterations}: {more}")
    result = run_dir / "eval.json"
    if iterations == done and result.is_file() and \
            result.stat().st_mtime_ns >= (run_dir / "checkpoint.pt").stat().st_mtime_ns:
        raise UsageError(f"--resume {run_dir}: the run is already complete ({done} iterations; results in "
                         f"eval.json and policy/): {more}")


def own_rank(saved):
    """This process's entry of what `per_rank` saved; a one-process checkpoint's state as it is (a run resumed
    on another number of processes continues, with other random numbers)."""
    if not isinstance(saved, list):
        return saved
    return saved[rt._rank()] if len(saved) == (dist.get_world_size() if dist.is_initialized() else 1) else saved[0]


def set_rng_state(s):
    """The global generators put back as `common.runtime.rng_state` saved them (this process's entry)."""
    s = own_rank(s)
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.random.set_rng_state(s["torch"])


def _set_state(obj, saved):
    """Put back what `common.harness._get_state` saved of one of the script's objects."""
    if isinstance(obj, random.Random):
        obj.setstate(own_rank(saved))
    else:
        vars(obj).update(saved)


# ---------------------------------------------------------------------------------------------------
# logs: what an earlier run logged from the resumed iteration on goes
# ---------------------------------------------------------------------------------------------------
def metrics_to_keep(jsonl: Path, resume_from: int, final_tag: str = "eval") -> list[str]:
    """The lines of a resumed run's metrics.jsonl that stay: those of steps before `resume_from` (later ones are
    redone). A line that is not a whole JSON record (a kill or a full disk cuts the last one short) is dropped,
    said in one line. Where every iteration was done (a run stopped while writing its results), the final
    evaluation's line goes too, as the resumed run logs it again: `final_tag` is its prefix, `final_eval` where it
    has prompts of its own (the last periodic evaluation's `eval` line then stays: it is not redone), `eval` where
    the last periodic evaluation is the final one."""
    keep, damaged = [], []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = rec["step"]
            assert isinstance(rec, dict) and isinstance(step, int)
        except (ValueError, KeyError, TypeError, AssertionError):
            damaged.append(n)
            continue
        if step < resume_from and not (step == resume_from - 1 == rt._RUN.get("iterations")
                                       and all(k == "step" or k.startswith(final_tag + "/") for k in rec)):
            keep.append(line)
    if damaged:
        print(f"{jsonl}: dropped {len(damaged)} incomplete line(s) (line {', '.join(map(str, damaged))}), as a kill "
              "or a full disk leaves them; their steps are logged again if they are redone")
    return keep
