"""The guide: a frozen black box that continues text (SPEC section 1). Text in (prompt + prefix),
continuation text out; nothing but its samples is ever used, and a model guide's weights never change.

Three kinds behind one interface, `complete(prompts, prefixes, budgets) -> [(text, finished), ...]`:
- `HFGuide`: any causal or encoder-decoder LM (hub id or folder) with its own sampling settings (top-p 0.92
  and friends), separate from the learner's; a seq2seq guide reads the prompt in its encoder and has the
  prefix teacher-forced into its decoder (`common.generation.sample`);
- `HTTPGuide`: any OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama, a hosted API) through its
  `/completions` or `/chat/completions` endpoint, with the same sampling settings sent in each request;
- `CallableGuide`: a plain Python function `fn(prompts, prefixes) -> continuations`.

`finished` says whether the guide ended the text itself (the HF guide sampled its EOS, the server answered
`finish_reason: "stop"`, the function said so) rather than being cut at its budget: only then does the
learner's EOS follow the guide's text.

Our addition: simple rule-based guides (`RULE_GUIDES`) for the tasks where the embedded learner is weak,
so the paper's premise (a guide better than the learner) holds offline: CommonGen writes the concepts the
prefix has not used yet; TL;DR writes the post's title.

`guide_continue` is the one "continue from a forced prefix" helper for the guide side; the learner side is
`common.generation.sample(..., prefixes=...)`. A guide always receives the task's prompt text (without the
learner's chat template); an `HFGuide` whose tokenizer is set up for its own chat template (common.chat) puts
that template around it, and the learner's prefix continues the guide's assistant turn.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from common.chat import task_ids, template_length, wrap
from common.errors import UsageError
from common.generation import decode, query_room, sample


class Guide(Protocol):
    def complete(self, prompts: list[str], prefixes: list[str], max_new_tokens: list[int]) -> list[tuple[str, bool]]:
        """(continuation text, finished) for each prompt + prefix. `max_new_tokens` is the budget left, in the
        learner's tokens (a hint: the caller cuts to it); `finished` is True when the guide ended the text
        itself, False when it stopped at its budget."""


class CallableGuide:
    """A Python function `fn(prompts, prefixes) -> continuations`. Each continuation is a string (the guide
    ended there: EOS follows when the budget and `min_new_tokens` allow) or a `(text, finished)` pair, with
    `finished=False` for a text cut short (no EOS follows, and `guide_continue` asks again for the rest)."""

    def __init__(self, fn: Callable[[list[str], list[str]], list], name: str = "callable"):
        self.fn, self.name = fn, name

    def complete(self, prompts, prefixes, max_new_tokens):
        out = list(self.fn(list(prompts), list(prefixes)))
        if len(out) != len(prompts):
            raise ValueError(f"guide {self.name} returned {len(out)} continuations for {len(prompts)} prompts")
        pairs = []
        for c in out:
            if isinstance(c, str):
                pairs.append((c, True))
            elif isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], str):
                pairs.append((c[0], bool(c[1])))
            else:
                raise ValueError(f"guide {self.name} returned {c!r}: a continuation is a string or (text, finished)")
        return pairs


class HFGuide:
    """A frozen causal or encoder-decoder LM sampled with its own settings. Its parameters never receive gradients.
    `frozen=False` (only `--guide learner`, the official code's moving guide: `common.runtime.learner_guide`)
    samples a model that is being trained, left as it is."""

    def __init__(self, model, tokenizer, *, top_p: float = 0.92, top_k: int = 0, temperature: float = 1.0,
                 min_new_tokens: int = 0, device=None, name: str = "hf", frozen: bool = True):
        self.model = model.eval().requires_grad_(False) if frozen else model
        self.tok, self.top_p, self.top_k, self.temperature = tokenizer, top_p, top_k, temperature
        self.min_new_tokens, self.device, self.name = min_new_tokens, device, name

    @torch.no_grad()
    def complete(self, prompts, prefixes, max_new_tokens):
        enc = lambda texts: [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
        queries, forced = enc(prompts), enc(prefixes)
        # the prefix counts toward the response in the guide's tokens too (its minimum length rule)
        total = max(len(f) + b for f, b in zip(forced, max_new_tokens))
        room = query_room(self.model, total)  # a causal guide holds prompt + response, a seq2seq guide's encoder the prompt
        if room is not None:
            queries = [q[-max(1, room - template_length(self.tok)):] for q in queries]
        # the guide's own chat template (when set up, common.chat) around its own prompt; a prefix continues
        # the assistant turn
        queries = [wrap(self.tok, q) for q in queries]
        out = sample(self.model, queries, prefixes=forced, max_new_tokens=total, min_new_tokens=self.min_new_tokens,
                     eos_id=self.tok.eos_token_id, pad_id=self.tok.pad_token_id, temperature=self.temperature,
                     top_k=self.top_k, top_p=self.top_p, device=self.device)
        kept = [t[:b] for t, b in zip(out.tokens, max_new_tokens)]
        return list(zip(decode(self.tok, kept), [self.tok.eos_token_id in t for t in kept]))


# ---------------------------------------------------------------------------------------------------
# a server as the guide: any OpenAI-compatible completions endpoint
# ---------------------------------------------------------------------------------------------------
class GuideError(UsageError):
    """The guide's server is down, refuses a request, or answers with something that is not a completion.
    Raised from inside the training loop; the run's last checkpoint stays as it was."""


def _one_line(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


@dataclass
class ServerOptions:
    """How to talk to a guide server (the scripts' `--guide-*` flags)."""

    model_name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout: float = 60.0
    retries: int = 3
    chat: bool = False
    cache: str | None = None
    extra_body: str | None = None

    @classmethod
    def from_args(cls, args) -> "ServerOptions":
        return cls(**{f: getattr(args, "guide_" + f) for f in cls.__dataclass_fields__ if hasattr(args, "guide_" + f)})


class _JsonlCache:
    """request -> answer, one JSON object a line, appended as answers arrive (a torn last line is skipped)."""

    def __init__(self, path: str):
        self.path, self.lock, self.entries = path, threading.Lock(), {}
        try:
            open(path, "a", encoding="utf-8").close()
        except OSError as e:
            raise UsageError(f"--guide-cache {path}: cannot write there ({e.strerror})") from None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self.entries[rec["key"]] = rec
                    except (ValueError, KeyError, TypeError):
                        continue

    @staticmethod
    def key(url: str, body: dict) -> str:
        return hashlib.sha256(json.dumps({"url": url, "body": body}, sort_keys=True).encode()).hexdigest()

    def get(self, key: str):
        with self.lock:
            return self.entries.get(key)

    def put(self, key: str, rec: dict):
        rec = dict(rec, key=key)
        with self.lock:
            self.entries[key] = rec
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


class HTTPGuide:
    """An OpenAI-compatible server as the guide. One request per prompt, at most `max_concurrency` in
    flight; each waits `timeout` seconds, and a connection error, a timeout, HTTP 429 or 5xx is retried
    `retries` times with exponential backoff (0.5 s, 1 s, 2 s, ... at most 8 s) before a `GuideError`.

    What is sent:
    - `/completions` (default): `prompt` = prompt + prefix as one text; the server continues it, which is a
      true continuation of the learner's prefix.
    - `/chat/completions` (`chat=True`): the prompt is the user turn and a non-empty prefix a final assistant
      turn. A server that continues a final assistant message (vLLM with `continue_final_message`, set through
      `extra_body`; servers that prefill) continues the prefix; any other answers with a new turn, which is
      then appended to the prefix as if it continued it (an approximation: the reply may repeat or ignore the
      prefix). PPO++'s roll-in has no prefix, so it is exact there.
    - `max_tokens` = the budget left in the learner's tokens, `temperature`, `top_p`, and `top_k` when > 0
      (OpenAI's own API rejects `top_k`: use top_k 0 there), plus the JSON object `extra_body`.
    `finished` is `finish_reason == "stop"`; the usage's completion tokens are counted (`pop_metrics`)."""

    BACKOFF, BACKOFF_MAX = 0.5, 8.0

    def __init__(self, url: str, *, model_name: str | None = None, api_key: str | None = None, chat: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 3, cache: str | None = None, extra_body: dict | None = None):
        if max_concurrency < 1:
            raise UsageError(f"--guide-max-concurrency must be at least 1, not {max_concurrency}")
        if not timeout > 0:
            raise UsageError(f"--guide-timeout must be positive, not {timeout}")
        if retries < 0:
            raise UsageError(f"--guide-retries must be 0 or more, not {retries}")
        if cache and temperature != 0:
            raise UsageError("--guide-cache replays one answer per request, which is the guide's distribution only "
                             f"when it is deterministic: pass --guide-temperature 0 (not {temperature}) or drop "
                             "--guide-cache")
        self.base = url.rstrip("/")
        self.endpoint = self.base + ("/chat/completions" if chat else "/completions")
        self.chat, self.temperature, self.top_p, self.top_k = chat, temperature, top_p, top_k
        self.max_concurrency, self.timeout, self.retries = max_concurrency, timeout, retries
        self.extra_body = dict(extra_body or {})
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        host = urllib.parse.urlsplit(self.base).hostname or ""
        # a server on this machine is reached directly, whatever proxy the environment names for the outside
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)
        self._cache = _JsonlCache(cache) if cache else None
        self._lock = threading.Lock()
        self._stats = self._zero_stats()
        self.model_name = model_name or self._first_model()
        self.name = f"{self.model_name} at {self.base}"

    @staticmethod
    def _zero_stats():
        return {"requests": 0, "retries": 0, "cache_hits": 0, "server_tokens": 0, "seconds": 0.0}

    # ---- one HTTP exchange, with retries -----------------------------------------------------------
    def _call(self, url: str, body: dict | None, abort: threading.Event | None = None) -> dict:
        """The JSON answer of one GET (`body` None) or POST. `abort`, once set (another request of the same
        batch failed), ends the retries early."""
        data = None if body is None else json.dumps(body).encode()
        abort = abort or threading.Event()
        last, tries = "", 0
        for attempt in range(self.retries + 1):
            if attempt:
                if abort.wait(min(self.BACKOFF * 2 ** (attempt - 1), self.BACKOFF_MAX)):
                    break
                with self._lock:
                    self._stats["retries"] += 1
            tries = attempt + 1
            req = urllib.request.Request(url, data=data, headers=self._headers,
                                         method="GET" if body is None else "POST")
            try:
                with self._opener.open(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                try:
                    detail = _one_line(e.read().decode("utf-8", "replace"))
                except Exception:  # noqa: BLE001  (the body of an error answer is only a hint)
                    detail = ""
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code} {detail}".strip()
                    continue
                raise GuideError(f"guide server {url} answered HTTP {e.code}: {detail or e.reason}") from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, a broken answer
                last = _one_line(getattr(e, "reason", None) or e) or type(e).__name__
                continue
            except ValueError as e:  # a URL urllib cannot use
                raise GuideError(f"guide URL {url} is not usable: {_one_line(e)}") from None
            try:
                return json.loads(raw)
            except ValueError:
                raise GuideError(f"guide server {url} answered with something that is not JSON: "
                                 f"{_one_line(raw.decode('utf-8', 'replace'), 80)!r}") from None
        raise GuideError(f"guide server {url} failed {tries} tries (last: {last}); check that it is running "
                         "and reachable (--guide-timeout, --guide-retries)")

    def _first_model(self) -> str:
        url = self.base + "/models"
        payload = self._call(url, None)
        try:
            return str(payload["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise GuideError(f"guide server {url} lists no model ({_one_line(json.dumps(payload), 80)}): "
                             "name one with --guide-model-name") from None

    # ---- the guide interface ------------------------------------------------------------------------
    def body(self, prompt: str, prefix: str, budget: int) -> dict:
        """The request for one continuation (also the cache's key, with the URL)."""
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            if prefix:
                messages.append({"role": "assistant", "content": prefix})
            b = {"model": self.model_name, "messages": messages}
        else:
            b = {"model": self.model_name, "prompt": prompt + prefix}
        b.update(max_tokens=max(1, int(budget)), temperature=self.temperature, top_p=self.top_p, n=1, stream=False)
        if self.top_k > 0:
            b["top_k"] = self.top_k
        b.update(self.extra_body)
        return b

    def _one(self, prompt: str, prefix: str, budget: int, abort: threading.Event) -> tuple[str, bool]:
        body = self.body(prompt, prefix, budget)
        key = _JsonlCache.key(self.endpoint, body) if self._cache else None
        if key is not None and (hit := self._cache.get(key)) is not None:
            with self._lock:
                self._stats["cache_hits"] += 1
            return hit["text"], hit["finished"]
        payload = self._call(self.endpoint, body, abort)
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            field = "choices[0].message.content" if self.chat else "choices[0].text"
            raise GuideError(f"guide server {self.endpoint} answered without a completion ({field}): "
                             f"{_one_line(json.dumps(payload), 120)}") from None
        finished = choice.get("finish_reason") == "stop"
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        with self._lock:
            self._stats["requests"] += 1
            self._stats["server_tokens"] += int(usage.get("completion_tokens") or 0)
        if key is not None:
            self._cache.put(key, {"text": text, "finished": finished})
        return text, finished

    def complete(self, prompts, prefixes, max_new_tokens):
        t0 = time.time()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(prompts))))
        abort = threading.Event()
        try:
            futures = [pool.submit(self._one, p, x, b, abort) for p, x, b in zip(prompts, prefixes, max_new_tokens)]
            wait(futures, return_when="FIRST_EXCEPTION")
            for f in futures:
                if f.done() and f.exception() is not None:
                    raise f.exception()
            out = [f.result() for f in futures]
        finally:
            # on an error (or Ctrl-C) nothing new starts, and requests in flight end within one timeout
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._stats["seconds"] += time.time() - t0
        return out

    def pop_metrics(self) -> dict:
        """The `guide/*` counters since the last call: answered requests, retries, cache hits, the completion
        tokens the server reported (`usage`), and those tokens per second of request time."""
        with self._lock:
            s, self._stats = self._stats, self._zero_stats()
        return {"guide/requests": s["requests"], "guide/retries": s["retries"], "guide/cache_hits": s["cache_hits"],
                "guide/server_tokens": s["server_tokens"],
                "guide/server_tokens_per_second": s["server_tokens"] / s["seconds"] if s["seconds"] > 0 else 0.0}


def is_server_url(kind: str) -> bool:
    return kind.startswith(("http://", "https://"))


def build_server_guide(url: str, opts: ServerOptions, *, top_p: float, top_k: int, temperature: float) -> HTTPGuide:
    """`--guide http://HOST:PORT/v1` with the `--guide-*` server flags. The API key is read here from the
    environment variable `opts.api_key_env` and kept only in the request headers."""
    key = os.environ.get(opts.api_key_env) if opts.api_key_env else None
    if opts.api_key_env and opts.api_key_env != "OPENAI_API_KEY" and key is None:
        raise UsageError(f"--guide-api-key-env {opts.api_key_env}: that environment variable is not set")
    extra = None
    if opts.extra_body:
        try:
            extra = json.loads(opts.extra_body)
        except ValueError:
            extra = None
        if not isinstance(extra, dict):
            raise UsageError(f"--guide-extra-body must be a JSON object, not {opts.extra_body!r}")
    return HTTPGuide(url, model_name=opts.model_name, api_key=key or None, chat=opts.chat, temperature=temperature,
                     top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, max_concurrency=opts.max_concurrency,
                     timeout=opts.timeout, retries=opts.retries, cache=opts.cache, extra_body=extra)


# ---------------------------------------------------------------------------------------------------
# rule-based guides (our addition; selectable with --guide rule)
# ---------------------------------------------------------------------------------------------------
def _concepts(prompt: str) -> list[str]:
    m = re.search(r"generate a sentence with:(.*)\.\s*$", prompt)
    return m.group(1).split() if m else []


def commongen_rule(prompts: list[str], prefixes: list[str]) -> list[str]:
    """The concepts the prefix has not used yet, in order, then a full stop."""
    out = []
    for p, x in zip(prompts, prefixes):
        used = set(re.findall(r"\w+", x.lower()))
        rest = [c for c in _concepts(p) if c.lower() not in used and c.lower()[:4] not in {u[:4] for u in used}]
        out.append((" " + " ".join(rest) if rest else "") + ".")
    return out


def tldr_rule(prompts: list[str], prefixes: list[str]) -> list[str]:
    """The post's title, minus as many words as the prefix already has."""
    out = []
    for p, x in zip(prompts, prefixes):
        m = re.search(r"^TITLE:(.*)$", p, flags=re.M)
        words = (m.group(1) if m else "").split()
        rest = words[len(x.split()):]
        out.append(" " + " ".join(rest) if rest else ".")
    return out


RULE_GUIDES = {"commongen": commongen_rule, "tldr": tldr_rule}


# ---------------------------------------------------------------------------------------------------
# guide side of roll-in / roll-out
# ---------------------------------------------------------------------------------------------------
GUIDE_ROUNDS = 3
"""At most this many requests per row: a text that re-tokenises to fewer learner tokens than its budget (the
guide's tokenizer is finer than the learner's, a server's budget counts its own tokens) and that the guide did
not finish is continued, from prompt + prefix + its text so far, until the budget is full or the guide ends."""


def guide_continue(guide: Guide, tok, queries: list[list[int]], prefixes: list[list[int]], *,
                   max_new_tokens: int, min_new_tokens: int) -> list[list[int]]:
    """Continue each learner-tokenised prompt + prefix with the guide; returns the continuation in the
    learner's tokens, cut to the remaining budget. EOS is appended only when the guide ended the text itself
    (`finished`), the text fits the budget with room for EOS, and the response (prefix included) has
    `min_new_tokens` tokens; a text cut at the budget gets none. Pad and EOS never appear inside."""
    budgets = [max_new_tokens - len(p) for p in prefixes]
    # the guide gets the task's prompt text (the learner's chat template, if any, stripped: a guide has its own)
    prompts = decode(tok, [task_ids(tok, q) for q in queries])
    special = {tok.pad_token_id, tok.eos_token_id}
    out: list[list[int]] = [[] for _ in prefixes]
    finished = [False] * len(prefixes)
    todo = [i for i, b in enumerate(budgets) if b > 0]
    for _ in range(GUIDE_ROUNDS):
        if not todo:
            break
        answers = guide.complete([prompts[i] for i in todo], decode(tok, [prefixes[i] + out[i] for i in todo]),
                                 [budgets[i] - len(out[i]) for i in todo])
        if len(answers) != len(todo):
            raise ValueError(f"guide {getattr(guide, 'name', guide)} returned {len(answers)} continuations "
                             f"for {len(todo)} prompts")
        again = []
        for i, (text, done) in zip(todo, answers):
            ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids = [t for t in ids if t not in special]
            room = budgets[i] - len(out[i])
            out[i] += ids[:room]
            if len(ids) >= room:
                continue  # the budget is full: cut here, no EOS
            if done:
                finished[i] = True
            elif ids:
                again.append(i)
        todo = again
    for i, prefix in enumerate(prefixes):
        if finished[i] and len(out[i]) < budgets[i] and len(prefix) + len(out[i]) >= max(1, min_new_tokens):
            out[i].append(tok.eos_token_id)
    return out


def guide_metrics(guide) -> dict:
    """The guide's own `guide/*` counters since the last call (a server guide: requests, retries, cache hits,
    tokens); empty for guides without any."""
    pop = getattr(guide, "pop_metrics", None)
    return pop() if pop is not None else {}
