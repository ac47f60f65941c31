"""Bad values inside data rows, model folders of the wrong kind, LoRA settings, the guide cache at temperature 0,
one embedded build per model, the start line's size, tied weights under FSDP (docs/reliability.md). Each bad input
must end in one `error:` line before any model is built or loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import aggrevated
import d2lols
import lols
import ppo
import ppo_plus_plus
from common import models as cm
from common import runtime as rt
from common.errors import UsageError
from common.tasks import get_task
from conftest import DATA, REPO, needs_data

SCRIPTS = {"ppo": ppo, "ppo_plus_plus": ppo_plus_plus, "aggrevated": aggrevated, "lols": lols, "d2lols": d2lols}
FILES = {"imdb": ("imdb", "train.jsonl"), "commongen": ("common_gen", "train.jsonl"),
         "tldr": ("openai_summarize_tldr", "train.jsonl")}
VAL = {"imdb": None, "commongen": "validation.jsonl", "tldr": "valid.jsonl"}


def _args(mod, task: str, out: Path, **kw):
    base = dict(task=task, data_dir=str(DATA), output_dir=str(out), run_name="run", iterations=1,
                rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2, eval_interval=1, device="cpu")
    if mod is not ppo:
        base["guide"] = "rule" if task != "imdb" else "model"
    base.update(kw)
    return mod.Args(**base)


def _one_error_line(capsys, exc, *words) -> str:
    """Exit status 2, no traceback, one `error:` line on stderr holding `words`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, (exc.value.code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def no_slow_work(monkeypatch):
    """Resolving, building or loading a model fails the test: the refusals must come before it."""
    def touched(*a, **k):
        raise AssertionError("a model was resolved, built or loaded before the bad input was found")

    for name in ("resolve_models", "build_policy_ref_critic", "make_reward", "build_guide"):
        monkeypatch.setattr(rt, name, touched)
    monkeypatch.setattr(cm, "embedded_models", touched)


# ---------------------------------------------------------------------------------------------------
# FSDP: the tied lm_head.weight is saved as without FSDP
# ---------------------------------------------------------------------------------------------------
def test_fsdp_full_state_dict_keeps_tied_weights_tied_and_saves_like_a_plain_model(tmp_path, monkeypatch):
    """Gathered from 2 processes, each weight is a new tensor: the tied lm_head.weight must still be the embedding
    (one tensor under both names), so save_pretrained leaves it out as it does without FSDP. One process is
    sharded here, with a gather that allocates like a 2-process one."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from common import fsdp

    real = fsdp._full
    monkeypatch.setattr(fsdp, "_full", lambda t, keep: None if not keep else real(t, keep).clone())

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    model.save_pretrained(tmp_path / "plain")
    try:
        fsdp.ensure_process_group(torch.device("cpu"))
        fsdp.shard([model], None, torch.device("cpu"), 1)
        state = fsdp.full_state_dict(model)
        assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
        rt.save_pretrained_unsharded(model, state, tmp_path / "fsdp")
    finally:
        rt._RUN.update(fsdp=False)
        if dist.is_initialized():
            dist.destroy_process_group()
    plain, sharded = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "fsdp"))
    assert set(plain) == set(sharded) and "lm_head.weight" not in sharded
    assert all(torch.equal(plain[k], sharded[k]) for k in plain)
