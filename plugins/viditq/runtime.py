"""ViDiT-Q at inference: quantized linear layers that read the timestep range from the hook layer.

Every quantized layer is a :class:`ViDiTQLinear` holding its weight variants (int8 or packed int4
codes, float32 per-output-channel scales, an optional float32 channel-balancing divisor) and the
bias; its forward is one ``overdrive.kernels.act8_linear`` call (int8 GEMM with the per-token
activation quantization and the balancing division fused in) with the variant of the current
timestep range. The layers of one denoiser share a :class:`QuantState` (the plan and the current
range); :class:`ViDiTQHooks` — callbacks of the shared diffusers hook layer — set the range from the
step context of each denoiser call (``step.step``), check the run's step count against the plan,
and clear the range after the call, so a layer run outside a denoiser call is a clear error.

Two ways in (both framework-neutral here; the adapter does the diffusers part):

* ``DiffusionPipeline.from_pretrained(DIR)`` on a checkpoint written by ``overdrive calibrate
  --method viditq``: :meth:`ViDiTQMethod.prepare_checkpoint` puts meta-device ``ViDiTQLinear``s in
  place of the float layers before loading, so no float copy of them is ever made (memory saved);
* ``overdrive.diffusers.enable(pipe, "viditq", checkpoint=DIR)`` on a float pipeline: the layers are
  swapped in and the float ones kept for ``disable()`` (exact restore; no memory saved).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import DenoiserInfo, DenoiserSession, DiTHooks, ModuleCall, StepContext
from overdrive.kernels import act8_linear, packed_length

from .config import NAME, SCHEMES, Identity, LayerPlan, Plan, Variant, ViDiTQConfig
from .numerics import quantize_weight


class QuantState:
    """Shared by the quantized layers of one denoiser: the plan and the range of the call in progress."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.range: int | None = None


class QuantVariant(torch.nn.Module):
    """One weight set: ``qweight`` (int8 (N, K) or int32 (N, ceil(K/8)) packed int4), ``wscale`` (N,)
    float32, ``smooth`` (K,) float32 or None."""

    def __init__(self, in_features: int, out_features: int, variant: Variant, device: Any = None) -> None:
        super().__init__()
        self.bits = variant.bits
        shape, dtype = (((out_features, in_features), torch.int8) if variant.bits == 8 else
                        ((out_features, packed_length(in_features, 4)), torch.int32))
        self.qweight = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
        self.wscale = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        if variant.smooth:
            self.smooth = torch.nn.Parameter(torch.ones(in_features, device=device), requires_grad=False)
        else:
            self.register_parameter("smooth", None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, smooth={self.smooth is not None}"


class ViDiTQLinear(torch.nn.Module):
    """A ViDiT-Q-quantized linear layer (see the module doc)."""

    def __init__(self, name: str, plan: LayerPlan, state: QuantState, bias_dtype: torch.dtype = torch.float32,
                 device: Any = None) -> None:
        super().__init__()
        self.layer_name = name
        self.in_features, self.out_features = plan.in_features, plan.out_features
        self.variants = torch.nn.ModuleList(QuantVariant(plan.in_features, plan.out_features, v, device)
                                            for v in plan.variants)
        self.range_variant = tuple(plan.ranges)
        if plan.bias:
            self.bias = torch.nn.Parameter(torch.zeros(plan.out_features, dtype=bias_dtype, device=device),
                                           requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.quant_state = state

    @classmethod
    def from_float(cls, name: str, lin: torch.nn.Linear, state: QuantState,
                   variants: list[tuple[int, torch.Tensor | None]], ranges: list[int]) -> "ViDiTQLinear":
        """Quantize float layer ``lin``: one variant per (bits, balancing divisor or None)."""

        plan = LayerPlan(lin.in_features, lin.out_features, lin.bias is not None,
                         [Variant(b, s is not None) for b, s in variants], list(ranges))
        dev = lin.weight.device
        q = cls(name, plan, state, lin.bias.dtype if lin.bias is not None else torch.float32, device=dev)
        for v, (bits, smooth) in zip(q.variants, variants):
            qw, ws = quantize_weight(lin.weight, bits, smooth)
            v.qweight.data, v.wscale.data = qw.to(dev), ws.to(dev)
            if smooth is not None:
                v.smooth.data = smooth.to(dev)
        if lin.bias is not None:
            q.bias.data = lin.bias.detach().clone()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.quant_state.range
        if r is None:
            raise RuntimeError(f"ViDiT-Q layer {self.layer_name} ran outside a denoiser call with ViDiT-Q enabled: "
                               "the timestep range comes from the step context of the denoiser call. Run the "
                               "denoiser (not its layers) and keep the method enabled (overdrive.diffusers.enable(pipe, "
                               "'viditq') re-attaches it after disable)")
        v = self.variants[self.range_variant[r]]
        return act8_linear(x, v.qweight, v.wscale, v.bits, self.bias, smooth=v.smooth)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"range_variant={self.range_variant}")


# ------------------------------------------------------------------------------- model helpers
def float_linears(model: torch.nn.Module, info: DenoiserInfo, keep_float: tuple[str, ...] = ()) -> dict[str, torch.nn.Linear]:
    """The linear layers ViDiT-Q quantizes: every ``nn.Linear`` inside the transformer blocks (names as
    in ``model.named_modules()``) except those whose name contains a ``keep_float`` substring.
    Embedders, the final norm/projection and anything else outside the blocks stay in 16 bits."""
    out: dict[str, torch.nn.Linear] = {}
    for block_list in info.block_lists:
        for name, m in getattr(model, block_list).named_modules():
            full = f"{block_list}.{name}"
            if isinstance(m, torch.nn.Linear) and not any(k in full for k in keep_float):
                out[full] = m
    return out


def quantized_layers(model: torch.nn.Module) -> dict[str, ViDiTQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)}


def swap_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Put ``new`` at ``name`` inside ``model`` (an instance's child, never a class); returns the old one."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


def layer_shapes(model: torch.nn.Module, info: DenoiserInfo) -> dict[str, tuple[int, int, bool]]:
    return {n: (m.in_features, m.out_features, m.bias is not None) for n, m in float_linears(model, info).items()}


def build_layers(plan: Plan, model: torch.nn.Module, info: DenoiserInfo, source: str,
                 device: Any = None) -> tuple[QuantState, dict[str, ViDiTQLinear]]:
    """Check ``plan`` against ``model`` and build its (empty) quantized layers."""
    plan.check_model(type(model).__name__, len(info.blocks(model)), layer_shapes(model, info), source)
    state = QuantState(plan)
    linears = float_linears(model, info)
    layers = {}
    for name, lp in plan.layers.items():
        lin = linears[name]
        dtype = lin.bias.dtype if lin.bias is not None else torch.float32
        layers[name] = ViDiTQLinear(name, lp, state, dtype, device=device)
    return state, layers


# ------------------------------------------------------------------------------- checkpoints
def _checkpoint_dir(path: Path) -> Path:
    """The denoiser folder of a ViDiT-Q checkpoint: ``path`` itself or its ``transformer/``."""
    for d in (path, path / "transformer"):
        conf = d / "config.json"
        if conf.is_file():
            try:
                data = json.loads(conf.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{conf}: not valid JSON ({e})") from None
            if isinstance(data, dict) and isinstance(data.get("quantization_config"), dict):
                return d
    raise ConfigError(f"checkpoint={path}: no config.json with a quantization_config here or in {path}/transformer "
                      "(expected the output of `overdrive calibrate --method viditq`)")


def load_checkpoint_plan(path: str | Path) -> tuple[Plan, Path]:
    d = _checkpoint_dir(Path(path))
    conf = json.loads((d / "config.json").read_text())
    return Plan.from_quantization_config(conf["quantization_config"], str(d / "config.json")), d


def load_checkpoint_tensors(d: Path, layers: Mapping[str, ViDiTQLinear]) -> None:
    """Fill ``layers`` from the safetensors files of checkpoint folder ``d`` (only their tensors are read)."""
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{d}: no *.safetensors files (only safetensors checkpoints are read)")
    wanted = {f"{n}.{p}": t for n, lay in layers.items() for p, t in lay.named_parameters()}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                param = wanted.pop(key, None)
                if param is None:
                    continue
                t = st.get_tensor(key)
                # floating tensors keep their stored dtype (fp32 scales and biases in a bf16 model)
                same_kind = t.dtype == param.dtype or t.dtype.is_floating_point and param.dtype.is_floating_point
                if t.shape != param.shape or not same_kind:
                    raise ConfigError(f"{f}: tensor {key!r} is {tuple(t.shape)} {t.dtype}, the plan's layer needs "
                                      f"{tuple(param.shape)} {param.dtype}")
                param.data = t.to(param.device)
    if wanted:
        raise ConfigError(f"{d}: the checkpoint has no tensor {sorted(wanted)[0]!r} ({len(wanted)} missing) for its "
                          "plan's quantized layers")


# ------------------------------------------------------------------------------------ hooks
class ViDiTQHooks(DiTHooks):
    """ViDiT-Q on one denoiser: what ``overdrive.diffusers.enable(pipe, "viditq", ...)`` returns.

    ``calls_per_range[r]``: denoiser calls run with range ``r`` since attach (the timestep switch).
    """

    def __init__(self, session: DenoiserSession, cfg: ViDiTQConfig) -> None:
        super().__init__(session)
        self.cfg = cfg
        model = session.module
        self.replaced: dict[str, torch.nn.Module] = {}
        layers = quantized_layers(model)
        if cfg.checkpoint:
            if layers:
                raise ConfigError(f"checkpoint={cfg.checkpoint}: this denoiser is already ViDiT-Q-quantized (loaded from "
                                  "a ViDiT-Q checkpoint); enable it without checkpoint=")
            plan, d = load_checkpoint_plan(cfg.checkpoint)
            device = next(model.parameters()).device
            _, layers = build_layers(plan, model, session.info, f"checkpoint={cfg.checkpoint}", device)
            load_checkpoint_tensors(d, layers)
            for name, lay in layers.items():  # everything checked: now swap (kept for disable)
                self.replaced[name] = swap_module(model, name, lay)
        elif not layers:
            raise ConfigError(f"ViDiT-Q: {session.architecture} has no ViDiT-Q-quantized layers; give checkpoint=DIR "
                              "(the output of `overdrive calibrate --method viditq`) or load the pipeline from that "
                              "directory with DiffusionPipeline.from_pretrained after `import overdrive.diffusers`")
        states = {id(lay.quant_state): lay.quant_state for lay in layers.values()}
        if len(states) != 1:
            raise ConfigError(f"ViDiT-Q: {session.architecture} holds layers of {len(states)} different plans")
        self.state: QuantState = next(iter(states.values()))
        self.plan = self.state.plan
        self.layers = layers
        self.calls_per_range = [0] * len(self.plan.ranges)
        self._runs: dict[str, tuple[int, bool]] = {}  # branch -> (last step, step count known)

    @property
    def source(self) -> str:
        return self.cfg.checkpoint or f"ViDiT-Q ({self.session.architecture})"

    def denoiser_call(self, step: StepContext, call: ModuleCall) -> Any:
        if step.new_run:
            self._end_run(step.branch)
        self.plan.check_steps(step.num_steps, step.step, self.source)
        self._runs[step.branch] = (step.step, step.num_steps is not None)
        r = self.plan.range_of(step.step)
        self.calls_per_range[r] += 1
        outer, self.state.range = self.state.range, r
        try:
            return call.run()
        finally:
            self.state.range = outer

    def _end_run(self, branch: str) -> None:
        """A run whose step count was unknown (no pipeline bound, none in the cache context) must have
        reached the plan's last step; a shorter one used ranges of another schedule."""
        last = self._runs.pop(branch, None)
        if last is not None and not last[1] and last[0] != self.plan.steps - 1:
            raise ConfigError(
                f"{self.source}: the last run (branch {branch!r}) ended after {last[0] + 1} steps, but the ViDiT-Q "
                f"checkpoint was calibrated for steps={self.plan.steps}; its timestep ranges {self.plan.ranges} do not "
                "fit that run. Calibrate for this step count (bind the pipeline with overdrive.diffusers.enable(pipe, "
                "'viditq') to have this checked before the first step)")

    def reset_caches(self) -> None:
        errors = []
        for branch in list(self._runs):
            try:
                self._end_run(branch)
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def detached(self) -> None:
        for name, old in self.replaced.items():
            swap_module(self.session.module, name, old)
        self.replaced.clear()
        self.state.range = None
        self._runs.clear()


def quantize_in_place(model: torch.nn.Module, info: DenoiserInfo, scheme: str = "w8a8", steps: int = 1,
                      keep_float: tuple[str, ...] = ()) -> Plan:
    """Round-to-nearest ViDiT-Q without calibration: one timestep range, no channel balancing (ViDiT-Q's
    W8A8 plan needs no activation statistics). Replaces the float layers in place (not restorable);
    ``overdrive.diffusers.enable(model, "viditq")`` then attaches the hook layer. For benchmarks and
    quick trials; ``overdrive calibrate --method viditq`` is the normal way."""

    bits = SCHEMES[scheme]
    linears = float_linears(model, info, keep_float)
    plan = Plan(Identity(type(model).__name__, info.family, len(info.blocks(model))), steps, [(0, steps)], scheme,
                [None], {}, {"calibrated": "round to nearest, no calibration"})
    state = QuantState(plan)
    for name, lin in linears.items():
        q = ViDiTQLinear.from_float(name, lin, state, [(bits, None)], [0])
        plan.layers[name] = LayerPlan(lin.in_features, lin.out_features, lin.bias is not None, [Variant(bits, False)], [0])
        swap_module(model, name, q)
    return plan
