"""The offline digits transfer task (tools/tasks.py: digits_transfer): pre-train on
digits 0-4, fine-tune on 5-9.  Needs scikit-learn (its bundled digits, no download);
fast (a few seconds)."""
import pytest
import torch

pytest.importorskip("sklearn", reason="the digits task needs scikit-learn: pip install scikit-learn")

from conftest import load_tool  # noqa: E402

import slimfit_fx  # noqa: E402

tasks = load_tool("tasks")


@pytest.fixture(scope="module")
def digits():
    return tasks.digits_transfer(seed=0)


def test_splits_are_disjoint_and_cover_the_classes(digits):
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target)
    rows = {}
    for task, first in (("pretrain", 0), ("finetune", 5)):
        for split in ("train", "test"):
            idx = digits[task][f"{split}_index"]
            rows[task, split] = set(idx.tolist())
            # Labels remapped to 0-4, in order (5 -> 0, ..., 9 -> 4).
            assert torch.equal(digits[task][f"{split}_labels"], target[idx] - first)
            assert set(digits[task][f"{split}_labels"].tolist()) == set(range(5))
    all_rows = list(rows.values())
    assert sum(map(len, all_rows)) == len(set().union(*all_rows)) == len(target)  # disjoint, every image once
    # Stratified 75/25 split within each task.
    for task in ("pretrain", "finetune"):
        n_train, n_test = len(rows[task, "train"]), len(rows[task, "test"])
        assert 0.2 < n_test / (n_train + n_test) < 0.3


def test_shapes_scaling_and_determinism(digits):
    for task in digits.values():
        for split in ("train", "test"):
            x, y = task[f"{split}_pixels"], task[f"{split}_labels"]
            assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and len(x) == len(y)
            assert x.min() >= -1 and x.max() <= 1
    again = tasks.digits_transfer(seed=0)
    assert all(torch.equal(digits[t][k], again[t][k]) for t in digits for k in digits[t])
    other = tasks.digits_transfer(seed=1)
    assert not torch.equal(digits["finetune"]["test_index"].sort().values,
                           other["finetune"]["test_index"].sort().values)
    big = tasks.digits_transfer(seed=0, image_size=16)
    assert big["finetune"]["train_pixels"].shape[1:] == (1, 16, 16)
    few = tasks.digits_transfer(seed=0, finetune_train_per_class=10)["finetune"]
    assert torch.bincount(few["train_labels"]).tolist() == [10] * 5
    assert torch.equal(few["test_index"].sort().values, digits["finetune"]["test_index"].sort().values)  # same test set
    with pytest.raises(ValueError, match="overlap"):
        tasks.digits_transfer(pretrain_classes=range(6), finetune_classes=range(5, 10))


def test_tiny_vit_trains_on_digits_plain_and_compiled(digits):
    data = digits["finetune"]
    model = tasks.tiny_vit_classifier(seed=0)
    assert sum(p.numel() for p in model.parameters()) < 400_000
    out = tasks.train(model, data, steps=3, batch=8, lr=1e-3, seed=0)
    assert len(out["losses"]) == len(out["step_seconds"]) == 3
    assert 0.0 <= tasks.evaluate(model, data) <= 1.0
    # Through slimfit_fx.compile with the scheduler: runs, and freezes 90% of the layers.
    model = tasks.tiny_vit_classifier(seed=0)
    example = {"pixel_values": data["train_pixels"][:4], "labels": data["train_labels"][:4]}
    slim = slimfit_fx.compile(model, example)
    out = tasks.train(slim, data, steps=2, batch=8, lr=1e-3, seed=0,
                      scheduler=lambda m, o: slimfit_fx.Scheduler(m, o, slimfit_fx.Ratio(0.9)))
    sched = out["scheduler"]
    assert sched.iteration == 2 and len(sched.frozen) == int(0.9 * len(sched.layers))
