"""A server as the guide: any OpenAI-compatible completions endpoint (vLLM, llama.cpp, TGI, Ollama, a hosted API)
through its `/completions` or `/chat/completions` endpoint, with the guide's sampling settings sent in each request
(`--guide http://HOST:PORT/v1` and the `--guide-*` server flags; docs/guides.md). Imported only for a server guide;
the guide interface and the other guides are in common/guides.py.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from common.errors import UsageError


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
