"""The transformers family sweep (issue 15): every causal-LM architecture of the installed
transformers, built from a tiny random config, either runs exactly through
``attn_implementation="sparse24"`` or is refused with a clear error. No silent outcome.

The families come from transformers' own auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``;
the config class is the model class's own ``config_class``, else ``CONFIG_MAPPING``'s), not
from a hand-picked list. A tiny config: 2 layers, hidden 64, 4 heads / 2 KV heads, head_dim
16, vocab 128, plus the family's own size fields shrunk where it has them (experts, MLA
ranks, sliding window 4, SSM sizes, other large ``*_dim`` / ``*_size`` fields) and two layers
keeping its mix of layer types. Each family ends in exactly one of:

* ``runs``: sparse24 dense equals the reference attention (sdpa, or eager where sdpa differs
  from eager) to 1e-4 on a full forward and on cached decode steps, and 2:4 on a left-padded
  batch equals each prompt alone (to 1e-4; right-padded where the family's own attention
  gives a left-padded prompt other logits, e.g. positions that ignore ``position_ids``);
* ``refused``: a ValueError / TypeError / NotImplementedError at ``set_attn_implementation``
  or ``sparsify`` time, or raised by ``sparse24.hf`` itself at the first forward (its mask
  reading), saying what is unsupported;
* ``not buildable``: the family cannot be built tiny, or does not run tiny with its own
  reference attention (no sparse24 involved): listed with the reason;
* ``FAILED``: anything else (a mismatch; an unexpected exception; a ValueError/TypeError that
  the model's code, or the op's argument checks, raise under sparse24 instead of a refusal of
  ``sparse24.hf``; a family that takes longer than ``FAMILY_SECONDS``): a bug, the test fails.

sparse24 runs with ``backend="reference"`` here (``sparsify(model, cfg, backend="reference")``:
the chunked torch implementation of the spec, fast on a CPU; under ``TRITON_INTERPRET=1`` the
default backend would be the slow Triton interpreter). The sweep tests the transformers
integration (routing, masks, caches, padding, refusals); the kernel's exactness against the
reference is proven by the kernel tests. Everything runs in one process, one thread, with a
per-family time guard (``signal.alarm`` in the main thread).

``python -m sparse24.hf_families`` prints the table; ``--write-readme README.md`` writes it
between the README's ``<!-- families:start -->`` / ``<!-- families:end -->`` markers
(``tests/test_hf_families.py`` checks that block equals the sweep's output).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import signal
import sys
import threading
import warnings

import torch

TOL = 1e-4
FAMILY_SECONDS = 30  # the per-family guard (signal.alarm, where available): longer is FAILED/not buildable
PREFIX, LENGTH = 5, 8  # the cached-decode check: a prefill of PREFIX tokens, then LENGTH - PREFIX decode steps
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=128, intermediate_size=128, max_position_embeddings=256)
# Family-specific sizes, set where a config has them (MoE, MLA, sliding windows, SSM layers, ...), so the
# common tiny sizes above give a tiny model in more families. MLA keeps the real families' shape
# (v_head_dim = qk_nope_head_dim < qk_nope_head_dim + qk_rope_head_dim).
SHRINK = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
              moe_k=2, top_k=2, n_group=1, topk_group=1, n_shared_experts=1, num_shared_experts=1,
              moe_intermediate_size=64, shared_expert_intermediate_size=64, expert_intermediate_size=64,
              first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=8, sliding_window=4, rotary_dim=8, attention_types=[[["global", "local"], 1]],
              attn_layer_period=2, attn_layer_offset=1, attn_layer_indices=[1], mamba_chunk_size=16, chunk_size=16,
              mamba_n_heads=4, mamba_d_ssm=64, mamba_d_state=16, state_size=16, mamba_d_head="auto",
              vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, encoder_layers=2, decoder_layers=2,
              num_encoder_layers=2, num_decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              num_heads=4)
# set even where the default is None (None there means "derived", not "feature off")
ALWAYS = {"num_experts_per_tok", "attn_layer_indices", "n_group", "topk_group"}
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)
# int config fields by name: sizes that, left at their defaults, keep a "tiny" model large
_SIZE_FIELD = re.compile(r"(ffn|intermediate|hidden|_dim$|^dim_|d_ff|d_model|embed_dim|vocab)")
_NOT_A_SIZE = re.compile(r"(head_dim|max_position|token_id|seed|max_length|bucket|distance|num_)")
MAX_PARAMS = 3_000_000
START, END = "<!-- families:start -->", "<!-- families:end -->"


def _tiny_layer_types(layer_types):
    """Two layers keeping the family's mix: its first two distinct layer types (one attention type at least)."""
    distinct = list(dict.fromkeys(layer_types))
    attention = [t for t in distinct if "attention" in str(t) and "linear" not in str(t)]
    chosen = distinct[:2]
    if attention and not any(t in attention for t in chosen):
        chosen = [chosen[0], attention[0]]
    return (chosen * 2)[:2]


def _tiny_kwargs(config_cls) -> dict:
    """Constructor arguments of a tiny ``config_cls``: TINY, TOKEN_IDS, the SHRINK fields it has,
    its other large size fields shrunk, and two layers of its layer types."""
    defaults = config_cls().to_dict()
    kw = dict(TINY)
    for k, v in defaults.items():
        if (type(v) is int and v > 128 and k not in kw and _SIZE_FIELD.search(k) and not _NOT_A_SIZE.search(k)):
            kw[k] = 128 if "vocab" in k else 64
    kw.update({k: v for k, v in SHRINK.items() if defaults.get(k) is not None or (k in ALWAYS and k in defaults)})
    kw.update({k: v for k, v in TOKEN_IDS.items() if k in defaults})
    layer_types = defaults.get("layer_types")
    if isinstance(layer_types, (list, tuple)) and layer_types:
        kw["layer_types"] = _tiny_layer_types(layer_types)
    if defaults.get("kv_lora_rank") is not None:  # MLA: heads are not grouped, head_dim is the rope part
        kw.update(head_dim=SHRINK["qk_rope_head_dim"], num_key_value_heads=TINY["num_attention_heads"])
    return kw


def _shrink(cfg) -> None:
    """Shrink a built config in place (sub-configs of composite models), attribute by attribute."""
    for k, v in {**TINY, **TOKEN_IDS}.items():
        if k in TINY or getattr(cfg, k, None) is not None:
            with contextlib.suppress(Exception):
                setattr(cfg, k, v)
    for k, v in SHRINK.items():
        if getattr(cfg, k, None) is not None:
            with contextlib.suppress(Exception):
                setattr(cfg, k, v)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types:
        with contextlib.suppress(Exception):
            cfg.layer_types = _tiny_layer_types(layer_types)
    if getattr(cfg, "kv_lora_rank", None) is not None:
        with contextlib.suppress(Exception):
            cfg.head_dim, cfg.num_key_value_heads = SHRINK["qk_rope_head_dim"], TINY["num_attention_heads"]


def families() -> dict[str, str]:
    """{model_type: causal-LM class name}, from transformers' auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text if len(text) <= 400 else text[:400] + ' ...'}"


class _NotBuildable(Exception):
    pass


def _config(family: str, model_cls):
    """A tiny config of ``family``: constructed from tiny arguments, else the defaults shrunk in
    place. The model class's own config class where it differs from the family's (a causal-LM
    class of a composite family takes the text config)."""
    from transformers import CONFIG_MAPPING, PreTrainedConfig

    config_cls = getattr(model_cls, "config_class", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, PreTrainedConfig)):
        config_cls = CONFIG_MAPPING[family]
    errors = []
    try:
        kw = _tiny_kwargs(config_cls)
    except Exception as e:  # noqa: BLE001 - the defaults do not build: fall back to TINY
        errors.append(e)
        kw = dict(TINY)
    for attempt in (kw, {k: v for k, v in kw.items() if k != "head_dim"}):
        try:
            cfg = config_cls(**attempt)
            break
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    else:
        try:
            cfg = config_cls()
        except Exception:  # noqa: BLE001
            raise _NotBuildable(f"config construction fails: {_reason(errors[-1])}") from None
        _shrink(cfg)
    for sub in ("text_config", "decoder", "language_config", "vision_config", "audio_config"):
        if getattr(cfg, sub, None) is not None and hasattr(getattr(cfg, sub), "to_dict"):
            _shrink(getattr(cfg, sub))
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True
    return cfg


def build(family: str):
    """A tiny random model of ``family`` (eval, fp32), or raise _NotBuildable(reason)."""
    import transformers

    cls = getattr(transformers, families()[family], None)
    if cls is None:
        raise _NotBuildable(f"transformers has no class {families()[family]} (the mapping names it)")
    cfg = _config(family, cls)
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(cfg).parameters())
    except Exception as e:  # noqa: BLE001 - any failure to build is the reason
        raise _NotBuildable(f"model construction fails: {_reason(e)}") from None
    if n > MAX_PARAMS:
        raise _NotBuildable(f"the tiny config still has {n / 1e6:.0f}M parameters (sizes the tiny config does "
                            "not reach)")
    torch.manual_seed(0)
    try:
        model = cls(cfg).eval()
    except Exception as e:  # noqa: BLE001
        raise _NotBuildable(f"model construction fails: {_reason(e)}") from None
    model.generation_config.eos_token_id = None
    languages = getattr(cfg, "languages", None)
    if hasattr(model, "set_default_language") and languages:  # X-MOD: one adapter per language
        model.set_default_language(languages[0])
    return model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def _full_and_decode(model, ids, prefix: int, with_mask: bool = False):
    """Logits of a full forward and of a cached prefill + token-by-token decode. ``with_mask``:
    pass an all-ones attention_mask (the reference: some families' eager path builds no causal
    mask without one, e.g. Moshi), else none (sparse24: the common path; masks are checked on
    the padded batch)."""
    def mask(n):
        return dict(attention_mask=torch.ones(ids.shape[0], n, dtype=torch.long)) if with_mask else {}

    full = _logits(model, ids, **mask(ids.shape[1]))
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True, **mask(prefix))
        steps, cache = [out.logits.float()], out.past_key_values
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t: t + 1], past_key_values=cache, use_cache=True, **mask(t + 1))
            steps.append(out.logits.float())
            cache = out.past_key_values
    return full, torch.cat(steps, 1)


def _padded(side: str, lengths=(8, 5), seed=10):
    width = max(lengths)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        real = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, real] = p
        mask[b, real] = 1
    return prompts, ids, mask


def _padded_matches_alone(model, side: str) -> str | None:
    """None when a ``side``-padded batch equals each prompt alone, else what differs. Both get
    explicit positions (0.. per prompt) where the model takes ``position_ids``, so families that
    derive positions from padding tokens (RoBERTa-like) see the same positions twice."""
    prompts, padded, mask = _padded(side)
    explicit = "position_ids" in inspect.signature(model.forward).parameters
    kw = dict(position_ids=(mask.cumsum(1) - 1).clamp(min=0)) if explicit else {}
    batched = _logits(model, padded, attention_mask=mask, **kw)
    for b, p in enumerate(prompts):
        alone = _logits(model, p[None], **(dict(position_ids=torch.arange(len(p))[None]) if explicit else {}))[0]
        real = slice(padded.shape[1] - len(p), None) if side == "left" else slice(0, len(p))
        d = (batched[b, real] - alone).abs().max().item()
        if not d <= TOL:
            return f"a {side}-padded batch differs from prompt {b} alone by {d:.3g}"
    return None


CLEAR = (ValueError, TypeError, NotImplementedError)


def _raised_in(e: BaseException) -> str:
    """The module whose code raised ``e`` (the innermost frame of its traceback)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "?") if tb is not None else "?"


def _refusal(stage: str, e: BaseException) -> tuple[str, str]:
    """A forward's error is a refusal only when the backend (``sparse24.hf``) raised it on
    purpose; one from the model's code under sparse24, or from the op's argument checks (which
    the backend should have refused first, saying why), is a bug (FAILED)."""
    where = _raised_in(e)
    if where == "sparse24.hf":
        return "refused", f"at {stage}: {_reason(e)}"
    return "FAILED", f"{type(e).__name__} from {where} (not a sparse24 refusal) at {stage}: {_reason(e)}"


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _guard(seconds: int):
    """Raise _Timeout in the block after ``seconds`` (signal.alarm: main thread, POSIX; else no guard)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_):
        raise _Timeout(f"took longer than {seconds} s (the sweep's per-family guard)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(family: str) -> tuple[str, str]:
    """(outcome, reason) of one family: "runs" | "refused" | "not buildable" | "FAILED".

    Order: build; switch to sparse24 and ``dense(..., backend="reference")`` (a refusal here
    is the answer: the model's structure is unsupported, whatever its reference does); the
    reference (eager, then sdpa if it agrees) on a full forward and cached decode steps, and
    which padding side its own attention handles (a padded batch equals each prompt alone);
    the same forwards through sparse24 dense; 2:4 on that padded batch against each prompt alone.
    """
    import sparse24.hf
    from sparse24 import SparsityConfig

    try:
        model = build(family)
    except _NotBuildable as e:
        return "not buildable", str(e)
    stage = "set_attn_implementation"
    try:
        model.set_attn_implementation(sparse24.hf.DEFAULT_NAME)
        stage = "sparsify"
        sparse24.hf.dense(model, backend="reference")
    except CLEAR as e:
        return "refused", f"at {stage}: {_reason(e)}"
    except Exception as e:  # noqa: BLE001
        return "FAILED", f"unexpected {type(e).__name__} at {stage}: {_reason(e)}"
    ids = torch.randint(3, TINY["vocab_size"], (2, LENGTH), generator=torch.Generator().manual_seed(1))
    # the reference: sdpa, or eager where sdpa is unavailable or drops a feature (they differ)
    try:
        model.set_attn_implementation("eager")
        want = _full_and_decode(model, ids, PREFIX, with_mask=True)
    except Exception as e:  # noqa: BLE001 - the family does not run tiny even without sparse24
        return "not buildable", f"does not run tiny with eager attention: {_reason(e)}"
    try:
        # the padded check: left padding, or right padding where the family's own attention
        # gives a left-padded prompt other logits (positions that ignore position_ids: Whisper)
        side = next((side for side in ("left", "right") if _padded_matches_alone(model, side) is None), None)
        if side is None:  # eager may be the odd one out (Moshi's eager ignores padding); sdpa then
            model.set_attn_implementation("sdpa")
            side = next((side for side in ("left", "right") if _padded_matches_alone(model, side) is None), None)
    except Exception as e:  # noqa: BLE001
        return "not buildable", f"does not run a padded batch tiny with eager attention: {_reason(e)}"
    if side is None:
        return "not buildable", ("with eager attention, a padded batch differs from each prompt alone (left and "
                                 "right padding): no reference for the padded check")
    reference = "eager"
    with contextlib.suppress(Exception):
        model.set_attn_implementation("sdpa")
        sdpa = _full_and_decode(model, ids, PREFIX, with_mask=True)
        if all((a - b).abs().max() <= TOL for a, b in zip(sdpa, want)):
            reference = "sdpa"
    stage = "first forward"
    try:
        model.set_attn_implementation(sparse24.hf.DEFAULT_NAME)  # the layers keep dense(): set above
        got = _full_and_decode(model, ids, PREFIX)
    except CLEAR as e:
        return _refusal(stage, e)
    except Exception as e:  # noqa: BLE001
        return "FAILED", f"unexpected {type(e).__name__} at {stage}: {_reason(e)}"
    for what, a, b in zip(("full forward", "cached decode"), got, want):
        d = (a - b).abs().max().item()
        if not d <= TOL:
            return "FAILED", f"sparse24 dense differs from {reference} on the {what} by {d:.3g}"
    try:
        sparse24.hf.sparsify(model, SparsityConfig(dense_recent_tokens=0), backend="reference")
        wrong = _padded_matches_alone(model, side)
    except CLEAR as e:
        return _refusal("a padded forward", e)
    except Exception as e:  # noqa: BLE001
        return "FAILED", f"unexpected {type(e).__name__} on a padded batch: {_reason(e)}"
    if wrong:
        return "FAILED", f"2:4: {wrong}"
    return "runs", f"equals {reference}" + ("" if side == "left" else " (padded check: right padding, as its "
                                                                     "positions ignore position_ids)")


def _check_guarded(family: str) -> tuple[str, str]:
    try:
        with _guard(FAMILY_SECONDS):
            return check(family)
    except _Timeout as e:  # raised outside check's own handlers (between stages)
        return "FAILED", str(e)


def sweep(names=None) -> dict[str, tuple[str, str]]:
    """{family: (outcome, reason)} over ``names`` (default: every family), in one process."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(transformers.logging.CRITICAL)  # tiny configs log errors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: one thread is fastest
    results = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names or families():
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    results[name] = _check_guarded(name)
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    return results


def table(results) -> str:
    """The README block: counts, then one row per family."""
    counts = {k: sum(o == k for o, _ in results.values()) for k in ("runs", "refused", "not buildable", "FAILED")}
    import transformers

    lines = [
        f"Family sweep (generated by `python -m sparse24.hf_families --write-readme README.md` from transformers "
        f"{transformers.__version__}'s causal-LM auto mapping; `tests/test_hf_families.py` keeps it current): "
        + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k != "FAILED") + ".",
        "",
        "| family | outcome | reason |",
        "|---|---|---|",
    ]
    for name, (outcome, reason) in results.items():
        lines.append(f"| `{name}` | {outcome} | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must contain one {START} ... {END} block")
    return text[text.index(START) + len(START): text.index(END)].strip("\n")


def write_readme(path: str, results) -> None:
    text = open(path).read()
    readme_block(text)  # checks the markers
    new = text[: text.index(START) + len(START)] + "\n" + table(results) + "\n" + text[text.index(END):]
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    results = sweep()
    if argv[:1] == ["--write-readme"]:
        write_readme(argv[1] if len(argv) > 1 else "README.md", results)
    print(table(results))
    return 1 if any(o == "FAILED" for o, _ in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
