"""Backend names, the one backend resolver, and how a process runs Triton (compiled or interpreted).

Triton decides per process, when it is imported (more exactly: when ``@triton.jit`` decorates
sparse24's kernels), whether kernels are compiled for a GPU or run by its CPU interpreter
(``TRITON_INTERPRET=1`` set before the import). So ``backend="interpret"`` works only in an
interpreting process and ``backend="triton"`` only in the other kind; asking for the one the
process cannot do is an error that says how to get it.

:func:`resolve_backend` is the only place that gives ``"auto"`` its meaning, for the torch ops,
the JAX ops, ``sparse24.eval`` and the HF backend alike (docs/SPEC.md §4): the compiled kernel on
a GPU, the interpreter in an interpreting process, otherwise the array-code reference.
:func:`use_interpreter_if_no_gpu` is the one way scripts and test setups choose the
interpreter when there is no GPU.
"""

from __future__ import annotations

import os
import sys

BACKENDS = ("auto", "triton", "interpret", "reference")
FRAMEWORKS = ("torch", "jax")

# Process-wide facts, computed once. Plain module globals (not lru_cache) so that
# torch.compile reads them as constants instead of tracing the probes.
_TRITON_AVAILABLE: bool | None = None
_KERNELS_INTERPRETED: bool | None = None

_TRUE = ("1", "true", "on", "yes")


def triton_available() -> bool:
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_AVAILABLE = False
        else:
            _TRITON_AVAILABLE = True
    return _TRITON_AVAILABLE


def kernels_interpreted() -> bool:
    """True when sparse24's kernels run in Triton's interpreter in this process (imports the
    kernels, and so decides the process's mode, on first call)."""
    global _KERNELS_INTERPRETED
    if _KERNELS_INTERPRETED is None:
        if not triton_available():
            _KERNELS_INTERPRETED = False
        else:
            from triton.runtime.jit import JITFunction

            from sparse24.kernels import unified_attention_kernel

            _KERNELS_INTERPRETED = not isinstance(unified_attention_kernel, JITFunction)
    return _KERNELS_INTERPRETED


def check_backend_name(backend) -> str:
    """``backend`` is one of ``BACKENDS`` (a name check only; ``resolve_backend`` decides what runs)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, framework: str = "torch", *, on_gpu: bool) -> str:
    """Map a requested backend to "triton", "interpret" or "reference", or raise ValueError.

    ``"auto"`` means the same for every framework and caller: ``"triton"`` when ``on_gpu`` and
    the process compiles kernels, ``"interpret"`` in an interpreting process, otherwise
    ``"reference"``.

    Args:
      backend: "auto" | "triton" | "interpret" | "reference".
      framework: "torch" | "jax" (only the words of the errors differ).
      on_gpu: torch: the inputs live on a CUDA device; JAX: the default backend is a GPU.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {list(FRAMEWORKS)}, got {framework!r}")
    check_backend_name(backend)
    if backend == "reference":
        return backend
    if backend == "auto":
        if not triton_available():
            return "reference"
        if kernels_interpreted():
            return "interpret"
        return "triton" if on_gpu else "reference"
    if not triton_available():
        extra = "sparse24[jax]" if framework == "jax" else "sparse24[torch]"
        raise ValueError(f"backend={backend!r} needs the triton package; install {extra} or use backend='reference'")
    if backend == "interpret" and not kernels_interpreted():
        raise ValueError(
            "backend='interpret' runs the Triton kernel in Triton's CPU interpreter, which this process "
            "did not enable: set TRITON_INTERPRET=1 in the environment before triton is imported "
            "(e.g. `TRITON_INTERPRET=1 python script.py`, or sparse24.backends.use_interpreter_if_no_gpu() "
            "first thing), or use backend='reference' / 'triton'"
        )
    if backend == "triton":
        if kernels_interpreted():
            raise ValueError(
                "backend='triton' needs compiled kernels, but this process imported triton with "
                "TRITON_INTERPRET=1 (the whole process interprets); use backend='interpret' here, or run "
                "without TRITON_INTERPRET for the GPU"
            )
        if not on_gpu:
            if framework == "jax":
                raise ValueError(
                    "backend='triton' needs a GPU: JAX's default backend is not 'gpu' here "
                    "(use backend='reference' or 'interpret')"
                )
            raise ValueError("backend='triton' needs CUDA inputs; got tensors off the GPU (use backend='reference' or 'interpret')")
    return backend


def _cuda_gpu_present() -> bool:
    """A CUDA GPU is visible (asks torch when installed, else JAX; neither: no)."""
    try:
        import torch
    except ImportError:
        pass
    else:
        return bool(torch.cuda.is_available())
    try:
        import jax
    except ImportError:
        return False
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def use_interpreter_if_no_gpu(*, force: bool = False) -> bool:
    """Choose Triton's interpreter for this process when it has no CUDA GPU (or always, with
    ``force=True``); returns whether the process will interpret sparse24's kernels.

    Sets ``TRITON_INTERPRET=1`` in ``os.environ``; call it before anything imports triton
    (first thing in a script, ``conftest.py``, a CLI's ``main``). An explicit
    ``TRITON_INTERPRET`` in the environment always wins (nothing is changed then).

    Raises:
      RuntimeError: the interpreter is wanted but triton (or sparse24's kernels) was already
        imported without it: the process compiles, and that cannot change any more.
    """
    env = os.environ.get("TRITON_INTERPRET")
    if env is not None:
        return env.strip().lower() in _TRUE
    if not force and _cuda_gpu_present():
        return False
    if "triton" in sys.modules or "sparse24.kernels" in sys.modules:
        raise RuntimeError(
            "use_interpreter_if_no_gpu(): triton was already imported without TRITON_INTERPRET=1, so this "
            "process compiles kernels and cannot switch to the interpreter; call it before anything imports "
            "triton (sparse24.torch_ops, sparse24.jax_ops, sparse24.kernels), or start the process with "
            "TRITON_INTERPRET=1 in its environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return True
