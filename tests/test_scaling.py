"""--fsdp (common/fsdp.py): sharding, full state dicts, one process against a plain run, two torchrun processes
against DDP, resume. Run on RLGF_TEST_DEVICE where marked `device` (default cpu)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import DATA, DEVICE, needs_data

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _train_lines(run_dir: Path) -> list[dict]:
    return [r for r in _jsonl(run_dir / "metrics.jsonl") if "objective/reward" in r]


def _state(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(str(folder)).state_dict().items()}


def _assert_same_metrics(a: list[dict], b: list[dict]):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), f"step {ra['step']} {k}: {ra[k]} != {rb[k]}"


@pytest.fixture
def process_group():
    """A one-process group for FSDP in this process, removed afterwards (and the runtime's FSDP flag reset)."""
    from common import runtime as rt

    yield
    rt._RUN.update(fsdp=False)
    if dist.is_initialized():
        dist.destroy_process_group()


def _tiny_gpt2(vocab: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2))


@pytest.mark.device
def test_shard_finds_layers_and_carries_optimizer_state(process_group):
    """Each transformer block is an FSDP unit; an optimiser's state (as after --resume) moves onto the shards
    and gathers back to the same full state dict; the full model state dict equals the unsharded one."""
    from torch.distributed.tensor import DTensor

    from common import fsdp
    from common.fsdp import full_optimizer_state, full_state_dict, shard, transformer_layers
    from common.generation import ValueModel

    dev = torch.device(DEVICE)
    fsdp.ensure_process_group(dev)
    model = _tiny_gpt2()
    critic = ValueModel(_tiny_gpt2().transformer)
    assert [type(m).__name__ for m in transformer_layers(model)] == ["GPT2Block"] * 2
    assert [type(m).__name__ for m in transformer_layers(critic)] == ["GPT2Block"] * 2
    opt = torch.optim.AdamW([*model.parameters(), *critic.parameters()], lr=1e-2)
    ids = torch.randint(0, 64, (2, 6))
    (model(input_ids=ids, labels=ids).loss + critic(ids, torch.ones_like(ids), ids, torch.ones_like(ids)).sum()).backward()
    opt.step()
    want_opt = opt.state_dict()
    want_model = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dev), critic.to(dev)
    shard([model, critic], opt, dev, 1)
    assert fsdp.is_sharded(model) and fsdp.is_sharded(critic)
    assert all(fsdp.is_sharded(m) for m in transformer_layers(model))
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
    got = full_optimizer_state(opt)
    assert got["param_groups"] == want_opt["param_groups"]
    for i, st in want_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k].cpu(), v.cpu()), (i, k)
    full = full_state_dict(model)
    assert set(full) == set(want_model) and all(torch.equal(full[k].cpu(), want_model[k]) for k in full)
    # a step on the shards moves the weights and gathers back to a full state dict of the same keys
    with torch.no_grad():  # no-gradient forwards keep the gathered weights; a gradient forward frees them again
        model(input_ids=ids.to(dev))
    (model(input_ids=ids.to(dev), labels=ids.to(dev)).loss).backward()
    opt.step()
    after = full_state_dict(model)
    assert any(not torch.equal(after[k].cpu(), want_model[k]) for k in after)


@pytest.mark.device
def test_shard_peft_model_trains_only_the_adapter(process_group):
    """A peft LoRA model shards per transformer layer like its base model; the backward reaches the adapter
    only (the frozen base weights get no gradient)."""
    peft = pytest.importorskip("peft")
    from common import fsdp

    dev = torch.device(DEVICE)
    fsdp.ensure_process_group(dev)
    model = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                               fan_in_fan_out=True))
    assert [type(m).__name__ for m in fsdp.transformer_layers(model)] == ["GPT2Block"] * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.to(dev)
    fsdp.shard([model], None, dev, 1)
    ids = torch.randint(0, 64, (2, 6), device=dev)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable and all("lora_" in n for n in with_grad)


def _run_args(task: str, policy: Path, out: Path, **kw) -> dict:
    return dict(task=task, policy_model=str(policy), device=DEVICE, prompt_tokens=48, iterations=2,
                rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2, eval_interval=1,
                output_dir=str(out), keep_checkpoint=True, **kw)


@needs_data
@pytest.mark.device
def test_fsdp_one_process_equals_plain_run_lols(tiny_model, tmp_path, process_group):
    """`python lols.py --fsdp` (one process, both critics sharded; seed 2 gives one PPO++ and one AggreVaTeD
    iteration): the same metrics, final policy, critics and checkpoint as without --fsdp."""
    import lols

    base = _run_args("tldr", tiny_model("tldr"), tmp_path, p_ppo_pp=0.5, seed=2)
    lols.main(lols.Args(**base, run_name="plain"))
    lols.main(lols.Args(**base, run_name="fsdp", fsdp=True))
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    assert sorted(r["guide/phase"] for r in _train_lines(sharded)) == [0.0, 1.0]
    _assert_same_metrics(_jsonl(plain / "metrics.jsonl"), _jsonl(sharded / "metrics.jsonl"))
    a, b = _state(plain / "policy"), _state(sharded / "policy")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((sharded / "policy" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (plain, sharded))
    for key in ("critic", "guide_critic"):
        assert set(ca[key]) == set(cb[key])
        assert all(torch.allclose(ca[key][k].cpu(), cb[key][k].cpu(), atol=1e-6) for k in ca[key]), key
    assert set(ca["optimizer"]["state"]) == set(cb["optimizer"]["state"])
    for i, st in ca["optimizer"]["state"].items():
        assert all(torch.allclose(v.cpu().float(), cb["optimizer"]["state"][i][k].cpu().float(), atol=1e-6)
                   for k, v in st.items()), i


def _env(**extra):
    env = dict(os.environ)
    env.update(RLGF_DATA_DIR=str(DATA), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _torchrun(script: str, *argv: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           "--device", "cpu", *argv]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]


@needs_data
def test_fsdp_two_processes_match_ddp_save_and_resume(tiny_model, tmp_path):
    """torchrun, 2 processes on the CPU (gloo): --fsdp gives DDP's numbers, saves a full policy that
    from_pretrained loads, and a run resumed from its checkpoint continues with DDP's numbers."""
    common = ["--task", "tldr", "--policy-model", str(tiny_model("tldr")), "--prompt-tokens", "48",
              "--rollouts-per-iteration", "4", "--minibatch-size", "2", "--n-epochs", "1", "--eval-samples", "2",
              "--final-eval-samples", "2", "--eval-interval", "1", "--output-dir", str(tmp_path)]
    _torchrun("ppo.py", *common, "--iterations", "2", "--run-name", "ddp")
    _torchrun("ppo.py", *common, "--iterations", "1", "--run-name", "fsdp", "--fsdp", "--keep-checkpoint")
    first = _train_lines(tmp_path / "fsdp")
    shutil.copy(tmp_path / "fsdp" / "checkpoint.pt", tmp_path / "checkpoint-1.pt")
    _torchrun("ppo.py", *common, "--iterations", "2", "--resume", str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = _train_lines(tmp_path / "ddp"), _train_lines(tmp_path / "fsdp")
    assert [r["step"] for r in first] == [1] and [r["step"] for r in fsdp] == [1, 2]
    assert all(math.isfinite(v) for r in fsdp for v in r.values())
    _assert_same_metrics(ddp, fsdp)
    a, b = _state(tmp_path / "ddp" / "policy"), _state(tmp_path / "fsdp" / "policy")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    init = _state(tiny_model("tldr"))
    assert any(not torch.equal(init[k], b[k]) for k in init)  # trained
    assert torch.load(tmp_path / "checkpoint-1.pt", weights_only=True)["iteration"] == 1


@needs_data
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_fsdp_two_processes_evaluate_with_generate_as_ddp(tiny_model, tmp_path, decoding):
    """torchrun, 2 processes: greedy and beam evaluations of a sharded policy (generate with every process
    taking part in every step) give DDP's evaluation numbers, periodic and final."""
    common = ["--task", "tldr", "--policy-model", str(tiny_model("tldr")), "--prompt-tokens", "48",
              "--rollouts-per-iteration", "4", "--minibatch-size", "2", "--n-epochs", "1", "--eval-samples", "2",
              "--final-eval-samples", "3", "--eval-interval", "1", "--iterations", "1", "--output-dir", str(tmp_path),
              "--eval-decoding", decoding, "--eval-num-beams", "3"]
    _torchrun("ppo.py", *common, "--run-name", "ddp")
    _torchrun("ppo.py", *common, "--run-name", "fsdp", "--fsdp")
    evals = {name: [r for r in _jsonl(tmp_path / name / "metrics.jsonl") if "eval/reward" in r or
                    "final_eval/reward" in r] for name in ("ddp", "fsdp")}
    assert [r["step"] for r in evals["fsdp"]] == [0, 0, 1, 1]
    _assert_same_metrics(evals["ddp"], evals["fsdp"])
    saved = json.loads((tmp_path / "fsdp" / "eval.json").read_text())
    assert saved["evaluation"]["decoding"] == decoding and saved["final"]["prompts"] == 3




@needs_data
@pytest.mark.device
@pytest.mark.parametrize("algo", ["ppo", "lols"])
def test_fsdp_with_lora_equals_plain_lora_run(tiny_model, tmp_path, process_group, algo):
    """`--fsdp --lora-r 4` (one process: the base with every adapter sharded, the critic heads too): the same
    metrics as the LoRA run without --fsdp (LOLS: both phases, both critic adapters), the saved adapter equal
    and trained, and a checkpoint that resumes a run without --fsdp."""
    import lols
    import ppo

    mod = {"ppo": ppo, "lols": lols}[algo]
    extra = {"p_ppo_pp": 0.5, "seed": 2} if algo == "lols" else {}
    base = _run_args("tldr", tiny_model("tldr"), tmp_path, lora_r=4, lora_alpha=8.0, lr=1e-2, **extra)
    mod.main(mod.Args(**base, run_name="plain"))
    mod.main(mod.Args(**base, run_name="fsdp", fsdp=True))
    plain, sharded = _train_lines(tmp_path / "plain"), _train_lines(tmp_path / "fsdp")
    assert len(plain) == 2
    if algo == "lols":
        assert sorted(r["guide/phase"] for r in plain) == [0.0, 1.0]
    _assert_same_metrics(plain, sharded)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "policy" / "adapter_model.safetensors")) for d in ("plain", "fsdp"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained
    ca, cb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("plain", "fsdp"))
    for key in ("policy", "critic"):
        assert set(ca[key]) == set(cb[key]) and all(torch.allclose(ca[key][k], cb[key][k], atol=1e-6) for k in ca[key])


@needs_data
def test_fsdp_two_processes_with_lora_match_ddp(tiny_model, tmp_path):
    """torchrun, 2 processes on the CPU: LOLS with LoRA adapters (policy and two critic adapters on one base) under
    --fsdp gives DDP's numbers in both phases, and saves the same adapter."""
    common = ["--task", "tldr", "--policy-model", str(tiny_model("tldr")), "--prompt-tokens", "48",
              "--rollouts-per-iteration", "4", "--minibatch-size", "2", "--n-epochs", "1", "--eval-samples", "2",
              "--final-eval-samples", "2", "--eval-interval", "1", "--output-dir", str(tmp_path), "--iterations", "2",
              "--lora-r", "4",
              "--lora-alpha", "8", "--lr", "1e-4", "--p-ppo-pp", "0.5", "--seed", "2"]
    _torchrun("lols.py", *common, "--run-name", "ddp")
    _torchrun("lols.py", *common, "--run-name", "fsdp", "--fsdp")
    ddp, fsdp = _train_lines(tmp_path / "ddp"), _train_lines(tmp_path / "fsdp")
    assert sorted(r["guide/phase"] for r in ddp) == [0.0, 1.0]
    _assert_same_metrics(ddp, fsdp)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "policy" / "adapter_model.safetensors")) for d in ("ddp", "fsdp"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
