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
from common import embedded as ce
from common import guides
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

    for name in ("resolve_models", "build_policy_ref_critic", "make_reward"):
        monkeypatch.setattr(rt, name, touched)
    monkeypatch.setattr(guides, "build_guide", touched)
    monkeypatch.setattr(ce, "embedded_models", touched)


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
        fsdp.save_pretrained_unsharded(model, state, tmp_path / "fsdp")
    finally:
        rt._RUN.update(fsdp=False)
        if dist.is_initialized():
            dist.destroy_process_group()
    plain, sharded = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "fsdp"))
    assert set(plain) == set(sharded) and "lm_head.weight" not in sharded
    assert all(torch.equal(plain[k], sharded[k]) for k in plain)


# ---------------------------------------------------------------------------------------------------
# data: bad values inside rows, null lines, empty files
# ---------------------------------------------------------------------------------------------------
def _small_data(tmp_path: Path, task: str, rows: int = 40) -> Path:
    """A data folder with the first rows of the task's train (and validation) file."""
    folder, train = FILES[task]
    out = tmp_path / "data"
    (out / folder).mkdir(parents=True, exist_ok=True)
    for name in filter(None, (train, VAL[task])):
        with open(DATA / folder / name) as f:
            (out / folder / name).write_text("".join(next(f) for _ in range(rows)))
    return out


def _damage(data: Path, task: str, line: int, field: str | None, raw: str) -> Path:
    """Line `line` of the task's train file: its `field` replaced by the JSON text `raw`, or the whole line
    replaced by `raw` (field None). Returns the file."""
    path = data / FILES[task][0] / FILES[task][1]
    lines = path.read_text().splitlines(keepends=True)
    if field is None:
        lines[line - 1] = raw + "\n"
    else:
        row = json.loads(lines[line - 1])
        row[field] = "@@BAD@@"
        lines[line - 1] = json.dumps(row).replace('"@@BAD@@"', raw) + "\n"
    path.write_text("".join(lines))
    return path


BAD_VALUES = [
    ("imdb", "label", v) for v in ("NaN", "1e999", "-Infinity", '"pos"', "null", "2", "0.5", "true", "[1]")
] + [("imdb", "text", v) for v in ("12345", "null", '["a"]', "{}")] + [
    ("commongen", "concepts", v) for v in ('"dog"', "null", "[]", "[1, 2]", '["dog", null]', '["dog", ""]', "{}")
] + [("commongen", "target", v) for v in ("null", "12", '["a"]', "NaN")] + [
    ("commongen", "concept_set_idx", v) for v in ("null", '"3"', "1.5", "NaN", "Infinity", "true")
] + [("tldr", f, v) for f in ("prompt", "label") for v in ("null", "12345", "NaN", '["a"]', "false")]


@needs_data
@pytest.mark.parametrize("task,field,raw", BAD_VALUES, ids=lambda x: str(x))
def test_bad_value_in_a_row_is_one_line_naming_file_line_and_field(tmp_path, task, field, raw):
    data = _small_data(tmp_path, task)
    path = _damage(data, task, 3, field, raw)
    with pytest.raises(UsageError) as e:
        get_task(task).load("train", str(data))
    msg = str(e.value)
    assert msg.startswith(f"{path}, line 3: field {field!r}"), msg
    assert "\n" not in msg


@needs_data
@pytest.mark.parametrize("task", list(FILES))
@pytest.mark.parametrize("raw,what", [("null", "null, not an object"), ("[1, 2]", "a JSON list"),
                                      ("7", "a JSON int"), ('"row"', "a JSON str")])
def test_a_line_that_is_not_an_object_is_refused(tmp_path, task, raw, what):
    data = _small_data(tmp_path, task)
    path = _damage(data, task, 4, None, raw)
    with pytest.raises(UsageError, match="line 4") as e:
        get_task(task).load("train", str(data))
    assert str(e.value).startswith(f"{path}, line 4: {what}")


@needs_data
@pytest.mark.parametrize("task", list(FILES))
def test_blank_lines_are_skipped_and_an_empty_file_is_named(tmp_path, task):
    data = _small_data(tmp_path, task)
    path = data / FILES[task][0] / FILES[task][1]
    n = len(get_task(task).load("train", str(data)))
    path.write_text(path.read_text().replace("\n", "\n\n  \n"))
    assert len(get_task(task).load("train", str(data))) == n
    path.write_text("\n")
    with pytest.raises(UsageError) as e:
        get_task(task).load("train", str(data))
    assert str(path) in str(e.value) and "empty" in str(e.value)


def test_hub_rows_are_checked_like_local_ones():
    from common.tasks import _checked

    task = get_task("commongen")
    rows = [{"concept_set_idx": 0, "concepts": ["dog", "ball"], "target": "A dog."},
            {"concept_set_idx": 1, "concepts": "dog", "target": "A dog."}]
    with pytest.raises(UsageError, match=r"allenai/common_gen \(train\): row 2: field 'concepts' is \"dog\""):
        list(_checked(rows, task, "allenai/common_gen (train)"))


@needs_data
@pytest.mark.parametrize("algo", list(SCRIPTS))
@pytest.mark.parametrize("task,field,raw", [("imdb", "label", "NaN"), ("imdb", "text", "12345"),
                                            ("commongen", "concepts", '"dog"'), ("commongen", "target", "null"),
                                            ("tldr", "label", "null"), ("tldr", None, "null")])
def test_bad_data_stops_a_script_in_one_line_before_any_model(tmp_path, capsys, no_slow_work, algo, task, field, raw):
    data = _small_data(tmp_path, task)
    path = _damage(data, task, 5, field, raw)
    mod = SCRIPTS[algo]
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, task, tmp_path / "runs", data_dir=str(data)))
    _one_error_line(capsys, e, str(path), "line 5", *([f"'{field}'"] if field else ["null"]))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# model folders: the config loads and the kind fits the role, checked before anything slow
# ---------------------------------------------------------------------------------------------------
def _config_folder(path: Path, cls: str = "GPT2LMHeadModel", **kw) -> Path:
    """A model folder with a config.json only (all that the up-front check reads)."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, architectures=[cls],
               **kw).save_pretrained(path)
    return path


def _adapter_folder(path: Path, base: str, task_type: str | None = "SEQ_CLS") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": 4, "lora_alpha": 8,
           "target_modules": ["c_attn"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def folders(tmp_path):
    """Model folders of every kind, by name."""
    f = {}
    f["garbage"] = tmp_path / "garbage"
    f["garbage"].mkdir()
    (f["garbage"] / "config.json").write_text("this is not json {")
    (f["garbage"] / "model.safetensors").write_bytes(b"\x00" * 64)
    f["no config"] = tmp_path / "empty"
    f["no config"].mkdir()
    f["a file"] = tmp_path / "model.bin"
    f["a file"].write_bytes(b"\x00")
    f["unknown type"] = tmp_path / "unknown"
    f["unknown type"].mkdir()
    (f["unknown type"] / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    f["lm"] = _config_folder(tmp_path / "lm")
    f["classifier-1"] = _config_folder(tmp_path / "cls1", "GPT2ForSequenceClassification", num_labels=1)
    f["classifier-2"] = _config_folder(tmp_path / "cls2", "GPT2ForSequenceClassification", num_labels=2)
    f["token classifier"] = _config_folder(tmp_path / "tok", "GPT2ForTokenClassification")
    f["reward adapter"] = _adapter_folder(tmp_path / "rm-adapter", str(f["classifier-1"]))
    f["lm adapter"] = _adapter_folder(tmp_path / "lm-adapter", str(f["lm"]), "CAUSAL_LM")
    f["adapter, base missing"] = _adapter_folder(tmp_path / "orphan", str(tmp_path / "no-such-base"))
    f["adapter, garbage config"] = tmp_path / "bad-adapter"
    f["adapter, garbage config"].mkdir()
    (f["adapter, garbage config"] / "adapter_config.json").write_text("[1, 2")
    return f


REFUSED = [  # role, task, folder, words of the error line
    ("lm", "commongen", "garbage", "config.json cannot be read"), ("lm", "tldr", "no config", "no config.json"),
    ("lm", "imdb", "a file", "is a file"), ("lm", "commongen", "unknown type", "config.json cannot be read"),
    ("lm", "tldr", "classifier-1", "sequence classifier"), ("lm", "tldr", "token classifier", "token classifier"),
    ("lm", "tldr", "reward adapter", "task_type SEQ_CLS"),
    ("reward", "tldr", "garbage", "config.json cannot be read"), ("reward", "imdb", "garbage", "config.json"),
    ("reward", "tldr", "no config", "no config.json"), ("reward", "imdb", "a file", "is a file"),
    ("reward", "tldr", "lm", "not a sequence classifier"), ("reward", "imdb", "lm", "not a sequence classifier"),
    ("reward", "tldr", "classifier-2", "num_labels 1"), ("reward", "imdb", "classifier-1", "at least 2"),
    ("reward", "tldr", "lm adapter", "task_type CAUSAL_LM"), ("reward", "tldr", "adapter, base missing", "its base model"),
    ("reward", "imdb", "adapter, garbage config", "adapter_config.json cannot be read"),
]
ACCEPTED = [("lm", "tldr", "lm"), ("lm", "commongen", "lm adapter"), ("reward", "tldr", "classifier-1"),
            ("reward", "imdb", "classifier-2"), ("reward", "tldr", "reward adapter")]


@pytest.mark.parametrize("role,task,name,words", REFUSED, ids=lambda x: str(x))
def test_a_model_of_the_wrong_kind_is_one_line(folders, role, task, name, words):
    flag = "--reward-model" if role == "reward" else "--policy-model"
    with pytest.raises(UsageError) as e:
        cm.check_model_kind(str(folders[name]), flag, role, task)
    assert flag in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("role,task,name", ACCEPTED, ids=lambda x: str(x))
def test_a_model_of_the_right_kind_passes(folders, role, task, name):
    cm.check_model_kind(str(folders[name]), "--x", role, task)


def test_a_hub_id_that_is_not_cached_is_left_to_the_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    cm.check_model_kind("someone-unknown/not-a-cached-model", "--reward-model", "reward", "tldr")


MODEL_CASES = [  # flag, task, folder, words
    ("reward_model", "tldr", "garbage", "--reward-model"), ("reward_model", "imdb", "lm", "--reward-model"),
    ("reward_model", "tldr", "classifier-2", "num_labels 1"), ("policy_model", "commongen", "garbage", "--policy-model"),
    ("policy_model", "tldr", "classifier-1", "--policy-model"), ("guide_model", "commongen", "no config", "--guide-model"),
    ("guide_model", "tldr", "token classifier", "--guide-model"),
]


@needs_data
@pytest.mark.parametrize("algo", list(SCRIPTS))
@pytest.mark.parametrize("field,task,name,words", MODEL_CASES, ids=lambda x: str(x))
def test_a_bad_model_stops_a_script_before_data_and_builds(folders, tmp_path, capsys, no_slow_work, monkeypatch,
                                                          algo, field, task, name, words):
    """The issue's case: a garbage --reward-model on TL;DR without cached models failed after the whole embedded
    build. Now it is refused with the settings, before the data is read."""
    mod = SCRIPTS[algo]
    if field == "guide_model" and mod is ppo:
        pytest.skip("ppo has no guide")
    kw = {field: str(folders[name])}
    if field == "guide_model":
        kw["guide"] = "model"
    monkeypatch.setattr(get_task(task).__class__, "load", lambda *a, **k: pytest.fail("data read first"))
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, task, tmp_path / "runs", **kw))
    _one_error_line(capsys, e, words)


# ---------------------------------------------------------------------------------------------------
# LoRA settings
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("algo", list(SCRIPTS))
@pytest.mark.parametrize("kw,words", [
    (dict(lora_target_modules=("nosuchmodule",)), "--lora-target-modules nosuchmodule matches no module"),
    (dict(lora_target_modules=("c_attn", "nosuchmodule")), "nosuchmodule"),
    (dict(lora_target_modules=("attn",)), "matches no linear"),  # GPT2Attention: not a layer LoRA adapts
    (dict(lora_alpha=-1.0), "--lora-alpha"), (dict(lora_alpha=0.0), "--lora-alpha"),
    (dict(lora_alpha=float("nan")), "--lora-alpha"), (dict(lora_dropout=1.0), "--lora-dropout"),
    (dict(lora_dropout=-0.1), "--lora-dropout")], ids=str)
@pytest.mark.parametrize("given", [True, False], ids=["policy folder", "embedded default"])
def test_bad_lora_settings_are_one_line_before_any_model(tiny_model, tmp_path, capsys, no_slow_work, algo, kw,
                                                         words, given):
    mod = SCRIPTS[algo]
    model = {"policy_model": str(tiny_model("commongen"))} if given else {}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, "commongen", tmp_path / "runs", lora_r=4, **model, **kw))
    _one_error_line(capsys, e, words)


def test_lora_targets_are_checked_on_the_loaded_model_too(tiny_model):
    """Where the model could not be read up front (a hub id not cached), the loaded model is checked before peft."""
    from transformers import AutoModelForCausalLM

    from common.lora import ModelSetup, check_targets, wrap_policy

    model = AutoModelForCausalLM.from_pretrained(tiny_model("commongen"))
    with pytest.raises(UsageError, match="--lora-target-modules nosuchmodule matches no module of x: choose among"):
        wrap_policy(model, ModelSetup(lora_r=4, lora_target_modules=("nosuchmodule",)), "x")
    for good in (("c_attn",), ("all-linear",), None):
        check_targets(ModelSetup(lora_r=4, lora_target_modules=good), model, "x")


@needs_data
def test_a_lora_run_prints_no_future_warning_and_both_sizes(tiny_model, tmp_path, capsys):
    """transformers' FutureWarning about is_gradient_checkpointing (read by peft) is not shown; the start line
    gives the trainable and the total size under LoRA, the size alone without."""
    model = tiny_model("commongen")
    for lora_r in (0, 4):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ppo.main(_args(ppo, "commongen", tmp_path, policy_model=str(model), run_name=f"r{lora_r}", lora_r=lora_r))
        assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
        start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ppo on commongen"))
        if lora_r:
            assert " trainable of " in start and "M params" in start, start
        else:
            assert "trainable" not in start and "M params" in start, start


def test_describe_params():
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.lora import ModelSetup, wrap_policy

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=32, n_embd=64, n_layer=2, n_head=2))
    total = sum(p.numel() for p in model.parameters())
    assert rt.describe_params(model) == f"{total / 1e6:.1f}M"
    policy = wrap_policy(model, ModelSetup(lora_r=256), "x")
    trainable = sum(p.numel() for p in policy.parameters())
    assert 0 < trainable < total
    assert rt.describe_params(policy) == f"{trainable / 1e6:.1f}M trainable of {(total + trainable) / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------------
# --guide-cache: a server guide at temperature 0 (greedy)
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("algo", [a for a in SCRIPTS if a != "ppo"])
def test_a_model_guide_at_temperature_0_is_refused_in_one_line(tmp_path, capsys, no_slow_work, algo):
    mod = SCRIPTS[algo]
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, "commongen", tmp_path / "runs", guide="model", guide_temperature=0.0))
    _one_error_line(capsys, e, "--guide-temperature", "server guide")
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, "commongen", tmp_path / "runs", guide="http://127.0.0.1:9/v1", guide_temperature=-1.0))
    _one_error_line(capsys, e, "--guide-temperature")


@needs_data
def test_guide_cache_runs_with_a_server_guide_at_temperature_0(tiny_model, tmp_path, monkeypatch):
    from common.server_guide import HTTPGuide
    from test_server_guide import FIXED, Server

    sent = []
    real_body = HTTPGuide.body
    monkeypatch.setattr(HTTPGuide, "body", lambda self, *a: sent.append(real_body(self, *a)) or sent[-1])
    srv = Server(tmp_path, "--fixed-text", FIXED)
    try:
        for run in ("a", "b"):
            ppo_plus_plus.main(_args(ppo_plus_plus, "commongen", tmp_path, policy_model=str(tiny_model("commongen")),
                                     run_name=run, guide=srv.url, guide_model_name="x", guide_temperature=0.0,
                                     guide_cache=str(tmp_path / "guide.jsonl"), beta=1.0))
        served = len(srv.stats()["answers"])
    finally:
        srv.stop()
    assert sent and all(b["temperature"] == 0 for b in sent)
    assert served == len(sent) // 2  # the second run's requests were all answered from the cache
    assert (tmp_path / "b" / "eval.json").is_file()


# ---------------------------------------------------------------------------------------------------
# one build per embedded model
# ---------------------------------------------------------------------------------------------------
_BUILDER = """
import sys, time
sys.path[:0] = [{repo!r}]
from common import embedded as ce
from common.tasks import get_task
cfg = ce.EmbeddedConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=2, n_positions=64, prompt_tokens=24, seq_len=40,
                        sft_steps=6, batch_size=16, length_buckets=2, warmup_steps=2, max_train_texts=300, val_texts=16)
real = ce.sft
def slow(*a, **k):
    time.sleep(float(sys.argv[1]))
    return real(*a, **k)
ce.sft = slow
em = ce.embedded_models(get_task("commongen"), sys.argv[2], cfg, log=lambda m: print(m, flush=True), progress=False)
print("RESULT", em.policy, flush=True)
"""


@needs_data
def test_a_second_process_waits_for_the_first_build_and_uses_it(tmp_path):
    data = _small_data(tmp_path, "commongen", rows=300)
    script = tmp_path / "build.py"
    script.write_text(_BUILDER.format(repo=str(REPO)))
    env = dict(__import__("os").environ, RLGF_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(script), "4", str(data)], env=env, stdout=subprocess.PIPE, text=True)
    lines = [first.stdout.readline()]
    assert lines[0].startswith("building the embedded commongen models"), lines
    second = subprocess.run([sys.executable, str(script), "0", str(data)], env=env, capture_output=True, text=True,
                            timeout=300)
    out_first = "".join(lines) + first.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "another process is building the embedded commongen models: waiting" in second.stdout
    assert "built by the other process: using them" in second.stdout
    assert not any(line.startswith("building the embedded") for line in second.stdout.splitlines())
    assert "policy SFT" not in second.stdout
    result = [line for line in (out_first + second.stdout).splitlines() if line.startswith("RESULT")]
    assert len(result) == 2 and result[0] == result[1]


def test_a_build_lock_dies_with_its_process(tmp_path):
    """No stale lock: the operating system releases it when the holder is killed (kill -9)."""
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, sys, time\nfd = os.open({str(lock)!r}, "
                               "os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said = []
    holder.kill()
    holder.wait()
    with ce.build_lock(lock, said.append, "it") as waited:
        assert not waited and not said
    assert not lock.exists()  # removed by the holder that let it go
