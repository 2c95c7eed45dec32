"""tools/bench_memory.py on a tiny config: every requested row, sane numbers, JSON and markdown."""
import json

import pytest
from conftest import load_tool

CHEAP = ["pytorch", "checkpointing", "pytorch+freeze", "slimfit", "slimfit+offload"]  # torch.compile: minutes


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_memory")


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bert_tiny"
    argv = ["--model", "bert-tiny", "--batch", "2", "--seq", "32", "--repeats", "1",
            "--settings", ",".join(CHEAP), "--out", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    return doc, out.with_suffix(".md").read_text()


def test_every_requested_row_is_there(result):
    doc, _ = result
    assert list(doc["rows"]) == CHEAP
    for name, row in doc["rows"].items():
        assert row["status"] == "ok", (name, row["note"])
        assert len(row["times"]) == 1 and row["times"][0] > 0


def test_numbers_are_sane(result):
    doc, _ = result
    rows = {k: r for k, r in doc["rows"].items() if r["status"] == "ok"}
    plain, freeze, slim = rows["pytorch"], rows["pytorch+freeze"], rows["slimfit"]
    for name, r in rows.items():
        assert r["parameters"] + r["gradients"] + r["optimizer_state"] + r["activations_temporaries"] == r["peak"]
        assert 0 < r["saved"] and r["parameters"] > 0, name
    assert slim["saved"] < freeze["saved"] < plain["saved"]
    assert rows["checkpointing"]["saved"] < plain["saved"]
    assert slim["peak"] < plain["peak"] and freeze["peak"] < plain["peak"]
    assert plain["peak_ratio"] == 1.0 and plain["time_ratio"] == 1.0
    for r in (plain, freeze, slim):  # rows with a plan carry the predicted peak
        assert abs(r["peak_error_pct"]) < 10, r
    on = rows["slimfit+offload"]
    assert on["offloaded"] > 0  # the frozen parameters' AdamW state, host-resident
    assert on["peak"] <= slim["peak"] + 4 * len(doc["frozen"])  # their 0-d step tensors stay
    assert doc["frozen_layers"] == int(0.9 * doc["layers"])  # floor, as the CLI


def test_machine_facts_and_markdown(result):
    doc, md = result
    assert doc["machine"]["cpus"] >= 1 and doc["versions"]["torch"] and doc["versions"]["transformers"]
    assert doc["command"].startswith("python tools/bench_memory.py --model bert-tiny")
    assert doc["date"]
    for r in doc["rows"].values():
        assert f"| {r['label']} |" in md
    assert doc["command"] in md


def test_unknown_setting_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--model", "bert-tiny", "--settings", "pytorch,nope"])


def test_slimfit_through_torch_compile_row_reports_compile_time_and_ratio_to_eager_slimfit(bench, tmp_path):
    out = tmp_path / "bert_tiny_compiled"
    argv = ["--model", "bert-tiny", "--batch", "2", "--seq", "32", "--repeats", "1",
            "--settings", "pytorch,slimfit,slimfit+torch.compile", "--out", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    eager, compiled = doc["rows"]["slimfit"], doc["rows"]["slimfit+torch.compile"]
    assert compiled["status"] == "ok", compiled["note"]
    assert abs(compiled["saved"] / eager["saved"] - 1) <= 0.10  # the bar
    assert compiled["time_ratio_to_slimfit"] > 0 and compiled["build_s"] + compiled["warmup_s"] > 0
    assert compiled["peak"] is None and "not measurable" in compiled["note"]
    assert "compile (build + first step" in out.with_suffix(".md").read_text()


def test_docs_section_is_replaced_between_markers(bench, tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nintro\n")
    bench.update_docs(page, "bert-tiny", "table one\n")
    bench.update_docs(page, "gpt2", "table two\n")
    bench.update_docs(page, "bert-tiny", "table three\n")
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "table one" not in text and text.count("table three") == 1 and "table two" in text
    assert text.index("table three") < text.index("table two")  # replaced in place
