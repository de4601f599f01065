"""The end-to-end demo a fresh install can run: build a small revisitop-layout dataset from photos
that ship with installable packages (scikit-image's CC0 samples; generated scenes when absent),
extract descriptors with a real pretrained preset, rank, evaluate, and write an HTML page of ranked
thumbnails.

Each photo gives one query view and three database views (two mild warps: "easy"; one strong
crop/perspective/occlusion: "hard"), all made by :mod:`irkit.data.synthetic_pairs`; generated
textured scenes are added as distractors.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from irkit.data.photo_sources import locate_photo_pool
from irkit.data.synthetic_pairs import ViewConfig, make_textured_scene, random_view
from irkit.errors import DatasetError
from irkit.io.images import load_image, resize_max_side
from irkit.utils import atomic_path

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
MILD = ViewConfig(crop_frac=(0.75, 0.95), max_rotation_deg=8.0, max_perspective=0.06, occlusion_prob=0.2)
STRONG = replace(MILD, crop_frac=(0.5, 0.7), max_rotation_deg=20.0, max_perspective=0.15, occlusion_prob=0.7)


def demo_photos() -> list[np.ndarray]:
    """Real photos from installed packages, or generated scenes (with a warning) when none are."""
    try:
        paths = locate_photo_pool("auto", min_images=4)
        return [resize_max_side(load_image(p), 512) for p in paths]
    except DatasetError as err:
        log.warning("no sample photos installed (%s); using generated scenes. "
                    "`pip install scikit-image` gives real photos.", err)
        return [make_textured_scene((384, 512), rng=i) for i in range(12)]


def _save(img: np.ndarray, path: Path) -> None:
    with atomic_path(path, suffix=".jpg") as tmp:
        Image.fromarray(img).save(tmp, format="JPEG", quality=92)


def build_demo_dataset(out_dir: str | Path, photos: list[np.ndarray] | None = None,
                       n_distractors: int = 10, seed: int = 0) -> Path:
    """Write ``out_dir/demo/{gnd_demo.pkl, jpg/}`` and return ``out_dir`` (the data dir)."""
    out_dir = Path(out_dir)
    jpg = out_dir / DEMO_NAME / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    photos = demo_photos() if photos is None else photos
    rng = np.random.default_rng(seed)
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict] = []
    for i, photo in enumerate(photos):
        query = random_view(photo, rng, MILD).image
        qimlist.append(f"query_{i:03d}")
        _save(query, jpg / f"{qimlist[-1]}.jpg")
        entry = {"bbx": [0.0, 0.0, float(query.shape[1]), float(query.shape[0])], "easy": [], "hard": [], "junk": []}
        for kind, cfg in (("easy", MILD), ("easy", MILD), ("hard", STRONG)):
            entry[kind].append(len(imlist))
            imlist.append(f"photo{i:03d}_{kind}{len(entry[kind])}")
            _save(random_view(photo, rng, cfg).image, jpg / f"{imlist[-1]}.jpg")
        gnd.append(entry)
    for j in range(n_distractors):
        imlist.append(f"distractor_{j:03d}")
        _save(make_textured_scene((384, 512), rng=1000 + j), jpg / f"{imlist[-1]}.jpg")
    with atomic_path(out_dir / DEMO_NAME / f"gnd_{DEMO_NAME}.pkl") as tmp:
        tmp.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return out_dir
