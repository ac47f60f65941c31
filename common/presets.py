"""Per-task default settings, filled into every script's `Args` fields left at their defaults (`--preset`).

- `paper`: the official configs (SPEC sections 2-3). Named on the command line (`--preset paper`) it also
  selects the paper's models for whatever `--policy-model`, `--guide-model` and `--reward-model` leave out,
  and their set-up (TL;DR: LoRA r 8 / alpha 64 on a 4-bit GPT-J, where the script has those fields).
- `embedded`: the offline default models: the same method, sized to finish in minutes on a 2-core CPU.
- `smollm2`: SmolLM2-135M-Instruct (`--policy-model smollm2`): full fine-tuning sized for a laptop CPU.
- `auto` (the default): `embedded` for the embedded default models, `smollm2` for that model (the alias or
  the folder it made), `paper`'s numbers (not its models) for any other model given with `--policy-model`
  (`auto_preset`).

A field given on the command line always wins; a preset key that is not a field of the script's `Args` is
ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from common.errors import UsageError
from common.tasks import TASKS

# How the official code evaluates (SPEC section 3): CommonGen by beam search over 5 beams (min_length 5, 20 new
# tokens, no sampling) on every validation concept set, TL;DR greedily (50 tokens), IMDB by sampling. The final
# evaluation (and the one before training it is compared with) runs on the whole validation split
# (final_eval_samples 0); the periodic ones on eval_samples prompts. eval_num_beams counts only for beam search.
EVAL_PAPER = {
    "imdb": dict(eval_decoding="sample", eval_num_beams=5, final_eval_samples=0),
    "commongen": dict(eval_decoding="beam", eval_num_beams=5, final_eval_samples=0),
    "tldr": dict(eval_decoding="greedy", eval_num_beams=5, final_eval_samples=0),
}
# The embedded preset evaluates as it always has: one sample per prompt (the learner's sampling, fixed seed) on the
# first eval_samples validation prompts, the final evaluation included (final_eval_samples None = eval_samples).
EVAL_EMBEDDED = dict(eval_decoding="sample", final_eval_samples=None)

PAPER = {
    "imdb": dict(iterations=50, rollouts_per_iteration=112, minibatch_size=28, n_epochs=5, gamma=0.99, lam=0.95,
                 vf_coef=0.5, clip_range=0.2, clip_range_vf=0.2, kl_coef=0.001, lr=1e-5, lr_schedule="linear",
                 weight_decay=0.0, prompt_tokens=64, eval_interval=10, eval_samples=500,
                 ppo_pp_beta=0.6, aggrevated_beta=0.8, lols_beta=0.8, p_ppo_pp=0.8, d2lols_beta=0.8, tau=20,
                 guide_top_p=0.92, guide_top_k=50, **EVAL_PAPER["imdb"]),
    "commongen": dict(iterations=500, rollouts_per_iteration=128, minibatch_size=32, n_epochs=4, gamma=0.99,
                      lam=0.95, vf_coef=30.0, clip_range=0.2, clip_range_vf=0.2, kl_coef=0.0, lr=5e-6,
                      lr_schedule="linear", weight_decay=0.0, prompt_tokens=15, eval_interval=50, eval_samples=993,
                      ppo_pp_beta=0.8, aggrevated_beta=0.8, lols_beta=0.8, p_ppo_pp=0.8, d2lols_beta=0.8, tau=100,
                      guide_top_p=0.92, guide_top_k=0, **EVAL_PAPER["commongen"]),
    "tldr": dict(iterations=1000, rollouts_per_iteration=128, minibatch_size=32, n_epochs=4, gamma=1.0, lam=0.95,
                 vf_coef=0.1, clip_range=0.2, clip_range_vf=0.2, kl_coef=0.002, lr=5e-6, lr_schedule="constant",
                 weight_decay=0.01, prompt_tokens=500, eval_interval=100, eval_samples=500,
                 ppo_pp_beta=0.8, aggrevated_beta=1.0, lols_beta=0.8, p_ppo_pp=0.8, d2lols_beta=0.8, tau=200,
                 guide_top_p=0.92, guide_top_k=0, **EVAL_PAPER["tldr"]),
}

for _name, _values in PAPER.items():  # the task's lengths (SPEC section 3): prompt cut, new tokens
    _values.update(min_new_tokens=TASKS[_name].min_new_tokens, max_new_tokens=TASKS[_name].max_new_tokens)

# Embedded defaults: same method, fewer and smaller iterations and 2 epochs (so a run fits in minutes on a
# 2-core CPU); tau keeps the paper's proportion of the run (CommonGen 100 of 500, TL;DR 200 of 1000) or, for
# IMDB, the paper's value (20 iterations; the paper runs 50, we run 40 to stay under 6 minutes warm: 50 took 7.0).
# IMDB lr / kl_coef: with 50 iterations of 32 rollouts, PPO at lr 5e-5 / 1e-4 moved the validation reward by
# +0.01 / +0.03 (256 prompts, SE ~0.02); lr 3e-4 with kl_coef 0.02 gave +0.08 at KL ~9 nats, no collapse.
# CommonGen and TL;DR use lr 1e-4 (not 5e-5, for the same reason; not tuned further). TL;DR: 32 iterations
# (40 took 6.6 min warm, 8.8 s per iteration with 2 threads on an idle 2-core CPU; the goal is under 6).
EMBEDDED = {
    "imdb": {**PAPER["imdb"], **dict(iterations=40, rollouts_per_iteration=32, minibatch_size=16, n_epochs=2,
                                      kl_coef=0.02, lr=3e-4, eval_interval=20, eval_samples=128, tau=20,
                                      **EVAL_EMBEDDED)},
    "commongen": {**PAPER["commongen"], **dict(iterations=60, rollouts_per_iteration=32, minibatch_size=16,
                                                n_epochs=2, kl_coef=0.01, lr=1e-4, prompt_tokens=32,
                                                eval_interval=20, eval_samples=64, tau=12, **EVAL_EMBEDDED)},
    "tldr": {**PAPER["tldr"], **dict(iterations=32, rollouts_per_iteration=16, minibatch_size=8, n_epochs=2,
                                      kl_coef=0.02, lr=1e-4, prompt_tokens=256, eval_interval=16,
                                      eval_samples=48, tau=6, **EVAL_EMBEDDED)},
}


# SmolLM2-135M-Instruct (134.5M parameters, full fine-tuning, fp32 unless --bf16), sized so that one run of a
# five-algorithm x 3-seed grid takes minutes on a laptop CPU, one thread per run (docs/real-model.md: ~30-50 s
# per CommonGen iteration of 16 rollouts x 2 epochs). Method settings are the paper's; the fewer, smaller
# iterations take a larger learning rate (not tuned) and a small KL penalty. tau keeps the paper's share of the
# run (CommonGen 100 of 500, TL;DR 200 of 1000, IMDB 20 of 50). The guide is the paper's: the learner's start
# model sampled with top-p 0.92. With the chat template it is already much better than the learner's
# temperature-1 samples (zero-shot CommonGen CIDEr-D: greedy 0.553, sampled 0.193; docs/real-model.md).
# Evaluation as the paper's (EVAL_PAPER): CommonGen by beam search, the final evaluation on all 993 concept sets.
# The critic: a value head on the frozen reference's last hidden states (critic="reference-head"), at the policy's
# lr, no warm-up. Measured with the policy held fixed on 10 batches of 16 CommonGen rollouts (explained variance
# of each batch's values before it is trained on, mean over batches 6-10; seconds of critic update per iteration):
# full critic lr 1e-5 (the old preset) +0.02, 11-29 s; head lr 1e-5 +0.02, 0.01 s; head lr 1e-4 / 1e-3 / 1e-2
# -0.02 / -0.35 / -3.3; head lr 1e-3 with 4 / 20 warm-up epochs -0.32 / -0.36; full critic lr 1e-4 fell to -0.18 at
# batch 4 too. A faster critic fits single noisy rewards (std 0.30 about a mean 0.17) and predicts the next batch
# worse than a constant; the head learns as much as the full critic did, without its forward and backward.
#   RLGF_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/critic_fit.py --policy-model smollm2 --iterations 10
SMOLLM2_CRITIC = dict(critic="reference-head", critic_lr=None, critic_warmup=0)
SMOLLM2 = {
    "commongen": {**PAPER["commongen"], **dict(iterations=20, rollouts_per_iteration=16, minibatch_size=8,
                                                n_epochs=2, kl_coef=0.01, lr=1e-5, prompt_tokens=32,
                                                eval_interval=5, eval_samples=100, tau=4, **SMOLLM2_CRITIC)},
    "imdb": {**PAPER["imdb"], **dict(iterations=10, rollouts_per_iteration=8, minibatch_size=4, n_epochs=2,
                                      kl_coef=0.02, lr=1e-5, eval_interval=5, eval_samples=32, tau=4,
                                      **SMOLLM2_CRITIC)},
    "tldr": {**PAPER["tldr"], **dict(iterations=10, rollouts_per_iteration=8, minibatch_size=4, n_epochs=2,
                                      kl_coef=0.02, lr=1e-5, prompt_tokens=256, eval_interval=5, eval_samples=32,
                                      tau=2, **SMOLLM2_CRITIC)},
}

# The paper's models per task (SPEC section 3), chosen by an explicit `--preset paper`. TL;DR's policy is GPT-J
# 6B in 4-bit with LoRA r 8 / alpha 64, its reward a LoRA adapter on GPT-J; CommonGen's policy is T5.
PAPER_MODELS = {
    "imdb": dict(policy_model="rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews",
                 guide_model="rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews",
                 reward_model="lvwerra/distilbert-imdb"),
    "commongen": dict(policy_model="rajkumarrrk/t5-common-gen", guide_model="rajkumarrrk/t5-common-gen"),
    "tldr": dict(policy_model="CarperAI/openai_summarize_tldr_sft", guide_model="CarperAI/openai_summarize_tldr_sft",
                 reward_model="jdchang/tldr_rm_adapter", lora_r=8, lora_alpha=64, load_in_4bit=True),
}

# preset name -> per-task settings; MODELS: preset name -> per-task models a preset named explicitly selects
PRESETS = {"paper": PAPER, "embedded": EMBEDDED, "smollm2": SMOLLM2}
MODELS = {"paper": PAPER_MODELS}
MODEL_FIELDS = ("policy_model", "guide_model", "reward_model")


def preset_for(policy_model: str | None) -> str:
    """The preset a policy model gets by default: `embedded` without one, a model alias's own preset for the
    alias (`smollm2`) or the folder it made (its info.json names the alias), else `paper`."""
    if policy_model is None:
        return "embedded"
    if policy_model in PRESETS and not os.path.exists(policy_model):
        return policy_model
    info = Path(os.path.expanduser(policy_model)) / "info.json"
    if info.is_file():
        try:
            alias = json.loads(info.read_text()).get("alias")
        except (ValueError, AttributeError):
            alias = None
        if alias in PRESETS:
            return alias
    return "paper"


auto_preset = preset_for  # what `--preset auto` stands for


def preset_values(preset: str, task_name: str, policy_model: str | None) -> tuple[str, dict]:
    """(the preset's name, the values it gives `task_name`'s fields)."""
    name = auto_preset(policy_model) if preset == "auto" else preset
    if name not in PRESETS:
        raise UsageError(f"--preset must be auto or one of {', '.join(PRESETS)}, not {preset!r}")
    values = dict(PRESETS[name][task_name])
    if preset != "auto":
        values.update(MODELS.get(name, {}).get(task_name, {}))
    return name, values


def _hub_unreachable(ids: list[str]) -> list[str]:
    """Those of the hub `ids` that neither the Hub (offline) nor the local Hugging Face cache can give."""
    from common.tasks import hub_offline_if_unreachable

    hub_offline_if_unreachable()
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("", "0", "false", "no"):
        return []
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return ids
    return [i for i in ids if not any(isinstance(try_to_load_from_cache(i, f), str)
                                      for f in ("config.json", "adapter_config.json"))]


def fill_presets(args, task_name: str, preset: str = "auto", aliases: dict | None = None, given: set | None = None):
    """Return a copy of `args` whose fields still at their default (or None), and not in `given` (the fields the user
    set), take the task's `preset` values (see the module docstring); `aliases` maps a field to the preset key it
    reads (e.g. beta -> ppo_pp_beta). The hub models an explicit preset selects must be reachable (or cached): else
    a UsageError."""
    name, values = preset_values(preset, task_name, getattr(args, "policy_model", None))
    aliases = aliases or {}
    updates = {}
    for f in dataclasses.fields(args):
        key = aliases.get(f.name, f.name)
        if key not in values or (f.name == "guide_model" and getattr(args, "guide", "model") != "model"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        v = getattr(args, f.name)
        named = f.name in (given or ()) and not (v is None and default is not None)  # None: "unset" for a value
        if not named and (v is None or v == default):
            updates[f.name] = values[key]
    hub = [v for k, v in updates.items() if k in MODEL_FIELDS and not os.path.isdir(os.path.expanduser(str(v)))]
    missing = _hub_unreachable(hub) if hub else []
    if missing:
        raise UsageError(f"--preset {name} loads {', '.join(missing)} from the Hugging Face Hub, which cannot be "
                         "reached (and they are not in the local cache): run with hub access, or pass local "
                         "folders with --policy-model / --guide-model / --reward-model")
    return dataclasses.replace(args, **updates)
