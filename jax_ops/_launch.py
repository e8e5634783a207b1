"""Launching the Triton kernels from JAX: the one launch description, two ways to run it.

``sparse24.kernels.launch`` describes every launch of a call completely (kernel, grid,
which named array goes to which pointer, output shapes and dtypes, scalars, strides,
constexprs, warps, stages), the same description the torch launcher runs. Here it runs
either

* on a GPU through ``jax_triton.triton_call`` (inputs positional, outputs appended,
  everything else by keyword -- jax-triton's binding, which the kernel signature follows);
* on the CPU through ``jax.pure_callback`` into Triton's interpreter, calling the very
  same kernel with the very same argument list on host copies.

So the CPU tests exercise the JAX launch contract (argument order, strides, dtypes,
outputs) with the real kernel source. jax-triton is imported lazily: it refuses to import
without a CUDA jaxlib.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse24.kernels.launch import (
    KernelLaunch,
    contiguous_strides,  # noqa: F401  (re-exported for callers of this module)
    run_launches,
    unified_attention_launches,
    write_kv_cache_launches,
)

ATTENTION_INPUTS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")
WRITE_INPUTS = ("k", "v", "slot_mapping", "k_cache", "v_cache")


def attention_calls(
    *,
    q_shape,
    dtype,
    cache_shape,
    block_table_shape,
    num_seqs: int,
    config,
    causal: bool,
    softmax_scale: float,
    window: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_kv_splits: int | None,
    num_sms: int | None,
    interpret: bool,
    store_lse: bool = True,
    store_stats: bool = False,
) -> tuple[KernelLaunch, ...]:
    """The described launch(es) of one unified-attention call on contiguous JAX arrays
    (inputs ``ATTENTION_INPUTS``; results ``out``, ``lse``)."""
    return unified_attention_launches(
        q_shape=tuple(int(d) for d in q_shape), dtype=jnp.dtype(dtype).name,
        cache_shape=tuple(int(d) for d in cache_shape), num_seqs=int(num_seqs),
        n=config.n, m=config.m, dense_sink_tokens=config.dense_sink_tokens,
        dense_recent_tokens=config.dense_recent_tokens, sparse_decode=config.sparse_decode,
        causal=bool(causal), softmax_scale=float(softmax_scale), window=int(window), softcap=float(softcap),
        max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k), store_lse=bool(store_lse),
        store_stats=bool(store_stats), num_kv_splits=num_kv_splits, num_sms=num_sms, interpret=bool(interpret),
        block_table_strides=contiguous_strides(block_table_shape),
    )


def write_kv_cache_call(*, kv_shape, cache_shape, dtype) -> tuple[KernelLaunch, ...]:
    """The described cache-write launch on contiguous JAX arrays (inputs ``WRITE_INPUTS``;
    results ``k_cache``, ``v_cache``, aliased to the input caches)."""
    return write_kv_cache_launches(
        kv_shape=tuple(int(d) for d in kv_shape), cache_shape=tuple(int(d) for d in cache_shape),
        dtype=jnp.dtype(dtype).name,
    )


# ---------------------------------------------------------------- GPU: jax-triton


@functools.lru_cache(maxsize=None)
def jax_triton():
    """The jax_triton module (imported on first GPU use; it needs a CUDA jaxlib)."""
    # jax-triton 0.3.1 sets os.environ["TRITON_CACHE_DIR"] = "" at import, which breaks every
    # later Triton compile in the process (torch's included: "Could not create or locate cache
    # dir"). Keep the process's setting.
    saved_cache_dir = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton as jt
    except Exception as err:  # ImportError, or its own refusal on a CPU-only jaxlib
        raise RuntimeError(
            "backend='triton' for JAX needs jax-triton (pip install 'jax-triton==0.3.1') and a CUDA jaxlib; "
            f"importing it failed: {err}"
        ) from err
    finally:
        if saved_cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache_dir
    return jt


def run_triton(launches: Sequence[KernelLaunch], input_names: Sequence[str], results: Sequence[str], *inputs):
    """The launches through ``jax_triton.triton_call``; returns the named ``results``."""
    jt = jax_triton()

    def launch_fn(launch: KernelLaunch, args: list, env: dict):
        kwargs = dict(
            kernel=launch.kernel, out_shape=[jax.ShapeDtypeStruct(o.shape, jnp.dtype(o.dtype)) for o in launch.outputs],
            grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.keywords,
        )
        if launch.input_output_aliases:
            kwargs["input_output_aliases"] = dict(launch.input_output_aliases)
        return tuple(jt.triton_call(*args, **kwargs))

    env = run_launches(launches, dict(zip(input_names, inputs)), launch_fn)
    return tuple(env[r] for r in results)


# ---------------------------------------------------------------- CPU: the interpreter


def _to_torch(x: np.ndarray):
    import torch

    x = np.array(x, copy=True)  # callback buffers are read-only
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _to_numpy(t, dtype) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.dtype(dtype))
    return t.numpy()


_INTERPRETER_LOCK = threading.Lock()  # Triton's interpreter patches module state: one launch at a time


def _host_launch(launches, input_names, results, *inputs: np.ndarray):
    """Run the launches on host copies through Triton's interpreter (outputs of one launch
    feed the next, as on the GPU). Callbacks of several devices (shard_map) may arrive
    concurrently: launches are serialised."""
    import torch

    def launch_fn(launch: KernelLaunch, args: list, env: dict):
        outs = []
        for i, o in enumerate(launch.outputs):
            alias = [a for a, out_index in launch.input_output_aliases if out_index == i]
            # an aliased output is the input buffer, as on the GPU; others are fresh
            outs.append(args[alias[0]] if alias else torch.empty(o.shape, dtype=_torch_dtype(o.dtype)))
        launch.kernel[launch.grid](
            *args, *outs, **launch.keywords, num_warps=launch.num_warps, num_stages=launch.num_stages
        )
        return outs

    with _INTERPRETER_LOCK:
        env = run_launches(launches, {n: _to_torch(x) for n, x in zip(input_names, inputs)}, launch_fn)
    specs = _result_specs(launches, results)
    return tuple(_to_numpy(env[r], specs[r].dtype) for r in results)


def _result_specs(launches: Sequence[KernelLaunch], results: Sequence[str]) -> dict:
    """Shape and dtype of each named result: its spec in the last launch that writes it."""
    specs = {}
    for launch in launches:
        for o in launch.outputs:
            specs[o.array] = jax.ShapeDtypeStruct(o.shape, jnp.dtype(o.dtype))
    return {r: specs[r] for r in results}


def _torch_dtype(dtype):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int32": torch.int32}[jnp.dtype(dtype).name]


def run_interpret(launches: Sequence[KernelLaunch], input_names: Sequence[str], results: Sequence[str], *inputs):
    """The launches as a ``jax.pure_callback`` into Triton's interpreter (jit/vmap-safe);
    returns the named ``results``."""
    if not launches:  # nothing to launch (e.g. a cache write of zero tokens)
        return tuple(dict(zip(input_names, inputs))[r] for r in results)
    specs = _result_specs(launches, results)
    return jax.pure_callback(
        functools.partial(_host_launch, tuple(launches), tuple(input_names), tuple(results)),
        tuple(specs[r] for r in results), *inputs, vmap_method="sequential",
    )
