"""--preset (common/presets.py): the paper's settings and models (SPEC sections 2-3), auto, unknown names and
the offline check, each one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aggrevated
import lols
import ppo
import ppo_plus_plus
from common import presets
from common.errors import UsageError
from common.presets import fill_presets

REPO = Path(__file__).resolve().parents[1]
GPT2_IMDB = "rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews"
TLDR_SFT = "CarperAI/openai_summarize_tldr_sft"


@pytest.fixture
def hub_reachable(monkeypatch):
    monkeypatch.setattr(presets, "_hub_unreachable", lambda ids: [])


# SPEC section 3's table and section 2's betas, per task: (script, Args fields, aliases) -> expected values
def test_paper_preset_fills_the_papers_numbers_and_models(hub_reachable):
    imdb = fill_presets(ppo_plus_plus.Args(task="imdb", preset="paper"), "imdb", "paper", {"beta": "ppo_pp_beta"})
    assert (imdb.iterations, imdb.rollouts_per_iteration, imdb.minibatch_size, imdb.n_epochs) == (50, 112, 28, 5)
    assert (imdb.gamma, imdb.lam, imdb.vf_coef, imdb.clip_range, imdb.kl_coef) == (0.99, 0.95, 0.5, 0.2, 0.001)
    assert (imdb.lr, imdb.lr_schedule, imdb.prompt_tokens, imdb.beta) == (1e-5, "linear", 64, 0.6)
    assert (imdb.guide_top_p, imdb.guide_top_k) == (0.92, 50)
    assert (imdb.policy_model, imdb.guide_model, imdb.reward_model) == (GPT2_IMDB, GPT2_IMDB, "lvwerra/distilbert-imdb")

    cg = fill_presets(ppo.Args(task="commongen", preset="paper"), "commongen", "paper")
    assert (cg.iterations, cg.rollouts_per_iteration, cg.minibatch_size, cg.n_epochs) == (500, 128, 32, 4)
    assert (cg.vf_coef, cg.kl_coef, cg.lr, cg.lr_schedule, cg.prompt_tokens) == (30.0, 0.0, 5e-6, "linear", 15)
    assert (cg.policy_model, cg.reward_model) == ("rajkumarrrk/t5-common-gen", None)  # reward: CIDEr-D + SPICE

    tl = fill_presets(aggrevated.Args(task="tldr", preset="paper"), "tldr", "paper", {"beta": "aggrevated_beta"})
    assert (tl.iterations, tl.rollouts_per_iteration, tl.minibatch_size, tl.n_epochs) == (1000, 128, 32, 4)
    assert (tl.gamma, tl.vf_coef, tl.kl_coef, tl.lr, tl.lr_schedule, tl.weight_decay) == (1.0, 0.1, 0.002, 5e-6,
                                                                                           "constant", 0.01)
    assert (tl.beta, tl.prompt_tokens) == (1.0, 500)
    assert (tl.policy_model, tl.guide_model, tl.reward_model) == (TLDR_SFT, TLDR_SFT, "jdchang/tldr_rm_adapter")

    lo = fill_presets(lols.Args(task="tldr", preset="paper"), "tldr", "paper", {"beta": "lols_beta"})
    assert (lo.beta, lo.p_ppo_pp) == (0.8, 0.8)


def test_paper_preset_sets_up_lora_where_the_script_has_the_fields(hub_reachable):
    """TL;DR's LoRA r 8 / alpha 64 and 4-bit go into fields named so (left at their defaults); a script without
    them ignores the keys; a flag given on the command line wins."""

    @dataclasses.dataclass
    class WithLora:
        policy_model: str | None = None
        reward_model: str | None = None
        iterations: int | None = None
        lora_r: int = 0
        lora_alpha: float = 16.0
        load_in_4bit: bool = False

    a = fill_presets(WithLora(), "tldr", "paper")
    assert (a.lora_r, a.lora_alpha, a.load_in_4bit, a.iterations) == (8, 64, True, 1000)
    b = fill_presets(WithLora(lora_r=16, iterations=3, policy_model="/my/model"), "tldr", "paper")
    assert (b.lora_r, b.lora_alpha, b.iterations, b.policy_model) == (16, 64, 3, "/my/model")
    c = fill_presets(ppo.Args(task="tldr"), "tldr", "paper")  # the scripts' own LoRA fields
    assert (c.lora_r, c.lora_alpha, c.load_in_4bit) == (8, 64, True)

    @dataclasses.dataclass
    class WithoutLora:
        iterations: int | None = None

    assert fill_presets(WithoutLora(), "tldr", "paper").iterations == 1000  # no such fields: ignored


def test_auto_preset_keeps_models_and_picks_numbers_by_model():
    emb = fill_presets(ppo.Args(task="imdb"), "imdb", "auto")
    assert emb.iterations == presets.EMBEDDED["imdb"]["iterations"] != presets.PAPER["imdb"]["iterations"]
    given = fill_presets(ppo.Args(task="imdb", policy_model="/some/folder"), "imdb", "auto")
    assert given.iterations == presets.PAPER["imdb"]["iterations"]
    assert (given.policy_model, given.reward_model) == ("/some/folder", None)  # auto never picks models
    explicit = fill_presets(ppo.Args(task="imdb"), "imdb", "embedded")
    assert explicit.policy_model is None and explicit.iterations == emb.iterations


def test_rule_guide_takes_no_guide_model(hub_reachable):
    a = fill_presets(ppo_plus_plus.Args(task="tldr", guide="rule"), "tldr", "paper", {"beta": "ppo_pp_beta"})
    assert a.guide_model is None and a.policy_model == TLDR_SFT


def test_unknown_preset_is_a_usage_error():
    with pytest.raises(UsageError, match="--preset must be auto or one of paper, embedded"):
        fill_presets(ppo.Args(), "imdb", "papr")


def _cli(*argv, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "ppo.py", *argv], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=120)


def _one_line(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_unknown_preset_is_one_line():
    _one_line(_cli("--task", "imdb", "--preset", "nope"), "--preset", "nope")


def test_cli_paper_preset_offline_is_one_line(tmp_path):
    """Offline, with an empty Hugging Face cache: one line naming the models and the Hub."""
    _one_line(_cli("--task", "imdb", "--preset", "paper", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path)),
              GPT2_IMDB, "Hugging Face Hub")
