"""The run folder (docs/reliability.md): a signal while a checkpoint or the final results are written, --resume
with too few iterations or a damaged metrics.jsonl, a folder that cannot be written, one run per folder, and what
an error before the first checkpoint leaves. Scripts run in-process on the tiny models of tests/conftest.py
unless a signal from outside or a second process is the point."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ppo
from common import runtime as rt
from conftest import DATA, REPO, needs_data
from test_reliability import _args, _env, _jsonl, _one_error_line, _train, cg_model, no_slow_work  # noqa: F401


def _lines(err: str) -> list[str]:
    """The visible lines of stderr, without the progress bar's updates and the notes, printed once per process,
    on the metrics skipped offline (SPICE, BERTScore)."""
    return [seg for line in err.split("\n") for seg in [line.split("\r")[-1]]
            if seg.strip() and not seg.startswith("iterations:") and " skipped: " not in seg]


@pytest.fixture(scope="module")
def kept_run(tiny_model, tmp_path_factory):
    """A finished 2-iteration PPO run on CommonGen that kept its checkpoint."""
    out = tmp_path_factory.mktemp("kept")
    ppo.main(_args(ppo, tiny_model("commongen"), out, keep_checkpoint=True, save_interval=1))
    return out / "run"


def _copy(src: Path, tmp_path: Path) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(src, run)
    return run


# ---------------------------------------------------------------------------------------------------
# a signal while a checkpoint is written: the write finishes, then the run stops as elsewhere
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_checkpoint_is_written_lets_it_finish_then_stops(cg_model, tmp_path, capsys, request,
                                                                            monkeypatch, sig, code):
    # a shell without job control starts background commands with SIGINT ignored, and the scripts leave an ignored
    # signal ignored (common/errors.py): the interpreter's own handler for this test, however pytest was started
    previous = signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    request.addfinalizer(lambda: signal.signal(sig, previous))
    real_save = torch.save
    writes = {"n": 0}

    def save_with_a_signal(obj, f, *a, **k):
        if str(getattr(f, "name", "")).endswith("checkpoint.pt.tmp"):
            writes["n"] += 1
            if writes["n"] == 2:  # the second checkpoint: the signal comes half-way through the write
                import io

                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
                f.write(buf.getvalue()[len(buf.getvalue()) // 2:])
                return None
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_with_a_signal)
    with pytest.raises(SystemExit) as e:
        ppo.main(_args(ppo, cg_model, tmp_path, iterations=3, save_interval=1))
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert e.value.code == code and "Traceback" not in err, err[-2000:]
    assert _lines(err) == [f"interrupted: policy saved to {run / 'policy'}; continue from the last checkpoint with "
                           f"python ppo.py --resume {run}"]
    assert not list(run.glob("*.tmp"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2  # the write that was under way
    ppo.main(ppo.Args(resume=str(run)))
    assert "resumed from iteration 2" in capsys.readouterr().out
    assert [r["step"] for r in _train(run)] == [1, 2, 3]


@needs_data
def test_sigterm_from_outside_during_a_checkpoint_write(tiny_model, tmp_path):
    """A real process: SIGTERM arrives while torch.save writes checkpoint.pt.tmp."""
    marker = tmp_path / "writing"
    flags = ["--task", "commongen", "--policy-model", str(tiny_model("commongen")), "--data-dir", str(DATA),
             "--device", "cpu", "--iterations", "3", "--rollouts-per-iteration", "4", "--minibatch-size", "2",
             "--n-epochs", "1", "--eval-samples", "2", "--eval-interval", "3", "--save-interval", "1",
             "--output-dir", str(tmp_path), "--run-name", "run"]
    code = f"""
import io, runpy, sys, time, torch
real = torch.save
def slow(obj, f, *a, **k):
    if not str(getattr(f, "name", "")).endswith("checkpoint.pt.tmp"):
        return real(obj, f, *a, **k)
    buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    open({str(marker)!r}, "w").close()
    time.sleep(3)
    f.write(data[len(data) // 2:])
torch.save = slow
sys.argv = ["ppo.py", *{flags!r}]
runpy.run_path("ppo.py", run_name="__main__")
"""
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    run = tmp_path / "run"
    assert p.returncode == 143 and "Traceback" not in err, (p.returncode, err[-2000:])
    assert f"continue from the last checkpoint with python ppo.py --resume {run}" in err
    assert not list(run.glob("*.tmp"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 1


# ---------------------------------------------------------------------------------------------------
# after the last iteration: an interruption says what is kept, and --resume writes the results
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("final_eval_samples", [None, 3])  # the final evaluation: the last periodic one, or its own
@pytest.mark.parametrize("stop_in", ["evaluate_end", "save_final"])  # before the final evaluation is logged, after
def test_sigterm_after_the_last_iteration_keeps_the_run_and_resume_writes_its_results(cg_model, tmp_path, capsys,
                                                                                     monkeypatch, stop_in,
                                                                                     final_eval_samples):
    """The resumed run's metrics.jsonl is an uninterrupted run's: every evaluation once (the last periodic one
    included, where the final evaluation has prompts of its own), and eval.json's final values are the final line's."""
    real = getattr(rt, stop_in)

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM was not raised")

    monkeypatch.setattr(rt, stop_in, terminated)
    with pytest.raises(SystemExit) as e:
        ppo.main(_args(ppo, cg_model, tmp_path, iterations=2, final_eval_samples=final_eval_samples))
    monkeypatch.setattr(rt, stop_in, real)
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert e.value.code == 143 and "Traceback" not in err, err[-2000:]
    assert _lines(err) == [f"interrupted after the last iteration (2), while writing the final evaluation and "
                           f"policy: every iteration is in checkpoint.pt; python ppo.py --resume {run} writes them"]
    assert not (run / "eval.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2
    before = _jsonl(run / "metrics.jsonl")

    ppo.main(ppo.Args(resume=str(run)))
    assert "resumed from iteration 2" in capsys.readouterr().out
    assert (run / "eval.json").is_file() and (run / "policy").is_dir() and not (run / "checkpoint.pt").exists()
    after = _jsonl(run / "metrics.jsonl")
    ppo.main(_args(ppo, cg_model, tmp_path / "whole", iterations=2, final_eval_samples=final_eval_samples))
    whole = _jsonl(tmp_path / "whole" / "run" / "metrics.jsonl")

    def evaluations(rows):  # every line but the iterations' (whose times differ between two runs)
        return [r for r in rows if "objective/reward" not in r]

    assert [r["step"] for r in after] == [r["step"] for r in whole]
    assert evaluations(after) == evaluations(whole)  # the last periodic evaluation and the final one, once each
    if stop_in == "save_final":
        assert after == before  # the final evaluation was logged before the signal: logged again, the same
    tag = "eval" if final_eval_samples is None else "final_eval"
    assert json.loads((run / "eval.json").read_text())["final"]["reward"] == after[-1][f"{tag}/reward"]
    assert sum("eval/reward" in r for r in after) == 3  # before training, after iteration 1, after iteration 2


# ---------------------------------------------------------------------------------------------------
# --resume: too few iterations, a complete run, a damaged metrics.jsonl
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("iterations,words", [(1, "has done 2 iterations, more than --iterations 1"),
                                              (None, "already complete (2 iterations")])
def test_resume_with_no_iteration_left_is_refused(kept_run, tmp_path, capsys, iterations, words):
    run = _copy(kept_run, tmp_path)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    kw = {} if iterations is None else {"iterations": iterations}
    with pytest.raises(SystemExit) as e:
        ppo.main(ppo.Args(resume=str(run), **kw))
    _one_error_line(capsys, e, 2, words, "give --iterations above 2")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing rewritten


@needs_data
def test_a_partial_last_line_of_metrics_is_dropped_on_resume(kept_run, tmp_path, capsys):
    run = _copy(kept_run, tmp_path)
    jsonl = run / "metrics.jsonl"
    whole = jsonl.read_text()
    jsonl.write_text(whole + '{"step": 3, "objective/rew')  # what a kill in the middle of a write leaves
    capsys.readouterr()
    ppo.main(ppo.Args(resume=str(run), iterations=3))
    out = capsys.readouterr().out
    n = len(whole.splitlines()) + 1
    assert f"metrics.jsonl: dropped 1 incomplete line(s) (line {n})" in out
    assert [r["step"] for r in _train(run)] == [1, 2, 3]  # every line parses


# ---------------------------------------------------------------------------------------------------
# a folder that cannot be written: one line, before any model
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_model(cg_model, tmp_path, capsys,
                                                                             no_slow_work):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        ppo.main(_args(ppo, cg_model, tmp_path / "file" / "runs"))
    _one_error_line(capsys, e, 2, "cannot create the run folder", "--output-dir")


@pytest.mark.parametrize("resume", [False, True])
def test_a_read_only_folder_is_one_line_before_any_model(tmp_path, capsys, monkeypatch, no_slow_work, resume):
    """Root writes anywhere, so the permission is denied through os.access (below: the real thing, non-root)."""
    out = tmp_path / "runs"
    (out / "run").mkdir(parents=True)
    if resume:
        (out / "run" / "args.json").write_text(json.dumps({"script": "ppo", **dataclasses.asdict(ppo.Args())}))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out / "run" else real(p, mode, **k))
    args = ppo.Args(resume=str(out / "run")) if resume else ppo.Args(output_dir=str(out), run_name="run")
    with pytest.raises(SystemExit) as e:
        ppo.main(args)
    _one_error_line(capsys, e, 2, f"run folder {out / 'run'} cannot be written", "permission denied")
    assert not (out / "run" / ".lock").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_really_read_only_output_folder(tmp_path, capsys, no_slow_work):
    out = tmp_path / "runs"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            ppo.main(ppo.Args(output_dir=str(out), run_name="run"))
        _one_error_line(capsys, e, 2, "cannot create the run folder")
    finally:
        out.chmod(0o755)


# ---------------------------------------------------------------------------------------------------
# one run per folder
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_a_folder_held_by_a_live_run_is_refused_and_freed_by_its_death(cg_model, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            ppo.main(_args(ppo, cg_model, tmp_path, iterations=1))
        _one_error_line(capsys, e, 2, "another run is using it", f"process {holder.pid}", "--run-name")
        (run / "args.json").write_text(json.dumps({"script": "ppo", **dataclasses.asdict(ppo.Args())}))
        with pytest.raises(SystemExit) as e:
            ppo.main(ppo.Args(resume=str(run)))
        _one_error_line(capsys, e, 2, "that run is still running", f"process {holder.pid}")
        (run / "args.json").unlink()
    finally:
        holder.kill()
        holder.wait()
    assert ppo.main(_args(ppo, cg_model, tmp_path, iterations=1)) is not None  # the OS let the lock go
    assert not (run / ".lock").exists()


@needs_data
def test_two_runs_started_at_once_with_one_name_share_no_folder(tiny_model, tmp_path):
    flags = ["--task", "commongen", "--policy-model", str(tiny_model("commongen")), "--data-dir", str(DATA),
             "--device", "cpu", "--iterations", "1", "--rollouts-per-iteration", "4", "--minibatch-size", "2",
             "--n-epochs", "1", "--eval-samples", "2", "--output-dir", str(tmp_path), "--run-name", "same"]
    procs = [subprocess.Popen([sys.executable, "ppo.py", *flags, "--seed", str(seed)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [(r[0], r[2][-1500:]) for r in results]
    refused = next(r for r in results if r[0] == 2)
    lines = _lines(refused[2])
    assert len(lines) == 1 and lines[0].startswith("error: run folder") and "Traceback" not in refused[2], lines
    assert "another run is using it" in lines[0] or "already holds a run" in lines[0], lines
    winner = next(i for i, r in enumerate(results) if r[0] == 0) + 1
    assert json.loads((tmp_path / "same" / "args.json").read_text())["seed"] == winner
    records = _jsonl(tmp_path / "same" / "metrics.jsonl")  # one run's: an evaluation at 0 and 1, iteration 1
    assert [r["step"] for r in _train(tmp_path / "same")] == [1]
    assert [r["step"] for r in records if "eval/reward" in r] == [0, 1]


# ---------------------------------------------------------------------------------------------------
# an error that stops the run: what is kept, said in its one line
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("failure,at", [("nan reward", 1), ("guide down", 1), ("nan reward", 2)])
def test_an_error_in_the_loop_says_what_is_kept_and_cleans_up_without_a_checkpoint(cg_model, tmp_path, capsys,
                                                                                   monkeypatch, failure, at):
    calls = {"n": 0}

    def reward(prompts, responses, references):
        calls["n"] += 1  # call 1: first evaluation, then per iteration: the rollouts, the evaluation
        if calls["n"] == 2 * at:
            if failure == "guide down":  # what a guide server that stops answering raises
                raise rt.UsageError("the guide server http://127.0.0.1:9/v1 does not answer (connection refused)")
            return [float("nan")] * len(responses)
        return [0.01 * len(r) for r in responses]

    monkeypatch.setattr(rt, "make_reward", lambda *a, **k: reward)
    args = _args(ppo, cg_model, tmp_path, iterations=3, save_interval=1)
    with pytest.raises(SystemExit) as e:
        ppo.main(args)
    run = tmp_path / "run"
    line = _one_error_line(capsys, e, 2 if failure == "guide down" else 1)
    if at == 1:
        assert line.endswith("; nothing was checkpointed yet: the run folder is removed, so the same command can "
                             "run again"), line
        assert not run.exists()
        monkeypatch.setattr(rt, "make_reward", lambda *a, **k: lambda p, r, refs: [0.01 * len(x) for x in r])
        assert ppo.main(args) is not None  # the same command runs again
    else:
        assert line.endswith(f"; the checkpoint of iteration 1 is kept (python ppo.py --resume {run} continues "
                             "from it)"), line
        assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 1
        assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------------
# a run folder written by the earlier layout of the scripts
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_resume_reads_a_flat_args_json_and_refuses_an_earlier_checkpoint_in_one_line(kept_run, tmp_path, capsys):
    """args.json is one flat object of every setting (the settings groups' fields beside the script's own), as the
    earlier scripts wrote it; a checkpoint whose keys an earlier layout wrote (the KL controller as "kl_coef") is
    refused in one line instead of resumed wrongly."""
    saved = json.loads((kept_run / "args.json").read_text())
    assert saved["script"] == "ppo" and {"lr", "lora_r", "resume", "eval_decoding", "seed"} <= saved.keys()
    assert not any(isinstance(v, dict) for v in saved.values())
    run = _copy(kept_run, tmp_path)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["kl_ctl"]["value"] == saved["kl_coef"]
    ck["kl_coef"] = ck.pop("kl_ctl")["value"]  # the earlier layout
    torch.save(ck, run / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        ppo.main(ppo.Args(resume=str(run), iterations=3))
    _one_error_line(capsys, e, 2, "checkpoint.pt has no kl_ctl", "start a new run")
