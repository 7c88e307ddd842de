"""Convert a released MusicFM ``.pt`` checkpoint to safetensors (stats and config carried along).

python -m musicfm.convert pretrained_msd.pt OUT.safetensors --stats msd_stats.json [--config cfg.json]
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError, save_safetensors
from .model import MusicFM25Hz


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m musicfm.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("input", help="released .pt checkpoint (or a .safetensors to re-save)")
    ap.add_argument("output", help="output .safetensors path")
    ap.add_argument("--stats", help="stats JSON (msd_stats.json / fma_stats.json); required for .pt input")
    ap.add_argument("--config", help="MusicFMConfig JSON; default: inferred from tensor shapes")
    args = ap.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        ap.error("output must end with .safetensors")
    try:
        model = MusicFM25Hz.from_checkpoint(args.input, args.stats, args.config)
        save_safetensors(model, args.output)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} (model_id {model.model_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
