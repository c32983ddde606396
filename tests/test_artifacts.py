"""The one registry of shipped artifacts (vestis.artifacts)."""

import pytest
import torch

from vestis.artifacts import ARTIFACTS, PACKAGE, artifact, artifact_path, artifacts


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_every_artifact_is_shipped_in_its_format(name):
    entry = ARTIFACTS[name]
    assert entry.path.is_file() and entry.path.is_relative_to(PACKAGE)
    payload = torch.load(entry.path, map_location="cpu", weights_only=True)
    assert payload["format"] == entry.format
    assert (PACKAGE.parents[1] / entry.recipe).is_file()


def test_lookups_read_the_registry():
    from vestis.detect.parser import SHIPPED as parsers
    from vestis.models.registry import _TRAINED
    from vestis.video.fusion import SHIPPED as fusions

    assert _TRAINED["vestis-lite0"] == artifact_path("vestis-lite0")
    assert parsers == {"parser-lite0": artifact_path("parser-lite0", "parser")}
    assert fusions["learned"] == artifact_path("fusion", "video-fusion")
    assert [a.name for a in artifacts("text")] == ["text-align-lite0"]


def test_unknown_or_wrong_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown artifact 'vestis-lite9'.*vestis-lite0"):
        artifact("vestis-lite9")
    with pytest.raises(ValueError, match="unknown parser artifact 'vestis-lite0'.*parser-lite0"):
        artifact("vestis-lite0", "parser")
