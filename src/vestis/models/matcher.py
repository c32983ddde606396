"""A learned verification head that re-ranks a search's top-k (the survey's Match R-CNN idea).

Match R-CNN scores a (consumer garment, shop item) pair with a small matching network
instead of a plain distance. :class:`MatchHead` does that on the two embeddings a catalog
already stores: the pair's element-wise product and absolute difference go through a small
MLP, added to a learned multiple of their cosine, to give a match logit::

    logit(q, g) = scale * cos(q, g) + bias + MLP([q * g, |q - g|])

The MLP's last layer starts at zero, so an untrained head ranks exactly as the cosine does.

:class:`Matcher` applies a head to numpy vectors: :meth:`Matcher.rerank` reorders one
query's candidates, :func:`rerank_scores` a whole score matrix (``vestis eval --rerank``:
each row's top ``k`` reordered by the head and kept above the rest, which keep their order).
A matcher is bound to the embedding model it was trained on (``model_id``); the shipped one
is the artifact ``rerank-lite0`` (:mod:`vestis.artifacts`), loaded by :func:`load_matcher`.
Trained by ``vestis train configs/rerank.yaml`` (:mod:`vestis.train.rerank`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vestis.artifacts import artifact, artifacts

FORMAT = "vestis-matcher/1"
#: The shipped matcher (``vestis search --rerank`` without a name).
DEFAULT_MATCHER = "rerank-lite0"
#: Candidates re-ranked per query by default: the top ``RERANK_K`` of the plain search.
RERANK_K = 50


class MatchHead(nn.Module):
    """Match logit of (query, candidate) embedding pairs; see the module docstring."""

    def __init__(self, dim: int, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``query`` (B, D) and ``candidates`` (B, K, D), L2-normalised: logits (B, K)."""
        query = query[:, None, :].expand_as(candidates)
        cosine = (query * candidates).sum(-1)
        pair = torch.cat([query * candidates, (query - candidates).abs()], dim=-1)
        return self.scale * cosine + self.bias + self.mlp(pair).squeeze(-1)


class Matcher:
    """A trained :class:`MatchHead` on numpy vectors, with what it was trained for
    (``meta``: the embedding ``model`` and ``model_id``, training figures)."""

    def __init__(self, head: MatchHead, meta: dict[str, Any] | None = None,
                 name: str = "matcher"):
        self.head = head.float().eval()
        self.meta = dict(meta or {})
        self.name = name

    @property
    def dim(self) -> int:
        return self.head.dim

    @property
    def model_id(self) -> str | None:
        """The ``model_id`` of the embeddings it scores (None: any model of its ``dim``)."""
        return self.meta.get("model_id")

    def check(self, model_id: str, dim: int) -> None:
        """Refuse vectors of another model: the head learned that model's space alone."""
        if dim != self.dim or (self.model_id is not None and model_id != self.model_id):
            raise ValueError(
                f"matcher {self.name!r} was trained on {self.meta.get('model', '?')} "
                f"({self.model_id}, dim {self.dim}); this catalog's vectors are {model_id} "
                f"(dim {dim}): re-ranking needs a matcher trained on the catalog's model")

    def scores(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Match logits: ``query`` (D,) against ``candidates`` (K, D) gives (K,);
        ``query`` (B, D) against ``candidates`` (B, K, D) gives (B, K)."""
        query = np.asarray(query, dtype=np.float32)
        candidates = np.asarray(candidates, dtype=np.float32)
        single = query.ndim == 1
        if single:
            query, candidates = query[None], candidates[None]
        threads = torch.get_num_threads()
        # One thread: a query's few dozen pairs take ~0.1 ms on it, where a pool of threads
        # costs ~10 ms on a busy CPU (as vestis.text.align's small fits).
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                logits = self.head(torch.from_numpy(query),
                                   torch.from_numpy(candidates)).numpy()
        finally:
            torch.set_num_threads(threads)
        return logits[0] if single else logits

    def rerank(self, query: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(order, logits)``: candidate rows best first (stable among equal logits), and
        every candidate's logit."""
        logits = self.scores(query, candidates)
        return np.argsort(-logits, kind="stable"), logits


def rerank_scores(sims: np.ndarray, queries: np.ndarray, gallery: np.ndarray,
                  matcher: Matcher, k: int = RERANK_K,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """A copy of the (Q, G) similarity matrix ``sims`` in which each row's top ``k`` entries
    (by similarity; ``exclude[i]``, a gallery column or -1, left out: the query itself in
    leave-one-out) score by the matcher instead, above every other entry; the others keep
    their similarity, so their order below the re-ranked ones is unchanged. The result
    ranks exactly as a re-ranked search does; feed it to a metric as the scores."""
    sims = np.asarray(sims, dtype=np.float32)
    out = sims.astype(np.float64)
    masked = sims.copy()
    rows = np.arange(len(sims))
    if exclude is not None:
        keep = np.asarray(exclude) >= 0
        masked[rows[keep], np.asarray(exclude)[keep]] = -np.inf
    k = min(k, sims.shape[1] - (1 if exclude is not None else 0))
    if k < 1:
        return out
    top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    logits = np.concatenate([  # in blocks: (block, k, D) candidates at a time
        matcher.scores(queries[start:start + 256], gallery[top[start:start + 256]])
        for start in range(0, len(top), 256)]).astype(np.float64)
    # Above any similarity: cosines are at most 1 (a margin over it covers rounding).
    floor = max(float(np.max(sims[np.isfinite(sims)], initial=1.0)), 1.0) + 1.0
    out[rows[:, None], top] = floor + logits - logits.min(axis=1, keepdims=True)
    return out


# -- files and names ----------------------------------------------------------------------
def save_matcher(head: MatchHead, path: str | Path, meta: dict[str, Any] | None = None,
                 ) -> Path:
    """Write ``head`` as an fp16 checkpoint (a few hundred KB at most) with ``meta``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "dim": head.dim, "hidden": head.hidden,
               "state": {key: value.detach().to(torch.float16).clone()
                         for key, value in head.state_dict().items()},
               "meta": meta or {}}
    torch.save(payload, path)
    return path


def read_matcher(path: str | Path, name: str | None = None) -> Matcher:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vestis matcher checkpoint")
    head = MatchHead(payload["dim"], payload["hidden"])
    head.load_state_dict({key: value.float() for key, value in payload["state"].items()})
    return Matcher(head, payload.get("meta", {}), name or Path(path).stem)


def load_matcher(name: str | Path | Matcher = DEFAULT_MATCHER) -> Matcher:
    """A shipped matcher by name (``rerank-lite0``), or a checkpoint file (a run's
    ``matcher.pt``)."""
    if isinstance(name, Matcher):
        return name
    key = str(name)
    if key in {a.name for a in artifacts("rerank")}:
        path = artifact(key, "rerank").path
        if not path.is_file():
            raise FileNotFoundError(f"the weights of matcher {key!r} are missing: {path}; "
                                    "train them with vestis train configs/rerank.yaml, then "
                                    f"vestis ship runs/rerank {key}")
        return _read_cached(path, key)
    path = Path(key).expanduser()
    if path.is_file():
        return _read_cached(path.resolve(), path.stem)
    known = ", ".join(a.name for a in artifacts("rerank"))
    raise ValueError(f"unknown matcher {key!r}: one of {known} or a matcher checkpoint file")


_CACHE: dict[tuple[Path, str], tuple[int, Matcher]] = {}


def _read_cached(path: Path, name: str) -> Matcher:
    """One read per file version: a search with ``rerank`` costs no load after the first."""
    stamp = path.stat().st_mtime_ns
    cached = _CACHE.get((path, name))
    if cached is None or cached[0] != stamp:
        cached = _CACHE[(path, name)] = (stamp, read_matcher(path, name))
    return cached[1]
