"""Benchmark readers on small fixtures written in each format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vestis.evaluation import EvalDataset, load_dataset
from vestis.evaluation.datasets import detect_format
from vestis.records import ImageRecord

LUMA_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "luma" / "catalog.csv"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def listing(header: str, rows: list[str]) -> str:
    return "\n".join([str(len(rows)), header, *rows]) + "\n"


# --- csv ----------------------------------------------------------------------------------


def test_csv_without_split_is_leave_one_out(tmp_path):
    csv_path = write(
        tmp_path / "shop" / "catalog.csv",
        "image,item_id,colour,x1,y1,x2,y2\n"
        "img/a1.jpg,a,red,1,2,30,40\n"
        "img/a2.jpg,a,red,,,,\n"
        "img/b1.jpg,b,blue,,,,\n"
        "img/c1.jpg,c,green,,,,\n"
        "img/c2.jpg,c,green,,,,\n"
        "/abs/c3.jpg,c,green,,,,\n",
    )
    dataset = load_dataset(csv_path)
    assert dataset.protocol == "leave-one-out"
    assert dataset.name == "shop/catalog"
    assert [s.item_id for s in dataset.gallery] == ["a", "a", "b", "c", "c", "c"]
    assert dataset.query_ids == ["a", "a", "c", "c", "c"]
    np.testing.assert_array_equal(dataset.query_gallery_index, [0, 1, 3, 4, 5])
    for query, row in zip(dataset.queries, dataset.query_gallery_index, strict=True):
        assert query == dataset.gallery[row]
    assert dataset.gallery[0] == ImageRecord(tmp_path / "shop" / "img" / "a1.jpg", "a",
                                             (1, 2, 30, 40))
    assert dataset.gallery[1].box is None
    assert dataset.gallery[5].path == Path("/abs/c3.jpg")


def test_csv_with_query_and_gallery_split(tmp_path):
    csv_path = write(
        tmp_path / "list.csv",
        "image,item_id,split\nq1.jpg,a,query\ng1.jpg,a,gallery\ng2.jpg,b,gallery\nt.jpg,a,train\n",
    )
    dataset = load_dataset(csv_path)
    assert dataset.protocol == "query-gallery"
    assert dataset.query_gallery_index is None
    assert [s.path.name for s in dataset.queries] == ["q1.jpg"]
    assert [s.path.name for s in dataset.gallery] == ["g1.jpg", "g2.jpg"]


def test_csv_with_other_splits_is_leave_one_out_within_the_split(tmp_path):
    csv_path = write(
        tmp_path / "list.csv",
        "image,item_id,split\n1.jpg,a,train\n2.jpg,a,train\n3.jpg,b,test\n4.jpg,b,test\n"
        "5.jpg,c,test\n",
    )
    dataset = load_dataset(csv_path, split="test")
    assert [s.path.name for s in dataset.gallery] == ["3.jpg", "4.jpg", "5.jpg"]
    np.testing.assert_array_equal(dataset.query_gallery_index, [0, 1])
    with pytest.raises(ValueError, match="no rows with split 'val'"):
        load_dataset(csv_path, split="val")


def test_csv_folder_is_detected_through_catalog_csv(tmp_path):
    write(tmp_path / "catalog.csv", "image,item_id\n1.jpg,a\n2.jpg,a\n")
    write(tmp_path / "other.csv", "x\n")
    assert detect_format(tmp_path) == "csv"
    assert len(load_dataset(tmp_path).queries) == 2


def test_clothing_format_csv_matches_by_category_label(tmp_path):
    write(tmp_path / "labels.csv", "image,label,sender_id\n1.jpg,Shirt,4\n2.jpg,Shirt,5\n"
          "3.jpg,Hat,4\n")
    dataset = load_dataset(tmp_path / "labels.csv")
    assert [sample.item_id for sample in dataset.gallery] == ["Shirt", "Shirt", "Hat"]
    assert len(dataset.queries) == 2


def test_clothing_labels_that_are_not_ground_truth_are_left_out(tmp_path):
    write(tmp_path / "labels.csv", "image,label\n1.jpg,Shirt\n2.jpg,Not sure\n3.jpg,Shirt\n"
          "4.jpg,Not sure\n5.jpg,Skip\n6.jpg,Other\n")
    dataset = load_dataset(tmp_path / "labels.csv")
    assert [sample.path.name for sample in dataset.gallery] == ["1.jpg", "3.jpg"]
    write(tmp_path / "bad.csv", "image,label\n1.jpg,Skip\n")
    with pytest.raises(ValueError, match="not ground truth|every row"):
        load_dataset(tmp_path / "bad.csv")
    # With an item_id column the same words are ordinary item names.
    write(tmp_path / "items.csv", "image,item_id\n1.jpg,Other\n2.jpg,Other\n")
    assert len(load_dataset(tmp_path / "items.csv").queries) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,category\n1.jpg,a\n", r"one of \('item_id', 'label'\)"),
        ("image,item_id,x1,y1\n1.jpg,a,1,2\n", "x1,y1,x2,y2"),
        ("image,item_id,x1,y1,x2,y2\n1.jpg,a,1,2,3,4\n2.jpg,a,1,b,3,4\n", "line 3: a box"),
        ("image,item_id\n1.jpg,a\n,a\n", "line 3: empty image or item_id"),
        ("image,item_id\n", "no rows"),
        ("image,item_id\n1.jpg,a\n2.jpg,b\n", "no item has two or more images"),
        ("image,item_id,split\n1.jpg,a,query\n", "no 'gallery' rows"),
    ],
)
def test_csv_errors_name_the_file_and_the_problem(tmp_path, text, message):
    csv_path = write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message) as error:
        load_dataset(csv_path)
    assert "bad.csv" in str(error.value) or "no item" in str(error.value)


def test_luma_catalog_leave_one_out(data_dir):
    dataset = load_dataset(LUMA_CSV)
    assert dataset.protocol == "leave-one-out"
    assert len(dataset.gallery) == 413
    assert len(dataset.queries) == 247
    assert all(sample.path.is_absolute() for sample in dataset.gallery)
    assert dataset.gallery[0].path.exists()


# --- DeepFashion In-shop ------------------------------------------------------------------

INSHOP_HEADER = "image_name item_id evaluation_status"
INSHOP_ROWS = [
    "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 query",
    "img/WOMEN/Dresses/id_00000002/02_2_side.jpg  id_00000002 gallery",
    "img/MEN/Pants/id_00000007/01_1_front.jpg id_00000007 train",
    "img/MEN/Pants/id_00000008/01_1_front.jpg id_00000008 gallery",
]


def make_inshop(root: Path, with_img_folder: bool = True) -> Path:
    partition = write(
        root / "Eval" / "list_eval_partition.txt", listing(INSHOP_HEADER, INSHOP_ROWS)
    )
    write(
        root / "Anno" / "list_bbox_inshop.txt",
        listing(
            "image_name clothes_type pose_type x_1 y_1 x_2 y_2",
            ["img/WOMEN/Dresses/id_00000002/02_1_front.jpg 3 1 50 49 208 235"],
        ),
    )
    if with_img_folder:
        write(root / "Img" / INSHOP_ROWS[0].split()[0], "")
    return partition


def test_inshop_reader(tmp_path):
    partition = make_inshop(tmp_path)
    assert detect_format(tmp_path) == "inshop"
    for source in (tmp_path, partition):
        dataset = load_dataset(source)
        assert dataset.protocol == "query-gallery"
        assert dataset.query_ids == ["id_00000002"]
        assert dataset.gallery_ids == ["id_00000002", "id_00000008"]
        query = dataset.queries[0]
        assert query.path == tmp_path / "Img" / "img/WOMEN/Dresses/id_00000002/02_1_front.jpg"
        assert query.box == (50, 49, 208, 235)
        assert dataset.gallery[0].box is None


def test_inshop_images_relative_to_root_without_img_folder(tmp_path):
    make_inshop(tmp_path, with_img_folder=False)
    dataset = load_dataset(tmp_path, "inshop")
    assert dataset.queries[0].path == tmp_path / INSHOP_ROWS[0].split()[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (listing("image_name item evaluation_status", INSHOP_ROWS), "line 2 must be the header"),
        ("4\n" + INSHOP_HEADER + "\n" + "\n".join(INSHOP_ROWS[:3]), "announces 4 rows, found 3"),
        (listing(INSHOP_HEADER, ["img/a.jpg id_1"]), "line 3: expected 3 fields"),
        ("many\n" + INSHOP_HEADER + "\n", "line 1 must be the number of rows"),
    ],
)
def test_inshop_malformed_partition(tmp_path, text, message):
    partition = write(tmp_path / "list_eval_partition.txt", text)
    with pytest.raises(ValueError, match=message) as error:
        load_dataset(partition, "inshop")
    assert "list_eval_partition.txt" in str(error.value)


def test_missing_partition_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        load_dataset(tmp_path, "inshop")


# --- DeepFashion Consumer-to-shop ---------------------------------------------------------

C2S_HEADER = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"


def test_consumer_to_shop_reader(tmp_path):
    rows = [
        "img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg img/CLOTHING/Blouse/id_00000001/shop_01.jpg id_00000001 test",  # noqa: E501
        "img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg img/CLOTHING/Blouse/id_00000001/shop_02.jpg id_00000001 test",  # noqa: E501
        "img/CLOTHING/Blouse/id_00000001/comsumer_02.jpg img/CLOTHING/Blouse/id_00000001/shop_01.jpg id_00000001 test",  # noqa: E501
        "img/DRESSES/Dress/id_00000009/comsumer_01.jpg img/DRESSES/Dress/id_00000009/shop_01.jpg id_00000009 val",  # noqa: E501
        "img/TOPS/Tee/id_00000020/comsumer_01.jpg img/TOPS/Tee/id_00000020/shop_01.jpg id_00000020 train",  # noqa: E501
    ]
    write(tmp_path / "Eval" / "list_eval_partition.txt", listing(C2S_HEADER, rows))
    write(
        tmp_path / "Anno" / "list_bbox_consumer2shop.txt",
        listing(
            "image_name clothes_type source_type x_1 y_1 x_2 y_2",
            ["img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg 1 2 10 20 110 220"],
        ),
    )
    assert detect_format(tmp_path) == "c2s"
    dataset = load_dataset(tmp_path)
    assert [s.path.name for s in dataset.queries] == ["comsumer_01.jpg", "comsumer_02.jpg"]
    assert [s.path.name for s in dataset.gallery] == ["shop_01.jpg", "shop_02.jpg"]
    assert set(dataset.query_ids + dataset.gallery_ids) == {"id_00000001"}
    assert dataset.queries[0].box == (10, 20, 110, 220)
    assert dataset.queries[0].path == tmp_path / rows[0].split()[0]

    validation = load_dataset(tmp_path, split="val")
    assert validation.query_ids == ["id_00000009"]
    with pytest.raises(ValueError, match="no pairs with evaluation_status 'nope'"):
        load_dataset(tmp_path, split="nope")


# --- DeepFashion2 -------------------------------------------------------------------------


def test_deepfashion2_official_retrieval_files(tmp_path):
    query = [
        {"style": 2, "pair_id": 1, "query_image_id": 1, "bbox": [204, 189, 293, 414], "cls": 13},
        {"style": 1, "pair_id": 1, "query_image_id": 1, "bbox": [199, 190, 287, 269], "cls": 5},
        {"style": 0, "pair_id": 6, "query_image_id": 48, "bbox": [125, 66, 467, 623], "cls": 1},
    ]
    gallery = [
        {"gallery_image_id": 3, "style": 2, "pair_id": 1, "bbox": [247, 254, 381, 667]},
        {"gallery_image_id": 3, "style": 0, "pair_id": 1, "bbox": [233, 251, 394, 409]},
        {"gallery_image_id": 4, "style": 0, "pair_id": 1, "bbox": [260, 319, 464, 804]},
    ]
    write(tmp_path / "query_gt.json", json.dumps(query))
    write(tmp_path / "gallery_gt.json", json.dumps(gallery))
    (tmp_path / "image").mkdir()
    assert detect_format(tmp_path) == "df2"
    dataset = load_dataset(tmp_path)
    assert dataset.protocol == "query-gallery"
    # The style-0 query is dropped; style-0 gallery boxes never match anything.
    assert dataset.query_ids == ["1-2", "1-1"]
    assert dataset.queries[0] == ImageRecord(
        tmp_path / "image" / "000001.jpg", "1-2", (204, 189, 293, 414)
    )
    assert dataset.gallery_ids[0] == "1-2"
    assert len(set(dataset.gallery_ids)) == 3
    assert dataset.gallery[2].path == tmp_path / "image" / "000004.jpg"
    # Naming one of the two files works too.
    assert load_dataset(tmp_path / "gallery_gt.json").query_ids == ["1-2", "1-1"]


def test_deepfashion2_per_image_annotations(tmp_path):
    def annotation(source, pair_id, *styles):
        items = {
            f"item{i}": {"style": style, "bounding_box": [i, i, 10 + i, 20 + i], "category_id": 1}
            for i, style in enumerate(styles, start=1)
        }
        return {"source": source, "pair_id": pair_id, **items}

    write(tmp_path / "annos" / "000001.json", json.dumps(annotation("user", 7, 1, 0)))
    write(tmp_path / "annos" / "000002.json", json.dumps(annotation("shop", 7, 0, 1)))
    write(tmp_path / "annos" / "000003.json", json.dumps(annotation("shop", 8, 1)))
    (tmp_path / "image").mkdir()
    dataset = load_dataset(tmp_path, "df2")
    assert dataset.query_ids == ["7-1"]
    assert dataset.queries[0].box == (1, 1, 11, 21)
    assert dataset.queries[0].path == tmp_path / "image" / "000001.jpg"
    assert dataset.gallery_ids[1:] == ["7-1", "8-1"]
    assert dataset.gallery[1].box == (2, 2, 12, 22)

    # The same annotations as dicts inside query/gallery files.
    by_image = {"000001": annotation("user", 7, 1, 0)}
    write(tmp_path / "flat" / "query_gt.json", json.dumps(by_image))
    write(
        tmp_path / "flat" / "gallery_gt.json", json.dumps({"000002.jpg": annotation("shop", 7, 1)})
    )
    flat = load_dataset(tmp_path / "flat")
    assert flat.query_ids == ["7-1"] and flat.gallery_ids == ["7-1"]
    assert flat.gallery[0].path == tmp_path / "flat" / "000002.jpg"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"style": 1, "pair_id": 1, "bbox": [1, 2, 3, 4]}, "no image reference"),
        ({"query_image_id": 1, "pair_id": 1, "bbox": [1, 2, 3, 4]}, "missing 'style'"),
        ({"query_image_id": 1, "style": 1, "pair_id": 1, "bbox": [1, 2]}, "a box must be 4"),
    ],
)
def test_deepfashion2_malformed_entries(tmp_path, record, message):
    write(tmp_path / "query_gt.json", json.dumps([record]))
    write(tmp_path / "gallery_gt.json", "[]")
    with pytest.raises(ValueError, match=message) as error:
        load_dataset(tmp_path)
    assert "query_gt.json, entry 0" in str(error.value)


def test_deepfashion2_invalid_json(tmp_path):
    write(tmp_path / "query_gt.json", "[{")
    write(tmp_path / "gallery_gt.json", "[]")
    with pytest.raises(ValueError, match="query_gt.json: invalid JSON"):
        load_dataset(tmp_path)


# --- dispatch and validation --------------------------------------------------------------


def test_missing_source_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="cannot detect the dataset format"):
        load_dataset(tmp_path)
    write(tmp_path / "x.csv", "image,item_id\n1.jpg,a\n1.jpg,a\n")
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        load_dataset(tmp_path / "x.csv", "coco")


def test_eval_dataset_validates_its_fields():
    sample = ImageRecord(Path("/a.jpg"), "a")
    with pytest.raises(ValueError, match="no queries"):
        EvalDataset("d", [], [sample], None, "query-gallery")
    with pytest.raises(ValueError, match="protocol"):
        EvalDataset("d", [sample], [sample], None, "random")
    with pytest.raises(ValueError, match="query_gallery_index"):
        EvalDataset("d", [sample], [sample], np.array([0, 0]), "leave-one-out")
