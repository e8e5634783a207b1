"""Backend names and how a process runs Triton (compiled or interpreted).

Triton decides per process, when it is imported, whether ``@triton.jit`` kernels are
compiled for a GPU or run by its CPU interpreter (``TRITON_INTERPRET=1`` set before the
import). So ``backend="interpret"`` works only in an interpreting process and
``backend="triton"`` only in the other kind; asking for the one the process cannot do
is an error that says how to get it.
"""

from __future__ import annotations

BACKENDS = ("auto", "triton", "interpret", "reference")

# Process-wide facts, computed once. Plain module globals (not lru_cache) so that
# torch.compile reads them as constants instead of tracing the probes.
_TRITON_AVAILABLE: bool | None = None
_KERNELS_INTERPRETED: bool | None = None


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
    """True when sparse24's kernels run in Triton's interpreter in this process."""
    global _KERNELS_INTERPRETED
    if _KERNELS_INTERPRETED is None:
        if not triton_available():
            _KERNELS_INTERPRETED = False
        else:
            from triton.runtime.jit import JITFunction

            from sparse24.kernels import unified_attention_kernel

            _KERNELS_INTERPRETED = not isinstance(unified_attention_kernel, JITFunction)
    return _KERNELS_INTERPRETED


def resolve_backend(backend: str, *, on_cuda: bool, auto_interprets: bool = True) -> str:
    """Map a requested backend to "triton", "interpret" or "reference", or raise.

    Args:
      backend: "auto" | "triton" | "interpret" | "reference".
      on_cuda: the inputs live on a CUDA device (JAX: the default backend is a GPU).
      auto_interprets: whether "auto" picks the interpreter in an interpreting process
        (torch: yes; JAX: no, "auto" is the GPU kernel or the jax.numpy reference).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "auto":
        if auto_interprets and triton_available() and kernels_interpreted():
            return "interpret"
        if on_cuda and triton_available() and not kernels_interpreted():
            return "triton"
        return "reference"
    if not triton_available():
        raise ValueError(f"backend={backend!r} needs the triton package; install sparse24[torch] or use backend='reference'")
    if backend == "interpret" and not kernels_interpreted():
        raise ValueError(
            "backend='interpret' runs the Triton kernel in Triton's CPU interpreter, which this process "
            "did not enable: set TRITON_INTERPRET=1 in the environment before triton is imported "
            "(e.g. `TRITON_INTERPRET=1 python script.py`), or use backend='reference' / 'triton'"
        )
    if backend == "triton":
        if kernels_interpreted():
            raise ValueError(
                "backend='triton' needs compiled kernels, but this process imported triton with "
                "TRITON_INTERPRET=1 (the whole process interprets); use backend='interpret' here, or run "
                "without TRITON_INTERPRET for the GPU"
            )
        if not on_cuda:
            raise ValueError("backend='triton' needs CUDA inputs; got tensors off the GPU (use backend='reference' or 'interpret')")
    return backend
