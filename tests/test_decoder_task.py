"""tools/decoder_accuracy.py, the offline decoder task, at a few steps: real data, a held-out split,
a cached checkpoint, and every setting trained from it."""
from __future__ import annotations

import math

import pytest
from conftest import load_tool


@pytest.fixture(scope="module")
def task():
    return load_tool("decoder_accuracy")


def test_topics_are_held_out_whole(task):
    from pydoc_data.topics import topics

    train, test, held = task.pydoc_split()
    assert 10 <= len(held) < len(topics) // 2
    for name in held:  # no held-out passage is in the training text
        text = topics[name].encode()
        assert text[:200] in test and text[:200] not in train and text[-200:] not in train, name
    assert len(task.stdlib_corpus(100_000)) == 100_000


def test_pretraining_is_cached_and_fine_tuning_runs_every_setting(task, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFIT_FX_CACHE", str(tmp_path))
    recipe = {**task.PRETRAIN, "steps": 12, "batch": 4, "corpus_bytes": 200_000}
    state, info = task.pretrained(recipe)
    assert "cached" not in info and task.cache_path(recipe).exists()
    again, info = task.pretrained(recipe)
    assert info["cached"] == str(task.cache_path(recipe))
    assert all((state[k] == again[k]).all() for k in state)
    train, test, _ = task.pydoc_split()
    train_ids, test_ids = task.as_ids(train), task.as_ids(test[:4096])
    out = task.fine_tune(state, train_ids, test_ids, seed=0, steps=3, batch=4, seq=64, lr=1e-3)
    assert set(out) == set(task.DEFAULT_SETTINGS)
    for name, r in out.items():
        assert math.isfinite(r["bpb"]) and 0 < r["bpb"] < 9, name
    assert out["ratio"]["saved_bytes"] < out["full"]["saved_bytes"] / 2
    assert out["ratio"]["frozen_fraction"] > 0.8
