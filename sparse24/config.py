"""``SparsityConfig``: which keys N:M sparse attention keeps (docs/SPEC.md §2).

For every query row and head, keys are grouped by absolute key index into groups of ``m``
consecutive keys, ``[m*g, m*g + m)``; in each group only the ``n`` largest pre-softmax scores
survive (equal scores: the lower key index wins). Keys in the dense regions (the first
``dense_sink_tokens`` keys, and the ``dense_recent_tokens`` keys ending at the query's own
position) are never sparsified. ``n == m`` is plain attention.

This module is pure Python (no torch, no jax) so that every framework can share it.
"""

from __future__ import annotations

import dataclasses
import numbers
import re

__all__ = ["SparsityConfig"]

_ACCEPTED = (
    "accepted: 'N:M' with M in {4, 8} and 1 <= N <= M (e.g. '2:4', '1:4', '4:8') or 'dense', "
    "optionally followed by comma-separated options 'sink=INT', 'recent=INT', "
    "'sparse_decode=true|false', 'decode=sparse|dense' "
    "(e.g. '2:4,sink=4,recent=64,sparse_decode=false')"
)

_HEAD_RE = re.compile(r"^(\d+)\s*:\s*(\d+)$")
_OPTION_RE = re.compile(r"^([A-Za-z_]+)\s*=\s*(\S+)$")
_INT_RE = re.compile(r"^[+]?\d+$")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
# option key (as written on a command line) -> dataclass field
_OPTION_FIELDS = {
    "sink": "dense_sink_tokens",
    "dense_sink_tokens": "dense_sink_tokens",
    "recent": "dense_recent_tokens",
    "dense_recent_tokens": "dense_recent_tokens",
    "sparse_decode": "sparse_decode",
    "decode": "sparse_decode",
}


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Which keys N:M sparse attention keeps (docs/SPEC.md §2). Immutable and hashable.

    Attributes:
        n: keys kept per group of ``m`` (the ``n`` largest scores of the group; equal
            scores: the lower key index wins). ``1 <= n <= m``; ``n == m`` is plain attention.
        m: group size. Groups are ``m`` consecutive *absolute* key indices ``[m*g, m*g + m)``
            of one sequence, counted from its first real key. Must be 4 or 8.
        dense_sink_tokens: the first ``dense_sink_tokens`` keys (``j < dense_sink_tokens``)
            are never sparsified ("attention sinks"). Dense keys must still be visible
            (causal mask, window) to be kept.
        dense_recent_tokens: key ``j`` is never sparsified for the query at absolute
            position ``p`` when ``0 <= p - j < dense_recent_tokens`` (the query's own key and
            the ``dense_recent_tokens - 1`` keys before it). 0 disables the region.
        sparse_decode: if False, every row of a sequence with exactly one new query token
            (a decode step) is entirely dense: N:M selection applies to prefill only.
    """

    n: int = 2
    m: int = 4
    dense_sink_tokens: int = 0
    dense_recent_tokens: int = 64
    sparse_decode: bool = True

    def __post_init__(self) -> None:
        for name in ("n", "m", "dense_sink_tokens", "dense_recent_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"SparsityConfig.{name} must be an int, got {value!r} "
                    f"of type {type(value).__name__}"
                )
            # normalise numpy integers etc. to a plain int (keeps hash/eq/str simple)
            object.__setattr__(self, name, int(value))
        if not isinstance(self.sparse_decode, bool):
            raise TypeError(
                f"SparsityConfig.sparse_decode must be a bool, got {self.sparse_decode!r} "
                f"of type {type(self.sparse_decode).__name__}"
            )
        if self.m not in (4, 8):
            raise ValueError(f"SparsityConfig.m must be 4 or 8, got {self.m}")
        if not 1 <= self.n <= self.m:
            raise ValueError(
                f"SparsityConfig.n must satisfy 1 <= n <= m (m={self.m}), got {self.n}"
            )
        for name in ("dense_sink_tokens", "dense_recent_tokens"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"SparsityConfig.{name} must be >= 0, got {value}")

    @classmethod
    def dense(cls) -> "SparsityConfig":
        """Plain (dense) attention: ``SparsityConfig(n=4, m=4, 0, 0)``."""
        return cls(n=4, m=4, dense_sink_tokens=0, dense_recent_tokens=0)

    @property
    def is_dense(self) -> bool:
        """True when nothing is ever dropped (``n == m``)."""
        return self.n == self.m

    @classmethod
    def parse(cls, text: str) -> "SparsityConfig":
        """Parse a command-line string such as ``"2:4"``, ``"dense"`` or
        ``"2:4,sink=4,recent=64,sparse_decode=false"``.

        Fields not given keep the dataclass defaults (so ``"2:4"`` has ``recent=64``);
        ``"dense"`` starts from :meth:`dense`. Keys: ``sink`` (``dense_sink_tokens``),
        ``recent`` (``dense_recent_tokens``), ``sparse_decode=true|false`` or
        ``decode=sparse|dense``. Whitespace and letter case are ignored.
        ``parse(str(cfg)) == cfg`` for every config.

        Raises:
            TypeError: ``text`` is not a string.
            ValueError: malformed text, unknown or repeated keys, or invalid values; the
                message names the text and what is accepted.
        """
        if not isinstance(text, str):
            raise TypeError(
                f"SparsityConfig.parse expects a str, got {text!r} of type {type(text).__name__}"
            )

        def fail(why: str) -> ValueError:
            return ValueError(f"invalid sparsity config {text!r}: {why}; {_ACCEPTED}")

        parts = [part.strip() for part in text.strip().split(",")]
        head = parts[0].lower()
        if head == "dense":
            fields = dataclasses.asdict(cls.dense())
        else:
            match = _HEAD_RE.match(head)
            if match is None:
                raise fail(f"expected 'N:M' or 'dense' first, got {parts[0]!r}")
            fields = dataclasses.asdict(cls())
            fields["n"], fields["m"] = int(match.group(1)), int(match.group(2))

        seen: set[str] = set()
        for part in parts[1:]:
            match = _OPTION_RE.match(part)
            if match is None:
                raise fail(f"expected 'key=value', got {part!r}")
            key, value = match.group(1).lower(), match.group(2).lower()
            field = _OPTION_FIELDS.get(key)
            if field is None:
                raise fail(f"unknown key {key!r}")
            if field in seen:
                raise fail(f"{field} given twice")
            seen.add(field)
            if key == "decode":
                if value not in ("sparse", "dense"):
                    raise fail(f"decode must be 'sparse' or 'dense', got {value!r}")
                fields[field] = value == "sparse"
            elif field == "sparse_decode":
                if value not in _TRUE | _FALSE:
                    raise fail(f"sparse_decode must be true or false, got {value!r}")
                fields[field] = value in _TRUE
            else:
                if not _INT_RE.match(value):
                    raise fail(f"{key} must be a non-negative integer, got {value!r}")
                fields[field] = int(value)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise fail(str(err)) from err

    def __str__(self) -> str:
        """Canonical form that :meth:`parse` reads back, e.g.
        ``"2:4,sink=0,recent=64,sparse_decode=true"``; ``"dense"`` for :meth:`dense`."""
        if self == SparsityConfig.dense():
            return "dense"
        decode = "true" if self.sparse_decode else "false"
        return (
            f"{self.n}:{self.m},sink={self.dense_sink_tokens},"
            f"recent={self.dense_recent_tokens},sparse_decode={decode}"
        )
