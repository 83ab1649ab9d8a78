"""``overdrive generate --method vgdfr``: the shared pipeline options, then VGDFR's, and the options they make."""
from __future__ import annotations

from typing import Any

from overdrive.config import ConfigError


def add_arguments(p: Any) -> None:
    """``overdrive generate --method vgdfr`` options: the shared pipeline options, then VGDFR's."""
    from overdrive.contracts.frame_rate import add_generate_arguments

    add_generate_arguments(p)
    g = p.add_argument_group("VGDFR")
    g.add_argument("--keep-ratio", type=float, default=None, help="target fraction of latent frames kept (default 0.75)")
    g.add_argument("--threshold", type=float, default=None, help="SSIM threshold instead of a target keep ratio")
    g.add_argument("--compress-step", type=int, default=5, help="full-length steps before the compaction")
    g.add_argument("--max-merge", type=int, default=2, choices=(2, 4))
    g.add_argument("--protect-tail", type=int, default=2, help="latent frames at the end never merged")
    g.add_argument("--estimate", default="pixels", choices=("pixels", "latents"))
    g.add_argument("--estimate-downsample", type=int, default=2)
    g.add_argument("--merge", default="latents", choices=("latents", "pixels"))
    g.add_argument("--original-position-blocks", default="auto",
                   help="auto, none, all, or comma-separated block indices (per-block RoPE)")
    g.add_argument("--interpolator", default="blend", help="blend, nearest, or package.module:function")
    g.add_argument("--schedule", default=None, help="apply a recorded schedule JSON instead of estimating one")


def options_from_args(args: Any) -> dict[str, Any]:
    """:class:`~.config.VGDFRConfig` options from the parsed ``overdrive generate`` arguments."""
    blocks = args.original_position_blocks
    if blocks not in ("auto", "none", "all"):
        try:
            blocks = [int(b) for b in blocks.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"--original-position-blocks {blocks!r}: expected auto, none, all or a comma-separated "
                              "list of block indices") from None
    return dict(keep_ratio=args.keep_ratio, threshold=args.threshold, compress_step=args.compress_step,
                max_merge=args.max_merge, protect_tail=args.protect_tail, estimate=args.estimate,
                estimate_downsample=args.estimate_downsample, merge=args.merge,
                original_position_blocks=blocks, interpolator=args.interpolator,
                schedule=str(args.schedule) if args.schedule else "")
