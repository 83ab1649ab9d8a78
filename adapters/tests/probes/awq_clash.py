"""A third-party plugin offering a weight-quant method named ``awq``, which collides with vLLM's in-tree
AWQ (installed as a distribution by test_registration.py; never imported by the test process)."""
import dataclasses

import overdrive
from overdrive import Kind, MethodConfig, MethodSpec


@dataclasses.dataclass
class Cfg(MethodConfig):
    pass


@overdrive.hookimpl
def overdrive_methods():
    return [MethodSpec(name="awq", kind=Kind.WEIGHT_QUANT, config_cls=Cfg, paper="-",
                       impl="overdrive_example.w8:METHOD")]
