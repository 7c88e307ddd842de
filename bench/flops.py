"""FLOPs of one MusicFM forward pass, counted by ``torch.utils.flop_counter`` (not a hand figure).

Runs the model once (batch 1, ``--seconds`` of audio, all hidden states up to ``--layer``) under
``FlopCounterMode`` on the CPU (or ``--device cuda``; the count does not depend on the device) and
prints GFLOP per window, GFLOP per audio second and the split into mel / conv front end / Conformer
(matmuls, convolutions and attention are counted: 2 FLOPs per multiply-add; the STFT's FFT and
elementwise ops are not, so this is the figure MFU is defined against). ``bench/gpu.py`` uses
:func:`flops_per_audio_second` for its MFU column.

    python bench/flops.py                  # full size, 30 s windows
    python bench/flops.py --seconds 10 --config ../shared/golden/config.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from musicfm import MusicFM25Hz, MusicFMConfig  # noqa: E402

SAMPLE_RATE = 24000


def _linear_pointwise_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ARG001
    """oneDNN's linear (the model's CPU fp32 path): 2 * rows * out * in, as aten.mm."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * w_shape[0] * w_shape[1]


def _custom_formulas() -> dict:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return {} if op is None else {op: _linear_pointwise_flop}  # keyed by overload packet


def count_flops(model: MusicFM25Hz, seconds: float, layer: int | None = None) -> dict:
    """FLOPs of one forward of one window of ``seconds`` (batch 1): total and per top-level module
    (LogMel, ConvFrontEnd, Conformer). The CPU's oneDNN linear op is counted as a matmul (the
    counter does not know it, and a count without it misses every Conformer linear)."""
    n = int(round(seconds * SAMPLE_RATE))
    layer = model.config.encoder_depth if layer is None else layer
    x = torch.zeros((1, n), device=model.device)  # (1, N)
    with (
        torch.inference_mode(),
        FlopCounterMode(display=False, depth=1, custom_mapping=_custom_formulas()) as fc,
    ):
        model.hidden_states(x, [layer])
    per_module = {
        name: sum(counts.values())
        for name, counts in fc.get_flop_counts().items()
        if name != "Global" and "." not in name
    }
    total = fc.get_total_flops()
    return {
        "seconds": seconds,
        "samples": n,
        "tokens": model.config.num_tokens(n),
        "layer": layer,
        "flops_per_window": total,
        "gflop_per_audio_s": total / seconds / 1e9,
        "per_module_gflop": {k: v / 1e9 for k, v in per_module.items()},
    }


def flops_per_audio_second(config: MusicFMConfig, seconds: float = 30.0, device: str = "cpu") -> float:
    """FLOPs per audio second of a model of ``config`` on ``seconds``-long windows (counted)."""
    model = MusicFM25Hz(config, seed=0).to(device).eval()
    return count_flops(model, seconds)["flops_per_window"] / seconds


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="window length (default 30)")
    ap.add_argument("--config", type=Path, default=None, help="model config JSON (default: full size)")
    ap.add_argument("--layer", type=int, default=None, help="deepest hidden state (default: the last)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    cfg = MusicFMConfig.from_json(args.config) if args.config else MusicFMConfig()
    model = MusicFM25Hz(cfg, seed=0).to(args.device).eval()
    t0 = time.perf_counter()
    res = count_flops(model, args.seconds, args.layer)
    res["count_wall_s"] = time.perf_counter() - t0
    res["config"] = cfg.to_dict()
    print(
        f"MusicFM D={cfg.encoder_dim} L={cfg.encoder_depth}, {args.seconds:g} s window ({res['tokens']} tokens), "
        f"hidden states up to {res['layer']}"
    )
    print(
        f"  {res['flops_per_window'] / 1e9:.1f} GFLOP per window, {res['gflop_per_audio_s']:.2f} GFLOP per audio second"
    )
    for k, v in res["per_module_gflop"].items():
        print(f"    {k:>14}: {v:8.1f} GFLOP ({v / (res['flops_per_window'] / 1e9) * 100:.1f} %)")
    print(
        "  (torch.utils.flop_counter: matmul, conv and attention FLOPs; FFT and elementwise ops not counted)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
