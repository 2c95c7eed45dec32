"""The inter-layer scheduler: schedule properties, policies, resume, and what freezing does to a step."""
import copy
import math
import random

import pytest
import torch
from conftest import make_bert, make_gpt2, make_vit

import slimfit_fx
from slimfit_fx import Budget, ConfigError, Ratio, Scheduler, SchedulerError
from slimfit_fx.measure import saved_bytes


def _bert_no_dropout():
    torch.manual_seed(0)
    return make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _train(model, optimizer, inputs, steps, check=None):
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        if check is not None:
            check()
        optimizer.step()
        optimizer.zero_grad()


def _trained_sets(sched):
    return [set(sched.layers) - set(frozen) for _, frozen in sched.history]


def _max_streak(sched) -> int:
    worst, streak = 0, dict.fromkeys(sched.layers, 0)
    for _, frozen in sched.history:
        for name in sched.layers:
            streak[name] = streak[name] + 1 if name in frozen else 0
            worst = max(worst, streak[name])
    return worst


def test_ratio_freezes_exactly_k_and_sweeps_every_layer_first():
    model, x = _bert_no_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(model, opt, Ratio(0.9))
    t = len(sched.layers)
    assert t == 22  # 3 embeddings + embedding LN + 2 x 8 per block + pooler + classifier
    k = math.floor(0.9 * t)
    _train(model, opt, x, 20)
    assert all(len(frozen) == k for _, frozen in sched.history)
    sweep = math.ceil(t / (t - k))
    seen = set().union(*_trained_sets(sched)[:sweep])
    assert seen == set(sched.layers), "the random initial scores must sweep every layer once first"
    assert bool(sched.measured.all())
    assert all(math.isfinite(s) for s in sched.scores.tolist())
    # After the sweep every score is a measured change (far below the 1e6 initial values).
    assert float(sched.scores.max()) < 1e3


def test_frozen_layers_get_no_gradient_and_do_not_move():
    model, x = _bert_no_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = Scheduler(model, opt, Ratio(0.8))
    named = dict(model.named_parameters())
    for _ in range(6):
        frozen = list(sched.frozen)
        before = {n: named[n].detach().clone() for n in frozen}
        model(**x).loss.backward()
        for n in frozen:
            assert named[n].grad is None, n
        for n in sched.trained:
            assert named[n].grad is not None, n
        assert all(p.grad is not None for n, p in named.items() if n.endswith("bias")), "biases always train"
        opt.step()
        opt.zero_grad(set_to_none=False)  # zeros, not None: the scheduler must still drop frozen grads
        for n in frozen:
            assert torch.equal(named[n], before[n]), f"{n} moved while frozen (momentum or weight decay)"


def test_same_seed_same_schedule_other_seed_differs():
    runs = []
    for seed in (0, 0, 1):
        model, x = _bert_no_dropout()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = Scheduler(model, opt, Ratio(0.75), seed=seed)
        _train(model, opt, x, 5)
        runs.append(sched.history)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_staleness_bound_holds_under_ratio():
    model, x = _bert_no_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # 22 layers, 3 trained per iteration: every layer must train within 8 iterations.
    sched = Scheduler(model, opt, Ratio(0.9), max_frozen_steps=7)
    _train(model, opt, x, 40)
    assert _max_streak(sched) <= 7
    assert all(len(f) == sched.k for _, f in sched.history)
    # Without the bound the lowest-scoring layers stay frozen much longer.
    model, x = _bert_no_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    free = Scheduler(model, opt, Ratio(0.9), max_frozen_steps=None)
    _train(model, opt, x, 40)
    assert _max_streak(free) > 7


def test_infeasible_staleness_bound_is_a_config_error():
    model, _ = _bert_no_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match="max_frozen_steps >= 7"):
        Scheduler(model, opt, Ratio(0.9), max_frozen_steps=3)


@pytest.mark.parametrize("bad", [
    lambda: Ratio(1.0), lambda: Ratio(-0.1), lambda: Budget(0), lambda: Budget(float("nan")), lambda: Budget(True),
])
def test_bad_policy_values(bad):
    with pytest.raises(ConfigError):
        bad()


def test_bad_scheduler_arguments():
    model, _ = _bert_no_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match="frozen_state"):
        Scheduler(model, opt, Ratio(0.5), frozen_state="disk")
    with pytest.raises(ConfigError, match="nonfinite"):
        Scheduler(model, opt, Ratio(0.5), nonfinite="ignore")
    with pytest.raises(ConfigError, match="policy"):
        Scheduler(model, opt, 0.9)
    with pytest.raises(ConfigError, match="list of name patterns"):
        Scheduler(model, opt, Ratio(0.5), exclude="classifier.*")
    with pytest.raises(SchedulerError, match="no layer to schedule"):
        Scheduler(model, opt, Ratio(0.5), include=["nothing.*"])


def test_include_exclude_and_user_frozen_layers():
    model, x = _bert_no_dropout()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # the user's own choice
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = Scheduler(model, opt, Ratio(0.9), exclude=["classifier.*", "bert.pooler.*"])
    assert "classifier.weight" not in sched.layers and "bert.pooler.dense.weight" not in sched.layers
    assert "bert.embeddings.word_embeddings.weight" not in sched.layers
    _train(model, opt, x, 4)
    assert model.classifier.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    only = Scheduler(*_fresh_bert_and_opt(), Ratio(0.5), include=["*.attention.self.*"])
    assert len(only.layers) == 6 and len(only.frozen) == 3


def _fresh_bert_and_opt():
    model, _ = _bert_no_dropout()
    return model, torch.optim.SGD(model.parameters(), lr=1e-2)


def test_metric_is_finite_with_zero_weights_and_nonfinite_is_handled():
    model, x = _bert_no_dropout()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(model, opt, Ratio(0.5))
    _train(model, opt, x, 6)
    assert sched.measured[sched.layers.index("bert.encoder.layer.0.intermediate.dense.weight")]
    assert all(math.isfinite(s) for s in sched.scores.tolist())

    # A weight that turns NaN: warned once, score kept, never NaN.
    name = sched.trained[0]
    i = sched.layers.index(name)
    kept = float(sched.scores[i])
    param = dict(model.named_parameters())[name]
    model(**x).loss.backward()
    param.grad.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match=name.replace(".", r"\.")):
        opt.step()
    opt.zero_grad()
    assert float(sched.scores[i]) == kept
    assert not any(math.isnan(s) for s in sched.scores.tolist())
    assert sched.nonfinite_events[-1][1] == name

    model, x = _bert_no_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    strict = Scheduler(model, opt, Ratio(0.5), nonfinite="raise")
    model(**x).loss.backward()
    dict(model.named_parameters())[strict.trained[0]].grad.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step()


def test_resume_from_checkpoint_reproduces_the_schedule():
    model, x = _bert_no_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(model, opt, Ratio(0.8), max_frozen_steps=10)
    _train(model, opt, x, 5)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    _train(model, opt, x, 8)
    expected = sched.history[6:]

    model2, _ = _bert_no_dropout()
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = Scheduler(model2, opt2, Ratio(0.8), max_frozen_steps=10, seed=123)  # seed is overridden by the state
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.frozen == list(ckpt["sched"]["history"][-1][1])
    _train(model2, opt2, x, 8)
    assert sched2.history[6:] == expected
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n


def test_state_dict_rejects_other_layers():
    model, _ = _bert_no_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    state = Scheduler(model, opt, Ratio(0.5)).state_dict()
    model2, _ = _bert_no_dropout()
    other = Scheduler(model2, torch.optim.SGD(model2.parameters(), lr=1e-2), Ratio(0.5), exclude=["classifier.*"])
    with pytest.raises(SchedulerError, match="different set of layers"):
        other.load_state_dict(state)


def _budget_for_ratio(plan, ratio, seed=0):
    layers = plan.layers
    frozen = set(random.Random(seed).sample(layers, math.floor(ratio * len(layers))))
    return int(plan.predict(frozen=frozen).total)


def test_budget_never_exceeds_its_bytes_and_uses_them():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    budget = _budget_for_ratio(module.plan, 0.9)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = Scheduler(module, opt, Budget(budget))
    plan = module.plan
    for _ in range(12):
        est = plan.predict(frozen=sched.frozen)
        assert est.total <= budget
        # Greedy fill: no frozen layer would still fit on its own.
        slack = budget - est.total
        costs = plan.predict(frozen=[]).per_layer
        assert slack < max(costs[n].gradients + costs[n].optimizer_state for n in sched.frozen)
        _train(module, opt, x, 1)
    assert _max_streak(sched) <= sched.max_frozen_steps
    trained = [len(t) for t in _trained_sets(sched)]
    assert min(trained) >= 2 and max(trained) < len(sched.layers)
    assert sched.predicted_bytes().total <= budget


def test_budget_counts_a_shared_input_once():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    q, k, v = (f"bert.encoder.layer.0.attention.self.{n}.weight" for n in ("query", "key", "value"))
    sched = Scheduler(module, opt, Budget(10**12), include=[q, k, v])
    pricing = sched._budget_pricing()
    plan = module.plan
    exact = plan.predict(frozen=[]).total - plan.predict(frozen=[q, k, v]).total
    assert pricing.marginal(q, set()) + pricing.marginal(k, {q}) + pricing.marginal(v, {q, k}) == exact
    # Q, K and V read one input: the second and third pay for their gradient and state only.
    assert pricing.marginal(k, {q}) == pricing.marginal(k, set()) - 4 * x["input_ids"].numel() * 32


def test_budget_below_the_all_frozen_floor_is_an_error():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    with pytest.raises(SchedulerError, match="raise the budget to at least"):
        Scheduler(module, opt, Budget(1000))  # priced on the example inputs at once
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    Scheduler(model, opt, Budget(1000))  # plain module: priced at the first forward
    with pytest.raises(SchedulerError, match="raise the budget to at least"):
        model(**x)


def test_staleness_bound_holds_under_budget():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    budget = _budget_for_ratio(module.plan, 0.9)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    sched = Scheduler(module, opt, Budget(budget), max_frozen_steps=5)
    _train(module, opt, x, 30)
    assert _max_streak(sched) <= 5


@pytest.mark.parametrize("make", [make_bert, make_vit, make_gpt2])
def test_compiled_module_saves_what_the_plan_predicts_for_each_frozen_set(make):
    torch.manual_seed(0)
    model, x = make()
    module = slimfit_fx.compile(model, x)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = Scheduler(module, opt, Ratio(0.9))
    plain_saved = saved_bytes(lambda: model(**x).loss)  # eager, same frozen set
    for _ in range(3):
        measured = saved_bytes(lambda: module(**x).loss)
        assert measured == module.plan.predict(frozen=sched.frozen).activations
        assert measured < plain_saved
        _train(module, opt, x, 1)
    assert "slimfit_fx.compile" in sched.summary()
    assert "plain nn.Module" in Scheduler(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           Ratio(0.5)).summary()


def test_price_gives_predictions_under_ratio_and_schedule_matrix():
    model, x = _bert_no_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(model, opt, Ratio(0.9))
    assert sched.predicted_bytes() is None
    sched.price(x)
    est = sched.predicted_bytes()
    assert est.frozen_parameters >= sched.k
    _train(model, opt, x, 4)
    grid = sched.schedule_matrix()
    assert grid.shape == (len(sched.layers), 5)
    assert grid.sum(0).tolist() == [sched.k] * 5
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            sched.heatmap()
    else:
        assert sched.heatmap() is not None


def test_remove_unfreezes_everything():
    model, x = _bert_no_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(model, opt, Ratio(0.9))
    _train(model, opt, x, 2)
    sched.remove()
    assert all(p.requires_grad for p in model.parameters())
    n = len(sched.history)
    _train(model, opt, x, 2)
    assert len(sched.history) == n


def _scheduled_run(frozen_state, steps=10):
    model, x = _bert_no_dropout()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = Scheduler(model, opt, Ratio(0.8), frozen_state=frozen_state, max_frozen_steps=6)
    _train(model, opt, x, steps)
    return model, opt, sched


def test_offloaded_optimizer_state_gives_identical_training_and_compress_stays_close():
    ref, _, ref_sched = _scheduled_run("keep")
    off, opt, off_sched = _scheduled_run("offload")
    assert off_sched.history == ref_sched.history
    for (n, p), q in zip(ref.named_parameters(), off.parameters()):
        assert torch.equal(p, q), n
    # The frozen layers' state is host-resident while frozen, and the whole state round-trips.
    from slimfit_fx.measure import is_host_resident

    named = dict(off.named_parameters())
    frozen_state = [t for n in off_sched.frozen for k, t in opt.state[named[n]].items() if k != "step"]
    assert frozen_state and all(is_host_resident(t) for t in frozen_state)
    comp, _, comp_sched = _scheduled_run("compress")
    assert comp_sched.history[:3] == ref_sched.history[:3]
    moved = sum((p - p0).norm() ** 2 for p, p0 in zip(ref.parameters(), _bert_no_dropout()[0].parameters())) ** 0.5
    diff = sum((p - q).norm() ** 2 for p, q in zip(ref.parameters(), comp.parameters())) ** 0.5
    # Lossy, and a different state can reorder the scores later on: close, not equal.
    same = sum(a == b for a, b in zip(comp_sched.history, ref_sched.history))
    print(f"compress vs keep: {float(diff / moved):.3f} of the distance moved, {same}/{len(ref_sched.history)} "
          "identical frozen sets")
    assert torch.isfinite(diff) and diff < 0.2 * moved


def test_budget_that_can_never_train_a_layer_is_an_error_under_the_staleness_bound():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    plan = module.plan
    probe = Scheduler(module, torch.optim.AdamW(module.parameters()), Ratio(0.5))
    layers = probe.layers
    probe.remove()
    base = plan.predict(frozen=layers).total
    alone = {n: plan.predict(frozen=set(layers) - {n}).total - base for n in layers}
    biggest = max(alone, key=alone.get)
    budget = base + alone[biggest] - 1  # every layer but the largest fits alone
    with pytest.raises(SchedulerError, match=f"can never train {biggest}.*at least {base + alone[biggest]}"):
        Scheduler(module, opt, Budget(budget))
    assert all(p.requires_grad for p in module.parameters())  # the failed scheduler left nothing behind
    sched = Scheduler(module, opt, Budget(budget), max_frozen_steps=None)  # no bound: it just stays frozen
    _train(module, opt, x, 3)
    assert all(biggest in frozen for _, frozen in sched.history)


def test_budget_on_a_compiled_module_does_not_analyse_the_example_shape_again(monkeypatch):
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = Scheduler(module, opt, Budget(_budget_for_ratio(module.plan, 0.9)))
    first = list(sched.history)
    calls = []
    monkeypatch.setattr(sched, "_plan_for", lambda *a: calls.append(a))
    _train(module, opt, x, 2)  # batches shaped like the example inputs: priced already
    assert calls == [] and sched.history[0] == first[0]


def test_budget_too_tight_for_all_stale_layers_at_once_records_the_overrun():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    probe = Scheduler(module, torch.optim.SGD(module.parameters(), lr=1e-2), Ratio(0.5))
    layers = probe.layers
    probe.remove()
    plan = module.plan
    base = plan.predict(frozen=layers).total
    budget = base + max(plan.predict(frozen=set(layers) - {n}).total - base for n in layers)  # ~one layer at a time
    with pytest.warns(RuntimeWarning, match="wait longer"):
        sched = Scheduler(module, opt, Budget(budget), max_frozen_steps=2)
        _train(module, opt, x, 8)
    assert sched.staleness_overruns and all(late for _, late in sched.staleness_overruns)
    # Most stale first: every layer still gets its turn.
    assert all(any(n not in frozen for _, frozen in sched.history) for n in layers)


def test_a_new_head_of_a_pretrained_model_always_trains(caplog):
    import logging

    from conftest import load_tool

    tasks = load_tool("tasks")
    model = tasks.load_minilm_classifier(seed=0)  # pretrained, with a new classification head
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with caplog.at_level(logging.INFO, logger="slimfit_fx"):
        sched = Scheduler(model, opt, Ratio(0.9))
    assert sched.new_layers == ["classifier.weight"] and "classifier.weight" not in sched.layers
    assert "classifier.weight" in caplog.text and "always train" in caplog.text
    assert "new in the model: classifier.weight" in sched.summary()
    assert model.classifier.weight.requires_grad
    sched.remove()
    everything = Scheduler(model, opt, Ratio(0.9), keep_new=False)
    assert "classifier.weight" in everything.layers and everything.new_layers == []
    everything.remove()
    # A model built from its config has nothing pretrained: nothing is new.
    bert, _ = make_bert()
    plain = Scheduler(bert, torch.optim.AdamW(bert.parameters()), Ratio(0.9))
    assert plain.new_layers == [] and "classifier.weight" in plain.layers


def _linear_stack(t):
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(t)])
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_default_staleness_bound_is_four_sweeps():
    def bound(t, policy):
        sched = Scheduler(*_linear_stack(t), policy)
        sched.remove()
        return sched.max_frozen_steps

    assert bound(102, Ratio(0.9)) == 40  # BERT-base's 102 layers at Ratio(0.9): a sweep is 10 iterations
    assert bound(8, Ratio(0.5)) == 8  # a minimum of 8
    assert bound(1000, Ratio(0.99)) == 100  # a maximum of 100
    assert bound(102, Budget(10**9)) == 100  # Budget
    assert bound(1000, Ratio(0.999)) == 999  # one layer trains per iteration: none can wait less


def test_the_default_staleness_bound_holds_at_any_ratio():
    # 300 layers at Ratio(0.995): two train per iteration, so some must wait 149 (the 4-sweep cap is 100).
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(300)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Scheduler(model, opt, Ratio(0.995))
    assert sched.max_frozen_steps == 149


def test_a_sparse_gradient_is_scored_like_a_dense_one():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Scheduler(model, opt, Ratio(0.0))
    for _ in range(2):
        model(torch.tensor([1, 2])).sum().backward()
        opt.step()
        opt.zero_grad()
    assert sched.measured.all() and not sched.unmeasured_events


def test_a_state_saved_with_a_new_head_names_the_fix_when_the_head_is_no_longer_new():
    def model(head_new):
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        for name, p in m.named_parameters():  # as from_pretrained flags what the checkpoint held
            p._is_hf_initialized = not (head_new and name.startswith("2."))
        return m

    first = model(head_new=True)
    saved = Scheduler(first, torch.optim.SGD(first.parameters(), lr=0.1), Ratio(0.5)).state_dict()
    assert saved["new_layers"] == ["2.weight"]
    reloaded = model(head_new=False)  # the fine-tuned checkpoint holds the head too
    sched = Scheduler(reloaded, torch.optim.SGD(reloaded.parameters(), lr=0.1), Ratio(0.5))
    with pytest.raises(SchedulerError, match="keep_new=False"):
        sched.load_state_dict(saved)


def test_loss_drop_metric_scores_the_first_order_loss_decrease():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Scheduler(model, opt, Ratio(0.5), metric="loss_drop", max_frozen_steps=None)
    x = torch.randn(16, 4)
    model(x).square().mean().backward()
    trained = [i for i, name in enumerate(sched.layers) if name not in sched.frozen]
    expected = {i: 0.1 * float(sched.params[i].grad.square().sum()) for i in trained}  # SGD: dW = -lr * g
    opt.step()
    for i, value in expected.items():
        assert sched.scores[i].item() == pytest.approx(value, rel=1e-5)
    with pytest.raises(ConfigError, match="metric"):
        Scheduler(model, opt, Ratio(0.5), metric="size")


def test_the_default_metric_caps_a_large_tensor_and_ignores_the_weights_scale():
    from slimfit_fx.scheduler import CAPPED_ELEMENTS, METRICS, capped_loss_drop, loss_drop, relative_change

    model = torch.nn.Linear(2, 2)
    assert Scheduler(model, torch.optim.SGD(model.parameters(), lr=0.1)).metric == "capped_loss_drop"
    g = torch.Generator().manual_seed(0)
    before = torch.randn(CAPPED_ELEMENTS * 4, generator=g)
    grad = torch.randn(before.shape, generator=g)
    after = before - 1e-3 * grad.sign()  # an Adam-like step: the same size for every element
    assert capped_loss_drop(before, after, grad, 1e-8) == pytest.approx(loss_drop(before, after, grad, 1e-8) / 4)
    small = before[:1000]
    assert capped_loss_drop(small, after[:1000], grad[:1000], 1e-8) == loss_drop(small, after[:1000], grad[:1000], 1e-8)
    # Ten times the weights, the same gradient and step: the paper's score drops tenfold, this one not.
    step = after[:1000] - small

    def scored(metric, scale):
        return float(metric(small * scale, small * scale + step, grad[:1000], 1e-8))  # fresh: metrics may clobber

    assert scored(relative_change, 10) < scored(relative_change, 1) / 5
    assert scored(METRICS["capped_loss_drop"], 10) == pytest.approx(scored(capped_loss_drop, 1), rel=1e-3)


def test_a_ratio_scheduler_runs_with_an_optimizer_the_memory_model_cannot_price():
    model, opt = _linear_stack(4)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    sched = Scheduler(model, opt, Ratio(0.5))
    for _ in range(3):
        model(torch.randn(3, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert len(sched.history) == 4 and all(len(frozen) == 2 for _, frozen in sched.history)
    with pytest.raises(SchedulerError, match="cannot price the state of Adagrad"):
        sched.predicted_bytes()  # pricing bytes, and only that, needs a known optimizer


def test_a_budget_with_an_optimizer_the_memory_model_cannot_price_fails_at_construction():
    model, _ = _linear_stack(4)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    with pytest.raises(SchedulerError, match=r"Adagrad.*AdamW, Adam or SGD, or use a Ratio policy"):
        Scheduler(model, opt, Budget(10**9))
    assert not model._forward_pre_hooks and all(p.requires_grad for p in model.parameters())


def test_a_subclass_of_a_known_optimizer_is_priced_as_its_base():
    class LoggingAdamW(torch.optim.AdamW):
        pass

    model, _ = _linear_stack(4)
    sched = Scheduler(model, LoggingAdamW(model.parameters(), lr=0.1), Budget(10**9))
    assert sched.priced_optimizer() == "adamw"
    sched.remove()


def test_adam_and_adamw_budgets_price_the_same_state():
    model, x = _bert_no_dropout()
    module = slimfit_fx.compile(model, x)
    budget = Budget(_budget_for_ratio(module.plan, 0.9))
    histories = []
    for make in (torch.optim.AdamW, torch.optim.Adam):
        opt = make(module.parameters(), lr=0)  # lr 0: the weights, so the scores, are the same in both runs
        sched = Scheduler(module, opt, budget)
        _train(module, opt, x, 2)
        histories.append((list(sched.history), sched.predicted_bytes().total))
        sched.remove()
    assert sched.priced_optimizer() == "adam" and histories[0] == histories[1]


def test_fixed_frozen_names_the_parameters_the_user_froze():
    model, opt = _linear_stack(3)
    model[0].weight.requires_grad_(False)
    sched = Scheduler(model, opt, Ratio(0.0))
    assert sched.fixed_frozen == frozenset({"0.weight"}) and "0.weight" not in sched.layers


def test_a_policy_of_your_own_chooses_the_frozen_set():
    from slimfit_fx.scheduler import FreezePolicy

    class FreezeFirst(FreezePolicy):
        def frozen_count(self, t):
            return 1

        def choose(self, scheduler):
            return {0} if scheduler.iteration % 2 == 0 else {len(scheduler.layers) - 1}

    model, opt = _linear_stack(3)
    sched = Scheduler(model, opt, FreezeFirst(), max_frozen_steps=None)
    assert sched.k == 1 and sched.frozen == ["0.weight"]
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    assert sched.frozen == ["2.weight"] and not model[2].weight.requires_grad and model[0].weight.requires_grad
    with pytest.raises(ConfigError, match="policy must be"):
        Scheduler(model, opt, "ratio")
