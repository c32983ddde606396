"""Where a model looks: its attention map over a photo, as a heat-map overlay.

Only models with an attention map can be explained: they define
``attention_maps(x) -> (B, K, h, w)`` in [0, 1] over their (letterboxed) input, such as
:class:`vestis.models.impdrop.ImpdropNet` (K = 1) and :class:`vestis.models.abe.ABENet`
(one map per learner). Each map is drawn over the photo; several maps are tiled side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vestis.images import ImageSource, Preprocess, load_image
from vestis.models.hooks import ModelHooks


@dataclass
class Explanation:
    overlay: Image.Image
    maps: np.ndarray  # (K, h, w) in [0, 1], over the model's letterboxed input


def attention_maps(model: ModelHooks, image: Image.Image) -> np.ndarray:
    """The model's (K, h, w) attention maps of ``image``; refused for a model without one."""
    if not model.has_attention_maps():
        raise ValueError(f"model {model.display_name!r} has no attention map to show; explain "
                         "needs a model with one, such as impdrop_net or abe_net (or a "
                         "checkpoint of them)")
    batch = torch.from_numpy(model.preprocess.to_array(image)[None])
    with torch.inference_mode():
        device = next(model.parameters()).device
        return model.attention_maps(batch.to(device))[0].float().cpu().numpy()


def overlay(image: Image.Image, maps: np.ndarray, preprocess: Preprocess,
            alpha: float = 0.5) -> Image.Image:
    """Each map, stretched back over the photo it came from, blended in as a heat map whose
    colours span the maps' own range (jointly, so that panels compare): blue at its minimum,
    red at its maximum."""
    low, high = float(maps.min()), float(maps.max())
    scaled = (maps - low) / max(high - low, 1e-6)
    panels = [_blend(image, _on_photo(m, image.size, preprocess), alpha) for m in scaled]
    canvas = Image.new("RGB", (image.width * len(panels), image.height))
    for index, panel in enumerate(panels):
        canvas.paste(panel, (index * image.width, 0))
    return canvas


def _on_photo(attention: np.ndarray, size: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
    """An (h, w) map over the letterboxed square → (height, width) over the photo itself."""
    side = preprocess.size
    square = F.interpolate(torch.from_numpy(attention)[None, None], size=(side, side),
                           mode="bilinear", align_corners=False)[0, 0].numpy()
    width, height = size
    scale = side / max(width, height)  # as Preprocess.letterbox places the photo
    inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (side - inner_w) // 2, (side - inner_h) // 2
    inner = square[top:top + inner_h, left:left + inner_w]
    resized = Image.fromarray(inner.astype(np.float32)).resize(size, Image.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _blend(image: Image.Image, heat: np.ndarray, alpha: float) -> Image.Image:
    from matplotlib import colormaps

    coloured = (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image, Image.fromarray(coloured), alpha)


def explain(source: ImageSource, model: torch.nn.Module | str) -> Explanation:
    """The attention overlay of one photo under ``model`` (a model, name or checkpoint)."""
    if isinstance(model, str):
        from vestis.models import create_model

        model = create_model(model)
    image = load_image(source)
    maps = attention_maps(model.eval(), image)
    return Explanation(overlay(image, maps, model.preprocess), maps)


def write_explanation(source: ImageSource, model: torch.nn.Module | str,
                      out: str | Path) -> Explanation:
    out = Path(out)
    explanation = explain(source, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    explanation.overlay.save(out)
    return explanation
