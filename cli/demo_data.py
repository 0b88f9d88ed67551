"""The demo's real data, made from what ships with the dependencies (nothing is downloaded).

- Images: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale scans, UCI ML repository),
  upscaled to 32x32 PNGs, labels "0".."9".
- Text: every paragraph of every docstring in four packages of the Python standard library (asyncio,
  email, logging, xml), labeled with the package it documents: a real topic-classification task over
  technical English (~1,550 items; doctest examples are left out, they are code, not English).
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import random
import warnings

TEXT_LABELS = ("asyncio", "email", "logging", "xml")
DIGIT_LABELS = tuple(str(d) for d in range(10))


def digit_images(size: int = 32) -> list[tuple[bytes, str]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    items = []
    for pixels, target in zip(digits.images, digits.target, strict=True):
        image = Image.fromarray((pixels * (255 / 16)).astype("uint8"), mode="L").resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        items.append((buffer.getvalue(), str(int(target))))
    return items


def stdlib_docstrings(min_chars: int = 30, max_chars: int = 400) -> list[tuple[str, str]]:
    items: dict[str, str] = {}
    for label in TEXT_LABELS:
        for paragraph in sorted(_docstrings(label, min_chars, max_chars)):
            items.setdefault(paragraph, label)  # a paragraph documented in two packages keeps its first label
    return sorted(items.items())


def _docstrings(package: str, min_chars: int, max_chars: int) -> set[str]:
    root = importlib.import_module(package)
    names = [package] + [
        info.name
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.", onerror=lambda _name: None)
        if "test" not in info.name and not info.name.endswith("__main__")
    ]
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: S112 - a module that cannot import on this platform has no docs to give
                continue
            objects = [
                obj for _, obj in inspect.getmembers(module) if getattr(obj, "__module__", None) == module.__name__
            ]
            for obj in list(objects):
                if inspect.isclass(obj):
                    # Only methods the package defines: an imported library may patch its own onto a class
                    # (transformers adds `warning_once` to logging.Logger), which would make the data depend on
                    # what was imported before.
                    objects += [
                        v
                        for k, v in vars(obj).items()
                        if not k.startswith("_") and callable(v) and _defined_in(v, package)
                    ]
            for obj in objects:
                for block in (inspect.getdoc(obj) or "").split("\n\n"):
                    paragraph = " ".join(block.split())
                    if min_chars <= len(paragraph) <= max_chars and not paragraph.startswith(">>>"):
                        found.add(paragraph)
    return found


def _defined_in(obj: object, package: str) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == package or module.startswith(f"{package}.")


def shuffled(items: list, seed: int = 7) -> list:
    copy = list(items)
    random.Random(seed).shuffle(copy)  # noqa: S311 - a reproducible demo order, not a secret
    return copy
