"""Plans: a model's sequence parallelism as data — module paths mapped to ``ParallelStyle``s.

A plan ships as a YAML file in this folder, one per diffusers transformer class::

    model: FluxTransformer2DModel
    plan:
      "":                                  # the root module
        style: ShardSequence
        inputs: {hidden_states: 1, encoder_hidden_states: 1, img_ids: 0, txt_ids: 0}
      transformer_blocks.*.attn: {style: ParallelAttention}
      proj_out: {style: GatherSequence, outputs: {0: 1}}

Tensor parallelism is a second section, ``tp``, applied on the mesh's ``tp`` axis with torch's
``ColwiseParallel`` / ``RowwiseParallel`` and the styles of ``meshsp.tp``::

    tp:
      transformer_blocks.*.attn: {style: LocalHeads}
      transformer_blocks.*.attn.to_q: {style: ColwiseParallel}
      transformer_blocks.*.attn.to_out.0: {style: RowwiseParallel}
      single_transformer_blocks.*.proj_out: {style: PackedRowwiseParallel, blocks: [1, 4]}

Keys are module paths with ``*`` wildcards per path component, as torch's ``parallelize_module``
takes them, and ``-1`` for the last child of a ``ModuleList`` (a gather after a loop's last layer,
whatever the depth of the config). ``optional: true`` on an entry allows it to match nothing (a variant module some configs
have); any other path that matches no module is an error, never a silent skip.
"""

from __future__ import annotations

import contextlib
import inspect
import difflib
import fnmatch
from collections.abc import Mapping
from pathlib import Path

import torch.nn as nn
import yaml
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.expert_choice import ExpertChoiceTopK
from meshsp.linear import LINEAR_STYLES
from meshsp.placements.sequence import BALANCES
from meshsp.refuse import RefuseInputs
from meshsp.whole_tokens import WholeTokens
from meshsp.styles import CheckInputs, GatherSequence, ParallelAttention, PlanState, ShardSequence
from meshsp.tp import TP_STYLES, tp_requirements

__all__ = ["Plan", "STYLES", "available_plans", "get_plan", "infer_plan", "load_plan", "parallelize", "plan_from_cp_plan"]

STYLES = {"ShardSequence": ShardSequence, "ParallelAttention": ParallelAttention, "GatherSequence": GatherSequence,
          "RefuseInputs": RefuseInputs, "ExpertChoiceTopK": ExpertChoiceTopK, "WholeTokens": WholeTokens}
STYLES.update(LINEAR_STYLES)  # linear attention and token-grid shards (meshsp.linear, meshsp.grid)
# The keys each style takes besides 'style' and 'optional' (its constructor's keywords).
_STYLE_KEYS = {"ShardSequence": {"inputs", "outputs"}, "GatherSequence": {"outputs"},
               "ParallelAttention": {"queries", "masks", "runs"}, "RefuseInputs": {"inputs"},
               "ExpertChoiceTopK": {"capacity", "experts"}, "WholeTokens": {"inputs", "outputs"}}
_STYLE_KEYS.update({name: set(inspect.signature(cls).parameters) for name, cls in LINEAR_STYLES.items()})
_ENTRY_KEYS = {"style", "optional"}.union(*_STYLE_KEYS.values())
_TP_ENTRY_KEYS = {"style", "blocks", "outputs", "output_layouts", "optional"}
_PLAN_DIR = Path(__file__).parent


def _style_from_entry(path: str, entry) -> tuple[object, bool]:
    if not isinstance(entry, Mapping) or "style" not in entry:
        raise ValueError(f"plan entry '{path}' must be a mapping with a 'style' (one of {sorted(STYLES)}); got {entry!r}.")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ValueError(f"plan entry '{path}' has unknown keys {sorted(unknown)}; valid keys: {sorted(_ENTRY_KEYS)}.")
    name = entry["style"]
    if name not in STYLES:
        raise ValueError(f"plan entry '{path}': unknown style {name!r}; valid styles: {sorted(STYLES)}.")
    kwargs = {k: v for k, v in entry.items() if k not in ("style", "optional")}
    if set(kwargs) - _STYLE_KEYS[name]:
        what = "no inputs/outputs" if name in ("ParallelAttention", "ParallelLinearAttention", "GridHalo") \
            else f"only {sorted(_STYLE_KEYS[name])}"
        raise ValueError(f"plan entry '{path}': {name} takes {what}; got {sorted(kwargs)}.")
    return STYLES[name](**kwargs), bool(entry.get("optional", False))


def _tp_style_from_entry(path: str, entry) -> tuple[object, bool]:
    if isinstance(entry, str):
        entry = {"style": entry}
    if not isinstance(entry, Mapping) or entry.get("style") not in TP_STYLES or set(entry) - _TP_ENTRY_KEYS:
        raise ValueError(f"plan tp entry '{path}' must be a mapping with a 'style' (one of {sorted(TP_STYLES)}) "
                         f"and optionally {sorted(_TP_ENTRY_KEYS - {'style'})}; got {entry!r}.")
    name = entry["style"]
    if "blocks" in entry and not name.startswith("Packed"):
        raise ValueError(f"plan tp entry '{path}': only the Packed styles take 'blocks'.")
    if ("outputs" in entry) != (name == "ShardFeatures"):
        raise ValueError(f"plan tp entry '{path}': ShardFeatures, and only it, takes 'outputs' ({{index: dim}}).")
    if "output_layouts" in entry and (name != "ColwiseParallel" or entry["output_layouts"] != "Replicate"):
        raise ValueError(f"plan tp entry '{path}': 'output_layouts: Replicate' is for ColwiseParallel only (a "
                         f"gathered output); got {entry!r}.")
    if name.startswith("Packed"):
        style = TP_STYLES[name](entry.get("blocks"))
    elif "output_layouts" in entry:
        style = TP_STYLES[name](output_layouts=Replicate())
    elif name == "ShardFeatures":
        style = TP_STYLES[name](entry["outputs"])
    else:
        style = TP_STYLES[name]()
    return style, bool(entry.get("optional", False))


def _spec_to_yaml(spec):
    if isinstance(spec, tuple):
        return [None if s is None else _spec_to_yaml(s) for s in spec]
    if spec.ndim is None and spec.segments is None and not spec.flatten and spec.units is None:
        return spec.dim
    out = {"dim": spec.dim}
    if spec.flatten:
        out["flatten"] = True
    if spec.ndim is not None:
        out["ndim"] = spec.ndim
    if spec.segments is not None:
        out["segments"] = list(spec.segments)
    if spec.units is not None:
        out["units"] = spec.units if isinstance(spec.units, str) else {"input": spec.units[0], "dim": spec.units[1]}
    return out


class Plan(ParallelStyle, dict):
    """``{module_path: ParallelStyle}`` whose styles share one state; itself the style of the root.

    Applied by ``meshsp.parallelize(model, mesh, plan)`` or torch's own
    ``parallelize_module(model, mesh, plan)`` — the same ``_apply`` either way: every path is
    validated against the model (a path that matches nothing raises, unless ``optional``), ``*`` and
    ``-1`` are resolved to concrete module names, the styles are applied in plan order (all or none:
    hooks of a failed application are removed), and ``CheckInputs`` goes on the root. A mesh with a
    ``cfg`` axis is reduced to its ``("ring", "ulysses")`` part. On one SP rank the validated plan is
    the identity and the model is left untouched.

    Example::

        plan = meshsp.load_plan("FluxTransformer2DModel", ulysses_mode="advanced_uaa")
        parallelize_module(transformer, mesh, plan)       # torch's entry point, meshsp's checks
    """

    def __init__(self, styles: Mapping[str, object], *, ulysses_mode: str = "strict",
                 model: str | None = None, optional: set[str] | None = None, empty_shards: bool = False,
                 tp: Mapping[str, object] | None = None, balance: str = "contiguous") -> None:
        dict.__init__(self, styles)
        self.model = model
        self.tp = dict(tp or {})  # the tensor-parallel entries, applied on the mesh's "tp" axis
        for path, style in self.tp.items():
            if type(style).__name__ not in TP_STYLES:
                raise ValueError(f"plan tp entry '{path}': {type(style).__name__} is not a tp style; valid: {sorted(TP_STYLES)}.")
        self.source: str | None = None  # set by get_plan: "shipped", "converted" or "inferred"
        self.optional = set(optional or ())
        if balance not in BALANCES:
            raise ValueError(f"plan balance must be one of {BALANCES}, got {balance!r}.")
        self.state = PlanState(ulysses_mode, empty_shards, balance)
        for path, style in self.items():
            if not hasattr(style, "bind"):
                raise ValueError(f"plan entry '{path}': {type(style).__name__} is not a meshsp style; valid: {sorted(STYLES)}.")
            style.bind(self.state, path)

    @property
    def ulysses_mode(self) -> str:
        return self.state.ulysses_mode

    @classmethod
    def from_dict(cls, data: Mapping, *, ulysses_mode: str = "strict") -> Plan:
        unknown = set(data) - {"model", "plan", "empty_shards", "tp", "balance"}
        if unknown or "plan" not in data:
            raise ValueError(f"a plan file has 'model', 'plan' and optionally 'empty_shards', 'balance' and 'tp' keys; "
                             f"got {sorted(data)}.")
        styles, tp, optional = {}, {}, set()
        for path, entry in (data["plan"] or {}).items():
            styles[str(path)], opt = _style_from_entry(str(path), entry)
            if opt:
                optional.add(str(path))
        for path, entry in (data.get("tp") or {}).items():
            tp[str(path)], opt = _tp_style_from_entry(str(path), entry)
            if opt:
                optional.add(f"tp:{path}")
        return cls(styles, ulysses_mode=ulysses_mode, model=data.get("model"), optional=optional,
                   empty_shards=bool(data.get("empty_shards", False)), tp=tp,
                   balance=str(data.get("balance", "contiguous")))

    def to_dict(self) -> dict:
        entries = {}
        for path, style in self.items():
            entry: dict = {"style": type(style).__name__}
            if isinstance(style, (ShardSequence, WholeTokens)) and style.inputs:
                entry["inputs"] = {k: _spec_to_yaml(v) for k, v in style.inputs.items()}
            if isinstance(style, (ShardSequence, GatherSequence, WholeTokens)) and style.outputs:
                entry["outputs"] = {k: _spec_to_yaml(v) for k, v in style.outputs.items()}
            if isinstance(style, ParallelAttention) and style.queries != "sharded":
                entry["queries"] = style.queries
            if isinstance(style, ParallelAttention) and style.masks != "local":
                entry["masks"] = style.masks
            if isinstance(style, ParallelAttention) and style.runs is not None:
                entry["runs"] = style.runs.to_spec()
            if isinstance(style, RefuseInputs):
                entry["inputs"] = dict(style.inputs)
            if isinstance(style, ExpertChoiceTopK):
                entry["capacity"], entry["experts"] = dict(style.capacity), style.experts
            if hasattr(style, "entry"):  # a style that writes its own keys (meshsp.grid)
                entry.update(style.entry())
            if path in self.optional:
                entry["optional"] = True
            entries[path] = entry
        out = {"model": self.model, "plan": entries}
        if self.state.empty_shards:
            out["empty_shards"] = True
        if self.state.balance != "contiguous":
            out["balance"] = self.state.balance
        if self.tp:
            out["tp"] = {}
            for path, style in self.tp.items():
                entry = {"style": type(style).__name__}
                if getattr(style, "blocks", None):
                    entry["blocks"] = list(style.blocks)
                if type(style).__name__ == "ShardFeatures":
                    entry["outputs"] = dict(style.outputs)
                if getattr(style, "gathered", False):
                    entry["output_layouts"] = "Replicate"
                if f"tp:{path}" in self.optional:
                    entry["optional"] = True
                out["tp"][path] = entry
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def matches(self, model: nn.Module, path: str) -> list[str]:
        """Module names of ``model`` that the plan key ``path`` selects."""
        return match_path(model, path)

    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` for a path that matches no module (naming the nearest ones)."""
        names = [n for n, _ in model.named_modules()]
        for path in [*self, *(f"tp:{p}" for p in self.tp)]:
            if path in self.optional or self.matches(model, path.removeprefix("tp:")):
                continue
            near = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
            raise ValueError(
                f"plan path '{path}' matches no module of {type(model).__name__}; nearest module names: "
                f"{near or names[1:6]}. Fix the path, or mark the entry 'optional: true' if only some "
                "configs have it."
            )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.validate(module)
        names = device_mesh.mesh_dim_names or ()
        sp_names = tuple(n for n in ("ring", "ulysses") if n in names)
        sp_mesh = (device_mesh if names == sp_names else device_mesh[sp_names]) if sp_names else None
        tp_mesh = device_mesh["tp"] if "tp" in names and device_mesh["tp"].size() > 1 else None
        sp_size = sp_mesh.size() if sp_mesh is not None else 1
        if tp_mesh is not None:
            self._check_tp(module, tp_mesh.size())
        if sp_size == 1 and tp_mesh is None:
            return module  # a plan at degree 1 is the identity: leave the model as it is
        with _all_or_nothing(module):
            if tp_mesh is not None:
                for path, style in self.tp.items():
                    for name in self.matches(module, path):
                        style._apply(module.get_submodule(name), tp_mesh)
            if sp_size > 1:
                for path, style in self.items():  # concrete names, in plan order: torch never sees "-1"
                    for name in self.matches(module, path):
                        style._apply(module.get_submodule(name), sp_mesh)
            return CheckInputs(tp_group=tp_mesh.get_group() if tp_mesh is not None else None)._apply(
                module, sp_mesh if sp_mesh is not None else device_mesh)

    def _check_tp(self, module: nn.Module, tp: int) -> None:
        """Every width the tp degree must divide, checked before anything is sharded (no collective)."""
        if not self.tp:
            raise ValueError(f"the mesh has a 'tp' axis of size {tp} but the plan for {type(module).__name__} has no "
                             "tp entries; give tensor_parallel_size=1, or a plan with a 'tp' section.")
        bad = []
        for path, style in self.tp.items():
            for name in self.matches(module, path):
                bad += [f"{what} = {size}" for what, size in tp_requirements(style, module.get_submodule(name), name)
                        if size % tp]
        if bad:
            raise ValueError(f"tensor_parallel_size={tp} must divide every sharded width of {type(module).__name__}; "
                             f"it does not divide {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Use a tp "
                             "degree that divides the head count and hidden sizes (or tensor_parallel_size=1).")


def match_path(model: nn.Module, path: str) -> list[str]:
    """Module names of ``model`` that a plan key selects (``*`` per component, ``-1`` = last of a ModuleList)."""
    if path == "":
        return [""]
    selected = [("", model)]
    for part in path.split("."):
        found = []
        for name, module in selected:
            children = list(module.named_children())
            if part == "-1":
                children = children[-1:] if isinstance(module, nn.ModuleList) else []
            found += [(f"{name}.{child}" if name else child, sub) for child, sub in children
                      if part == "-1" or fnmatch.fnmatchcase(child, part)]
        selected = found
    return [name for name, _ in selected]


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module):
    """Undo everything done inside the block if it raises: the hooks added, the parameters a tp
    style replaced, a forward a style set on a module. A plan is never applied in part."""
    before = {name: ({d: set(getattr(m, d)) for d in _HOOK_DICTS}, dict(m._parameters), m.__dict__.get("forward"))
              for name, m in model.named_modules()}
    try:
        yield
    except BaseException:
        for name, m in model.named_modules():
            hooks_before, params, forward = before.get(name, ({}, None, None))
            for d in _HOOK_DICTS:
                hooks = getattr(m, d)
                for key in set(hooks) - hooks_before.get(d, set()):
                    del hooks[key]
            if params is not None:
                m._parameters.clear()
                m._parameters.update(params)
            if forward is None:
                m.__dict__.pop("forward", None)
        raise


def available_plans() -> list[str]:
    return sorted(p.stem for p in _PLAN_DIR.glob("*.yaml"))


def load_plan(name_or_path: str | Path, *, ulysses_mode: str = "strict") -> Plan:
    """Read a shipped plan by model class name, or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _PLAN_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"no shipped plan named {str(name_or_path)!r}; shipped plans: {available_plans()}.")
    with open(path) as f:
        return Plan.from_dict(yaml.safe_load(f), ulysses_mode=ulysses_mode)


def get_plan(transformer: nn.Module, *, ulysses_mode: str = "strict") -> Plan:
    """The plan for this model's class, validated against the instance.

    In order: the shipped YAML plan; else one converted from its diffusers ``_cp_plan`` (checked and
    repaired, ``meshsp.plans.cp_plan``); else one inferred from a tiny instance of the class
    (``meshsp.plans.infer``). A model none of these can serve raises ``ValueError`` saying why. A
    plan without a ``tp`` section gets one from ``meshsp.plans.tp_plan.tp_entries`` (the class's
    ``_tp_plan``, or its recognised attention and feed-forward blocks).

    Example::

        plan = meshsp.get_plan(transformer, ulysses_mode="advanced_uaa")
        parallelize_module(transformer, mesh, plan)
    """
    from meshsp.plans.infer import infer_plan
    from meshsp.zoo import ZOO, build

    name = type(transformer).__name__
    reasons = []
    plan = None
    if name in available_plans():
        plan, plan.source = load_plan(name, ulysses_mode=ulysses_mode), "shipped"
    elif getattr(transformer, "_cp_plan", None):
        try:
            plan, plan.source = plan_from_cp_plan(transformer, ulysses_mode=ulysses_mode), "converted"
        except ValueError as exc:
            reasons.append(f"its _cp_plan: {exc}")
    if plan is None and name in ZOO:
        try:
            plan, plan.source = infer_plan(build(name, heads=3), ulysses_mode=ulysses_mode), "inferred"
        except ValueError as exc:
            reasons.append(f"inference: {exc}")
    if plan is None:
        raise ValueError(
            f"no meshsp plan for {name}: " + ("; ".join(r.rstrip(".") for r in reasons) or "no shipped plan, no diffusers _cp_plan and no "
            "tiny config to infer one from") + f". Shipped plans: {available_plans()}. Write a YAML plan (see "
            "README) for meshsp.load_plan, or infer one with meshsp.plans.infer_plan(model, make_inputs)."
        )
    if not plan.tp:  # tensor parallel from the class's _tp_plan or recognised blocks (meshsp.plans.tp_plan)
        plan.tp = tp_entries(transformer)
    plan.validate(transformer)
    return plan


def parallelize(transformer: nn.Module, mesh: DeviceMesh, plan: Plan | None = None, *,
                ulysses_mode: str = "strict") -> nn.Module:
    """Apply ``plan`` (default: ``get_plan(transformer)``) with torch's ``parallelize_module``.

    The same as ``parallelize_module(transformer, mesh, plan)``: the plan is the root's style
    (``Plan._apply``), so both entry points validate, resolve paths and install ``CheckInputs``.

    Example::

        mesh = meshsp.init_sp_mesh(ParallelConfig(ulysses_degree=2))
        meshsp.parallelize(transformer, mesh)
    """
    plan = plan if plan is not None else get_plan(transformer, ulysses_mode=ulysses_mode)
    if not isinstance(plan, Plan):
        raise ValueError(f"parallelize takes a meshsp Plan (get_plan, load_plan, Plan(styles)); got {type(plan).__name__}.")
    return parallelize_module(transformer, mesh, plan)


from meshsp.plans.cp_plan import plan_from_cp_plan  # noqa: E402 - they build Plans
from meshsp.plans.infer import infer_plan  # noqa: E402
from meshsp.plans.tp_plan import tp_entries  # noqa: E402
