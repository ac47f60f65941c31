"""Evaluation metrics per task (SPEC section 3), all offline.

`compute_metrics(task_name, prompts, responses, references, meta=None, slow_metrics=False)` returns a
dict with stable keys:

| task | key | meaning |
|---|---|---|
| imdb | `sentiment` | mean VADER P(positive) of prompt + response, in [0, 1] |
| commongen | `rouge1`, `rouge2`, `rougeL` | mean ROUGE F-measure (rouge-score, stemming) against the best reference, in [0, 1] |
| commongen | `bleu` | sacrebleu corpus BLEU-4 with every reference of a sample, on the 0-100 scale sacrebleu reports |
| commongen | `cider` | mean CIDEr-D (pycocoevalcap, x10 scale), document frequencies from the evaluated set's references |
| commongen | `coverage` | our addition: mean fraction of the concepts whose Porter stem appears in the response, in [0, 1] |
| commongen | `meteor` | pycocoevalcap METEOR 1.5 (Java), in [0, 1]; only with `slow_metrics=True` (the JVM takes ~6 s to start) |
| commongen | `spice` | pycocoevalcap SPICE, in [0, 1]; only with `slow_metrics=True` and where its CoreNLP jars are installed |
| tldr | `rouge1`, `rouge2`, `rougeL` | as for commongen |

BERTScore is never computed (its model comes from the Hugging Face Hub). A metric that is left out says
why once per process, on stderr, and has no key.

The IMDB perplexities of the paper need a language model: `perplexity(model, tokenizer, prompts, texts)`.
"""

from __future__ import annotations

import math
import shutil
import threading

import numpy as np

from common.errors import UsageError
from common.rewards import (CiderDReward, VaderSentimentReward, best_rouge, check_batch, coco_tokenize,
                            model_max_length, say_once, spice_status)
from common.tasks import get_task

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
METRIC_KEYS = {
    "imdb": ("sentiment",),
    "commongen": ROUGE_KEYS + ("bleu", "cider", "coverage", "meteor", "spice"),
    "tldr": ROUGE_KEYS,
}
"""every key a task can report; `meteor` and `spice` only with slow_metrics=True, `coverage` only with
concepts (meta or the CommonGen prompt)"""


# ---------------------------------------------------------------------------------------------------
# CommonGen pieces
# ---------------------------------------------------------------------------------------------------
def corpus_bleu(responses: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU (default 13a tokenisation, case-sensitive), 0-100, with a variable number
    of references per sample."""
    import sacrebleu

    n_refs = max(len(r) for r in references)
    streams = [[refs[j].strip() if j < len(refs) else None for refs in references] for j in range(n_refs)]
    return float(sacrebleu.corpus_bleu([r.strip() for r in responses], streams).score)


_STEMMER = None


def _stem(word: str) -> str:
    global _STEMMER
    if _STEMMER is None:
        from nltk.stem import PorterStemmer

        _STEMMER = PorterStemmer()
    return _STEMMER.stem(word.lower())


# irregular verb forms and plurals -> base form, for the crude lemmatisation of `concept_coverage`
# (CommonGen's concepts are base forms; its sentences are often in the past tense)
_IRREGULAR = {}
for _base, _forms in {
    "be": "was were been", "bear": "bore borne born", "beat": "beaten", "become": "became",
    "begin": "began begun", "bend": "bent", "bite": "bit bitten", "blow": "blew blown", "break": "broke broken",
    "bring": "brought", "build": "built", "buy": "bought", "catch": "caught", "choose": "chose chosen",
    "come": "came", "dig": "dug", "do": "did done", "draw": "drew drawn", "drink": "drank drunk",
    "drive": "drove driven", "eat": "ate eaten", "fall": "fell fallen", "feed": "fed", "feel": "felt",
    "fight": "fought", "find": "found", "fly": "flew flown", "forget": "forgot forgotten",
    "freeze": "froze frozen", "get": "got gotten", "give": "gave given", "go": "went gone", "grow": "grew grown",
    "hang": "hung", "have": "had has", "hear": "heard", "hide": "hid hidden", "hold": "held", "keep": "kept",
    "kneel": "knelt", "know": "knew known", "lay": "laid", "lead": "led", "leave": "left", "lie": "lay lain",
    "light": "lit", "lose": "lost", "make": "made", "meet": "met", "pay": "paid", "ride": "rode ridden",
    "ring": "rang rung", "rise": "rose risen", "run": "ran", "say": "said", "see": "saw seen",
    "sell": "sold", "send": "sent", "shake": "shook shaken", "shine": "shone", "shoot": "shot",
    "sing": "sang sung", "sink": "sank sunk", "sit": "sat", "sleep": "slept", "slide": "slid",
    "speak": "spoke spoken", "spend": "spent", "spin": "spun", "stand": "stood", "steal": "stole stolen",
    "stick": "stuck", "sting": "stung", "strike": "struck", "sweep": "swept", "swim": "swam swum", "swing": "swung",
    "take": "took taken", "teach": "taught", "tear": "tore torn", "tell": "told", "think": "thought",
    "throw": "threw thrown", "wake": "woke woken", "wear": "wore worn", "win": "won", "write": "wrote written",
    "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women", "child": "children", "person": "people",
    "mouse": "mice", "goose": "geese", "knife": "knives", "leaf": "leaves", "wolf": "wolves", "shelf": "shelves",
    "life": "lives", "half": "halves", "wife": "wives", "loaf": "loaves", "calf": "calves", "fish": "fishes",
}.items():
    for _form in _forms.split():
        _IRREGULAR.setdefault(_form, _base)


def concept_coverage(concepts: list[str], response: str) -> float:
    """Fraction of `concepts` found in `response` (our addition to the paper's metrics), with a crude
    lemmatisation: a concept counts when a response word has the same Porter stem ("throws" ~ "throw",
    "dancing" ~ "dance"), is a listed irregular form of it ("threw" ~ "throw"), or starts with the
    concept's stem of 4+ letters ("dancer" ~ "dance")."""
    if not concepts:
        return 0.0
    words = coco_tokenize(response).split()
    stems = {_stem(w) for w in words} | {_stem(_IRREGULAR[w]) for w in words if w in _IRREGULAR}
    covered = 0
    for concept in concepts:
        c = _stem(concept)
        if c in stems or (len(c) >= 4 and any(w.startswith(c) for w in words)):
            covered += 1
    return covered / len(concepts)


_COMMONGEN_PREFIX = "generate a sentence with:"


def _concepts(prompts, meta) -> list[list[str]] | None:
    """Per-sample concepts from meta["concepts"], else parsed from the CommonGen prompt; None if neither."""
    if meta is not None:
        if len(meta) != len(prompts):
            raise UsageError(f"meta must have one dict per sample (got {len(meta)} for {len(prompts)} samples)")
        if all(isinstance(m, dict) and "concepts" in m for m in meta):
            return [list(m["concepts"]) for m in meta]
    if all(p.strip().lower().startswith(_COMMONGEN_PREFIX) for p in prompts):
        return [p.strip()[len(_COMMONGEN_PREFIX):].strip().rstrip(".").split() for p in prompts]
    return None


_METEOR = None
_METEOR_LOCK = threading.Lock()


def meteor_scores(responses: list[str], references: list[list[str]]) -> list[float] | None:
    """Per-sample METEOR 1.5 from pycocoevalcap's Java jar (shipped with the package, runs offline), one
    JVM kept per process; None (with a once-per-process message) where it cannot run."""
    global _METEOR
    if shutil.which("java") is None:
        say_once("meteor", "meteor skipped: pycocoevalcap's METEOR needs java on PATH")
        return None
    try:
        with _METEOR_LOCK:
            if _METEOR is None:
                from pycocoevalcap.meteor.meteor import Meteor

                _METEOR = Meteor()
        gts = {i: [coco_tokenize(r) for r in refs] for i, refs in enumerate(references)}
        res = {i: [coco_tokenize(r)] for i, r in enumerate(responses)}
        _, scores = _METEOR.compute_score(gts, res)
        return [float(s) for s in scores]
    except Exception as e:
        say_once("meteor", f"meteor skipped: pycocoevalcap's METEOR failed ({type(e).__name__}: {e})")
        return None


# ---------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------
def compute_metrics(task_name: str, prompts: list[str], responses: list[str], references: list[list[str]],
                    meta: list[dict] | None = None, slow_metrics: bool = False) -> dict[str, float]:
    """The task's evaluation metrics over a set of samples (keys in the module docstring). `meta`: one
    dict per sample (Example.meta; CommonGen uses "concepts"). `slow_metrics`: also the Java metrics
    (METEOR, SPICE where installed)."""
    task = get_task(task_name)
    check_batch(prompts, responses, references, need_references=task.name != "imdb")
    if not responses:
        raise UsageError("compute_metrics needs at least one sample")
    out: dict[str, float] = {}

    if task.name == "imdb":
        out["sentiment"] = float(np.mean(VaderSentimentReward()(prompts, responses, references)))
        return out

    rouge = best_rouge(ROUGE_KEYS, responses, references)
    out.update({k: float(np.mean(v)) for k, v in rouge.items()})
    if task.name == "tldr":
        return out

    # commongen
    out["bleu"] = corpus_bleu(responses, references)
    out["cider"] = float(np.mean(CiderDReward(None)(prompts, responses, references)))
    concepts = _concepts(prompts, meta)
    if concepts is not None:
        out["coverage"] = float(np.mean([concept_coverage(c, r) for c, r in zip(concepts, responses)]))
    else:
        say_once("coverage", "coverage skipped: no concepts (pass meta with 'concepts' or CommonGen prompts)")
    if slow_metrics:
        scores = meteor_scores(responses, references)
        if scores is not None:
            out["meteor"] = float(np.mean(scores))
        ok, reason = spice_status()
        if ok:
            from common.rewards import SpiceReward

            out["spice"] = float(np.mean(SpiceReward()(prompts, responses, references)))
        else:
            say_once("spice", f"spice skipped: {reason}")
    else:
        say_once("slow", "meteor and spice skipped: they start a JVM (METEOR ~6 s); pass --slow-metrics")
    say_once("bertscore", "bertscore skipped: it needs the bert_score package and roberta-large weights from "
                          "the Hugging Face Hub, which cannot be reached offline")
    return out


# ---------------------------------------------------------------------------------------------------
# perplexity (IMDB: of the references and of the outputs)
# ---------------------------------------------------------------------------------------------------
def perplexity(model, tokenizer, prompts: list[str], texts: list[str], device=None, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood) of the tokens of `texts`, each conditioned on its prompt, under
    a causal LM (or an encoder-decoder LM: prompt in the encoder, text scored from the decoder's start token);
    the mean is over all text tokens of all samples. Prompt and text are tokenised
    separately (no special tokens) and joined; an empty prompt starts from BOS where the tokenizer has
    one (else the text's first token is not scored). Sequences longer than the model takes lose the
    start of the prompt. Right padding with an attention mask, so positions are the unpadded ones."""
    import torch
    import torch.nn.functional as F

    if len(prompts) != len(texts):
        raise UsageError(f"prompts and texts must have the same length (got {len(prompts)} and {len(texts)})")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1 (got {batch_size})")
    from common.generation import is_seq2seq, left_pad, right_pad

    device = torch.device(device) if device is not None else next(model.parameters()).device
    seq2seq = is_seq2seq(model)
    max_len = model_max_length(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    seqs = []
    for prompt, text in zip(prompts, texts):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        t_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        if not p_ids and tokenizer.bos_token_id is not None:
            p_ids = [tokenizer.bos_token_id]
        keep = max_len if seq2seq else max_len - len(t_ids)  # seq2seq: prompt and text on two sides
        p_ids = p_ids[len(p_ids) - keep:] if keep > 0 else []
        seqs.append((p_ids, t_ids))

    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                width = max(len(p) + len(t) for p, t in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                labels = torch.full((len(chunk), width), -100, dtype=torch.long)
                if seq2seq:  # the prompt into the encoder, the text scored by the decoder from its start token
                    from common.seq2seq import seq2seq_inputs

                    text_ids, text_mask = right_pad([t for _, t in chunk], pad_id, device=device)
                    logits = model(**seq2seq_inputs(model, *left_pad([p for p, _ in chunk], pad_id, device),
                                                    text_ids)).logits
                    target = text_ids.masked_fill(text_mask == 0, -100)
                else:
                    for i, (p, t) in enumerate(chunk):
                        n = len(p) + len(t)
                        ids[i, :n] = torch.tensor(p + t, dtype=torch.long)
                        mask[i, :n] = 1
                        labels[i, len(p):n] = torch.tensor(t, dtype=torch.long)
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
                    target = labels[:, 1:].to(device)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      ignore_index=-100, reduction="sum")
                total_nll += float(nll)
                total_tokens += int((target != -100).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise UsageError("perplexity: the texts have no scorable tokens")
    return math.exp(total_nll / total_tokens)
