"""PEFT LoRA through slimfit_fx: the saved bytes, and a Scheduler that starves no adapter tensor."""
import collections

import pytest
import torch
from conftest import make_bert

import slimfit_fx
from slimfit_fx.measure import saved_bytes

peft = pytest.importorskip("peft")  # in the test extra


def _lora_bert():
    torch.manual_seed(0)
    model, inputs = make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0)
    return peft.get_peft_model(model, config).train(), inputs


def test_lora_through_compile_keeps_less_and_is_predicted():
    model, inputs = _lora_bert()
    plain = saved_bytes(lambda: model(**inputs).loss, params=model)
    slim = slimfit_fx.compile(model, inputs)
    measured = saved_bytes(lambda: slim(**inputs).loss, params=model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # PEFT froze the base model
    assert measured == slim.plan.predict(frozen).activations
    assert measured < 0.6 * plain
    torch.manual_seed(1)
    ref = model(**inputs).loss
    torch.manual_seed(1)
    torch.testing.assert_close(slim(**inputs).loss, ref, rtol=0, atol=0)


def _frozen_streaks(sched):
    streak, worst, trained = collections.Counter(), collections.Counter(), collections.Counter()
    for _, frozen in sched.history:
        for n in sched.layers:
            if n in frozen:
                streak[n] += 1
                worst[n] = max(worst[n], streak[n])
            else:
                trained[n] += 1
                streak[n] = 0
    return worst, trained


def test_no_lora_tensor_starves_under_the_scheduler():
    # lora_B starts at zero, so lora_A's first gradient is zero: scored as unmeasured it trains again
    # at once.  From then on the relative-change metric ranks B (leaving zero) far above A; the default
    # staleness bound (four sweeps: 8 iterations here) makes every tensor train at least every 9.
    model, inputs = _lora_bert()
    slim = slimfit_fx.compile(model, inputs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = slimfit_fx.Scheduler(slim, opt, slimfit_fx.Ratio(0.5))
    assert sched.max_frozen_steps == 8 and len(sched.layers) == 8
    for _ in range(40):
        slim(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    worst, trained = _frozen_streaks(sched)
    assert max(worst.values()) <= 8
    assert all(trained[n] >= 4 for n in sched.layers), trained
    assert any("lora_A" in name for _, name in sched.unmeasured_events)  # the zero-gradient rule fired


def test_zero_gradient_layers_are_unmeasured_not_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    torch.nn.init.zeros_(model[1].weight)  # model[0] gets a zero gradient while model[1] is zero
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = slimfit_fx.Scheduler(model, opt, slimfit_fx.Ratio(0.5), max_frozen_steps=None)
    sched._apply(set())  # train both this step
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert (0, "0.weight") in sched.unmeasured_events and not sched.measured[0] and sched.measured[1]
    assert sched.scores[0] >= 1e6  # ranks with the untrained, not below every measured change


def test_a_lora_models_new_head_always_trains_and_its_adapters_are_scheduled():
    # PEFT's SEQ_CLS task trains a copy of the new classification head (modules_to_save) beside the
    # adapters.  Left to the ILS with the adapters it trained in a few iterations out of ten and the
    # MiniLM task stayed at chance (tools/finetune.py --settings lora-ratio): it is a new head.
    torch.manual_seed(0)
    model, inputs = make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for name, p in model.named_parameters():  # as from_pretrained flags what it loaded: all but the head
        p._is_hf_initialized = not name.startswith("classifier.")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], lora_dropout=0.0,
                             modules_to_save=["pooler.dense"])  # a pretrained layer trained whole: scheduled
    model = peft.get_peft_model(model, config).train()
    slim = slimfit_fx.compile(model, inputs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = slimfit_fx.Scheduler(slim, opt, slimfit_fx.Ratio(0.9))
    copies = [n for n, p in model.named_parameters() if "modules_to_save" in n and p.dim() == 2]
    head = [n for n in copies if "classifier" in n]
    assert head and set(sched.new_layers) == set(head)
    assert sched.layers and all("lora_" in n or "pooler" in n for n in sched.layers)
    assert any("pooler" in n for n in sched.layers)
    for _ in range(3):
        slim(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(n not in frozen for _, frozen in sched.history for n in head)
    assert slimfit_fx.Scheduler(slim, opt, slimfit_fx.Ratio(0.9), keep_new=False).new_layers == []
