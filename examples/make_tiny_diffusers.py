"""Write a tiny random diffusers HunyuanVideoTransformer3DModel folder (for demos and the compare tool).

usage: python examples/make_tiny_diffusers.py OUT_DIR [--guidance] [--seed N]
"""

import argparse

from hcustom_mc import console

console.setup()  # quiet progress bars and known warnings of the libraries imported below
import torch  # noqa: E402
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--guidance", action="store_true", help="include the guidance embedder (cfg-distilled layout)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=args.guidance,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    )
    with torch.no_grad():  # zero-initialised layers would hide conversion mistakes: randomise everything
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
