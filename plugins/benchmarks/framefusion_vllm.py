"""Benchmark-only vLLM model: Qwen2.5-VL pruning with vLLM's own EVS or VidCom2 selection functions.

vLLM 0.32 runs VidCom2 only for Qwen3-VL (Qwen2.5-VL declares ``supported_video_pruning_methods =
("evs",)``), so to compare FrameFusion with VidCom2 on the same model the benchmark loads this class
through ``model_class_overrides``; it calls ``vllm.multimodal.video_prune.vidcom2.compute_retention_mask``
(or EVS's) unchanged. ``placement`` chooses where the text after the video starts: ``"evs"`` as vLLM's
EVS (base + llm_grid_w), ``"unreduced"`` as the unreduced model (base + largest grid index + 1, what
overdrive's FrameFusion does). Imported only inside vLLM engine processes of ``overdrive.benchmarks.framefusion``.
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.multimodal.video_prune import evs, vidcom2

logger = init_logger("vllm.overdrive.bench")


class PeerPruningQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        opts = vllm_config.additional_config.get("overdrive_bench", {})
        self.bench_selector = opts.get("selector", "evs")
        self.bench_placement = opts.get("placement", "evs")

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        merge = self.visual.spatial_merge_size
        tps = self.config.vision_config.tokens_per_second
        fn = vidcom2.compute_retention_mask if self.bench_selector == "vidcom2" else evs.compute_retention_mask
        out = []
        for emb, size, sec in zip(video_embeds_split, video_input["video_grid_thw"].tolist(),
                                  video_input["second_per_grid_ts"].long()):
            t, h, w = size
            want = evs.compute_retained_tokens_count((h // merge) * (w // merge), t, self.video_pruning_rate)
            mask = fn(emb, size, spatial_merge_size=merge, q=self.video_pruning_rate)
            if int(mask.sum()) != want:
                raise RuntimeError(f"{self.bench_selector} kept {int(mask.sum())} tokens, the processor reserved {want}")
            pos = evs.compute_mrope_for_media(size, merge, tokens_per_second=tps, video_second_per_grid=sec.item())
            if self.bench_placement == "unreduced":
                pos[:, 3] = pos[:, :3].max() + 1
            logger.info("overdrive bench %s: video %dx%dx%d -> %d kept", self.bench_selector, t, h // merge,
                        w // merge, want)
            out.append(torch.cat([emb[mask], pos.to(emb.device)[mask].to(emb.dtype)], dim=1))
        return tuple(out)
