"""Offline target tasks built from real images on the machine, written as an ImageFolder a user's own task
would be (``root/{train,test}/<class>/*.png``), so they go through the same loader, checks and recipe.

``font_digits``: the digits 0-9 rendered in every TTF/OTF font found (Debian: DejaVu, 22 faces), ``per_font``
seeded jitters each (size 16-22 px, rotation +-12 deg, shear +-0.2, shift +-2 px; ``zoo.domains._glyph``),
28x28 grayscale, white on black. Whole fonts are held out for the test split (about 20%: the test fonts are
unseen in training). With 22 fonts and ``per_font=8``: 1,440 train and 320 test images. It is not a zoo
source domain (the zoo's ``font_glyphs`` are the letters A-Z), so no demo source saw these labels.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

GLYPH_TASK_VERSION = 1  # bump when the rendering or the split changes: an older folder is rebuilt


def build_font_digits(root: Path, per_font: int = 8, seed: int = 0, test_fraction: float = 0.2) -> dict:
    """Write the ``font_digits`` ImageFolder under ``root`` (a no-op when ``root/task.json`` says the same
    build); returns that manifest: ``{"version", "per_font", "seed", "train", "test", "fonts", "description"}``
    (counts in images).

    The folder is written beside ``root`` and renamed into place, so an interrupted build leaves no partial
    task (a stale temporary folder is ignored and overwritten later).

    Raises:
        DataError: no font found (names the package to install).
    """
    from PIL import Image

    from orchestrator.demo.zoo_domains import load_font_glyphs, split_domain

    root = Path(root)
    want = {"version": GLYPH_TASK_VERSION, "per_font": per_font, "seed": seed, "test_fraction": test_fraction}
    manifest = root / "task.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want:
            return have
    d = load_font_glyphs(per_font=per_font, seed=seed, letters="0123456789")  # (N, 28, 28) uint8
    train, test = split_domain(d, test_fraction=test_fraction, seed=seed)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    for split, idx in (("train", train), ("test", test)):
        for c in d.classes:
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(d.images[i]).save(tmp / split / d.classes[d.labels[i]] / f"{i:05d}.png")
    info = {**want, "train": int(len(train)), "test": int(len(test)),
            "fonts": int(len(np.unique(d.groups))),
            "description": d.description.replace("letters 0-9", "the digits 0-9", 1)}
    (tmp / "task.json").write_text(json.dumps(info, indent=1))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return info


__all__ = ["build_font_digits", "GLYPH_TASK_VERSION"]
