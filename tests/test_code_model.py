"""The trained code-model pair (issue 16): bench/train_code_model.py's tiny mode trains byte-level Llama models on
the stdlib (held-out files never trained on) that mmaccel.generate runs as HF generate() does; bench/
code_model_eval.py's tiny mode gives the speculative and cascade rows (tokens identical to plain greedy in fp32).
One test: the eval reuses the graphs the generate check compiled (same models, options and buckets)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

import mmaccel
from tests.test_generation import EAGER, one_thread  # noqa: F401 (fixture)

BENCH = Path(__file__).resolve().parents[1] / "bench"
EVAL_ARGS = ["--tiny", "--target", "eager", "--prompts", "1", "--new-tokens", "6", "--k", "4", "--cascade-prompts",
             "2", "--answer-bytes", "4", "--prompt-bytes", "32"]


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/ scripts import their neighbours (common, speculative) by plain name, as `python bench/x.py` would."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("train_code_model"), importlib.import_module("code_model_eval")


def check_training(training, folder: Path) -> None:
    train_files, held_out_files = training.source_files()
    assert held_out_files and not set(train_files) & set(held_out_files)
    summary = json.loads((folder / "target" / "training.json").read_text())
    assert summary["steps"] == 20 and summary["tokens_seen"] == 20 * 8 * 128 and summary["early_exit_layer"] == 1
    assert len(summary["held_out_loss_nats"]) == 2 and summary["curve"][0]["loss"][0] > summary["curve"][-1]["loss"][0]
    draft = json.loads((folder / "draft" / "training.json").read_text())
    # cross-entropy by default (distillation bought less per GPU second); the agreement is measured anyway
    assert draft["distill"] == 0.0 and 0 <= draft["held_out_agreement"] <= 1


def check_generate(training, target) -> None:
    assert target.config.vocab_size == training.VOCAB == 259
    ids = training.encode(training.source_files()[1][:1])[None, :32]
    tokens = mmaccel.generate(target, ids, max_new_tokens=6, eos_token_id=[], pad_token_id=training.PAD, options=EAGER)
    with torch.no_grad():
        expected = target.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   pad_token_id=training.PAD)
    assert torch.equal(tokens, expected)


def check_rows(data: dict) -> None:
    methods = {row["method"]: row for row in data["speculative"]}
    assert list(methods) == ["plain", "draft k=4", "layers:1 k=4"]
    for row in methods.values():
        assert row["same_prompts"] == row["prompts"] == 1 and row["ms_per_token"] > 0  # fp32: greedy identical
    assert methods["plain"]["acceptance_rate"] is None
    assert 0 <= methods["draft k=4"]["acceptance_rate"] <= 1 and len(methods["layers:1 k=4"]["k_used"]) == 1
    rows = {row["method"]: row for row in data["cascade"]}
    assert list(rows) == ["target alone", "draft alone", "cascade agreement 0.01", "cascade truth 0.01"]
    assert set(rows["cascade truth 0.01"]["calibration_accuracy"]) == {"small", "large", "cascade"}
    cascade = rows["cascade agreement 0.01"]
    assert 0 <= cascade["served_by_draft"] <= 1 and 0 <= cascade["exact_match"] <= cascade["byte_accuracy"] + 1e-9
    assert {"accuracy_loss_points", "latency_saved", "threshold", "ms_per_request"} <= set(cascade)


# 20 s on the 2-core CI machine, which the suite's 20-minute budget no longer has room for; the mechanisms it
# drives (speculative rounds, cascade calibration, decode blocks) have their own default tests.
@pytest.mark.coverage
def test_tiny_code_models_train_generate_and_evaluate(bench_modules, tmp_path, one_thread) -> None:
    training, evaluation = bench_modules
    summaries = training.main(["--tiny", "--out", str(tmp_path), "--max-steps", "20", "--log-every", "10"])
    assert set(summaries) == {"target", "draft"}
    check_training(training, tmp_path)
    target, draft = (evaluation.load(tmp_path / name, "cpu", torch.float32) for name in ("target", "draft"))
    check_generate(training, target)
    args = evaluation.parse([*EVAL_ARGS, "--weights", str(tmp_path), "--out", str(tmp_path / "eval.json")])
    data = evaluation.evaluate(args, target, draft)
    assert json.loads((tmp_path / "eval.json").read_text())["cascade"] == data["cascade"]
    check_rows(data)
