"""The guide: a frozen black box that continues text (SPEC section 1). Text in (prompt + prefix),
continuation text out; nothing but its samples is ever used, and a model guide's weights never change.

Three kinds behind one interface, `complete(prompts, prefixes, budgets) -> [(text, finished), ...]`:
- `HFGuide`: any causal or encoder-decoder LM (hub id or folder) with its own sampling settings (top-p 0.92
  and friends), separate from the learner's; a seq2seq guide reads the prompt in its encoder and has the
  prefix teacher-forced into its decoder (`common.generation.sample`);
- `HTTPGuide` (common/server_guide.py, imported only for a server guide): any OpenAI-compatible server (vLLM,
  llama.cpp, TGI, Ollama, a hosted API) through its `/completions` or `/chat/completions` endpoint, with the same
  sampling settings sent in each request;
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

A run's guide (`common.harness.Run`) is made by `build_guide` from the `--guide*` settings, which
`check_guide_settings` checks with the others before anything is loaded.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol

import torch

from common.chat import setup_chat, task_ids, template_length, wrap
from common.errors import UsageError
from common.generation import decode, query_room, sample
from common.models import is_encoder_decoder, load_causal_lm, load_tokenizer
from common.runtime import is_lora
from common.settings import ModelSetup, flag
from common.tasks import Task


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
    `frozen=False` (only `--guide learner`, the official code's moving guide: `learner_guide`)
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


def is_server_url(kind: str) -> bool:
    """Whether `--guide` names a server (common/server_guide.py) rather than model, rule or learner."""
    return kind.startswith(("http://", "https://"))


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


# ---------------------------------------------------------------------------------------------------
# a run's guide: settings checked, the guide built (common.harness.Run), sample tables
# ---------------------------------------------------------------------------------------------------
def check_guide_settings(args) -> None:
    """The guide's settings, checked with the others (`common.runtime.check_settings`, for args with a guide):
    the kind, its temperature, the flags each kind does not use, a rule guide for the task."""
    def value(name):
        return getattr(args, name, None)

    guide = args.guide
    if guide not in ("model", "rule", "learner") and not is_server_url(guide):
        raise UsageError(f"--guide must be model, rule, learner or a server URL (http://HOST:PORT/v1), not "
                         f"{guide!r}")
    if guide in ("model", "learner") and value("guide_temperature") == 0:
        raise UsageError("--guide-temperature must be above 0 for a model guide, which samples; greedy "
                         "(temperature 0) is for a server guide (--guide http://HOST:PORT/v1)")
    if guide == "learner" and value("guide_model"):
        raise UsageError("--guide-model is not used with --guide learner (the guide is the learner itself): "
                         "drop one of them")
    if guide == "learner" and value("fsdp"):
        raise UsageError("--guide learner does not run under --fsdp (the guide's calls differ between "
                         "processes): use DDP or one process")
    if guide == "rule" and args.task not in RULE_GUIDES:
        raise UsageError(f"--guide rule exists for {', '.join(RULE_GUIDES)}, not {args.task}: use --guide model")
    if guide == "rule" and value("guide_model"):
        raise UsageError("--guide-model is not used with --guide rule: drop one of them")
    if not is_server_url(guide):
        refuse_server_flags(guide, lambda name: value("guide_" + name))


def build_guide(kind: str, task: Task, guide_path: str | None, learner_tok, device, *, top_p: float, top_k: int,
                temperature: float, min_new_tokens: int, policy=None, setup: ModelSetup | None = None, server=None,
                chat_template: str = "off"):
    """The frozen black-box guide: `model` (an HF causal or encoder-decoder LM, default the task's embedded
    guide), `rule` (our rule-based guide for CommonGen and TL;DR) or the URL of an OpenAI-compatible server
    (`http://HOST:PORT/v1`), reached as `server` (a `common.server_guide.ServerOptions`) says. A model guide that is a
    LoRA policy's own start model (same path) is that policy's base with the adapters off, not a second copy; any
    other model guide is loaded (4/8-bit with the policy, `setup`). Loading leaves the random streams alone. A
    model guide keeps its own chat template, applied to its own prompt, whenever its tokenizer has one and
    `chat_template` is not off.

    `learner`: the official code's moving guide (SPEC 5.1, a defect there): the current learner itself, `policy`,
    sampled with the guide's settings (top-p 0.92 ...), so its samples follow the learner's weights as they train;
    its tokenizer and chat template are those a model guide of the learner's start model would have. Offered to
    reproduce the paper's published setting next to the frozen guide."""
    if is_server_url(kind):
        from common.server_guide import ServerOptions, build_server_guide

        if guide_path:
            raise UsageError(f"--guide-model {guide_path} is a model loaded in this process; the server's model is "
                             "named with --guide-model-name")
        return build_server_guide(kind, server or ServerOptions(), top_p=top_p, top_k=top_k, temperature=temperature)
    if server is not None:
        refuse_server_flags(kind, lambda name: getattr(server, name))
    if kind == "rule":
        if task.name not in RULE_GUIDES:
            raise UsageError(f"--guide rule exists for {', '.join(RULE_GUIDES)}, not {task.name}: use --guide model")
        return CallableGuide(RULE_GUIDES[task.name], name=f"{task.name}-rule")
    if kind != "model":
        if kind == "learner":
            return learner_guide(policy, top_p=top_p, top_k=top_k, temperature=temperature,
                                 min_new_tokens=min_new_tokens, device=device, chat_template=chat_template)
        raise UsageError(f"--guide must be model, rule, learner or a server URL (http://HOST:PORT/v1), not {kind!r}")
    gtok = load_tokenizer(guide_path)
    setup_chat(gtok, "off" if chat_template == "off" else "auto", encoder_decoder=is_encoder_decoder(guide_path))
    if is_lora(policy) and guide_path == policy.path:
        model = policy.reference()
    else:
        with torch.random.fork_rng(devices=[]):
            model = load_causal_lm(guide_path, gtok, device, "--guide-model",
                                   quantization=setup.quantization_config() if setup else None)
    return HFGuide(model, gtok, top_p=top_p, top_k=top_k, temperature=temperature,
                   min_new_tokens=min_new_tokens, device=device, name=guide_path)


def server_options(args):
    """The server guide's connection settings (`common.server_guide.ServerOptions`, from the `--guide-*` flags) for
    `--guide http://HOST:PORT/v1`; None for any other guide, which never imports common/server_guide.py."""
    if not is_server_url(args.guide):
        return None
    from common.server_guide import ServerOptions

    return ServerOptions.from_args(args)


SERVER_FLAGS = ("model_name", "chat", "cache", "extra_body")
"""the `--guide-*` flags only a server guide reads (fields of ServerOptions)"""


def refuse_server_flags(kind: str, value) -> None:
    """One line where a flag only a server guide reads (`value(name)` for each of SERVER_FLAGS) is given with
    `--guide kind`, which is not a server."""
    for name in SERVER_FLAGS:
        if value(name):
            raise UsageError(f"{flag('guide_' + name)} is for a server guide (--guide http://HOST:PORT/v1), "
                             f"not --guide {kind}")


def learner_guide(policy, *, top_p: float, top_k: int, temperature: float, min_new_tokens: int, device,
                  chat_template: str = "off"):
    """`--guide learner`: an HFGuide sampling `policy`, the learner being trained, whose weights it leaves
    trainable (the guide of every other kind is frozen). See `build_guide`."""
    if policy is None:
        raise UsageError("--guide learner needs the learner (the script's policy)")
    path = policy.path if is_lora(policy) else _base_model(policy).name_or_path
    gtok = load_tokenizer(path)
    setup_chat(gtok, "off" if chat_template == "off" else "auto", encoder_decoder=is_encoder_decoder(path))
    return HFGuide(policy, gtok, top_p=top_p, top_k=top_k, temperature=temperature, min_new_tokens=min_new_tokens,
                   device=device, name=f"the learner ({path}, moving)", frozen=False)


def _base_model(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def mixed_rows(prompts, guide_parts, learner_parts, scores):
    """Sample-table rows that mark where the guide's text ends and the learner's begins."""
    return list(zip(prompts, guide_parts, learner_parts, scores))
