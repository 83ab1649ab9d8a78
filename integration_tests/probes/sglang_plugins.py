"""SGLang's real plugin loader in a fresh process: overdrive's methods land in SGLang's registries and CLI
choices, and the generic linear method built on SGLang's own base classes computes the right product."""
import torch
from sglang.srt.plugins import load_plugins

from overdrive.testing.probe import emit

load_plugins()
load_plugins()  # idempotent

from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES  # noqa: E402
from sglang.srt.layers import quantization as q  # noqa: E402
from sglang.srt.layers.linear import LinearBase  # noqa: E402
from sglang.srt.layers.quantization.base_config import LinearMethodBase, QuantizationConfig  # noqa: E402

from overdrive.kernels import dequantize_reference  # noqa: E402
from overdrive.mbq.quant import rtn_group_asymmetric  # noqa: E402

cls = q.QUANTIZATION_METHODS["example_w8"]
cfg = cls.from_config({"quant_method": "example_w8", "version": 1, "skip": ["lm_head"]})
assert isinstance(cfg, QuantizationConfig) and cfg.get_name() == "example_w8"
assert cls.override_quantization_method({"quant_method": "example_w8"}, None) == "example_w8"

# a real SGLang linear layer: create_weights / load / apply through overdrive's generic method
layer = LinearBase.__new__(LinearBase)
torch.nn.Module.__init__(layer)
method = cfg.get_quant_method(layer, prefix="model.layers.0.mlp.down_proj")
assert isinstance(method, LinearMethodBase), type(method)
method.create_weights(layer, 40, [24], 40, 24, torch.float32, weight_loader=None)
g = torch.Generator().manual_seed(0)
qw = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
scale = torch.rand(24, generator=g) / 100 + 1e-3
layer.qweight.data.copy_(qw)
layer.scale.data.copy_(scale)
method.process_weights_after_loading(layer)
x = torch.randn(3, 40, generator=g)
bias = torch.randn(24, generator=g)
y = method.apply(layer, x, bias)
ref = (x.double() @ (qw.double() * scale.double()[:, None]).T + bias.double())

# MBQ (built in): W3 group 32 through the same generic linear method on SGLang's classes
mcfg = q.QUANTIZATION_METHODS["mbq"].from_config({"quant_method": "mbq", "bits": 3, "group_size": 32})
mlayer = LinearBase.__new__(LinearBase)
torch.nn.Module.__init__(mlayer)
mmethod = mcfg.get_quant_method(mlayer, prefix="model.layers.0.mlp.down_proj")
mmethod.create_weights(mlayer, 64, [24], 64, 24, torch.float32, weight_loader=None)
packed = rtn_group_asymmetric(torch.randn(24, 64, generator=g), 3, 32)
for name, t in packed.items():
    getattr(mlayer, name).data.copy_(t)
mmethod.process_weights_after_loading(mlayer)
xm = torch.randn(5, 64, generator=g)
ym = mmethod.apply(mlayer, xm, None)
wm = dequantize_reference(packed["qweight"], packed["scales"].double(), packed["zeros"], 3, 32, 64)
mbq_err = (ym.double() - xm.double() @ wm.double().T).abs().max().item()
emit({
    "mbq_err": mbq_err, "mbq_choice": "mbq" in QUANTIZATION_CHOICES,
    "in_registry": "example_w8" in q.QUANTIZATION_METHODS,
    "in_choices": QUANTIZATION_CHOICES.count("example_w8"),
    "err": (y.double() - ref).abs().max().item(),
    "skipped": type(cfg.get_quant_method(layer, prefix="lm_head")).__name__,
})
