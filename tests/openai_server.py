"""A small OpenAI-compatible server on the standard library, for the server-guide tests (tests/test_server_guide.py).

    python tests/openai_server.py --port 0 --model FOLDER [--port-file F] [--delay S] ...

Endpoints, as vLLM / llama.cpp / TGI serve them:
- `GET  /v1/models`: `{"object": "list", "data": [{"id": NAME, "object": "model"}]}`
- `POST /v1/completions`: `prompt` (a string), `max_tokens`, `temperature` (0 = greedy), `top_p`, `top_k`;
  answers `choices[0].text`, `finish_reason` ("stop" when the model sampled its EOS, else "length") and `usage`.
- `POST /v1/chat/completions`: the same on the text of the messages joined in order, so a final assistant
  message is continued (as a server that prefills the assistant turn does); answers `choices[0].message`.
- `GET  /stats`: `{"requests", "max_concurrent", "answers", "authorization"}` (the largest number of requests in
  flight at once; prompt, text and finish_reason of every answer; the last Authorization header); `POST
  /stats/reset` zeroes it.

The text comes from a Hugging Face causal LM in a folder (`--model`, sampled with `generate`) or is a fixed
string (`--fixed-text`, cut to `max_tokens` whitespace-separated pieces, "stop" when it fits). Faults for the
tests: `--delay` seconds per answer (a request's own `delay` field overrides it), `--fail-first N` answers HTTP 503 to the first N completion requests,
`--garbage` answers 200 with JSON that is no completion, `--exit-after N` ends the process right after its
N-th completion. It binds 127.0.0.1 only; `--port 0` takes a free port, written to `--port-file`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class State:
    def __init__(self, args):
        self.args, self.lock, self.model_lock = args, threading.Lock(), threading.Lock()
        self.in_flight = self.max_concurrent = self.requests = self.completions = 0
        self.answers: list[dict] = []  # prompt, text, finish_reason of every completion
        self.authorization = None
        self.model = self.tok = None
        if args.model:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(1)
            torch.manual_seed(args.seed)
            self.tok = AutoTokenizer.from_pretrained(args.model)
            self.model = AutoModelForCausalLM.from_pretrained(args.model).eval()

    def generate(self, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int):
        """(text, finish_reason, prompt tokens, completion tokens)."""
        if self.model is None:
            pieces = self.args.fixed_text.split(" ")
            text = " ".join(pieces[:max_tokens])
            return text, "stop" if len(pieces) <= max_tokens else "length", len(prompt.split()), min(len(pieces), max_tokens)
        import torch

        ids = self.tok(prompt, add_special_tokens=False)["input_ids"] or [self.tok.eos_token_id]
        limit = self.model.config.n_positions
        ids = ids[-max(1, limit - max_tokens):]
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else dict(do_sample=False)
        with self.model_lock, torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_tokens, pad_token_id=self.tok.pad_token_id,
                                      eos_token_id=self.tok.eos_token_id, **kw)
        new = out[0, len(ids):].tolist()
        stop = self.tok.eos_token_id in new
        if stop:
            new = new[: new.index(self.tok.eos_token_id) + 1]
        text = self.tok.decode(new, skip_special_tokens=True)
        return text, "stop" if stop else "length", len(ids), len(new)


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._done()  # before the answer leaves: a client may send its next request the moment it has it
        self.wfile.write(data)

    def _done(self) -> None:
        """This request no longer counts as in flight (once)."""
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            with self.state.lock:
                self.state.in_flight -= 1

    def do_GET(self):
        s = self.state
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": s.args.name, "object": "model"}]})
        if self.path.rstrip("/") == "/stats":
            with s.lock:
                return self._send(200, {"requests": s.requests, "max_concurrent": s.max_concurrent,
                                        "answers": list(s.answers), "authorization": s.authorization})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        s = self.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        path = self.path.rstrip("/")
        if path == "/stats/reset":
            with s.lock:
                s.requests = s.max_concurrent = 0
                s.answers = []
            return self._send(200, {"ok": True})
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        with s.lock:
            s.requests += 1
            s.in_flight += 1
            s.max_concurrent = max(s.max_concurrent, s.in_flight)
            fail = s.requests <= s.args.fail_first
        self._in_flight = True
        try:
            delay = float(body.get("delay", s.args.delay))  # a test may ask for a slow answer
            if delay:
                time.sleep(delay)
            if fail:
                return self._send(503, {"error": {"message": "overloaded, try again"}})
            if s.args.garbage:
                return self._send(200, {"hello": "this is not a completion"})
            chat = path.endswith("chat/completions")
            prompt = "".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
            text, reason, n_prompt, n_new = s.generate(prompt, int(body.get("max_tokens", 16)),
                                                       float(body.get("temperature", 1.0)),
                                                       float(body.get("top_p", 1.0)), int(body.get("top_k", 0)))
            choice = {"index": 0, "finish_reason": reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            with s.lock:
                s.answers.append({"prompt": prompt, "text": text, "finish_reason": reason})
                s.authorization = self.headers.get("Authorization")
                s.completions += 1
                last = s.args.exit_after and s.completions >= s.args.exit_after
            self._send(200, {"id": f"cmpl-{s.completions}", "object": "chat.completion" if chat else "text_completion",
                             "model": body.get("model", s.args.name), "choices": [choice],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                       "total_tokens": n_prompt + n_new}})
            if last:  # the server dies mid-run, once the answers already being sent are out
                self.wfile.flush()
                deadline = time.time() + 5
                while s.in_flight > 0 and time.time() < deadline:
                    time.sleep(0.01)
                os._exit(0)
        finally:
            self._done()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", default=None)
    p.add_argument("--model", default=None, help="folder of a Hugging Face causal LM")
    p.add_argument("--fixed-text", default=" a fixed answer.")
    p.add_argument("--name", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--garbage", action="store_true")
    p.add_argument("--exit-after", type=int, default=0)
    args = p.parse_args(argv)
    Handler.state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(tmp, args.port_file)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/v1", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
