"""The per-model metadata of the diffusers adapter matches the real diffusers classes."""
from __future__ import annotations

import pytest
import torch

import overdrive.diffusers as odd
from overdrive.contracts import DenoiserInfo
from overdrive.testing import tiny_pipeline

EXPECTED = {"flux": ("FluxTransformer2DModel", 2), "sd3": ("SD3Transformer2DModel", 2),
            "pixart": ("PixArtTransformer2DModel", 2), "wan": ("WanTransformer3DModel", 2),
            "hunyuanvideo": ("HunyuanVideoTransformer3DModel", 2)}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_metadata_names_real_blocks_and_attention(family):
    pipe = tiny_pipeline(family)
    model = odd.denoiser_of(pipe)
    info = odd.denoiser_info(model)
    assert info.family == family and type(model).__name__ == EXPECTED[family][0]
    blocks = info.blocks(model)
    assert len(blocks) == EXPECTED[family][1]
    for b in blocks:
        assert isinstance(getattr(b, info.attention), torch.nn.Module)


def test_subclasses_resolve_through_the_mro_and_new_models_can_be_registered(monkeypatch):
    from diffusers import PixArtTransformer2DModel

    class MyPixArt(PixArtTransformer2DModel):
        pass

    assert odd.DENOISERS["PixArtTransformer2DModel"] is odd.denoiser_info(MyPixArt.__new__(MyPixArt))

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])

    monkeypatch.setitem(odd.DENOISERS, "Custom", DenoiserInfo("custom", ("layers",), "attn"))
    assert odd.denoiser_info(Custom()).family == "custom"


def test_pipelines_without_a_transformer_are_rejected():
    class UNetPipe:
        unet = object()

    with pytest.raises(TypeError, match="uses a UNet"):
        odd.denoiser_of(UNetPipe())
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        odd.denoiser_of(object())
