"""One train command (``vestis train RECIPE`` dispatching on the recipe's task), typed
recipes for every task, and ``vestis ship RUN NAME``: no training run writes the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vestis import artifacts as registry
from vestis.artifacts import Artifact, artifact_path
from vestis.train import tasks
from vestis.train.ship import ship

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VESTIS = str(Path(sys.executable).with_name("vestis"))


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_shipped_recipe_names_a_known_task():
    for entry in registry.artifacts():
        recipe = yaml.safe_load((CONFIGS.parent / entry.recipe).read_text())
        assert tasks.recipe_task(recipe) == entry.kind
    with pytest.raises(ValueError, match="unknown task 'parsre'"):
        tasks.recipe_task({"task": "parsre"})


@pytest.mark.parametrize("task", tasks.TASKS)
def test_train_dispatches_on_the_task_into_the_run_folder(task, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(tasks._RUNNERS, task, lambda *args: calls.append(args) or "done")
    recipe = write(tmp_path, {} if task == "retrieval" else {"task": task}, "my-run.yaml")
    assert tasks.train_recipe(recipe) == "done"
    assert calls[0][:2] == (recipe, Path("runs/my-run")) and calls[0][-1] == task


def test_options_that_do_not_apply_and_a_wrong_alias_are_refused(tmp_path):
    parser = write(tmp_path, {"task": "parser"})
    with pytest.raises(ValueError, match="--resume does not apply to a parser recipe"):
        tasks.train_recipe(parser, tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="--minutes does not apply to a text recipe"):
        tasks.train_recipe(write(tmp_path, {"task": "text"}), tmp_path / "run", minutes=1.0)
    with pytest.raises(ValueError, match="is a text recipe, not a parser one"):
        tasks.train_recipe(write(tmp_path, {"task": "text"}), tmp_path / "run", task="parser")


def test_a_misspelled_key_is_refused_by_name_for_every_task(tmp_path):
    from vestis.detect.train import load_recipe
    from vestis.text.align import train_from_recipe as train_text
    from vestis.train.config import load_config
    from vestis.train.heads import load_head_config
    from vestis.video.fusion import train_from_recipe as train_fusion

    parser = yaml.safe_load((CONFIGS / "parser-lite0.yaml").read_text())
    parser["train"]["epochz"] = 3
    with pytest.raises(ValueError, match=r"unknown train key\(s\): epochz"):
        load_recipe(write(tmp_path, parser))
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\): atributes"):
        load_head_config({**yaml.safe_load((CONFIGS / "attributes.yaml").read_text()),
                          "atributes": {}})
    with pytest.raises(ValueError, match=r"unknown outfits key\(s\): embed_dims"):
        load_head_config(CONFIGS / "compnet.yaml", {"outfits": {"embed_dims": 8}})
    text = yaml.safe_load((CONFIGS / "text_align.yaml").read_text())
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\): out"):  # --out, not a key
        train_text(write(tmp_path, {**text, "out": "src/vestis/text/weights/x.pt"}), tmp_path)
    fusion = yaml.safe_load((CONFIGS / "video_fusion.yaml").read_text())
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\): epoch"):
        train_fusion(write(tmp_path, {**fusion, "epoch": 3}), tmp_path)
    with pytest.raises(ValueError, match="not a retrieval recipe"):
        load_config({"task": "parser"})
    assert not list(tmp_path.glob("*.pt"))


def test_library_defaults_name_no_data_folder(tmp_path):
    from vestis.detect.train import load_recipe
    from vestis.train.heads import load_head_config

    with pytest.raises(ValueError, match="sets no data.csv"):
        load_recipe(write(tmp_path, {"task": "parser"}))
    with pytest.raises(ValueError, match="sets no data.catalog, data.products"):
        load_head_config({"task": "attributes"})
    with pytest.raises(ValueError, match="sets no data.related"):
        load_head_config({"task": "outfits", "data": {"catalog": "c", "products": "p"}})


def test_ship_stores_a_run_as_a_named_artifact_in_its_format(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "attributes"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(artifact_path("attributes-lite0").read_bytes())
    target = Artifact("attributes-test", "attributes", str(tmp_path / "shipped.pt"),
                      "vestis-attributes", "configs/attributes.yaml", "best.pt")
    monkeypatch.setitem(registry.ARTIFACTS, target.name, target)
    assert ship(run, target.name) == tmp_path / "shipped.pt"
    assert target.path.read_bytes() == (run / "best.pt").read_bytes()
    wrong = Artifact("parser-test", "parser", str(tmp_path / "p.pt"), "vestis-garment-parser",
                     "configs/parser-lite0.yaml", "best.pt")
    monkeypatch.setitem(registry.ARTIFACTS, wrong.name, wrong)
    with pytest.raises(ValueError, match="'vestis-attributes' checkpoint, but parser-test"):
        ship(run, wrong.name)
    with pytest.raises(ValueError, match="unknown artifact 'nope'"):
        ship(run, "nope")
    assert not wrong.path.exists()


def test_cli_train_refuses_a_misspelled_recipe_and_lists_artifacts(tmp_path):
    recipe = write(tmp_path, {"task": "attributes", "epocs": 3})
    result = subprocess.run([VESTIS, "train", str(recipe), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown recipe key(s): epocs" in result.stderr
    assert not (tmp_path / "run").exists()
    listed = subprocess.run([VESTIS, "models", "--all"], capture_output=True, text=True,
                            timeout=120, check=True).stdout
    assert all(name in listed for name in registry.ARTIFACTS)


@pytest.mark.train
def test_a_retrieval_recipe_with_its_task_trains_into_out_only(tmp_path, data_dir):
    from tests.smoke import SMOKE
    from vestis.recipe_files import deep_merge

    recipe = deep_merge(yaml.safe_load((CONFIGS / "triplet.yaml").read_text()), SMOKE)
    for source in recipe["data"]["sources"]:  # relative to the repository, not tmp_path
        source["path"] = str((CONFIGS.parent / source["path"]).resolve())
    summary = tasks.train_recipe(write(tmp_path, {**recipe, "task": "retrieval"}),
                                 tmp_path / "run")
    assert summary.task == "retrieval" and summary.checkpoint == tmp_path / "run" / "best.pt"
    assert summary.checkpoint.is_file() and "best checkpoint" in summary.message


def test_ship_stores_a_retrieval_run_small(tmp_path, monkeypatch):
    from vestis.models import create_model

    target = Artifact("vestis-test", "retrieval", str(tmp_path / "model.pt"),
                      "vestis-checkpoint", "configs/vestis-lite0.yaml", "last.pt")
    monkeypatch.setitem(registry.ARTIFACTS, target.name, target)
    path = ship(artifact_path("vestis-lite0"), target.name)
    assert path.stat().st_size < 10 * 2**20
    assert create_model(path).config == create_model("vestis-lite0").config
