"""One kernel op against float64 in a fresh process (so ``OVERDRIVE_KERNELS`` / the Triton interpreter
is chosen before Triton is imported).

    OVERDRIVE_KERNELS=interpret python -m overdrive.testing.kernel_selfcheck

emits ``{"backend": ..., "err": max |int8_weight_linear - float64|}`` for M=5, K=70, N=33.
"""
from __future__ import annotations


def main() -> dict:
    import torch

    from overdrive import kernels as k

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 70, generator=g)
    q = torch.randint(-127, 128, (33, 70), generator=g, dtype=torch.int8)
    s = torch.rand(33, generator=g) / 50
    y = k.int8_weight_linear(x, q, s)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    return {"backend": k.active_backend("cpu"), "err": (y.double() - ref).abs().max().item()}


if __name__ == "__main__":
    from overdrive.testing.probe import emit

    emit(main())
