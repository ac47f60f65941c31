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
