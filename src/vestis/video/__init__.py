"""Video queries (Video2Shop): which catalog items are worn in a video.

>>> from vestis.catalog import Catalog
>>> from vestis.video import search_video
>>> for hits in search_video(Catalog("shop"), "clip.mp4", k=5):
...     print(hits.group, hits.frames, [m.item_id for m in hits.matches])

:mod:`~vestis.video.reader` samples frames (every 25th, opening skipped, duplicates dropped,
rotation applied, streamed); :mod:`~vestis.video.track` links each garment across frames;
:mod:`~vestis.video.fusion` fuses per-frame similarities (max, mean or a learned AsymNet-style
tree); :mod:`~vestis.video.search` puts them together; :mod:`~vestis.video.synth` writes
synthetic clips for tests and benchmarks. Needs PyAV (``pip install av``).
"""

from vestis.video.fusion import FUSIONS, FusionTree, load_fusion, train_fusion
from vestis.video.reader import (
    VideoError,
    VideoFrame,
    VideoInfo,
    VideoWarning,
    probe,
    sample_frames,
)
from vestis.video.search import TrackHits, search_tracks, search_video
from vestis.video.track import Observation, Track, track_garments

__all__ = [
    "FUSIONS",
    "FusionTree",
    "Observation",
    "Track",
    "TrackHits",
    "VideoError",
    "VideoFrame",
    "VideoInfo",
    "VideoWarning",
    "load_fusion",
    "probe",
    "sample_frames",
    "search_tracks",
    "search_video",
    "track_garments",
    "train_fusion",
]
