"""The code the five scripts keep in common on purpose (each is one self-contained file) stays the same in all five:
the helpers (GAE, masked mean and whitening, the per-token KL, the adaptive KL controller), the PPO update of
line 6 (and its value loss in the critic's warm-up), the logged metrics every script shares, and the settings' defaults and documentation. A change to one copy
that is not made to the others fails here."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import aggrevated
import d2lols
import lols
import ppo
import ppo_plus_plus
from common.settings import GROUPS, field_docs

SCRIPTS = [ppo, ppo_plus_plus, aggrevated, lols, d2lols]
HELPERS = ["compute_gae", "masked_mean", "masked_whiten", "kl_per_token", "AdaptiveKL"]


@pytest.mark.parametrize("name", HELPERS)
def test_helpers_are_the_same_in_every_script(name):
    sources = {m.__name__: inspect.getsource(getattr(m, name)) for m in SCRIPTS}
    assert len(set(sources.values())) == 1, f"{name} differs between " + ", ".join(sources)


def _block(mod, start: str, end: str) -> list[str]:
    """The lines of `mod`'s main() from the banner `start` up to the banner `end`, dedented to the banner, with the
    phase-dependent critic handle of LOLS / D2LOLS written as PPO writes it."""
    lines = inspect.getsource(mod.main).splitlines()
    i = next(k for k, line in enumerate(lines) if start in line)
    j = next(k for k, line in enumerate(lines) if end in line and k > i)
    indent = len(lines[i]) - len(lines[i].lstrip())
    out = []
    for line in lines[i + 1: j]:
        line = line[indent:]
        line = line.replace("run.critic_t", "critic_t")  # the phase's critic (LOLS, D2LOLS)
        line = re.sub(r", idle=\[c for c in run\.critics\.values\(\) if c is not critic\]\)", ")", line)
        line = line.split("  #")[0].rstrip()  # comments may name the script's own case
        out.append(line)
    return out


def test_the_ppo_update_is_the_same_in_every_script():
    """Line 6 (the clipped policy and value losses, gradient accumulation, clipping, the optimiser step) is PPO's
    in all five; only which critic it trains differs (LOLS and D2LOLS: the phase's)."""
    blocks = {m.__name__: _block(m, "# ---- line 6", "# ---- logging") for m in SCRIPTS}
    assert len(blocks["ppo"]) > 40
    for name, block in blocks.items():
        assert block == blocks["ppo"], f"line 6 of {name}.py differs from ppo.py's"


def test_the_critic_warm_up_uses_line_6s_value_loss():
    """--critic-warmup (common/harness.py) trains the critic with the value loss of line 6: the same lines."""
    from common.harness import Run

    def value_loss(src: str) -> list[str]:
        lines = [line.strip() for line in src.splitlines()]
        i = next(k for k, line in enumerate(lines) if line.startswith("v_clip = "))
        return lines[i: i + 4]

    script = value_loss(inspect.getsource(ppo.main))
    assert script[-1] == "(args.vf_coef * vf_loss).backward()"
    assert value_loss(inspect.getsource(Run.warm_up_critic)) == script


def test_the_shared_metrics_are_computed_the_same_way():
    """The metrics every script logs (reward, KL, losses, clip fractions, explained variance, lengths) are computed
    by the same lines; the guide's own metrics are extra."""
    def shared(mod):
        block = _block(mod, "# ---- logging", "run.log(")
        return [line for line in block if '"guide/' not in line]

    base = shared(ppo)
    for mod in SCRIPTS[1:]:
        assert shared(mod) == base, f"the logged metrics of {mod.__name__}.py differ from ppo.py's"


def test_shared_settings_have_the_same_defaults_and_docs():
    """A field two scripts share has one default and one docstring (the groups of common/settings.py are written
    once; the scripts' own hyperparameters are copies that must agree)."""
    grouped = {f.name for g in GROUPS for f in dataclasses.fields(g)}
    base = {f.name: f.default for f in dataclasses.fields(ppo.Args)}
    base_docs = field_docs(ppo.Args)
    for mod in SCRIPTS[1:]:
        docs = field_docs(mod.Args)
        for f in dataclasses.fields(mod.Args):
            if f.name in base and f.name not in grouped:
                assert f.default == base[f.name], f"{mod.__name__}.Args.{f.name} defaults to {f.default!r}, not ppo's"
                assert docs[f.name] == base_docs[f.name], f"{mod.__name__}.Args.{f.name}'s docstring differs from ppo's"
    for name in ("beta",):  # the guided scripts' mixing probability: documented per algorithm, present in all four
        assert all(name in {f.name for f in dataclasses.fields(m.Args)} for m in SCRIPTS[1:])


def test_every_field_is_documented_and_concrete():
    """Every field has a docstring; no hyperparameter of the pseudocode is left as None (a preset that decides it
    shows its value in --help)."""
    may_be_none = {"policy_model", "reward_model", "kl_target", "data_dir", "run_name", "resume", "save_interval",
                   "micro_batch_size", "lora_target_modules", "critic", "guide_model", "guide_model_name",
                   "guide_cache", "guide_extra_body", "final_eval_samples", "critic_lr", "start_eval_from"}
    for mod in SCRIPTS:
        docs = field_docs(mod.Args)
        for f in dataclasses.fields(mod.Args):
            assert docs.get(f.name), f"{mod.__name__}.Args.{f.name} has no docstring"
            assert f.default is not None or f.name in may_be_none, f"{mod.__name__}.Args.{f.name} defaults to None"
