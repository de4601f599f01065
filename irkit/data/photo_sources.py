"""Where to find real photos for self-supervised training on a fresh machine.

No dataset can be downloaded from the web here, but a few packages from the ordinary registries
ship photographs. This module knows those packages, finds them where they install, and applies a
curated whitelist (photographs only, one image per scene so no two "different" photos show the
same thing) minus every file that the minidev evaluation set was built from (minidev is
evaluation-only; its distractors come from opencv-doc's examples/data and darknet's data).

Sources (install with the ordinary client; licenses as their packages state them):

* ``skimage``: PyPI ``scikit-image`` (``skimage/data``): 18 photos, CC0 / public domain
  (astronaut, chelsea, coffee, rocket, hubble, ...). The default: installable anywhere by pip.
* ``mate-backgrounds``: Debian ``mate-backgrounds`` (``/usr/share/backgrounds/mate/nature``):
  12 nature photos, GPL-2+ (per debian/copyright).
* ``opencv-doc``: Debian ``opencv-doc`` (``/usr/share/doc/opencv-doc/examples/data``): the few
  photos not used by minidev, one per stereo/flow pair; provenance of individual images varies.
* ``matplotlib``: PyPI ``matplotlib`` sample data: one photo (grace_hopper.jpg, public domain).
"""
from __future__ import annotations

import importlib.util
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from irkit.data.synthetic_pairs import _excluded
from irkit.errors import DatasetError

log = logging.getLogger(__name__)

#: opencv-doc sample images that minidev uses (its ``ocv_*`` pairs and ``distractor_distractors_*``)
#: or that are edits of those (ela_modified is ela_original retouched): never train on them.
MINIDEV_OPENCV_SOURCES: tuple[str, ...] = (
    "graf*", "box", "box_in_scene", "leuven*", "aero*", "HappyFish", "apple", "baboon", "board",
    "building", "butterfly", "ela_original", "ela_modified", "fruits", "home", "licenseplate_motion",
    "messi5", "orange", "smarties", "squirrel_cls", "stuff", "sudoku", "scream",
    # darknet's data (minidev distractors) in case such files sit in a pool
    "dog", "eagle", "giraffe", "horses", "kite", "person",
)


def _package_dir(module: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


@dataclass(frozen=True)
class PhotoSource:
    """A package that ships photos: where they install and which files are usable for training."""

    name: str
    install: str          # how to get it: "pip install scikit-image", "apt-get install mate-backgrounds"
    license: str
    locate: Callable[[], Path | None]
    files: tuple[str, ...]  # whitelist of file names inside the folder

    def folder(self) -> Path | None:
        """The installed folder, or None when the package is absent."""
        d = self.locate()
        return d if d is not None and d.is_dir() else None

    def photos(self, exclude: Iterable[str] = ()) -> list[Path]:
        """Installed whitelisted photos minus ``exclude`` and minidev's sources ([] when absent)."""
        d = self.folder()
        if d is None:
            return []
        pats = list(MINIDEV_OPENCV_SOURCES) + [str(e) for e in exclude]
        return [d / f for f in self.files if (d / f).is_file() and not _excluded(d / f, pats)]


SOURCES: dict[str, PhotoSource] = {
    "skimage": PhotoSource(
        "skimage", "pip install scikit-image", "CC0 / public domain (per skimage.data docstrings)",
        lambda: _package_dir("skimage", "data"),
        ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
         "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
         "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")),
    "mate-backgrounds": PhotoSource(
        "mate-backgrounds", "apt-get install mate-backgrounds", "GPL-2+ (debian/copyright)",
        lambda: Path("/usr/share/backgrounds/mate/nature"),
        ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
         "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg")),
    "opencv-doc": PhotoSource(
        "opencv-doc", "apt-get install opencv-doc", "BSD-3-Clause package; image provenance varies",
        lambda: Path("/usr/share/doc/opencv-doc/examples/data"),
        ("Blender_Suzanne1.jpg", "aloeL.jpg", "basketball1.png", "chicky_512.png", "pca_test1.jpg",
         "rubberwhale1.png", "starry_night.jpg", "text_defocus.jpg")),
    "matplotlib": PhotoSource(
        "matplotlib", "pip install matplotlib", "public domain (US Navy photo)",
        lambda: _package_dir("matplotlib", "mpl-data", "sample_data"), ("grace_hopper.jpg",)),
}


def minidev_exclusions(gnd_pkl: str | Path | None = None) -> list[str]:
    """Names to exclude from a training pool so it shares no photo with minidev.

    The built-in list, plus (when ``gnd_pkl`` is given) the source names recovered from minidev's
    ``distractor_<folder>_<name>`` entries and every image name of its imlist and qimlist.
    """
    out = list(MINIDEV_OPENCV_SOURCES)
    if gnd_pkl is not None:
        try:
            with open(gnd_pkl, "rb") as fh:
                gnd = pickle.load(fh)
            names = list(gnd["imlist"]) + list(gnd["qimlist"])
        except (OSError, KeyError, pickle.UnpicklingError, EOFError) as exc:
            raise DatasetError(f"cannot read minidev ground truth {gnd_pkl}: {exc}") from exc
        for n in names:
            out.append(n)
            if n.startswith("distractor_distractors_"):
                out.append(n[len("distractor_distractors_"):])
    return sorted(set(out))


def locate_photo_pool(sources: Sequence[str] | str = "auto", exclude: Iterable[str] = (),
                      min_images: int = 2) -> list[Path]:
    """Real training photos installed on this machine (never minidev's images).

    ``sources``: names from ``SOURCES`` or "auto" (every installed one). Raises DatasetError saying
    which package to install when fewer than ``min_images`` photos are found.
    """
    names = list(SOURCES) if sources == "auto" else ([sources] if isinstance(sources, str) else list(sources))
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise DatasetError(f"unknown photo source(s) {unknown}; known: {', '.join(SOURCES)}")
    pool: list[Path] = []
    for n in names:
        found = SOURCES[n].photos(exclude)
        log.debug("photo source %s: %d photos", n, len(found))
        pool.extend(found)
    if len(pool) < min_images:
        hints = "; ".join(f"{SOURCES[n].name}: {SOURCES[n].install}" for n in names)
        raise DatasetError(f"found {len(pool)} training photos (need {min_images}) in sources {names}; "
                           f"install one ({hints}) or pass your own folder to photo_pool()")
    return pool
