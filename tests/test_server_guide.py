"""The guide as a server: `--guide http://127.0.0.1:PORT/v1` against a real OpenAI-compatible server process
(tests/openai_server.py, started on a free port of 127.0.0.1 and stopped at the end), and the guide's own
end of text (`finished`) carried through `guide_continue`.

The model server serves a tiny GPT-2 whose every sample is " the" (tests/_tiny.py favour_token); the fixed
server answers a fixed text without any model (it starts at once), and fails on demand (HTTP 503, garbage,
exit after N answers). llama-cpp-python has no wheel for this machine (`pip download --only-binary=:all:`
finds none), so no llama.cpp server is tested.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from _tiny import DATA, REPO, build_tiny, favour_token, has_data  # noqa: F401  (also puts the repo on sys.path)
from test_guided import T_TEXT, analyse, phase_of, run_recorded, script_args, t_id  # noqa: E402

import aggrevated  # noqa: E402
import ppo_plus_plus  # noqa: E402
from common import guides  # noqa: E402
from common.errors import UsageError  # noqa: E402
from common.generation import decode  # noqa: E402
from common.guides import CallableGuide, HFGuide, guide_continue, guide_metrics  # noqa: E402
from common.models import load_tokenizer  # noqa: E402
from common.server_guide import GuideError, HTTPGuide, ServerOptions  # noqa: E402

TASKS = ("imdb", "commongen", "tldr")
SCRIPTS = {"ppo_plus_plus": ppo_plus_plus, "aggrevated": aggrevated}
FIXED = " a fixed answer."
SERVER = REPO / "tests" / "openai_server.py"

pytestmark = pytest.mark.skipif(not all(has_data(t) for t in TASKS),
                                reason=f"local data folder {DATA} (imdb, common_gen, openai_summarize_tldr) is absent")


# ---------------------------------------------------------------------------------------------------
# the server process
# ---------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, tmp: Path, *args: str, port: int = 0, wait_s: float = 180.0):
        port_file = tmp / f"port-{time.monotonic_ns()}"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(tmp / f"server-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), "--port-file", str(port_file),
                                      *args], env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + wait_s
        while not port_file.exists():
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"test server exited: {self.log.read()[-2000:]}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _get(self, path: str, data: bytes | None = None) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data), timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self._get("/stats")

    def reset(self) -> None:
        self._get("/stats/reset", data=b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """folders(task, kind) -> model folder: 'plain' (random learner) or 'guideT' (writes only T_TEXT)."""
    cache: dict = {}

    def make(task: str, kind: str = "plain") -> Path:
        if (task, kind) not in cache:
            out = tmp_path_factory.mktemp(f"srv-{task}-{kind}")
            cache[(task, kind)] = build_tiny(task, out, seed=0 if kind == "plain" else 1,
                                             favour=T_TEXT if kind == "guideT" else None)
        return cache[(task, kind)]

    return make


@pytest.fixture(scope="module")
def model_server(folders, tmp_path_factory):
    """One server for the module: the IMDB " the" model (any learner re-tokenises its text)."""
    srv = Server(tmp_path_factory.mktemp("model-server"), "--model", str(folders("imdb", "guideT")), "--name", "tiny-the")
    yield srv
    srv.stop()


@pytest.fixture
def fixed_server(tmp_path):
    """fixed_server(*flags) -> a started fixed-text server, stopped after the test."""
    started = []

    def start(*flags, port: int = 0):
        srv = Server(tmp_path, "--fixed-text", FIXED, *flags, port=port)
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


def learner_tok(folders, task: str = "imdb"):
    return load_tokenizer(str(folders(task)))


def retok(tok, text: str) -> list[int]:
    special = {tok.pad_token_id, tok.eos_token_id}
    return [t for t in tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if t not in special]


# ---------------------------------------------------------------------------------------------------
# 1. every task, PPO++ and AggreVaTeD, two iterations with the server as the guide
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_scripts_with_server_guide(folders, model_server, tmp_path, monkeypatch, algo, task):
    """The guide's tokens in the rollouts are exactly the server's answers, re-tokenised by the learner and cut
    to the budget (no EOS: the server stopped at max_tokens), and the server never had more than
    --guide-max-concurrency requests in flight. The API key reaches the server and nowhere else."""
    from common.tasks import get_task

    learner = folders(task)
    tok, T = load_tokenizer(str(learner)), t_id(learner)
    max_new = get_task(task).max_new_tokens
    eos = tok.eos_token_id
    monkeypatch.setenv("RLGF_TEST_GUIDE_KEY", "sekrit-123")
    model_server.reset()
    args = script_args(SCRIPTS[algo], task, learner, tmp_path, guide=model_server.url, beta=1.0, lr=1e-3,
                       guide_max_concurrency=2, guide_api_key_env="RLGF_TEST_GUIDE_KEY", guide_timeout=30.0,
                       keep_checkpoint=True)
    rec, result = run_recorded(SCRIPTS[algo], args)
    assert result is not None and len(rec.iters) == 2
    assert isinstance(rec.guide_objects[0], HTTPGuide)
    stats = model_server.stats()
    answers: dict = {}
    for a in stats["answers"]:
        answers.setdefault(a["prompt"], []).append(a)
    n_rows, guide_toks = 0, []
    for it in rec.iters:
        for queries, prefixes, outs in it.guides:
            for q, p, o in zip(queries, prefixes, outs):
                sent = decode(tok, [q])[0] + decode(tok, [p])[0]
                assert sent in answers, "a guide continuation the server never wrote"
                a = answers[sent][0]
                assert a["finish_reason"] == "length" and eos not in o, "EOS after a text cut at its budget"
                assert o == retok(tok, a["text"])[: max_new - len(p)], "the guide's tokens are not the server's text"
                n_rows += 1
                guide_toks += o
        assert it.metrics["guide/requests"] == sum(len(g[0]) for g in it.guides)
        assert it.metrics["guide/server_tokens"] > 0 and it.metrics["time/guide_generate"] > 0
        ro = analyse(it, phase_of(algo, it))  # the rollouts are built from these continuations
        assert all(t == T for _, g in ro.guide_tokens for t in g)
    assert n_rows >= 4 and len(guide_toks) > 10 and set(guide_toks) == {T}
    assert 1 <= stats["max_concurrent"] <= 2
    assert stats["authorization"] == "Bearer sekrit-123"
    run = tmp_path / "run"
    for f in ("args.json", "metrics.jsonl"):
        assert "sekrit" not in (run / f).read_text()
    assert json.loads((run / "args.json").read_text())["guide_api_key_env"] == "RLGF_TEST_GUIDE_KEY"
    assert (run / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------------------------------------
# 2. a server that dies mid-run: one-line error after the retries, the checkpoint survives and resumes
# ---------------------------------------------------------------------------------------------------
def test_server_dies_mid_run(folders, fixed_server, tmp_path, capsys):
    learner = folders("commongen")
    srv = fixed_server("--exit-after", "4")  # iteration 1 asks 4 roll-ins (beta 1, 4 rollouts), then it is gone
    common = dict(guide=srv.url, beta=1.0, save_interval=1, guide_retries=1, guide_timeout=5.0, keep_checkpoint=True)
    args = script_args(ppo_plus_plus, "commongen", learner, tmp_path, **common)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        ppo_plus_plus.main(args)
    assert e.value.code == 2 and time.time() - t0 < 120
    srv.proc.wait(10)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: guide server {srv.url}/completions failed 2 tries"), last
    run = tmp_path / "run"
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "objective/reward" in line]
    assert steps == [1]
    # the server comes back on its port: the run continues from its checkpoint
    back = fixed_server(port=srv.port)
    assert back.url == srv.url
    first, final = ppo_plus_plus.main(script_args(ppo_plus_plus, "commongen", learner, tmp_path, resume=str(run),
                                                  **common))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert len(back.stats()["answers"]) == 4


def test_server_down_at_start_is_one_line(folders, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    args = script_args(aggrevated, "imdb", folders("imdb"), tmp_path, guide=url, guide_retries=1)
    with pytest.raises(SystemExit) as e:
        aggrevated.main(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith(f"error: guide server {url}/models failed 2 tries"), last


# ---------------------------------------------------------------------------------------------------
# 3. requests: concurrency bound, retries, garbage, timeouts, chat, the cache
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bound", [1, 3])
def test_concurrency_never_exceeds_the_bound(model_server, bound):
    model_server.reset()
    g = HTTPGuide(model_server.url, max_concurrency=bound, temperature=0.0, extra_body={"delay": 0.3}, timeout=30)
    out = g.complete([f"prompt {i}" for i in range(9)], [""] * 9, [3] * 9)
    assert [t for t, _ in out] == [T_TEXT * 3] * 9 and not any(f for _, f in out)
    assert model_server.stats()["max_concurrent"] == bound
    m = g.pop_metrics()
    assert m["guide/requests"] == 9 and m["guide/server_tokens"] == 27 and m["guide/server_tokens_per_second"] > 0
    assert g.pop_metrics()["guide/requests"] == 0  # counters restart after each read


def test_retries_429_5xx_then_one_line_error(fixed_server):
    srv = fixed_server("--fail-first", "2")
    g = HTTPGuide(srv.url, model_name="x", retries=2)
    assert g.complete(["p"], [""], [20]) == [(FIXED, True)]
    assert guide_metrics(g)["guide/retries"] == 2
    srv = fixed_server("--fail-first", "100")
    g = HTTPGuide(srv.url, model_name="x", retries=1)
    with pytest.raises(GuideError) as e:
        g.complete(["p"], [""], [20])
    msg = str(e.value)
    assert isinstance(e.value, UsageError) and "\n" not in msg
    assert msg.startswith(f"guide server {srv.url}/completions failed 2 tries (last: HTTP 503"), msg


def test_garbage_and_timeout_are_one_line_errors(fixed_server):
    srv = fixed_server("--garbage")
    with pytest.raises(GuideError, match=r"answered without a completion \(choices\[0\]\.text\)"):
        HTTPGuide(srv.url, model_name="x", retries=0).complete(["p"], [""], [5])
    t0 = time.time()
    g = HTTPGuide(fixed_server("--delay", "3").url, timeout=0.3, retries=1)
    with pytest.raises(GuideError, match="timed out"):
        g.complete(["p"], [""], [2])
    assert time.time() - t0 < 3.5  # two tries of 0.3 s and a 0.5 s backoff, not the server's 3 s


def test_chat_sends_the_prefix_as_an_assistant_turn(model_server):
    model_server.reset()
    g = HTTPGuide(model_server.url, chat=True, temperature=0.0)
    assert g.complete(["Review:", "Review:"], [" great", ""], [2, 2]) == [(T_TEXT * 2, False)] * 2
    prompts = sorted(a["prompt"] for a in model_server.stats()["answers"])
    assert prompts == ["Review:", "Review: great"]  # user turn, then the assistant prefix the server continues
    assert g.body("Review:", " great", 2)["messages"] == [{"role": "user", "content": "Review:"},
                                                         {"role": "assistant", "content": " great"}]


def test_cache_answers_without_the_server(fixed_server, tmp_path):
    cache = tmp_path / "guide.jsonl"
    srv = fixed_server()
    g = HTTPGuide(srv.url, model_name="x", temperature=0.0, cache=str(cache), retries=0)
    first = g.complete(["p1", "p2"], ["", " x"], [20, 20])
    assert len(srv.stats()["answers"]) == 2
    srv.stop()
    for guide in (g, HTTPGuide(srv.url, model_name="x", temperature=0.0, cache=str(cache), retries=0)):
        assert guide.complete(["p1", "p2"], ["", " x"], [20, 20]) == first
        assert guide.pop_metrics()["guide/cache_hits"] == 2
    with pytest.raises(GuideError):  # a request it has not seen goes to the (stopped) server
        g.complete(["p3"], [""], [20])
    with pytest.raises(UsageError, match="--guide-temperature 0"):
        HTTPGuide(srv.url, model_name="x", temperature=1.0, cache=str(cache))


def test_server_flags_are_checked(folders, tmp_path):
    from common.tasks import get_task

    task = get_task("commongen")
    kw = dict(top_p=0.92, top_k=0, temperature=1.0, min_new_tokens=5)
    with pytest.raises(UsageError, match="--guide-chat is for a server guide"):
        guides.build_guide("rule", task, None, None, "cpu", server=ServerOptions(chat=True), **kw)
    with pytest.raises(UsageError, match="--guide-model-name"):
        guides.build_guide("http://127.0.0.1:9/v1", task, "some/folder", None, "cpu", **kw)
    with pytest.raises(UsageError, match="RLGF_UNSET_KEY"):
        guides.build_guide("http://127.0.0.1:9/v1", task, None, None, "cpu",
                           server=ServerOptions(api_key_env="RLGF_UNSET_KEY", model_name="x"), **kw)
    with pytest.raises(UsageError, match="--guide-extra-body must be a JSON object"):
        guides.build_guide("http://127.0.0.1:9/v1", task, None, None, "cpu",
                           server=ServerOptions(extra_body="[1]", model_name="x"), **kw)
    with pytest.raises(UsageError, match="--guide-cache .* cannot write there"):
        guides.build_guide("http://127.0.0.1:9/v1", task, None, None, "cpu", server=ServerOptions(
            cache=str(tmp_path / "no" / "such" / "c.jsonl"), model_name="x"), **dict(kw, temperature=0.0))
    with pytest.raises(UsageError, match="--guide must be model, rule, learner or a server URL"):
        guides.build_guide("ftp://x", task, None, None, "cpu", **kw)


# ---------------------------------------------------------------------------------------------------
# 4. the guide's own end of text: EOS only when the guide finished
# ---------------------------------------------------------------------------------------------------
def test_callable_finished_convention(folders):
    tok = learner_tok(folders)
    eos = tok.eos_token_id
    q = [tok("a prompt", add_special_tokens=False)["input_ids"]]
    calls = []

    def fn(prompts, prefixes):
        calls.append(prefixes[0])
        return [(" good", False)] if len(calls) < 2 else [" fine"]

    out = guide_continue(CallableGuide(fn), tok, q, [[]], max_new_tokens=10, min_new_tokens=1)[0]
    assert calls == ["", " good"], "an unfinished text is continued from prompt + prefix + its text"
    assert out == retok(tok, " good") + retok(tok, " fine") + [eos]
    cont = lambda texts: CallableGuide(lambda p, x: texts)  # noqa: E731
    assert guide_continue(cont([" good"]), tok, q, [[]], max_new_tokens=10, min_new_tokens=1)[0][-1] == eos
    assert eos not in guide_continue(cont([(" good", True)]), tok, q, [[]], max_new_tokens=10, min_new_tokens=8)[0]
    long = " good" * 20  # finished, but longer than the budget: cut there, no EOS
    assert guide_continue(cont([long]), tok, q, [[]], max_new_tokens=4, min_new_tokens=1)[0] == retok(tok, long)[:4]
    with pytest.raises(ValueError, match="a string or"):
        guide_continue(cont([3]), tok, q, [[]], max_new_tokens=4, min_new_tokens=1)


def test_fixed_server_stop_gets_eos_length_does_not(folders, fixed_server):
    tok = learner_tok(folders)
    srv = fixed_server()
    g = HTTPGuide(srv.url, retries=0)
    q = [tok("a prompt", add_special_tokens=False)["input_ids"]]
    assert g.model_name == "tiny"  # from /v1/models
    assert guide_continue(g, tok, q, [[]], max_new_tokens=20, min_new_tokens=1)[0] == retok(tok, FIXED) + [tok.eos_token_id]
    n = len(retok(tok, FIXED))
    cut = guide_continue(g, tok, q, [[]], max_new_tokens=n - 1, min_new_tokens=1)[0]
    assert tok.eos_token_id not in cut and 0 < len(cut) <= n - 1


def test_tiny_hf_guide_cut_at_its_budget_gets_no_eos(tmp_path):
    """A guide with a finer tokenizer than the learner's: its budget of characters re-tokenises to fewer learner
    tokens. It never finished, so no EOS follows (the text is continued instead, still without EOS); a guide
    that samples its EOS gets the learner's."""
    from conftest import train_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from _tiny import train_texts

    learner = train_tokenizer(["eeeeeeee eeee ee"] * 200 + train_texts("imdb", 100), 400, tmp_path / "learner")
    gtok = train_tokenizer(train_texts("imdb", 50), 258, tmp_path / "guide")  # bytes only: no merges
    e = gtok.convert_tokens_to_ids("e")
    assert len(learner("eeeeeeee", add_special_tokens=False)["input_ids"]) == 1
    assert gtok("eeee", add_special_tokens=False)["input_ids"] == [e] * 4

    def guide_writing(token_id):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(gtok), n_positions=384, n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=gtok.eos_token_id, eos_token_id=gtok.eos_token_id,
                                           pad_token_id=gtok.pad_token_id))
        favour_token(model, token_id, 14.0)
        return HFGuide(model, gtok, top_p=0.92)

    guide, calls = guide_writing(e), []
    real = guide.complete
    guide.complete = lambda *a: calls.append(a) or real(*a)  # noqa: E731
    q, x = [learner("a movie", add_special_tokens=False)["input_ids"]] * 3, learner(" It", add_special_tokens=False)["input_ids"]
    budget = 12
    for o in guide_continue(guide, learner, q, [[]] * 3, max_new_tokens=budget, min_new_tokens=0):
        assert learner.eos_token_id not in o, "EOS after a guide cut at its budget"
        assert 0 < len(o) < budget and set(decode(learner, [o])[0]) == {"e"}
    assert len(calls) > 1, "the unfinished text was not continued"
    outs = guide_continue(guide_writing(gtok.eos_token_id), learner, q, [x] * 3, max_new_tokens=budget, min_new_tokens=0)
    assert outs == [[learner.eos_token_id]] * 3


def test_server_options_are_the_guide_settings_server_fields():
    """ServerOptions (the server guide's own API) mirrors the `--guide-*` server settings: the same fields, the same
    defaults, and from_args carries every one of them."""
    import dataclasses

    from common.settings import GuideSettings

    settings = {f.name[len("guide_"):]: f.default for f in dataclasses.fields(GuideSettings)}
    options = {f.name: f.default for f in dataclasses.fields(ServerOptions)}
    assert options == {k: settings[k] for k in options}
    assert set(guides.SERVER_FLAGS) <= set(options)
    given = GuideSettings(**{"guide_" + k: f"value-{k}" for k in options})
    assert ServerOptions.from_args(given) == ServerOptions(**{k: f"value-{k}" for k in options})
