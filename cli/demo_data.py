"""The demo's real data, made from what ships with the dependencies (nothing is downloaded).

- Images: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale scans, UCI ML repository),
  upscaled to 32x32 PNGs, labels "0".."9".
- Text: every paragraph of every docstring in four packages of the Python standard library (asyncio,
  email, logging, xml), labeled with the package it documents: a real topic-classification task over
  technical English (~1,550 items; doctest examples are left out, they are code, not English).
- Entities: synthetic sentences for named-entity recognition. The `faker` package gives real-looking but
  invented people, companies, cities and dates (in English, French, German and Spanish locales, so names carry
  accents); the sentence templates are ours (`ENTITY_TEMPLATES`, `HELD_OUT_ENTITY_TEMPLATES`), and every
  entity's character offsets are known by construction. Labels PER, ORG, LOC, DATE.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import random
import warnings

TEXT_LABELS = ("asyncio", "email", "logging", "xml")
ENTITY_LABELS = ("PER", "ORG", "LOC", "DATE")
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


# Sentence templates for the entity dataset, written for it: {PER}, {ORG}, {LOC}, {DATE} are filled by faker.
# HELD_OUT_ENTITY_TEMPLATES share no template with ENTITY_TEMPLATES: a model scored on them must have learned the
# entities, not the sentences around them.
ENTITY_TEMPLATES = (
    "{PER} joined {ORG} in {LOC} on {DATE}.",
    "On {DATE}, {ORG} opened a new office in {LOC}.",
    "{PER} was born in {LOC}.",
    "The contract between {ORG} and {ORG} was signed on {DATE}.",
    "According to {PER}, {ORG} will leave {LOC} next year.",
    "{PER} met {PER} at the {ORG} headquarters in {LOC}.",
    "Shares of {ORG} fell sharply on {DATE}.",
    "{PER} moved from {LOC} to {LOC} after the merger.",
    "Yesterday {PER} announced that {ORG} had hired her.",
    "The conference in {LOC} starts on {DATE}.",
    "{ORG} appointed {PER} as chief financial officer.",
    "Flights from {LOC} were cancelled on {DATE}.",
    "In an interview, {PER} praised the engineers of {ORG}.",
    "{PER} has lived in {LOC} since {DATE}.",
    "A spokesperson for {ORG} declined to comment.",
    "{PER} and {PER} founded {ORG} together.",
    "Police in {LOC} are looking for {PER}.",
    "The report from {ORG} was published on {DATE} in {LOC}.",
    "{LOC}, {DATE}: {ORG} confirmed the deal.",
    "The chairman of {ORG}, {PER}, spoke in {LOC}.",
    "{PER}, a lawyer from {LOC}, represents {ORG}.",
    "Since {DATE}, {PER} runs the {LOC} branch of {ORG}.",
    "We spoke to {PER} in {LOC}.",
    "{ORG} bought {ORG} for an undisclosed sum.",
    "Born on {DATE} in {LOC}, {PER} studied law.",
    "Tickets for the show in {LOC} go on sale on {DATE}.",
    "{PER} left {ORG} on {DATE} to start a company.",
    "Residents of {LOC} told {PER} that the factory of {ORG} was closing.",
    "It rained in {LOC} for most of {DATE}.",
    "{PER} will replace {PER} at {ORG}.",
    "Employees of {ORG} marched through {LOC} on {DATE}.",
    "Thanks to {PER}, the {LOC} office of {ORG} stayed open.",
    "{ORG} reported strong sales in {LOC} and {LOC}.",
    "Ask {PER} about the meeting on {DATE}.",
    "The new CEO of {ORG} is {PER}.",
    "{PER} drove from {LOC} to visit {PER}.",
    "{PER} worked at {ORG} for ten years.",
    "The talks in {LOC} lasted for hours.",
)
HELD_OUT_ENTITY_TEMPLATES = (
    "Last week {PER} visited the {ORG} plant near {LOC}.",
    "{ORG} said on {DATE} that profits had doubled.",
    "After leaving {LOC}, {PER} settled down in {LOC}.",
    "Investors expect {ORG} to announce results on {DATE}.",
    "{PER} signed with {ORG} for three more years.",
    "{PER}, the new mayor, arrived in {LOC} on {DATE}.",
    "Customers of {ORG} in {LOC} lost power for hours.",
    "{PER} thanked {PER} for the invitation.",
)
_ENTITY_LOCALES = ("en_US", "en_GB", "fr_FR", "de_DE", "es_ES")


def _company(fake: object) -> str:
    """A faker company; one that is a bare surname ("Bruder", "Guyon") gets its locale's legal suffix, so that it
    reads as a company in any sentence."""
    name = fake.company()
    if " " not in name and "-" not in name:
        name = f"{name} {fake.company_suffix()}"
    return name


def entity_sentences(
    count: int, *, seed: int = 7, templates: tuple[str, ...] = ENTITY_TEMPLATES
) -> list[tuple[str, list[dict]]]:
    """`count` synthetic sentences, each `(text, spans)` with spans `{start, end, label}` in code points."""
    from faker import Faker

    fake = Faker(list(_ENTITY_LOCALES))
    fake.seed_instance(seed)
    rng = random.Random(seed)  # noqa: S311 - reproducible demo data, not secrets
    fill = {
        "PER": lambda: fake[rng.choice(_ENTITY_LOCALES)].name(),
        "ORG": lambda: _company(fake[rng.choice(_ENTITY_LOCALES)]),
        "LOC": lambda: fake[rng.choice(_ENTITY_LOCALES)].city(),
        "DATE": lambda: fake.date_between("-30y", "+2y").strftime(rng.choice(("%B %d, %Y", "%d %B %Y", "%Y-%m-%d"))),
    }
    sentences: list[tuple[str, list[dict]]] = []
    seen: set[str] = set()
    while len(sentences) < count:
        template = rng.choice(templates)
        text, spans, rest = "", [], template
        while "{" in rest:
            before, _, after = rest.partition("{")
            label, _, rest = after.partition("}")
            text += before
            value = fill[label]()
            spans.append({"start": len(text), "end": len(text) + len(value), "label": label})
            text += value
        text += rest
        if text not in seen:
            seen.add(text)
            sentences.append((text, spans))
    return sentences
