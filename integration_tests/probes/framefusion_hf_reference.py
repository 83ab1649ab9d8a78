"""Independent transformers reference of FrameFusion-before-the-decoder on the tiny Qwen2.5-VL.

    python framefusion_hf_reference.py MODEL_DIR OPTIONS_JSON NEW_TOKENS

The selection FrameFusion makes is applied to transformers' own vision embeddings; kept tokens stay at
their original multimodal rotary positions; greedy decoding by hand over the shortened sequence.
"""
import json
import sys

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

from overdrive.contracts.token_reduction import VideoGrid
from overdrive.framefusion.config import FrameFusionConfig
from overdrive.framefusion.method import METHOD
from overdrive.testing.framefusion import partly_static_video
from overdrive.testing.probe import emit

path, opts, n_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
proc = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
frames = partly_static_video(0, frames=16).permute(0, 2, 3, 1).numpy()
msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
inp = proc(text=[prompt], videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], return_tensors="pt")
cfg = METHOD.resolve(FrameFusionConfig.from_dict(opts), "qwen2_vl")
with torch.no_grad():
    feats = model.model.get_video_features(inp.pixel_values_videos, inp.video_grid_thw).pooler_output[0]
    t, h, w = inp.video_grid_thw[0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    grid = VideoGrid(t, h // merge, w // merge)
    keep = compute_retained_tokens_count(grid.tokens_per_frame, t, 1 - cfg.cost)
    sel = METHOD.select(feats, grid, keep, cfg)
    ids = inp.input_ids[0]
    pos, _ = model.model.get_rope_index(inp.input_ids, video_grid_thw=inp.video_grid_thw,
                                        second_per_grid_ts=inp.second_per_grid_ts,
                                        attention_mask=inp.attention_mask, mm_token_type_ids=inp.mm_token_type_ids)
    vid = (ids == model.config.video_token_id).nonzero().squeeze(-1)
    emb = model.model.language_model.embed_tokens(ids).clone()
    emb[vid[sel.keep]] = sel.embeds
    rows = torch.ones(ids.numel(), dtype=torch.bool)
    rows[vid] = False
    rows[vid[sel.keep]] = True
    emb, pos = emb[rows][None], pos[:, :, rows]
    S = emb.shape[1]
    text = torch.arange(S)[None, None]
    out = model(inputs_embeds=emb, position_ids=torch.cat([text, pos]), use_cache=True)
    tokens, cache, nxt = [], out.past_key_values, int(pos.max()) + 1
    for i in range(n_new):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        p = torch.full((4, 1, 1), nxt + i)
        p[0] = S + i
        out = model(input_ids=torch.tensor([[tok]]), position_ids=p, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
emit({"tokens": tokens, "prompt_len": S, "prompt": prompt, "kept": keep, "merged": sel.merged, "pruned": sel.pruned})
