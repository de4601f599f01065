"""irkit.data.labelled: the one labelled-data reader (folder per class, GLDv2 CSV, pairs CSV, SfM-120k
pickle), what it shares with collections (the extension list) and the names older callers import."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from irkit.data import labelled as L
from irkit.data.collection import load_collection
from irkit.errors import DatasetError
from irkit.io.images import IMAGE_EXTENSIONS


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_folder_per_class_layout(tmp_path):
    for rel in ("b_cls/1.jpg", "b_cls/sub/2.GIF", "b_cls/.hidden.jpg", "b_cls/.cache/3.jpg", "b_cls/notes.txt",
                "a_cls/0.png", "a_cls/x.webp", "empty/readme.md", ".trash/old.jpg", "loose.jpg"):
        _touch(tmp_path / rel)
    data = L.folder_per_class(tmp_path)
    assert data.class_names == ["a_cls", "b_cls"]  # sorted; no images -> no class; hidden skipped
    assert data.ids == ["0", "x", "1", "sub/2"]  # path inside the class folder, no extension
    assert data.labels.tolist() == [0, 0, 1, 1] and data.num_classes == 2 and len(data) == 4
    assert data.paths[3] == tmp_path / "b_cls" / "sub" / "2.GIF"
    assert data.boxes == [None] * 4
    assert data.by_class() == {"a_cls": [0, 1], "b_cls": [2, 3]}
    with pytest.raises(DatasetError, match="does not exist"):
        L.folder_per_class(tmp_path / "nope")
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no class folders with images"):
        L.folder_per_class(tmp_path / "none")


def test_a_gif_is_trained_on_as_it_is_extracted(tmp_path):
    """The defect the single extension list removes: collections and training folders agree."""
    for ext in IMAGE_EXTENSIONS:
        _touch(tmp_path / "cls" / f"im{ext.replace('.', '_')}{ext}")
    extracted = load_collection(tmp_path / "cls").paths
    trained = L.folder_per_class(tmp_path).paths
    assert sorted(extracted) == sorted(trained) and len(trained) == len(IMAGE_EXTENSIONS)


def test_select_and_filter_classes_relabel(tmp_path):
    data = L.LabelledImages([tmp_path / f"{i}.jpg" for i in range(6)], [2, 0, 2, 1, 2, 0], ["x", "y", "z"],
                            urls=[f"u{i}" for i in range(6)])
    sub = data.filter_classes(min_images=2)
    assert sub.class_names == ["x", "z"] and sub.labels.tolist() == [1, 0, 1, 1, 0]
    assert sub.ids == ["0", "1", "2", "4", "5"] and sub.urls == ["u0", "u1", "u2", "u4", "u5"]
    first = data.filter_classes(max_classes=1)
    assert first.class_names == ["x"] and first.ids == ["1", "5"] and first.labels.tolist() == [0, 0]
    with pytest.raises(DatasetError, match="at least 4"):
        data.filter_classes(min_images=4)
    with pytest.raises(DatasetError, match="labels must lie"):
        L.LabelledImages([tmp_path / "a.jpg"], [3], ["only"])
    with pytest.raises(DatasetError, match="1 paths but 2 labels"):
        L.LabelledImages([tmp_path / "a.jpg"], [0, 0], ["only"])


def test_gldv2_filters_and_layout(tmp_path):
    csv = tmp_path / "train_clean.csv"
    csv.write_text("landmark_id,images\n5,abc111 abd222\n2,aaa333\n9,bbb444 bbc555 bbd666\n")
    data = L.gldv2_csv(csv, tmp_path / "img", min_images=2)
    assert data.class_names == ["5", "9"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.paths[0] == tmp_path / "img" / "a" / "b" / "c" / "abc111.jpg"
    assert L.gldv2_csv(csv, tmp_path / "img", max_classes=1).ids == ["aaa333"]  # landmark 2 sorts first
    with pytest.raises(DatasetError, match="train_clean.csv: no class has at least 5"):
        L.gldv2_csv(csv, min_images=5)


def test_pairs_csv_and_sfm120k_pickle(tmp_path):
    (tmp_path / "pairs.csv").write_text("query,positive,cluster\nq/1.jpg,p1.jpg,7\nq2.jpg,p2.jpg,3\np1.jpg,x.jpg,7\n")
    data = L.pairs_csv(tmp_path / "pairs.csv")
    assert data.ids == ["q/1", "p1", "q2", "p2", "x"] and data.paths[0] == tmp_path / "q" / "1.jpg"
    assert data.labels.tolist() == [1, 1, 0, 0, 1] and data.class_names == ["3", "7"]
    (tmp_path / "bad.csv").write_text("query,positive,cluster\nq1.jpg,p1.jpg,7\np1.jpg,z.jpg,8\n")
    with pytest.raises(DatasetError, match="clusters 7 and 8"):
        L.pairs_csv(tmp_path / "bad.csv")
    (tmp_path / "nocl.csv").write_text("query,positive\na.jpg,b.jpg\n")
    with pytest.raises(DatasetError, match="missing column"):
        L.pairs_csv(tmp_path / "nocl.csv")

    cids = ["aa0011", "bb0022", "cc0033"]
    db = {"train": {"cids": cids, "cluster": [4, 4, 1], "qidxs": [0, 2], "pidxs": [1, 2]}}
    (tmp_path / "sfm.pkl").write_bytes(pickle.dumps(db))
    sfm = L.sfm120k_pickle(tmp_path / "sfm.pkl", tmp_path / "ims")
    assert sfm.ids == ["aa0011", "bb0022", "cc0033"] and sfm.labels.tolist() == [1, 1, 0]
    assert sfm.paths[0] == tmp_path / "ims" / "11" / "00" / "aa" / "aa0011"
    (tmp_path / "wrong.pkl").write_bytes(pickle.dumps({"val": {}}))
    with pytest.raises(DatasetError, match="not the cirtorch SfM-120k layout"):
        L.sfm120k_pickle(tmp_path / "wrong.pkl", tmp_path)


def test_load_labelled_picks_the_layout(tmp_path):
    _touch(tmp_path / "folder" / "c" / "a.jpg")
    assert L.load_labelled(tmp_path / "folder").class_names == ["c"]
    (tmp_path / "pairs.csv").write_text("query,positive,cluster\na.jpg,b.jpg,1\n")
    assert L.load_labelled(tmp_path / "pairs.csv", tmp_path / "root").paths == [tmp_path / "root" / "a.jpg",
                                                                              tmp_path / "root" / "b.jpg"]
    (tmp_path / "train.csv").write_text("id,url,landmark_id\nabc1,,5\n")
    assert L.load_labelled(tmp_path / "train.csv").ids == ["abc1"]
    (tmp_path / "db.pkl").write_bytes(pickle.dumps({}))
    with pytest.raises(DatasetError, match="needs the image root"):
        L.load_labelled(tmp_path / "db.pkl")
    for bad in (tmp_path / "missing", _touch(tmp_path / "list.txt")):
        with pytest.raises(DatasetError, match="expected a folder"):
            L.load_labelled(bad)


def test_names_other_code_imports_still_work(tmp_path):
    """irkit.train and `irkit clean` import these names; they are the labelled module's readers."""
    from irkit.data import training as T

    assert T.LabelledImages is L.LabelledImages and T.folder_per_class is L.folder_per_class
    assert T.gldv2_clean is L.gldv2_csv and T.pairs_csv is L.pairs_csv and T.sfm120k_pickle is L.sfm120k_pickle
    views = T.SyntheticViewSet([tmp_path / "a.png", tmp_path / "b.png"], 32, spec=None)
    assert views.data.labels.tolist() == [0, 1] and views.data.class_names == ["a", "b"]
    assert np.array_equal(views.labels, views.data.labels)
