"""Train the text-alignment head: ``python -m vestis.text configs/text_align.yaml``."""

from __future__ import annotations

import json
import sys

from vestis.text.align import train_from_recipe


def main() -> None:
    trained = train_from_recipe(sys.argv[1] if len(sys.argv) > 1 else "configs/text_align.yaml")
    print(json.dumps({"model_id": trained.model_id, **trained.info}, indent=2))


if __name__ == "__main__":
    main()
