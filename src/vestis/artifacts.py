"""The one registry of named artifacts shipped inside the package (like timm's pretrained
configs): each name has a kind, a file inside ``src/vestis``, a checkpoint format, and the
recipe that made it.

Every name -> file lookup in vestis reads :data:`ARTIFACTS` (``create_model("vestis-lite0")``,
``load_parser()``, ``load_attribute_model()``, ``load_outfit_model()``, the text-search head,
the learned video fusion). Training never writes here: ``vestis train RECIPE --out RUN``
writes a run folder, and ``vestis ship RUN NAME`` stores the run as the artifact ``NAME``
(see :mod:`vestis.train.ship`). No torch here: the command line reads it before any model
code loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The folder of the ``vestis`` package: artifact files are relative to it.
PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Artifact:
    """A named shipped file. ``kind`` is the training task that makes it (the ``task`` of
    its recipe), ``file`` its path inside the package, ``format`` the ``format`` field its
    checkpoint carries, ``recipe`` the recipe ``vestis train`` reproduces it with, and
    ``run_file`` the file of a run folder that ``vestis ship`` stores."""

    name: str
    kind: str
    file: str
    format: str
    recipe: str
    run_file: str

    @property
    def path(self) -> Path:
        return PACKAGE / self.file

    def exists(self) -> bool:
        return self.path.is_file()


#: Every shipped artifact, by name.
ARTIFACTS: dict[str, Artifact] = {a.name: a for a in (
    # Lite0 stages 5-6 fine-tuned plus a head; int8/fp16 (the shipped default is the last
    # epoch of its cosine schedule, hence last.pt).
    Artifact("vestis-lite0", "retrieval", "models/weights/vestis-lite0.pt",
             "vestis-checkpoint", "configs/vestis-lite0.yaml", "last.pt"),
    Artifact("parser-lite0", "parser", "detect/weights/parser-lite0.pt",
             "vestis-garment-parser", "configs/parser-lite0.yaml", "last.pt"),
    Artifact("text-align-lite0", "text", "text/weights/text-align-lite0.pt",
             "vestis-text-align/1", "configs/text_align.yaml", "text-align.pt"),
    Artifact("attributes-lite0", "attributes", "models/weights/attributes-lite0.pt",
             "vestis-attributes", "configs/attributes.yaml", "best.pt"),
    Artifact("compnet-lite0", "outfits", "models/weights/compnet-lite0.pt",
             "vestis-compnet", "configs/compnet.yaml", "best.pt"),
    Artifact("fusion", "video-fusion", "video/weights/fusion.pt",
             "vestis-video-fusion", "configs/video_fusion.yaml", "fusion.pt"),
    # The learned re-ranker of search --rerank (models/matcher.py), fp16, for vestis-lite0.
    Artifact("rerank-lite0", "rerank", "models/weights/rerank-lite0.pt",
             "vestis-matcher/1", "configs/rerank.yaml", "matcher.pt"),
)}


def artifact(name: str, kind: str | None = None) -> Artifact:
    """The artifact ``name`` (of ``kind`` when given); a ``ValueError`` naming the known
    ones otherwise."""
    found = ARTIFACTS.get(str(name))
    if found is None or (kind is not None and found.kind != kind):
        known = ", ".join(a.name for a in artifacts(kind))
        what = f"{kind} artifact" if kind else "artifact"
        raise ValueError(f"unknown {what} {str(name)!r}: one of {known}")
    return found


def artifacts(kind: str | None = None) -> list[Artifact]:
    """The artifacts of ``kind`` (all when None), in table order."""
    return [a for a in ARTIFACTS.values() if kind is None or a.kind == kind]


def artifact_path(name: str, kind: str | None = None) -> Path:
    """The file of artifact ``name`` (it may be missing: check ``.is_file()``)."""
    return artifact(name, kind).path
