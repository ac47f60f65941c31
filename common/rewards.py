"""Task rewards (SPEC section 3): one terminal score per sample.

Every reward is a plain callable

    reward(prompts: list[str], responses: list[str], references: list[list[str]]) -> list[float]

that scores a whole batch at once (models run in mini-batches, never one call per sample). Rewards that
do not need the prompt or the references ignore them.

| task | paper reward | here |
|---|---|---|
| IMDB | P(positive) of `lvwerra/distilbert-imdb` | `HFSentimentReward` (any local classifier); `VaderSentimentReward` is the offline default |
| CommonGen | CIDEr-D + SPICE | `CommonGenReward` (SPICE only where its Stanford CoreNLP jars are installed) |
| TL;DR | learned reward model | `RewardModelReward` |

Also `RougeReward` (ROUGE F-measure against the best reference) and `sentiment_accuracy`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import defaultdict

import numpy as np

from common.errors import UsageError

# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------
_SAID: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Print `message` on stderr the first time `key` is seen in this process."""
    if key not in _SAID:
        _SAID.add(key)
        print(message, file=sys.stderr, flush=True)


def check_batch(prompts, responses, references, need_references: bool = False) -> None:
    """The three lists must be parallel; `need_references`: every sample needs at least one reference."""
    if not (len(prompts) == len(responses) == len(references)):
        raise UsageError(f"prompts, responses and references must have the same length "
                         f"(got {len(prompts)}, {len(responses)}, {len(references)})")
    if need_references:
        for i, refs in enumerate(references):
            if isinstance(refs, str) or len(refs) == 0:
                raise UsageError(f"sample {i} needs a list of at least one reference string "
                                 f"(got {refs!r})")


def default_device(device=None):
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_local(path: str) -> bool:
    """A path rather than a hub id ("owner/name" or "name")."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
            or os.sep != "/" and os.sep in path)


def load_pretrained(model_name_or_path: str, loader, **kwargs):
    """`loader.from_pretrained` with one-line UsageErrors: a local folder that does not exist, or a hub
    id that cannot be loaded (no network, no cache)."""
    path = os.path.expanduser(str(model_name_or_path))
    if os.path.isdir(path):
        return loader.from_pretrained(path, **kwargs)
    if _looks_local(path) or os.path.exists(path):
        raise UsageError(f"model folder {model_name_or_path!r} does not exist: pass a folder written by "
                         "save_pretrained (or a Hugging Face Hub id)")
    try:
        return loader.from_pretrained(path, **kwargs)
    except Exception as e:  # network, missing repo, missing cache: all mean the same thing here
        raise UsageError(f"cannot load model {model_name_or_path!r} ({type(e).__name__}): it is not a local "
                         "folder and cannot be loaded from the Hugging Face Hub offline; pass a local folder "
                         "written by save_pretrained") from None


def adapter_config(model_name_or_path: str) -> dict | None:
    """The `adapter_config.json` of a PEFT adapter (local folder or hub id), None for a plain model."""
    import json

    path = os.path.expanduser(str(model_name_or_path))
    if os.path.isdir(path):
        f = os.path.join(path, "adapter_config.json")
        return json.loads(open(f).read()) if os.path.isfile(f) else None
    if _looks_local(path):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(open(hf_hub_download(path, "adapter_config.json")).read())
    except Exception:  # not an adapter, or not reachable: the plain loader says which in one line
        return None


def load_classifier(model_name_or_path: str, quantization=None, num_labels: int | None = None):
    """(tokenizer, sequence classifier) of a model folder / hub id, or of a PEFT adapter: its
    adapter_config.json names the base (`base_model_name_or_path`), loaded as a sequence classifier, then the
    adapter is applied (LoRA weights and the score head it saves). The tokenizer comes from the adapter's
    folder when it has one, else from the base. `quantization`: a BitsAndBytesConfig (CUDA)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kw = {} if quantization is None else {"quantization_config": quantization,
                                          "device_map": {"": torch.cuda.current_device()}}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    cfg = adapter_config(model_name_or_path)
    if cfg is None:
        kw.pop("num_labels", None)  # a plain classifier keeps its own head (checked by the caller)
        return (load_pretrained(model_name_or_path, AutoTokenizer),
                load_pretrained(model_name_or_path, AutoModelForSequenceClassification, **kw))
    from peft import PeftModel

    task_type, base = cfg.get("task_type") or "SEQ_CLS", cfg.get("base_model_name_or_path")
    if task_type != "SEQ_CLS":
        raise UsageError(f"the adapter {model_name_or_path!r} has task_type {task_type}: a reward model adapter "
                         "must be a sequence classifier (SEQ_CLS) that saves its score head")
    if not base:
        raise UsageError(f"the adapter {model_name_or_path!r} does not name its base model "
                         "(base_model_name_or_path in adapter_config.json)")
    try:
        tokenizer = load_pretrained(model_name_or_path, AutoTokenizer)
    except (UsageError, OSError, ValueError):
        tokenizer = load_pretrained(base, AutoTokenizer)
    model = load_pretrained(base, AutoModelForSequenceClassification, **kw)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # the adapter was trained with the grown vocabulary
    path = os.path.expanduser(str(model_name_or_path))
    from common.lora import quiet_peft

    with quiet_peft():
        return tokenizer, PeftModel.from_pretrained(model, path if os.path.isdir(path) else model_name_or_path)


def ensure_pad_token(tokenizer, model) -> None:
    """Give the tokenizer a pad token distinct from EOS (adding one and growing the embeddings if needed)
    and record it in the model's config, so HF's sequence classifiers find the last non-pad token."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def model_max_length(tokenizer, model) -> int:
    """The longest input the model takes: the tokenizer's limit, capped by the position embeddings."""
    limits = [tokenizer.model_max_length] if tokenizer.model_max_length < 1_000_000 else []
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits) if limits else 1024


# ---------------------------------------------------------------------------------------------------
# IMDB: sentiment
# ---------------------------------------------------------------------------------------------------
_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return _VADER


class VaderSentimentReward:
    """P(positive) = (VADER compound + 1) / 2 of prompt + response, in [0, 1]. Lexicon-based, offline,
    no model: the default IMDB reward when the paper's classifier is not available."""

    def __call__(self, prompts, responses, references=None) -> list[float]:
        references = references if references is not None else [[] for _ in prompts]
        check_batch(prompts, responses, references)
        analyzer = _vader()
        return [(analyzer.polarity_scores(p + r)["compound"] + 1.0) / 2.0 for p, r in zip(prompts, responses)]


class HFSentimentReward:
    """Softmax probability of the positive class of a Hugging Face sequence classifier (paper:
    `lvwerra/distilbert-imdb`) on prompt + response.

    The positive class is `positive_label` when given (a label name or an index), else the label of
    `config.id2label` containing "pos" (any case), else index 1. Inputs longer than the model takes
    are cut from the left, so the response (what is being rewarded) is always kept."""

    def __init__(self, model_name_or_path: str, positive_label: str | int | None = None, batch_size: int = 32,
                 device=None, quantization=None):
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1 (got {batch_size})")
        self.device = default_device(device)
        self.tokenizer, self.model = load_classifier(model_name_or_path, quantization)
        (self.model if quantization is not None else self.model.to(self.device)).eval()
        ensure_pad_token(self.tokenizer, self.model)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.max_length = model_max_length(self.tokenizer, self.model)
        self.batch_size = batch_size
        self.positive_index = self._positive_index(positive_label)

    def _positive_index(self, positive_label) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        n = self.model.config.num_labels
        if n < 2:
            raise UsageError(f"the sentiment classifier has {n} label(s): it needs at least 2 (negative, positive)")
        if positive_label is not None:
            if isinstance(positive_label, int) or str(positive_label).isdigit():
                index = int(positive_label)
                if not 0 <= index < n:
                    raise UsageError(f"positive_label {positive_label} is out of range: the model has {n} labels")
                return index
            for k, v in id2label.items():
                if v.lower() == str(positive_label).lower():
                    return k
            raise UsageError(f"positive_label {positive_label!r} is not one of the model's labels "
                             f"{sorted(id2label.values())}")
        for k, v in sorted(id2label.items()):
            if "pos" in v.lower():
                return k
        return 1

    def __call__(self, prompts, responses, references=None) -> list[float]:
        import torch

        references = references if references is not None else [[] for _ in prompts]
        check_batch(prompts, responses, references)
        texts = [p + r for p, r in zip(prompts, responses)]
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                enc.pop("token_type_ids", None)  # one segment: the models' default (None) is what we want
                logits = self.model(**enc).logits.float()
                out.extend(torch.softmax(logits, dim=-1)[:, self.positive_index].tolist())
        return out


def sentiment_accuracy(reward, texts: list[str], labels: list[int], threshold: float = 0.5) -> float:
    """Accuracy of a P(positive) reward as a classifier: predicts positive (1) when the score on the full
    text exceeds `threshold`. E.g. `sentiment_accuracy(VaderSentimentReward(), texts, labels)`."""
    if len(texts) != len(labels) or not texts:
        raise UsageError(f"texts and labels must be non-empty and of the same length "
                         f"(got {len(texts)} and {len(labels)})")
    scores = reward(list(texts), ["" for _ in texts], [[] for _ in texts])
    return float(np.mean([int(s > threshold) == int(y) for s, y in zip(scores, labels)]))


# ---------------------------------------------------------------------------------------------------
# CommonGen: CIDEr-D (+ SPICE)
# ---------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\w+|[^\w\s]")


def coco_tokenize(text: str) -> str:
    """Simple offline stand-in for the COCO PTB tokenizer: lowercase, split punctuation off the words
    and, as the COCO pipeline does, drop the punctuation tokens. Returns the tokens joined by spaces."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t[0].isalnum() or t[0] == "_")


def _cider_scorer_class():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    class _FixedCorpusCiderScorer(CiderScorer):
        """pycocoevalcap's CIDEr-D scorer (clipping, Gaussian length penalty) with document frequencies
        taken from a fixed reference corpus instead of the references added to this scorer.

        The library computes `ref_len` (log of the number of documents) inside `compute_cider` from
        the scored batch; the property below pins it to the corpus size."""

        def __init__(self, document_frequency, n_documents: int, n: int = 4, sigma: float = 6.0):
            self._log_n_documents = float(np.log(float(n_documents)))
            super().__init__(n=n, sigma=sigma)
            self.document_frequency = document_frequency

        @property
        def ref_len(self):
            return self._log_n_documents

        @ref_len.setter
        def ref_len(self, value):  # the library's per-batch value is ignored
            pass

        def compute_score(self, option=None, verbose=0):
            # no compute_doc_freq (fixed corpus) and no batch-size assertion on the document frequencies
            scores = np.array(self.compute_cider())
            return float(np.mean(scores)) if len(scores) else 0.0, scores

    return CiderScorer, _FixedCorpusCiderScorer


class DocumentFrequencies:
    """CIDEr-D's document frequencies of a fixed reference corpus, compact: how many documents (concept
    sets) contain each n-gram, counted with pycocoevalcap's own `precook` exactly as its `compute_doc_freq`
    counts them, but stored as two sorted NumPy arrays (n-gram hash -> count) instead of a dict of tuples
    of strings: CommonGen's training split has ~440k n-grams, ~170 MiB as Python objects, ~5 MiB here. They
    are counted by sorting every document's hashes (np.unique), not in a dict of Python ints: building
    CommonGen's reward grew the process by 20 MiB with the dict, by 12 without.

    Read like the library reads its dict: `df[ngram]` (a tuple of words), 0 where the corpus lacks it. Keys
    are Python's 64-bit hashes of the n-gram tuples, consistent within one process (the table is built in
    the process that reads it); two of ~10^6 n-grams share a hash with probability ~10^-8."""

    def __init__(self, reference_corpus: list[list[str]], n: int = 4):
        from array import array

        from pycocoevalcap.cider.cider_scorer import precook

        hashes = array("q")  # every document's distinct n-grams, as raw 64-bit hashes (no Python dict to count)
        for refs in reference_corpus:
            if isinstance(refs, str) or not refs:
                raise UsageError("reference_corpus must be a list of non-empty lists of reference strings")
            ngrams = {g for r in refs for g in precook(coco_tokenize(r), n)}  # each document counts once
            hashes.extend(hash(g) for g in ngrams)
        self._keys, counts = np.unique(np.frombuffer(hashes, dtype=np.int64), return_counts=True)
        self._counts = counts.astype(np.float64)
        self.n_documents = len(reference_corpus)

    def __len__(self):
        return len(self._keys)

    def __getitem__(self, ngram) -> float:
        h = hash(ngram)
        i = int(np.searchsorted(self._keys, h))
        return float(self._counts[i]) if i < len(self._keys) and self._keys[i] == h else 0.0


class CiderDReward:
    """Per-sample CIDEr-D (pycocoevalcap's `CiderScorer`: n-grams 1-4, clipping, length penalty sigma 6,
    x10 scale) of each response against its own references.

    `reference_corpus` (one list of references per document, e.g. every concept set of the training
    split) fixes the document frequencies once, so a sample's score does not depend on the rest of the
    batch. Without it the batch's own references are the corpus (the library's behaviour: a batch of
    one then scores 0)."""

    def __init__(self, reference_corpus: list[list[str]] | None = None, n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.document_frequency = None
        self.n_documents = 0
        if reference_corpus is not None:
            if not reference_corpus:
                raise UsageError("reference_corpus is empty: pass one list of references per document, or None")
            self.document_frequency = DocumentFrequencies(reference_corpus, n)
            self.n_documents = self.document_frequency.n_documents

    def __call__(self, prompts, responses, references) -> list[float]:
        check_batch(prompts, responses, references, need_references=True)
        if not responses:
            return []
        base, fixed = _cider_scorer_class()
        if self.document_frequency is None:
            scorer = base(n=self.n, sigma=self.sigma)
        else:
            scorer = fixed(self.document_frequency, self.n_documents, n=self.n, sigma=self.sigma)
        for response, refs in zip(responses, references):
            scorer += (coco_tokenize(response), [coco_tokenize(r) for r in refs])
        _, scores = scorer.compute_score()
        return [float(s) for s in scores]


def _spice_dir() -> str:
    import pycocoevalcap

    return os.path.join(list(pycocoevalcap.__path__)[0], "spice")


def spice_status() -> tuple[bool, str]:
    """(available, reason): SPICE needs Java and the Stanford CoreNLP 3.6.0 jars that pycocoevalcap
    downloads from nlp.stanford.edu at first use (not shipped with the package)."""
    if shutil.which("java") is None:
        return False, "no java on PATH"
    try:
        lib = os.path.join(_spice_dir(), "lib")
    except Exception as e:
        return False, f"pycocoevalcap is not importable ({type(e).__name__})"
    missing = [j for j in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not os.path.isfile(os.path.join(lib, j))]
    if missing:
        return False, (f"pycocoevalcap's SPICE needs {' and '.join(missing)} in {lib}, which it downloads "
                       "from nlp.stanford.edu at first use (no network here)")
    return True, ""


def spice_available() -> bool:
    return spice_status()[0]


class SpiceReward:
    """Per-sample SPICE F-score (pycocoevalcap's Java scorer) of each response against its references.
    Raises UsageError where SPICE cannot run (see `spice_status`)."""

    def __init__(self):
        ok, reason = spice_status()
        if not ok:
            raise UsageError(f"SPICE cannot run: {reason}")
        from pycocoevalcap.spice.spice import Spice

        self._spice = Spice()  # jars present: no download

    def __call__(self, prompts, responses, references) -> list[float]:
        check_batch(prompts, responses, references, need_references=True)
        if not responses:
            return []
        gts = {i: [r.strip() for r in refs] for i, refs in enumerate(references)}
        res = {i: [r.strip().replace("\n", " ")] for i, r in enumerate(responses)}
        _, per_sample = self._spice.compute_score(gts, res)
        out = [s["All"]["f"] for s in per_sample]
        return [0.0 if not np.isfinite(f) else float(f) for f in out]


class CommonGenReward:
    """The paper's CommonGen reward: CIDEr-D + SPICE per sample. Where SPICE cannot run it is CIDEr-D
    alone, with a warning printed once per process."""

    def __init__(self, reference_corpus: list[list[str]] | None = None):
        self.cider = CiderDReward(reference_corpus)
        ok, reason = spice_status()
        self.spice = SpiceReward() if ok else None
        if not ok:
            say_once("spice-reward", f"SPICE skipped: {reason}; the CommonGen reward is CIDEr-D alone")

    def __call__(self, prompts, responses, references) -> list[float]:
        scores = self.cider(prompts, responses, references)
        if self.spice is not None:
            scores = [c + s for c, s in zip(scores, self.spice(prompts, responses, references))]
        return scores


# ---------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------
ROUGE_KINDS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ROUGE_SCORERS: dict = {}


def rouge_scorer(kinds: tuple[str, ...]):
    from rouge_score import rouge_scorer as rs

    kinds = tuple(kinds)
    for k in kinds:
        if k not in ROUGE_KINDS:
            raise UsageError(f"unknown ROUGE kind {k!r}: choose one of {', '.join(ROUGE_KINDS)}")
    if kinds not in _ROUGE_SCORERS:
        _ROUGE_SCORERS[kinds] = rs.RougeScorer(list(kinds), use_stemmer=True)
    return _ROUGE_SCORERS[kinds]


def best_rouge(kinds: tuple[str, ...], responses, references) -> dict[str, list[float]]:
    """Per kind, per sample: the F-measure against the best-matching reference (best per kind)."""
    scorer = rouge_scorer(kinds)
    out: dict[str, list[float]] = {k: [] for k in kinds}
    for response, refs in zip(responses, references):
        per_ref = [scorer.score(ref.strip(), response.strip()) for ref in refs]
        for k in kinds:
            out[k].append(max(s[k].fmeasure for s in per_ref))
    return out


class RougeReward:
    """ROUGE F-measure (rouge-score, Porter stemming) of the response against its best reference."""

    def __init__(self, kind: str = "rougeL"):
        rouge_scorer((kind,))  # validates the kind
        self.kind = kind

    def __call__(self, prompts, responses, references) -> list[float]:
        check_batch(prompts, responses, references, need_references=True)
        return best_rouge((self.kind,), responses, references)[self.kind]


# ---------------------------------------------------------------------------------------------------
# TL;DR: learned reward model
# ---------------------------------------------------------------------------------------------------
class RewardModelReward:
    """Raw scalar of a learned reward model (AutoModelForSequenceClassification, num_labels 1) on
    prompt.rstrip() + response, read at the last real token.

    The tokenizer gets a pad token distinct from EOS (so an EOS at the end of a response is a real
    token) and pads on the right; `config.pad_token_id` is set, so HF pools the rightmost non-pad
    token. Inputs longer than the model takes are cut from the left (the response is kept).

    `model_name_or_path` may be a PEFT adapter (folder or hub id) on a base model (`load_classifier`);
    `quantization`: a BitsAndBytesConfig, the base loaded in 4/8-bit on the GPU."""

    def __init__(self, model_name_or_path: str, batch_size: int = 16, device=None, quantization=None):
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1 (got {batch_size})")
        self.device = default_device(device)
        self.tokenizer, self.model = load_classifier(model_name_or_path, quantization, num_labels=1)
        if self.model.config.num_labels != 1:
            raise UsageError(f"the reward model {model_name_or_path!r} has {self.model.config.num_labels} "
                             "labels: a reward model must have num_labels 1")
        (self.model if quantization is not None else self.model.to(self.device)).eval()
        ensure_pad_token(self.tokenizer, self.model)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.max_length = model_max_length(self.tokenizer, self.model)
        self.batch_size = batch_size

    def __call__(self, prompts, responses, references=None) -> list[float]:
        import torch

        references = references if references is not None else [[] for _ in prompts]
        check_batch(prompts, responses, references)
        texts = [p.rstrip() + r for p, r in zip(prompts, responses)]
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                enc.pop("token_type_ids", None)  # GPT-2 would embed zeros as token 0: use the default (None)
                out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out
