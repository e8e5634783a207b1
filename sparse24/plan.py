"""Per-layer sparsity plans under a quality budget (``sparse24 plan``), and ModelOpt's form.

A *plan* says which attention layers run which N:M config; every other layer is dense. It is
what :func:`sparse24.hf.sparsify` accepts (``sparsify(model, plan)`` or ``plan.layers``) and what
``sparse24 eval --plan FILE`` evaluates. JSON::

    {"format": "sparse24-plan", "version": 1, "num_layers": 30,
     "layers": {"0": "2:4,sink=0,recent=0,sparse_decode=true", "7": ...},   # the sparse layers
     "search": {...}}                                                      # how it was found

The search (:func:`search`, ``sparse24 plan --budget 0.5%``): the per-layer sensitivities of one
config (``sparse24.eval.per_layer_sweep``: the perplexity change when only layer L is sparse),
then layers are added greedily from the least sensitive while the *predicted* change (the sum of
the chosen layers' sensitivities) stays within the budget; a final check run measures the plan
itself, and while the measured change exceeds the budget the most sensitive chosen layer is
dropped and the plan measured again. The plan records the predicted and the measured change.
One config for the chosen layers (which N:M and recent to use per layer is not searched).

ModelOpt (0.47, ``modelopt.torch.sparsity.attention_sparsity``) describes the same thing as a
``sparse_cfg`` of module-name patterns (fnmatch) with ``sparsity_n``, ``sparsity_m``,
``dense_sink_tokens`` and ``dense_recent_tokens`` (../shared/research/anchor-modelopt.md §3):
:func:`to_modelopt` writes one pattern per sparse layer, :func:`from_modelopt` reads any patterns
(applied in order, a later match overriding an earlier one, ``"default"`` first). ModelOpt keeps
decode rows (``q_len <= 1``) dense: that is ``sparse_decode=False`` here, so a plan with
``sparse_decode=True`` layers is refused by :func:`to_modelopt` (no silent change of meaning).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import pathlib
import sys
from typing import Mapping, Optional, Sequence

from sparse24.config import SparsityConfig

FORMAT = "sparse24-plan"
VERSION = 1
MODELOPT_METHOD = "triton_sparse_softmax"


@dataclasses.dataclass
class Plan:
    """``layers``: {layer index: SparsityConfig} of the sparse layers (the others are dense);
    ``num_layers``: the model's attention layers; ``search``: provenance of a searched plan."""

    layers: dict
    num_layers: int
    search: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {self.num_layers!r}")
        layers = {}
        for key, config in dict(self.layers).items():
            layer = int(key)
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"plan layer {key!r} is outside the model's layers 0..{self.num_layers - 1}")
            if isinstance(config, str):
                config = SparsityConfig.parse(config)
            if config is not None and not isinstance(config, SparsityConfig):
                raise TypeError(f"plan layer {layer}: expected a SparsityConfig, a config string or None, "
                                f"got {type(config).__name__}")
            if config is not None and not config.is_dense:
                layers[layer] = config
        self.layers = dict(sorted(layers.items()))

    def for_sparsify(self) -> dict:
        """{layer: SparsityConfig | None} for every layer, as ``sparse24.hf.sparsify`` takes it."""
        return {layer: self.layers.get(layer) for layer in range(self.num_layers)}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "num_layers": self.num_layers,
                "layers": {str(k): str(v) for k, v in self.layers.items()}, "search": self.search}

    @classmethod
    def from_json(cls, data: Mapping) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a sparse24 plan (expected {{'format': {FORMAT!r}, ...}}); a ModelOpt "
                             "sparse_cfg is read by sparse24.plan.from_modelopt")
        if data.get("version") != VERSION:
            raise ValueError(f"sparse24 plan version {data.get('version')!r} is not supported (this is {VERSION})")
        return cls(layers=dict(data.get("layers", {})), num_layers=data["num_layers"],
                   search=dict(data.get("search", {})))

    def save(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        return cls.from_json(json.loads(pathlib.Path(path).read_text()))


# ----------------------------------------------------------------------------- ModelOpt's form


def attention_module_names(model) -> dict:
    """{layer index: qualified module name} of a transformers model's attention modules."""
    import sparse24.hf

    modules = sparse24.hf._attention_modules(model)
    by_id = {id(m): i for i, m in modules.items()}
    return {by_id[id(m)]: name for name, m in model.named_modules() if id(m) in by_id}


def _pattern(name: str) -> str:
    return f"*{name}"


def to_modelopt(plan: Plan, module_names: Mapping[int, str]) -> dict:
    """The plan as ModelOpt's ``{"sparse_cfg": {pattern: {...}, "default": {"enable": False}}}``.
    ``module_names``: {layer: qualified module name} (:func:`attention_module_names`)."""
    missing = sorted(set(plan.layers) - set(module_names))
    if missing:
        raise ValueError(f"module_names has no name for the plan's layers {missing}")
    decode = [layer for layer, c in plan.layers.items() if c.sparse_decode]
    if decode:
        raise ValueError(
            f"ModelOpt keeps decode rows (q_len <= 1) dense, but the plan's layers {decode} sparsify them "
            "(sparse_decode=true); plan with sparse_decode=false to write ModelOpt's form"
        )
    cfg = {}
    for layer, c in plan.layers.items():
        cfg[_pattern(module_names[layer])] = {
            "method": MODELOPT_METHOD, "sparsity_n": c.n, "sparsity_m": c.m, "dense_sink_tokens": c.dense_sink_tokens,
            "dense_recent_tokens": c.dense_recent_tokens, "backend": "triton", "enable": True,
        }
    cfg["default"] = {"enable": False}
    return {"sparse_cfg": cfg}


def from_modelopt(config: Mapping, module_names: Mapping[int, str]) -> Plan:
    """A plan from ModelOpt's ``sparse_cfg`` (or the dict holding it) for the modules named in
    ``module_names``. Entries apply in order, ``"default"`` first; a disabled or dense entry
    makes a layer dense. Unknown N:M fields are errors, not guesses."""
    cfg = config.get("sparse_cfg", config) if isinstance(config, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected ModelOpt's {{'sparse_cfg': {{pattern: settings}}}}, got {type(config).__name__}")
    entries = ([("default", cfg["default"])] if "default" in cfg else []) + \
        [(k, v) for k, v in cfg.items() if k != "default"]
    layers = {}
    for pattern, settings in entries:
        if not isinstance(settings, Mapping):
            raise TypeError(f"sparse_cfg[{pattern!r}] must be a dict, got {type(settings).__name__}")
        enabled = settings.get("enable", True)
        if enabled and "sparsity_n" not in settings and pattern != "default":
            raise ValueError(f"sparse_cfg[{pattern!r}] is enabled but has no sparsity_n (an N:M config needs "
                             "sparsity_n and sparsity_m)")
        config_here = None
        if enabled and "sparsity_n" in settings:
            config_here = SparsityConfig(
                n=int(settings["sparsity_n"]), m=int(settings.get("sparsity_m", 4)),
                dense_sink_tokens=int(settings.get("dense_sink_tokens", 0)),
                dense_recent_tokens=int(settings.get("dense_recent_tokens", 64)), sparse_decode=False,
            )
        for layer, name in module_names.items():
            if pattern == "default" or fnmatch.fnmatch(name, pattern):
                layers[layer] = config_here
    return Plan(layers={k: v for k, v in layers.items() if v is not None}, num_layers=len(module_names),
                search={"from": "modelopt sparse_cfg"})


# ----------------------------------------------------------------------------- the search


def greedy_layers(sensitivities: Mapping[int, float], budget_pct: float) -> tuple[list[int], float]:
    """Layers, least sensitive first, while the sum of their sensitivities (the predicted
    perplexity change, percent) stays <= ``budget_pct``. A negative sensitivity (a layer whose
    sparsity alone lowered the perplexity: mostly noise on short texts) predicts 0, not a gain
    to spend elsewhere. Ties: the lower layer first. Returns (layers in the order added,
    predicted change)."""
    chosen, total = [], 0.0
    for layer, delta in sorted(sensitivities.items(), key=lambda kv: (kv[1], kv[0])):
        cost = max(float(delta), 0.0)
        if total + cost > budget_pct * (1 + 1e-12):  # sums of floats: 0.1 + 0.2 is within 0.3
            break
        chosen.append(layer)
        total += cost
    return chosen, total


def search(model, tokens: Sequence[int], context: int, config: SparsityConfig, budget_pct: float, *,
           backend: Optional[str] = None, progress=None, max_backoff: int = 8, sweep=None) -> tuple[Plan, list]:
    """The budgeted plan search described in the module docstring. Returns (plan, rows): the
    per-layer sweep's results, then each check run's (dense, plan) results. ``sweep``: the
    results of ``sparse24.eval.per_layer_sweep(model, tokens, context, config)`` if already
    run (the same arguments), else it is run here."""
    from sparse24 import eval as ev

    if not isinstance(budget_pct, (int, float)) or isinstance(budget_pct, bool) or not budget_pct >= 0:
        raise ValueError(f"budget_pct must be a number >= 0 (percent), got {budget_pct!r}")
    if sweep is None:
        sweep = ev.per_layer_sweep(model, tokens, context, config, backend=backend, progress=progress)
    elif sweep[0].context != context or any(r.config != f"layer {r.layer}: {ev.config_label(config)}"
                                            for r in sweep[1:]):
        raise ValueError(f"sweep must be per_layer_sweep's results for context {context} and config {config}")
    num_layers = len(sweep) - 1
    sens = {r.layer: r.delta_pct for r in sweep[1:]}
    chosen, predicted = greedy_layers(sens, budget_pct)
    rows = list(sweep)
    checks = []
    while True:
        plan = Plan({layer: config for layer in chosen}, num_layers)
        if not chosen:
            measured = 0.0
            break
        dense, planned = ev.evaluate(model, tokens, context, [ev._dense(), plan.for_sparsify()], backend=backend,
                                     names=["dense", f"plan ({len(chosen)} layers)"])
        rows += [dense, planned]
        measured = planned.delta_pct
        checks.append({"layers": sorted(chosen), "measured_pct": measured})
        if measured <= budget_pct or len(checks) > max_backoff:
            break
        chosen = chosen[:-1]  # drop the most sensitive chosen layer and measure again
    plan.search = {
        "budget_pct": budget_pct, "config": str(config), "context": context, "tokens": len(tokens),
        "sensitivities_pct": {str(k): v for k, v in sorted(sens.items())},
        "predicted_pct": sum(max(sens[layer], 0.0) for layer in chosen), "measured_pct": measured,
        "within_budget": measured <= budget_pct, "checks": checks,
        "dense_perplexity": sweep[0].perplexity,
    }
    return plan, rows


# ----------------------------------------------------------------------------- command line


def _budget(text: str) -> float:
    value = text.strip().rstrip("%")
    try:
        budget = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 0.5%, got {text!r}") from None
    if not budget >= 0:
        raise argparse.ArgumentTypeError(f"the budget must be >= 0%, got {text!r}")
    return budget


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=_budget, required=True, metavar="PCT",
                        help="largest perplexity increase over dense, percent (e.g. 0.5%%)")
    parser.add_argument("--out", default="sparse24-plan.json", metavar="PATH",
                        help="where to write the plan (default sparse24-plan.json)")
    parser.add_argument("--modelopt", default=None, metavar="PATH",
                        help="also write the plan as ModelOpt's sparse_cfg (needs sparse_decode=false)")


def main(argv: list[str] | None = None, *, prog: str = "sparse24 plan") -> int:
    """``sparse24 plan --budget 0.5%``: eval's options (model, text, --contexts: the first is
    used, --max-tokens, --sparsity: the first is the config of the chosen layers, default
    ``2:4,recent=0``), plus --budget, --out, --modelopt."""
    from sparse24 import eval as ev

    return ev.main(argv, prog=prog, plan_command=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog="python -m sparse24.plan"))
