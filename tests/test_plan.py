"""Per-layer plans under a budget (sparse24.plan): the greedy rule, the JSON form, ModelOpt's
sparse_cfg both ways, the search on a tiny model, and the command line."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse24.hf  # noqa: E402
from sparse24 import SparsityConfig  # noqa: E402
from sparse24 import plan as plans  # noqa: E402

TWO_FOUR = SparsityConfig.parse("2:4,recent=0")
NO_DECODE = SparsityConfig.parse("2:4,sink=4,recent=16,sparse_decode=false")


@pytest.mark.parametrize(
    "sens, budget, want, predicted",
    [
        ({0: 0.3, 1: 0.1, 2: 0.2}, 0.3, [1, 2], 0.3),  # least sensitive first; the budget is inclusive
        ({0: 0.3, 1: 0.1, 2: 0.2}, 0.29, [1], 0.1),
        ({0: 0.1, 1: 0.1, 2: 0.5}, 0.2, [0, 1], 0.2),  # ties: the lower layer first
        ({0: -0.4, 1: 0.3, 2: 0.2}, 0.25, [0, 2], 0.2),  # a negative sensitivity predicts 0, not a gain
        ({0: 0.3}, 0.0, [], 0.0),
    ],
)
def test_greedy_layers(sens, budget, want, predicted):
    chosen, total = plans.greedy_layers(sens, budget)
    assert chosen == want and total == pytest.approx(predicted)


def test_plan_json_round_trip_and_errors(tmp_path):
    plan = plans.Plan({3: TWO_FOUR, "1": "4:8,recent=0", 2: SparsityConfig.dense(), 0: None}, num_layers=4,
                      search={"budget_pct": 0.5})
    assert sorted(plan.layers) == [1, 3]  # dense and None layers are simply not sparse
    assert plan.for_sparsify() == {0: None, 1: SparsityConfig.parse("4:8,recent=0"), 2: None, 3: TWO_FOUR}
    again = plans.Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan
    with pytest.raises(ValueError, match="outside the model's layers"):
        plans.Plan({4: TWO_FOUR}, num_layers=4)
    with pytest.raises(TypeError, match="plan layer 0"):
        plans.Plan({0: 2.4}, num_layers=4)
    with pytest.raises(ValueError, match="not a sparse24 plan"):
        plans.Plan.from_json({"sparse_cfg": {}})
    with pytest.raises(ValueError, match="version"):
        plans.Plan.from_json({**plan.to_json(), "version": 99})


NAMES = {i: f"model.layers.{i}.self_attn" for i in range(4)}


def test_modelopt_round_trip():
    plan = plans.Plan({0: NO_DECODE, 2: SparsityConfig.parse("1:4,recent=32,sparse_decode=false")}, num_layers=4)
    cfg = plans.to_modelopt(plan, NAMES)
    assert cfg["sparse_cfg"]["default"] == {"enable": False}
    entry = cfg["sparse_cfg"]["*model.layers.0.self_attn"]
    assert entry == {"method": "triton_sparse_softmax", "sparsity_n": 2, "sparsity_m": 4, "dense_sink_tokens": 4,
                     "dense_recent_tokens": 16, "backend": "triton", "enable": True}
    back = plans.from_modelopt(json.loads(json.dumps(cfg)), NAMES)
    assert back.layers == plan.layers and back.num_layers == 4


def test_modelopt_refuses_sparse_decode_and_reads_wildcards_in_order():
    with pytest.raises(ValueError, match="decode rows"):
        plans.to_modelopt(plans.Plan({1: TWO_FOUR}, num_layers=4), NAMES)  # sparse_decode=true
    preset = {"sparse_cfg": {"*attn*": {"method": "triton_sparse_softmax", "sparsity_n": 2, "sparsity_m": 4,
                                        "dense_sink_tokens": 0, "dense_recent_tokens": 64, "enable": True},
                             "*layers.3.*": {"enable": False}, "default": {"enable": False}}}
    plan = plans.from_modelopt(preset, NAMES)
    want = SparsityConfig(n=2, m=4, dense_sink_tokens=0, dense_recent_tokens=64, sparse_decode=False)
    assert plan.layers == {0: want, 1: want, 2: want}  # the later "*layers.3.*" turns layer 3 off
    with pytest.raises(ValueError, match="sparsity_n"):
        plans.from_modelopt({"sparse_cfg": {"*attn*": {"enable": True}}}, NAMES)


def _tiny_llama(layers=3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sparse24").eval()
    return model


def test_search_meets_its_budget_on_a_tiny_model():
    model = _tiny_llama()
    tokens = torch.randint(0, 97, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    big, rows = plans.search(model, tokens, 48, TWO_FOUR, 100.0, backend="reference")
    assert sorted(big.layers) == [0, 1, 2] and big.search["within_budget"]  # a generous budget: every layer
    assert big.search["measured_pct"] == pytest.approx(rows[-1].delta_pct)
    sens = {int(k): v for k, v in big.search["sensitivities_pct"].items()}
    for budget in (0.0, sorted(max(v, 0.0) for v in sens.values())[0]):
        plan, _ = plans.search(model, tokens, 48, TWO_FOUR, budget, backend="reference")
        greedy, predicted = plans.greedy_layers(sens, budget)
        assert set(plan.layers) <= set(greedy)  # the greedy choice, less what the check runs dropped
        assert plan.search["predicted_pct"] <= budget + 1e-9
        assert plan.search["within_budget"] == (plan.search["measured_pct"] <= budget)
    sparse24.hf.sparsify(model, big, backend="reference")  # a plan goes straight into sparsify
    assert sparse24.hf.layer_configs(model) == {0: TWO_FOUR, 1: TWO_FOUR, 2: TWO_FOUR}


def test_attention_module_names_of_a_transformers_model():
    assert plans.attention_module_names(_tiny_llama(2)) == {0: "model.layers.0.self_attn",
                                                             1: "model.layers.1.self_attn"}


@pytest.mark.parametrize("argv, message", [
    (["--budget", "half"], "percentage"),
    (["--budget=-1%"], ">= 0%"),
    ([], "--budget"),
])
def test_plan_command_line_errors(argv, message, capsys):
    from sparse24.__main__ import main

    with pytest.raises(SystemExit):
        main(["plan", *argv])
    assert message in capsys.readouterr().err


def test_plan_command_writes_a_plan_that_eval_reads(tmp_path, capsys, monkeypatch):
    """``sparse24 plan`` writes a plan (and ModelOpt's form with sparse_decode=false) and
    ``sparse24 eval --plan`` evaluates either file as one more row. A tiny random Llama stands
    in for the shipped model (the CLI's model loading is tested in test_eval.py)."""
    import sparse24.models
    from sparse24.__main__ import main

    class Tokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) % 97 for c in text]}

    model = _tiny_llama(3)
    monkeypatch.setattr(sparse24.models, "load_model", lambda *a, **k: (model, Tokenizer()))
    out, mo = tmp_path / "plan.json", tmp_path / "modelopt.json"
    assert main(["plan", "--budget", "50%", "--sparsity", "2:4,recent=0,sparse_decode=false", "--max-tokens", "96",
                 "--contexts", "48", "--out", str(out), "--modelopt", str(mo), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    plan = plans.Plan.load(out)
    assert plan.num_layers == 3 and plan.search["budget_pct"] == 50.0 and plan.layers
    assert f"plan: {len(plan.layers)} of 3 layers sparse" in printed
    assert json.loads(mo.read_text())["sparse_cfg"]["default"] == {"enable": False}
    for path in (out, mo):
        assert main(["eval", "--plan", str(path), "--max-tokens", "96", "--contexts", "48", "--no-progress"]) == 0
        assert f"plan: {len(plan.layers)}/3 layers" in capsys.readouterr().out
    assert main(["plan", "--budget", "50%", "--max-tokens", "96", "--contexts", "48", "--out", str(out),
                 "--modelopt", str(mo), "--no-progress"]) == 2  # sparse_decode=true cannot go to ModelOpt
    assert "decode rows" in capsys.readouterr().err


def test_search_takes_a_matching_sweep_only():
    """``search(..., sweep=)`` reuses a per-layer sweep of the same context and config, and
    refuses another's (before running anything)."""
    from sparse24.eval import Result

    config = SparsityConfig.parse("2:4,recent=0")
    rows = [Result(context=96, config="dense", perplexity=10.0, nll=2.3, kl=0.0, top1=1.0, tokens=95, windows=1,
                   seconds=0.0)]
    rows.append(Result(context=96, config="layer 0: 4:8,recent=0", perplexity=10.1, nll=2.31, kl=0.01, top1=0.99,
                       tokens=95, windows=1, seconds=0.0, layer=0))
    with pytest.raises(ValueError, match="per_layer_sweep's results for context 96"):
        plans.search(None, [], 96, config, 1.0, sweep=rows)
    with pytest.raises(ValueError, match="context 128"):
        plans.search(None, [], 128, SparsityConfig.parse("4:8,recent=0"), 1.0, sweep=rows)
