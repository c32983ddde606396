"""Train the text-alignment head: ``python -m vestis.text configs/text_align.yaml [OUT]``, an
alias of ``vestis train configs/text_align.yaml --out OUT`` (OUT default runs/<recipe stem>)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vestis.text.align import train_from_recipe


def main() -> None:
    recipe = Path(sys.argv[1] if len(sys.argv) > 1 else "configs/text_align.yaml")
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("runs") / recipe.stem
    trained = train_from_recipe(recipe, out)
    print(json.dumps({"model_id": trained.model_id, **trained.info}, indent=2))


if __name__ == "__main__":
    main()
