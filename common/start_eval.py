"""--start-eval-from RUN_FOLDER: a run copies another run's evaluations of the same start policy (step 0) instead
of making them again, so a sweep of runs from one start evaluates it once. Imported only under that flag."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import UsageError
from common.settings import flag


START_EVAL_SETTINGS = ("task", "policy_model", "data_dir", "device", "bf16", "load_in_4bit", "load_in_8bit", "lora_r",
                       "chat_template", "prompt_tokens", "max_new_tokens", "min_new_tokens", "temperature", "eval_samples",
                       "final_eval_samples", "eval_decoding", "eval_num_beams", "reward_model", "slow_metrics")
"""the settings that decide the evaluations of the start policy (evaluate uses a fixed seed, not the run's)"""


def check_start_eval_from(args) -> list[dict]:
    """--start-eval-from's folder: its metrics.jsonl rows, once the settings that decide the start's evaluations
    (START_EVAL_SETTINGS; chat_template only once resolved) are found equal to `args`': its step-0 rows by tag
    (eval, final_eval)."""
    src = Path(args.start_eval_from)
    try:
        old = json.loads((src / "args.json").read_text())
        rows = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UsageError(f"--start-eval-from {src}: cannot read its args.json and metrics.jsonl ({type(e).__name__});"
                         f" name the folder of a run that evaluated its start") from None
    differ = [f"{flag(k)} {old.get(k)!r}, not {getattr(args, k)!r}" for k in START_EVAL_SETTINGS
              if hasattr(args, k) and old.get(k) != getattr(args, k) and getattr(args, k) != "auto"]
    if differ:
        raise UsageError(f"--start-eval-from {src}: that run's start was evaluated with other settings "
                         f"({'; '.join(differ)}): drop --start-eval-from to evaluate this run's start")
    found = {}
    for tag in ("eval", "final_eval"):
        row = next((r for r in rows if r.get("step") == 0 and f"{tag}/reward" in r), None)
        if row is not None:
            found[tag] = {k: v for k, v in row.items() if k.startswith(tag + "/")}
    if "eval" not in found:
        raise UsageError(f"--start-eval-from {src}: its metrics.jsonl has no evaluation at step 0 (that run did not "
                         f"evaluate its start yet): drop --start-eval-from, or wait for it")
    return found


def copied_start_eval(args, logger, final_differs: bool) -> dict:
    """--start-eval-from: the start policy's evaluations (step 0: eval/*, and final_eval/* where the final prompts
    differ) copied from another run's metrics.jsonl into this run's, instead of made again; a sweep of runs from
    one start evaluates it once. The evaluation restores the random streams, so skipping it changes no training
    number. `final_differs`: the final evaluation's prompts are not the periodic ones. Returns eval.json's
    "initial"."""
    found = check_start_eval_from(args)
    if final_differs and "final_eval" not in found:
        raise UsageError(f"--start-eval-from {args.start_eval_from}: its start has no evaluation on the final "
                         f"prompts (that run stopped between the two): drop --start-eval-from")
    tags = ("eval", "final_eval") if final_differs else ("eval",)
    for tag in tags:
        logger.scalars(found[tag], 0)
    return {k.split("/", 1)[1]: v for k, v in found[tags[-1]].items()}
