"""SlimFitCallback inside a real transformers.Trainer (tiny BERT, a few steps, no downloads or loggers)."""
import pytest
import torch
from conftest import make_bert

import slimfit_fx
from slimfit_fx import Budget, Ratio
from slimfit_fx.integrations.huggingface import SlimFitCallback, compile_in_place, uncompile
from slimfit_fx.measure import saved_bytes

transformers = pytest.importorskip("transformers")  # a hard dependency: present in CI


def _dataset(n=16, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    labels = (ids[:, 0] > 50).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=2,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                learning_rate=1e-3, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _model():
    torch.manual_seed(0)
    model, _ = make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model


def test_callback_schedules_and_logs_in_a_real_trainer(tmp_path):
    from transformers import Trainer

    model = _model()
    keys = list(model.state_dict())
    cb = SlimFitCallback(Ratio(0.9), compile=True)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    sched = cb.scheduler
    assert sched is not None and sched.compiled
    assert sched.iteration == 6  # one decision per optimizer step
    assert all(len(frozen) == sched.k for _, frozen in sched.history)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["slimfit/frozen_fraction"] == pytest.approx(sched.k / len(sched.layers), abs=1e-4)
        assert h["slimfit/predicted_activation_bytes"] > 0
    # The model object, its parameters and state_dict keys are the user's.
    assert trainer.model is model and list(model.state_dict()) == keys
    # The compiled forward keeps what the plan predicts for the current frozen set, and less than eager.
    batch = {k: torch.stack([d[k] for d in _dataset()[:4]]) for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    measured = saved_bytes(lambda: model(**batch).loss)
    assert measured == sched.predicted_bytes().activations
    uncompile(model)
    assert measured < saved_bytes(lambda: model(**batch).loss)


def test_callback_without_compile_leaves_the_forward_alone(tmp_path):
    from transformers import Trainer

    model = _model()
    cb = SlimFitCallback(Ratio(0.5), exclude=["classifier.*"])
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    assert "forward" not in model.__dict__ and not cb.scheduler.compiled
    assert "plain nn.Module" in cb.scheduler.summary()
    assert "classifier.weight" not in cb.scheduler.layers


def test_trainer_with_budget_stays_within_it(tmp_path):
    from transformers import Trainer

    model = _model()
    example = {k: torch.stack([d[k] for d in _dataset()[:4]]) for k in ("input_ids", "attention_mask", "labels")}
    plan = slimfit_fx.analyze(model.train(), example, slimfit_fx.SlimFitConfig())
    layers = plan.layers
    budget = int(plan.predict(frozen=layers[: int(0.8 * len(layers))]).total)
    cb = SlimFitCallback(Budget(budget), compile=True)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    for _, frozen in cb.scheduler.history:
        assert plan.predict(frozen=frozen).total <= budget


def test_resume_restores_the_scheduler(tmp_path):
    from transformers import Trainer

    model = _model()
    cb = SlimFitCallback(Ratio(0.8), compile=True)
    args = _args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb]).train()
    full = list(cb.scheduler.history)

    model2 = _model()
    cb2 = SlimFitCallback(Ratio(0.8), compile=True)
    Trainer(model=model2, args=args, train_dataset=_dataset(), callbacks=[cb2]).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert cb2.scheduler.history == full


def test_compile_in_place_matches_compile_and_is_reversible():
    model = _model()
    torch.manual_seed(1)
    _, x = make_bert()
    slim = compile_in_place(model, x)
    assert compile_in_place(model) is slim
    assert "_slimfit_module" not in dict(model.named_modules())
    model.train()
    out = model(**x)
    ref = slimfit_fx.compile(_model(), x)(**x)
    torch.testing.assert_close(out.logits, ref.logits)
    model.eval()
    with torch.no_grad():
        assert model(**x).logits.shape == out.logits.shape
    uncompile(model)
    assert "forward" not in model.__dict__
    with pytest.raises(TypeError, match="original model"):
        compile_in_place(slimfit_fx.compile(_model()))


def test_a_deepcopy_or_pickle_of_a_model_compiled_in_place_trains_its_own_weights():
    # An EMA or a reference model is a deepcopy: it must not run the original's weights.
    import copy
    import inspect
    import pickle

    model = _model()
    _, x = make_bert()
    compile_in_place(model, x)
    model.train()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin._slimfit_module.original is twin and twin._slimfit_module is not model._slimfit_module
        with torch.no_grad():
            for p in twin.parameters():
                p.zero_()
        torch.manual_seed(0)
        out = twin(**x).logits
        assert torch.count_nonzero(out) == 0
        torch.manual_seed(0)
        assert torch.count_nonzero(model(**x).logits) > 0
    assert "input_ids" in inspect.signature(model.forward).parameters  # the Trainer reads it


def test_integrations_names_resolve_lazily():
    import slimfit_fx.integrations as integrations
    from slimfit_fx.integrations import distributed, huggingface

    assert integrations.SlimFitCallback is huggingface.SlimFitCallback
    assert integrations.wrap_ddp is distributed.wrap_ddp
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = integrations.nope


def _trained(tmp_path, name, bf16, compile):
    from transformers import Trainer

    model = _model()
    cb = SlimFitCallback(Ratio(0.5), compile=compile, config=slimfit_fx.SlimFitConfig.off(), seed=0)
    args = _args(tmp_path / name, max_steps=4, bf16=bf16)
    Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb]).train()
    slim = model.__dict__.get("_slimfit_module")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, slim


def test_bf16_trainer_trains_the_compiled_model_in_bf16(tmp_path):
    # With the rewrites off, the compiled model computes what eager does: in the Trainer's bf16
    # autocast it must end bit-identical to the plain model trained with bf16=True, and away from fp32.
    compiled, slim = _trained(tmp_path, "compiled", bf16=True, compile=True)
    plain, _ = _trained(tmp_path, "plain", bf16=True, compile=False)
    fp32, _ = _trained(tmp_path, "fp32", bf16=False, compile=True)
    assert [key[-1] for key in slim._graphs] == [(("cpu", torch.bfloat16),)]
    for k in plain:
        torch.testing.assert_close(compiled[k], plain[k], rtol=0, atol=0, msg=k)
    assert max((compiled[k] - fp32[k]).abs().max().item() for k in plain) > 1e-4


def test_a_callback_added_late_to_a_bf16_trainer_is_refused(tmp_path):
    from transformers import Trainer

    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, bf16=True), train_dataset=_dataset())
    trainer.add_callback(SlimFitCallback(Ratio(0.5), compile=True))
    with pytest.raises(RuntimeError, match="callbacks=\\[SlimFitCallback"):
        trainer.train()


def test_resume_from_a_checkpoint_anywhere_restores_the_scheduler(tmp_path):
    import shutil

    from transformers import Trainer

    args = _args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3)
    model = _model()
    cb = SlimFitCallback(Ratio(0.8), compile=True)
    Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb]).train()
    full, weights = list(cb.scheduler.history), {k: v.clone() for k, v in model.state_dict().items()}
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", moved)
    shutil.rmtree(tmp_path / "run")  # nothing left where the output_dir would point

    model2 = _model()
    cb2 = SlimFitCallback(Ratio(0.8), compile=True)
    args2 = _args(tmp_path / "run2", max_steps=6, save_strategy="no")
    Trainer(model=model2, args=args2, train_dataset=_dataset(), callbacks=[cb2]).train(
        resume_from_checkpoint=str(moved))
    assert cb2.scheduler.history == full
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, weights[k], msg=k)


def test_resume_from_a_checkpoint_without_scheduler_state_warns(tmp_path):
    from transformers import Trainer

    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    Trainer(model=_model(), args=args, train_dataset=_dataset()).train()  # no callback
    cb = SlimFitCallback(Ratio(0.8), compile=True)
    args2 = _args(tmp_path, max_steps=4, save_strategy="no")
    with pytest.warns(RuntimeWarning, match="holds no SlimFit scheduler state"):
        Trainer(model=_model(), args=args2, train_dataset=_dataset(), callbacks=[cb]).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_the_log_leaves_out_predicted_bytes_for_an_optimizer_the_memory_model_cannot_price():
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    callback = SlimFitCallback(Ratio(0.5))
    callback.scheduler = slimfit_fx.Scheduler(model, torch.optim.Adagrad(model.parameters(), lr=0.1), Ratio(0.5))
    model(torch.randn(3, 4))  # the scheduler keeps the batch shape to price
    with pytest.warns(UserWarning, match="not logged.*Adagrad"):
        first = callback.metrics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every log
        assert callback.metrics() == first
    assert set(first) == {"slimfit/frozen_fraction"}
