"""Resume, interruptions, checkpoints, one-line refusals, the embedded models' cache and the random streams
(docs/reliability.md). Scripts run in-process on the tiny models of tests/conftest.py unless a signal needs a
real process."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aggrevated
import d2lols
import lols
import ppo
import ppo_plus_plus
from common import embedded as cm
from common import resume
from common import runtime as rt
from common import settings
from common.errors import Terminated
from common.tasks import get_task
from conftest import DATA, REPO, needs_data

SCRIPTS = {"ppo": ppo, "ppo_plus_plus": ppo_plus_plus, "aggrevated": aggrevated, "lols": lols, "d2lols": d2lols}


def _args(mod, model: Path, out: Path, **kw):
    base = dict(task="commongen", policy_model=str(model), data_dir=str(DATA), output_dir=str(out), run_name="run",
                iterations=2, rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2,
                eval_interval=1, device="cpu")
    if mod is not ppo:
        base["guide"] = "rule"
    base.update(kw)
    return mod.Args(**base)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(run_dir: Path) -> list[dict]:
    return [r for r in _jsonl(run_dir / "metrics.jsonl") if "objective/reward" in r]


def _one_error_line(capsys, exc, code: int = 2, *words) -> str:
    """Exit status `code`, no traceback, and one visible line on stderr (besides the iterations' progress bar,
    whose updates are carriage returns) that starts with `error:` and holds `words`."""
    err = capsys.readouterr().err
    lines = [seg for line in err.split("\n") for seg in [line.split("\r")[-1]]
             if seg.strip() and not seg.startswith("iterations:")]
    assert exc.value.code == code, (exc.value.code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def cg_model(tiny_model, capsys):
    """The tiny CommonGen model's folder; what building it printed is cleared."""
    path = tiny_model("commongen")
    capsys.readouterr()
    return path


@pytest.fixture
def no_slow_work(monkeypatch):
    """Loading models fails the test: the refusals must come before it."""
    def touched(*a, **k):
        raise AssertionError("a model was resolved or built before the settings were checked")

    monkeypatch.setattr(rt, "resolve_models", touched)
    monkeypatch.setattr(rt, "build_policy_ref_critic", touched)


# ---------------------------------------------------------------------------------------------------
# every bad setting: one `error:` line, exit status 2, before any model is touched
# ---------------------------------------------------------------------------------------------------
BAD = [
    (dict(iterations=0), "--iterations"), (dict(iterations=-3), "--iterations"),
    (dict(eval_interval=0), "--eval-interval"), (dict(save_interval=0), "--save-interval"),
    (dict(minibatch_size=0), "--minibatch-size"), (dict(micro_batch_size=0), "--micro-batch-size"),
    (dict(rollouts_per_iteration=6, minibatch_size=4), "--minibatch-size"),
    (dict(n_epochs=0), "--n-epochs"), (dict(eval_samples=0), "--eval-samples"),
    (dict(temperature=0.0), "--temperature"), (dict(lr=-1.0), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(seed=-1), "--seed"), (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(min_new_tokens=30, max_new_tokens=20), "exceeds"), (dict(gamma=1.5), "--gamma"),
    (dict(kl_estimator="k2"), "kl-estimator"), (dict(lr_schedule="cosine"), "lr-schedule"),
    (dict(device="tpu"), "--device"), (dict(reward_model="some/model"), "--reward-model"),
    (dict(policy_model="./no-such-model"), "does not exist"),
]
GUIDED_BAD = [(dict(task="imdb", guide="rule"), "--guide rule"), (dict(guide="oracle"), "--guide"),
              (dict(beta=1.5), "--beta"), (dict(guide_top_p=2.0), "--guide-top-p")]


@needs_data
@pytest.mark.parametrize("algo", list(SCRIPTS))
@pytest.mark.parametrize("kw,words", BAD + GUIDED_BAD + [(dict(device="cuda"), "CUDA")],
                         ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else None)
def test_bad_setting_is_one_line_before_any_model(cg_model, tmp_path, capsys, no_slow_work, algo, kw, words):
    mod = SCRIPTS[algo]
    if (kw, words) in GUIDED_BAD and mod is ppo:
        pytest.skip("ppo has no guide")
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, cg_model, tmp_path / "runs", **kw))
    _one_error_line(capsys, e, 2, words)
    assert not (tmp_path / "runs").exists(), "a run folder was written before the refusal"


def _small_data(tmp_path: Path, rows: int = 200, val_rows: int = 20) -> Path:
    """A data folder with the first rows of CommonGen's train and validation files."""
    out = tmp_path / "data"
    (out / "common_gen").mkdir(parents=True)
    for name, n in (("train.jsonl", rows), ("validation.jsonl", val_rows)):
        with open(DATA / "common_gen" / name) as f:
            lines = [next(f) for _ in range(n)]
        (out / "common_gen" / name).write_text("".join(lines))
    return out


@needs_data
@pytest.mark.parametrize("algo", list(SCRIPTS))
@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing field"])
def test_bad_data_is_one_line_naming_file_and_line(cg_model, tmp_path, capsys, no_slow_work, algo, damage):
    data = _small_data(tmp_path)
    path = data / "common_gen" / "train.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "corrupt":
        lines[6] = lines[6][:30] + "\x01" + lines[6][30:]  # a control character inside a string, line 7
        words = (str(path), "line 7")
    elif damage == "truncated":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
        words = (str(path), f"line {len(lines)}")
    else:
        row = json.loads(lines[2])
        del row["target"]
        lines[2] = json.dumps(row) + "\n"
        words = (str(path), "line 3", "'target'")
    path.write_text("".join(lines))
    mod = SCRIPTS[algo]
    with pytest.raises(SystemExit) as e:
        mod.main(_args(mod, cg_model, tmp_path / "runs", data_dir=str(data)))
    _one_error_line(capsys, e, 2, *words)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """A 2-iteration PPO run on CommonGen that kept its checkpoint, with settings off the defaults."""
    out = tmp_path_factory.mktemp("finished")
    args = _args(ppo, tiny_model("commongen"), out, lr=1e-3, lr_schedule="constant", kl_coef=0.01,
                 keep_checkpoint=True, save_interval=1)
    ppo.main(args)
    return out / "run", args


@needs_data
def test_resume_with_the_documented_command_restores_the_settings(finished_run, tmp_path, capsys):
    """`python ppo.py --resume RUN --iterations 3`: the run's own task, model, data and settings, not the
    defaults; the one change said in one line; the same numbers as an uninterrupted 3-iteration run."""
    src, args = finished_run
    run = tmp_path / "copy"
    shutil.copytree(src, run)
    capsys.readouterr()
    ppo.main(ppo.Args(resume=str(run), iterations=3))
    out = capsys.readouterr().out
    assert "resumed from iteration 2" in out
    assert "except --iterations 3 (was 2)" in out
    saved = json.loads((run / "args.json").read_text())
    assert saved["script"] == "ppo" and saved["task"] == "commongen" and saved["lr"] == 1e-3
    assert saved["iterations"] == 3 and saved["policy_model"] == args.policy_model
    assert [r["step"] for r in _train(run)] == [1, 2, 3]
    assert (run / "checkpoint.pt").is_file()  # keep_checkpoint came back with the settings

    straight = ppo.Args(**{**args.__dict__, "iterations": 3, "output_dir": str(tmp_path / "straight")})
    ppo.main(straight)
    a, b = _train(run), _train(tmp_path / "straight" / "run")
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == rb[k] or (math.isnan(ra[k]) and math.isnan(rb[k])), (ra["step"], k, ra[k], rb[k])


def test_resume_refuses_a_changed_setting_and_allows_the_documented_ones(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    old = {"script": "ppo", **{k: v for k, v in ppo.Args().__dict__.items()}, "task": "tldr", "lr": 1e-4,
           "iterations": 5, "eval_interval": 5}
    (run / "args.json").write_text(json.dumps(old))
    args = resume.resume_settings(ppo.Args(resume=str(run), iterations=9, eval_interval=3), "ppo")
    assert (args.task, args.lr, args.iterations, args.eval_interval) == ("tldr", 1e-4, 9, 3)
    assert "--iterations 9 (was 5), --eval-interval 3 (was 5)" in capsys.readouterr().out
    with pytest.raises(rt.UsageError, match=r"--lr was 0.0001 in that run, not 0.002") as e:
        resume.resume_settings(ppo.Args(resume=str(run), lr=2e-3), "ppo")
    assert "\n" not in str(e.value)
    # named on the command line at its default value: given, so refused too (tldr run, --task imdb is the default)
    monkeypatch.setattr(rt, "_CLI_GIVEN", {"task", "resume"})
    with pytest.raises(rt.UsageError, match="--task was 'tldr'"):
        resume.resume_settings(ppo.Args(resume=str(run), task="imdb"), "ppo")


@pytest.mark.parametrize("made_by,resumed_with", [("ppo", "lols"), ("lols", "ppo"), ("d2lols", "aggrevated"),
                                                  ("ppo_plus_plus", "d2lols")])
def test_resume_refuses_another_scripts_folder(tmp_path, capsys, no_slow_work, made_by, resumed_with):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"script": made_by, **SCRIPTS[made_by].Args().__dict__}))
    with pytest.raises(SystemExit) as e:
        SCRIPTS[resumed_with].main(SCRIPTS[resumed_with].Args(resume=str(run)))
    _one_error_line(capsys, e, 2, f"made by {made_by}.py", f"not {resumed_with}.py")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


@needs_data
@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "malicious", "a list"])
def test_resume_refuses_a_damaged_or_malicious_checkpoint(finished_run, tmp_path, capsys, damage):
    src, _ = finished_run
    run = tmp_path / "copy"
    shutil.copytree(src, run)
    ck = run / "checkpoint.pt"
    data = ck.read_bytes()
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ck.write_bytes(b"")
    elif damage == "random":
        ck.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "malicious":
        _Evil.marker = marker
        torch.save({"script": "ppo", "iteration": 1, "x": _Evil()}, ck)
    else:
        torch.save([1, 2, 3], ck)
    with pytest.raises(SystemExit) as e:
        ppo.main(ppo.Args(resume=str(run)))
    _one_error_line(capsys, e, 2, str(run))
    assert not marker.exists(), "loading the checkpoint ran code"
    if damage == "malicious":  # the file is what it claims: loaded without weights_only, it runs its command
        torch.load(ck, weights_only=False)
        assert marker.exists()


def test_checkpoint_round_trips_under_weights_only(tmp_path):
    random.seed(3)
    import numpy as np

    np.random.seed(4)
    torch.manual_seed(5)
    state = rt.rng_state()
    sampler = rt.PromptSampler(10, rt.derive_seed(1, "prompts"))
    sampler.next(3)
    rt.save_checkpoint(tmp_path / "c.pt", {"rng": state, "sampler": sampler.state_dict(), "mix": random.Random(2).getstate()})
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    resume.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    other = rt.PromptSampler(10, 0)
    other.load_state_dict(loaded["sampler"])
    assert other.next(12) == sampler.next(12)
    assert not list(tmp_path.glob("*.tmp"))


@needs_data
def test_reused_run_name_is_refused_and_a_finished_run_drops_its_checkpoint(cg_model, tmp_path, capsys):
    args = _args(ppo, cg_model, tmp_path, iterations=1)
    ppo.main(args)
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert not (run / "checkpoint.pt").exists() and "checkpoint.pt deleted" in out
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        ppo.main(args)
    _one_error_line(capsys, e, 2, "already holds a run", f"--resume {run}")
    assert (run / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------------
# interruptions and failures
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_ctrl_c_in_the_first_evaluation_leaves_nothing_and_the_command_runs_again(tiny_model, tmp_path, capsys,
                                                                                  monkeypatch):
    args = _args(ppo, tiny_model("commongen"), tmp_path, iterations=1)
    real = rt.evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rt, "evaluate", interrupted)
    with pytest.raises(SystemExit) as e:
        ppo.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err and "nothing to resume" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(rt, "evaluate", real)
    assert ppo.main(args) is not None


@needs_data
@pytest.mark.parametrize("failure", ["nan reward", "reward raises", "nan loss"])
def test_a_failing_reward_or_nan_loss_stops_in_one_line_keeping_the_last_checkpoint(cg_model, tmp_path, capsys,
                                                                                 monkeypatch, failure):
    calls = {"n": 0}

    def reward(prompts, responses, references):
        calls["n"] += 1  # call 1: first evaluation, 2: iteration 1, 3: its evaluation, 4: iteration 2
        if calls["n"] == 4 and failure == "nan reward":
            return [float("nan")] * len(responses)
        if calls["n"] == 4 and failure == "reward raises":
            raise ZeroDivisionError("division by zero")
        return [0.01 * len(r) for r in responses]

    monkeypatch.setattr(rt, "make_reward", lambda *a, **k: reward)
    if failure == "nan loss":
        real = ppo.masked_whiten
        monkeypatch.setattr(ppo, "masked_whiten",
                            lambda x, m, w=1: real(x, m, w) * (float("nan") if calls["n"] >= 4 else 1.0))
    with pytest.raises(SystemExit) as e:
        ppo.main(_args(ppo, cg_model, tmp_path, iterations=3, save_interval=1))
    _one_error_line(capsys, e, 1, "iteration 2")
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 1


@needs_data
def test_a_kill_while_writing_the_checkpoint_leaves_the_previous_one_loadable(tiny_model, tmp_path, capsys,
                                                                            monkeypatch):
    real_save = torch.save
    writes = {"n": 0}

    def dying_save(obj, f, *a, **k):
        if hasattr(f, "write") and str(getattr(f, "name", "")).endswith("checkpoint.pt.tmp"):
            writes["n"] += 1
            if writes["n"] == 2:  # the second checkpoint: half written, then the process "dies"
                import io

                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                raise Terminated()
        return real_save(obj, f, *a, **k)

    args = _args(ppo, tiny_model("commongen"), tmp_path, iterations=3, save_interval=1, keep_checkpoint=True)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit) as e:
        ppo.main(args)
    assert e.value.code == 143
    monkeypatch.setattr(torch, "save", real_save)
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 1
    capsys.readouterr()
    ppo.main(ppo.Args(resume=str(run)))
    assert "resumed from iteration 1" in capsys.readouterr().out
    assert [r["step"] for r in _train(run)] == [1, 2, 3]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


@needs_data
def test_sigterm_mid_run_then_resume_gives_the_uninterrupted_numbers(tiny_model, tmp_path):
    model = tiny_model("commongen")
    flags = ["--task", "commongen", "--policy-model", str(model), "--data-dir", str(DATA), "--device", "cpu",
             "--iterations", "6", "--rollouts-per-iteration", "4", "--minibatch-size", "2", "--n-epochs", "1",
             "--eval-samples", "2", "--final-eval-samples", "2", "--eval-interval", "3", "--save-interval", "1",
             "--lr", "1e-3",
             "--kl-coef", "0.01", "--output-dir", str(tmp_path)]
    p = subprocess.Popen([sys.executable, "ppo.py", *flags, "--run-name", "cut"], cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ck.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, (p.returncode, err[-2000:])
    assert "Traceback" not in err and f"--resume {tmp_path / 'cut'}" in err
    done = torch.load(ck, weights_only=True)["iteration"]
    assert done < 6
    r = subprocess.run([sys.executable, "ppo.py", "--resume", str(tmp_path / "cut")], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from iteration {done}" in r.stdout

    # the uninterrupted run, in this process with the same (single) thread
    straight = ppo.Args(task="commongen", policy_model=str(model), data_dir=str(DATA), device="cpu", iterations=6,
                        rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2, eval_interval=3,
                        save_interval=1, lr=1e-3, kl_coef=0.01, output_dir=str(tmp_path), run_name="straight")
    ppo.main(straight)
    a, b = _jsonl(tmp_path / "cut" / "metrics.jsonl"), _jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])


# ---------------------------------------------------------------------------------------------------
# random streams
# ---------------------------------------------------------------------------------------------------
def test_random_streams_differ_by_seed_rank_and_purpose():
    purposes = ("torch", "mix", "phase", "prompts")
    seeds = {(s, p, r): rt.derive_seed(s, p, r) for s in range(20) for p in purposes for r in (None, 0, 1, 2, 3)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())
    for s in range(20):  # the first draws of rank 1's mixing stream and the shared coin no longer coincide
        assert rt.rng_stream(s, "mix", 1).random() != rt.rng_stream(s, "phase").random()
        assert rt.rng_stream(s, "mix", 1).random() == rt.rng_stream(s, "mix", 1).random()


@needs_data
def test_lols_draws_each_stream_from_seed_rank_and_purpose(tiny_model, tmp_path, monkeypatch):
    calls, derived = [], []
    real_stream, real_derive = rt.rng_stream, rt.derive_seed
    monkeypatch.setattr(rt, "rng_stream", lambda *a: calls.append(a) or real_stream(*a))
    monkeypatch.setattr(rt, "derive_seed", lambda *a: derived.append(a) or real_derive(*a))
    lols.main(_args(lols, tiny_model("commongen"), tmp_path, iterations=1, seed=7))
    assert sorted(calls) == [(7, "mix", 0), (7, "phase")]
    assert (7, "torch", 0) in derived and (7, "prompts") in derived


# ---------------------------------------------------------------------------------------------------
# embedded models: deterministic, keyed by content, rebuilt on request, never half-written
# ---------------------------------------------------------------------------------------------------
TINY = cm.EmbeddedConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=2, n_positions=64, prompt_tokens=24,
                         seq_len=40, sft_steps=6, batch_size=16, length_buckets=2, warmup_steps=2,
                         max_train_texts=300, val_texts=16)


def _weights(folder: str) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@needs_data
def test_embedded_build_gives_the_same_weights_under_any_thread_count(tmp_path, monkeypatch):
    data = _small_data(tmp_path, rows=400)
    task = get_task("commongen")
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("RLGF_CACHE_DIR", str(tmp_path / "a"))
        torch.set_num_threads(1)
        a = cm.embedded_models(task, str(data), TINY, log=lambda *x: None, progress=False)
        monkeypatch.setenv("RLGF_CACHE_DIR", str(tmp_path / "b"))
        torch.set_num_threads(2)
        b = cm.embedded_models(task, str(data), TINY, log=lambda *x: None, progress=False)
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(threads)
    wa, wb = _weights(a.policy), _weights(b.policy)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    info = json.loads((Path(a.policy).parent / "info.json").read_text())
    assert info["policy_sft"]["steps"] == TINY.sft_steps and info["build_seconds"] > 0


@needs_data
def test_embedded_cache_is_keyed_by_content_rebuilds_on_request_and_is_never_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("RLGF_CACHE_DIR", str(tmp_path / "cache"))
    task = get_task("commongen")
    data = _small_data(tmp_path, rows=300)
    copy = tmp_path / "elsewhere"
    shutil.copytree(data, copy)
    assert cm._key(task, TINY, str(data)) == cm._key(task, TINY, str(copy))
    edited = tmp_path / "edited"
    shutil.copytree(data, edited)
    with open(edited / "common_gen" / "train.jsonl", "a") as f:
        f.write('{"concept_set_idx": 99999, "concepts": ["a", "b"], "target": "a b."}\n')
    assert cm._key(task, TINY, str(edited)) != cm._key(task, TINY, str(data))

    # a build interrupted in its SFT leaves nothing behind; a killed build's folder goes at the next build
    real_sft = cm.sft
    monkeypatch.setattr(cm, "sft", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cm.embedded_models(task, str(data), TINY, log=lambda *x: None, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "cache" / f".commongen-{cm._key(task, TINY, str(data))}-pid{dead.pid}.building"
    (stale / "policy").mkdir(parents=True)
    monkeypatch.setattr(cm, "sft", real_sft)
    built = cm.embedded_models(task, str(data), TINY, log=lambda *x: None, progress=False)
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(built.policy).parent.name]
    # the copy finds the same models; --rebuild-models builds them again (same weights)
    same = cm.embedded_models(task, str(copy), TINY, log=lambda *x: (_ for _ in ()).throw(AssertionError(x)))
    assert same.policy == built.policy
    first = _weights(built.policy)
    stamp = (Path(built.policy).parent / "info.json").stat().st_mtime_ns
    again = cm.embedded_models(task, str(data), TINY, log=lambda *x: None, rebuild=True, progress=False)
    assert (Path(again.policy).parent / "info.json").stat().st_mtime_ns != stamp
    second = _weights(again.policy)
    assert all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,task,beta", [("ppo", "imdb", None), ("ppo_plus_plus", "commongen", "0.8"),
                                            ("lols", "tldr", "0.8")])
def test_help_shows_the_tasks_values_in_titled_groups(monkeypatch, capsys, algo, task, beta):
    """--help: the script's own settings first (the algorithm's), then the run, model and guide groups under their
    titles; every default shown is the value a run of that task would take (its preset), none is None."""
    from common.presets import EMBEDDED

    mod = SCRIPTS[algo]
    monkeypatch.setattr(sys, "argv", [f"{algo}.py", "--task", task, "--help"])
    monkeypatch.setenv("COLUMNS", "110")  # one column of boxes, in order
    with pytest.raises(SystemExit) as e:
        settings.cli(mod.Args, mod.__doc__, mod.PRESET_ALIASES)
    assert e.value.code == 0
    out = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    assert " ".join(mod.__doc__.split("\n\n")[0].split()) in out
    assert f"the embedded preset for {task}" in out
    own, rest = out.split("-h, --help", 1)[1].split("run options", 1)
    assert "--iterations INT" in own and "--lr FLOAT" in own and "--lora-r" not in own and "--resume" not in own
    assert "model options" in rest and "--lora-r INT" in rest.split("model options", 1)[1]
    assert ("guide options" in rest) == (beta is not None)
    for flag in ("iterations", "lr", "max_new_tokens", "eval_samples"):
        shown = out.split(f"--{flag.replace('_', '-')} ", 1)[1].split("(default: ", 1)[1].split(")", 1)[0]
        assert float(shown) == EMBEDDED[task][flag], (flag, shown)
    assert "--slow-metrics" in out and "--keep-checkpoint" in out and "--rebuild-models" in out
    if beta:
        assert f"(default: {beta})" in out.split("--beta", 1)[1].split("--", 1)[0]


def test_cli_notes_the_flags_given(monkeypatch):
    monkeypatch.setattr(rt, "_CLI_GIVEN", None)  # put back after the test
    monkeypatch.setattr(sys, "argv", ["ppo.py", "--task", "imdb", "--no-bf16", "--lr=0.1", "--resume", "x"])
    args = settings.cli(ppo.Args, ppo.__doc__, ppo.PRESET_ALIASES)
    assert isinstance(args, ppo.Args) and args.lr == 0.1 and args.resume == "x" and args.bf16 is False
    assert rt._CLI_GIVEN == {"task", "bf16", "lr", "resume"}


@pytest.mark.parametrize("flag,value", [("--lr-schedule", "cosine"), ("--kl-estimator", "k2"),
                                        ("--eval-decoding", "nucleus")])
def test_a_bad_choice_on_the_command_line_is_one_line(flag, value):
    """A field with a fixed set of choices (a Literal) named with another value: one `error:` line naming the
    choices, exit 2, before anything is loaded (not the parser's box)."""
    p = subprocess.run([sys.executable, "ppo.py", flag, value], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "RLGF_DATA_DIR": str(DATA)}, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag} must be "), p.stderr
    assert value in lines[0] and "╭" not in p.stderr
