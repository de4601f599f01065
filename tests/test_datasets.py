"""Dataset loaders: revisitop layout, distractors, collections, GLDv2 CSVs."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from irkit.data.collection import load_collection
from irkit.data.distractors import combined_database, load_distractors
from irkit.data.gldv2 import image_path, load_image_ids, load_retrieval_solution
from irkit.data.labelled import gldv2_csv
from irkit.data.revisitop import load_gnd, load_revisitop
from irkit.errors import DatasetError


def _gnd(n_db=5, nq=2):
    return {
        "imlist": [f"db{i}" for i in range(n_db)],
        "qimlist": [f"q{i}" for i in range(nq)],
        "gnd": [{"bbx": [1.5, 2.0, 10.0, 12.5], "easy": [0], "hard": [1, 2], "junk": [3]} for _ in range(nq)],
    }


def _write_ds(root: Path, name: str, g: dict, images: bool = True) -> Path:
    d = root / name
    (d / "jpg").mkdir(parents=True)
    with open(d / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump(g, fh)
    if images:
        for n in g["imlist"] + g["qimlist"]:
            (d / "jpg" / f"{n}.jpg").write_bytes(b"x")
    return d


# ------------------------------------------------------------------ revisitop

def test_load_revisitop_any_name(tmp_path):
    _write_ds(tmp_path, "mycity", _gnd())
    ds = load_revisitop(tmp_path, "mycity")
    assert ds.name == "mycity" and ds.root == tmp_path / "mycity"
    assert ds.n_db == 5 and ds.n_queries == 2
    assert ds.db_paths[3] == tmp_path / "mycity" / "jpg" / "db3.jpg"
    assert ds.query_paths[1] == tmp_path / "mycity" / "jpg" / "q1.jpg"
    assert ds.query_bbx[0] == (1.5, 2.0, 10.0, 12.5)
    assert ds.gnd[0]["hard"] == [1, 2]


def test_missing_images_named_and_counted(tmp_path):
    d = _write_ds(tmp_path, "ds", _gnd())
    for n in ("db1", "db4", "q0"):
        (d / "jpg" / f"{n}.jpg").unlink()
    with pytest.raises(DatasetError, match=r"3 of 7 images are missing.*q0\.jpg.*db1\.jpg"):
        load_revisitop(tmp_path, "ds")
    assert load_revisitop(tmp_path, "ds", check_images=False).n_db == 5


def test_missing_dataset_and_bad_name(tmp_path):
    with pytest.raises(DatasetError, match="nothere.*not found"):
        load_revisitop(tmp_path, "nothere")
    with pytest.raises(DatasetError, match="invalid dataset name"):
        load_revisitop(tmp_path, "../etc")
    (tmp_path / "nogt").mkdir()
    with pytest.raises(DatasetError, match="gnd_nogt.pkl not found"):
        load_revisitop(tmp_path, "nogt")


def _mutate(fn):
    g = _gnd()
    fn(g)
    return g


@pytest.mark.parametrize("raw, match", [
    ([1, 2, 3], "expected a dict"),
    ({"imlist": [], "qimlist": []}, r"missing key\(s\) \['gnd'\]"),
    (_mutate(lambda g: g.update(imlist="db0")), "'imlist' must be a list"),
    (_mutate(lambda g: g["qimlist"].append(3)), "non-empty strings"),
    (_mutate(lambda g: g["gnd"].pop()), "1 entries but 'qimlist' has 2"),
    (_mutate(lambda g: g.update(gnd={"a": 1})), "list of per-query dicts"),
    (_mutate(lambda g: g["gnd"].__setitem__(0, [1])), r"gnd\[0\] must be a dict"),
    (_mutate(lambda g: g["gnd"][1].pop("junk")), r"gnd\[1\] is missing key\(s\) \['junk'\]"),
    (_mutate(lambda g: g["gnd"][0].update(easy=[5])), r"index 5, outside the database \[0, 5\)"),
    (_mutate(lambda g: g["gnd"][0].update(easy=[-1])), "index -1"),
    (_mutate(lambda g: g["gnd"][0].update(easy=[1.0])), "must hold integers"),
    (_mutate(lambda g: g["gnd"][0].update(easy=[0, 0])), "appears twice"),
    (_mutate(lambda g: g["gnd"][0].update(junk=[1])), "in both 'hard' and 'junk'"),
    (_mutate(lambda g: g["gnd"][0].update(easy=3)), "list of database indices"),
    (_mutate(lambda g: g["gnd"][0].update(bbx=[1, 2, 3])), "4 finite numbers"),
    (_mutate(lambda g: g["gnd"][0].update(bbx=[5, 5, 1, 9])), "is empty"),
    (_mutate(lambda g: g["gnd"][0].update(bbx="abcd")), "bbx"),
])
def test_malformed_gnd(tmp_path, raw, match):
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(pickle.dumps(raw))
    with pytest.raises(DatasetError, match=match):
        load_gnd(p)


def test_gnd_not_a_pickle_and_bbx_none(tmp_path):
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="cannot be read as a pickle"):
        load_gnd(p)
    g = _gnd()
    g["gnd"][0]["bbx"] = None
    g["gnd"][0]["easy"] = np.array([0, 4])  # numpy indices are fine
    p.write_bytes(pickle.dumps(g))
    out = load_gnd(p)
    assert out["gnd"][0]["bbx"] is None and out["gnd"][0]["easy"] == [0, 4]


def test_minidev(minidev_dir):
    ds = load_revisitop(minidev_dir, "minidev")
    assert (ds.n_db, ds.n_queries) == (77, 37)
    assert all(p.is_file() for p in ds.db_paths + ds.query_paths)
    assert all(b is not None and len(b) == 4 for b in ds.query_bbx)


@pytest.mark.parametrize("name, n_db", [("roxford5k", 4993), ("rparis6k", 6322)])
def test_real_gnd(revisitop_gnd_dir, name, n_db):
    ds = load_revisitop(revisitop_gnd_dir, name, check_images=False)
    assert ds.n_db == n_db and ds.n_queries == 70
    assert not set(ds.qimlist) & set(ds.imlist)
    assert ds.db_paths[0].name == ds.imlist[0] + ".jpg"
    with pytest.raises(DatasetError, match="missing"):
        load_revisitop(revisitop_gnd_dir, name)


# ------------------------------------------------------------------ distractors

def test_distractors_appended(tmp_path):
    lst = tmp_path / "revisitop1m.txt"
    lst.write_text("jpg/a/b/abc001.jpg\n\n# comment\njpg/a/b/abc002\n")
    ds = load_distractors(lst, tmp_path / "r1m")
    assert ds.ids == ["jpg/a/b/abc001", "jpg/a/b/abc002"]
    assert ds.paths[1] == tmp_path / "r1m" / "jpg" / "a" / "b" / "abc002.jpg"
    ids, paths = combined_database(["db0", "db1"], [Path("x/db0.jpg"), Path("x/db1.jpg")], ds)
    assert ids == ["db0", "db1", "jpg/a/b/abc001", "jpg/a/b/abc002"]
    assert paths[2] == ds.paths[0] and len(paths) == 4
    with pytest.raises(DatasetError, match="equal database ids"):
        combined_database(["jpg/a/b/abc001"], [Path("q.jpg")], ds)
    with pytest.raises(DatasetError, match="missing"):
        load_distractors(lst, tmp_path / "r1m", check_images=True)


@pytest.mark.parametrize("text, match", [("", "empty"), ("a.jpg\na.jpg\n", "duplicates line 1"),
                                         ("/abs/a.jpg\n", "relative"), ("../up.jpg\n", "relative")])
def test_distractor_list_errors(tmp_path, text, match):
    lst = tmp_path / "l.txt"
    lst.write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_distractors(lst, tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load_distractors(tmp_path / "none.txt", tmp_path)


# ------------------------------------------------------------------ collections

def _touch(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_collection_folder(tmp_path):
    for rel in ("b.jpg", "a/z.PNG", "a/y.jpeg", "notes.txt", ".hidden.jpg", ".cache/c.jpg", "a/b/c.webp"):
        _touch(tmp_path / rel)
    c = load_collection(tmp_path)
    assert c.ids == ["a/b/c", "a/y", "a/z", "b"]
    assert c.paths[2] == tmp_path / "a" / "z.PNG"
    flat = load_collection(tmp_path, recursive=False)
    assert flat.ids == ["b"]
    assert load_collection(tmp_path, extensions=("png",)).ids == ["a/z"]
    _touch(tmp_path / "b.png")
    with pytest.raises(DatasetError, match="duplicate id 'b'"):
        load_collection(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_collection(empty)


def test_collection_lists(tmp_path):
    txt = tmp_path / "list.txt"
    txt.write_text("imgs/one.jpg\n\n# skip\n/abs/two.png\n")
    c = load_collection(txt)
    assert c.ids == ["imgs/one", "/abs/two"]
    assert c.paths == [tmp_path / "imgs" / "one.jpg", Path("/abs/two.png")]
    assert load_collection(txt, root="/data").paths[0] == Path("/data/imgs/one.jpg")
    csv1 = tmp_path / "l.csv"
    csv1.write_text("path,id,other\nimgs/a.jpg,A,1\nimgs/b.jpg,B,2\n")
    c = load_collection(csv1)
    assert c.ids == ["A", "B"] and c.paths[1] == tmp_path / "imgs" / "b.jpg"
    csv2 = tmp_path / "n.csv"
    csv2.write_text("path\nx/a.jpg\nx/b.jpg\n")
    assert load_collection(csv2).ids == ["x/a", "x/b"]


@pytest.mark.parametrize("name, text, match", [
    ("d.txt", "a.jpg\nsub/../a.jpg\na.png\n", "duplicate id 'a'"),
    ("e.txt", "\n# only comments\n", "no entries"),
    ("f.csv", "file,id\na.jpg,1\n", "needs a 'path' column"),
    ("g.csv", "path,id\na.jpg,X\nb.jpg,X\n", "duplicate id 'X'"),
    ("h.csv", "path,id\na.jpg,\n", "empty 'id'"),
    ("i.csv", "path\n", "no rows"),
    ("j.json", "[]", "unsupported list file type"),
])
def test_collection_list_errors(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_collection(p)


def test_collection_missing(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_collection(tmp_path / "nope")


# ------------------------------------------------------------------ GLDv2

def test_gldv2_layout():
    assert image_path("/g/train", "abcdef0123") == Path("/g/train/a/b/c/abcdef0123.jpg")
    for bad in ("ab", "../abc", "a/bc", ""):
        with pytest.raises(DatasetError):
            image_path("/g", bad)


def test_gldv2_train_clean_and_train(tmp_path):
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n7,aaa111 aaa222\n3,bbb111\n7000,ccc1 ccc2 ccc3\n")
    tc = gldv2_csv(clean, tmp_path / "img")
    assert tc.ids == ["aaa111", "aaa222", "bbb111", "ccc1", "ccc2", "ccc3"]
    assert [int(tc.class_names[c]) for c in tc.labels] == [7, 7, 3, 7000, 7000, 7000]  # the landmark ids
    assert tc.class_names == ["3", "7", "7000"] and tc.num_classes == 3  # numeric order, not "3" < "7000" < "7"
    assert tc.labels.tolist() == [1, 1, 0, 2, 2, 2]
    assert tc.paths[3] == tmp_path / "img" / "c" / "c" / "c" / "ccc1.jpg"
    assert gldv2_csv(clean).paths[0] == tmp_path / "a" / "a" / "a" / "aaa111.jpg"  # default root: the CSV's folder
    train = tmp_path / "train.csv"
    train.write_text("id,url,landmark_id\nabc1,http://x/1.jpg,5\nabc2,http://x/2.jpg,2\n")
    t = gldv2_csv(train)
    assert t.ids == ["abc1", "abc2"] and t.urls[0] == "http://x/1.jpg" and t.labels.tolist() == [1, 0]


@pytest.mark.parametrize("loader, text, match", [
    (gldv2_csv, "landmark,images\n1,a\n", "missing column"),
    (gldv2_csv, "landmark_id,images\nx,abc\n", "not an integer"),
    (gldv2_csv, "landmark_id,images\n1,\n", "lists no images"),
    (gldv2_csv, "landmark_id,images\n1,abc\n2,abc\n", "appears twice"),
    (gldv2_csv, "landmark_id,images\n", "no images"),
    (gldv2_csv, "id,url,landmark_id\n,u,1\n", "empty id"),
    (gldv2_csv, "id,url\nabc,u\n", "missing column"),
    (gldv2_csv, "landmark_id,images\n1,a/b\n", "invalid GLDv2 image id"),
    (load_image_ids, "name\nabc\n", "missing column"),
    (load_image_ids, "id\nabc\nabc\n", "appears twice"),
    (load_retrieval_solution, "id,images,Usage\nq1,abc,Secret\n", "Usage"),
    (load_retrieval_solution, "id,images,Usage\nq1,None,Private\n", "no relevant"),
    (load_retrieval_solution, "id,images,Usage\nq1,a,Public\nq1,b,Public\n", "twice"),
    (load_retrieval_solution, "id,images\nq1,a\n", "missing column"),
])
def test_gldv2_errors(tmp_path, loader, text, match):
    p = tmp_path / "f.csv"
    p.write_text(text)
    with pytest.raises(DatasetError, match=match):
        loader(p)
    with pytest.raises(DatasetError, match="not found"):
        loader(tmp_path / "none.csv")


def test_gldv2_index_and_solution(tmp_path):
    idx = tmp_path / "index.csv"
    idx.write_text("id\ni001\ni002\ni003\n")
    assert load_image_ids(idx) == ["i001", "i002", "i003"]
    sol = tmp_path / "retrieval_solution_v2.1.csv"
    sol.write_text("id,images,Usage\nq1,i001 i002,Private\nq2,i003,Public\nq3,None,Ignored\nq4,i002,Private\n")
    s = load_retrieval_solution(sol)
    assert s.relevant["q1"] == ["i001", "i002"] and s.relevant["q3"] == []
    assert s.queries("private") == ["q1", "q4"] and s.queries("public") == ["q2"]
    assert s.queries("all") == ["q1", "q2", "q4"]
    with pytest.raises(DatasetError, match="unknown GLDv2 split"):
        s.queries("ignored")
