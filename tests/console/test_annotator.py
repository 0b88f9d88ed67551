"""Annotators label in the browser with the keyboard, and their labels land in the labeling API."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from shared.client import answer_or_none
from tests.console.conftest import picture, sign_in
from tests.helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, 255 - shade, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def partner_with_dataset(console: dict[str, Any], name: str, task_type: str, labels: list[str], items: list[dict]):
    """A partner whose dataset holds `items` (unlabeled), an annotator for it, once labeling has its tasks."""
    operator = console["operator"]
    issued = operator.ingestion.create_partner(name)
    partner = operator.with_token(issued["api_key"])
    dataset = partner.ingestion.create_dataset(name, task_type, labels, overlap=1)["id"]
    eventually(lambda: answer_or_none(lambda: partner.labeling.dataset(dataset)), what="labeling to learn of it")
    assert partner.ingestion.push(dataset, items)["accepted"] == len(items)
    eventually(lambda: len(partner.labeling.tasks(dataset)) == len(items), what="a task per item")
    annotator = operator.labeling.create_annotator(issued["partner"]["id"], f"{name}-annotator", [dataset])
    return partner, dataset, annotator["token"]


def done_labels(partner: Any, dataset: str) -> list[str]:
    return sorted(task["consensus_label"] for task in partner.labeling.tasks(dataset) if task["status"] == "done")


def test_an_annotator_labels_text_and_image_tasks_with_the_keyboard(console, open_page) -> None:
    texts = [{"text": "the parcel arrived broken"}, {"text": "lovely service, thank you"}]
    partner, dataset, token = partner_with_dataset(console, "reviews", "text_classification", ["neg", "pos"], texts)
    images = [{"image": png(20)}, {"image": png(220)}]
    _, image_dataset, image_token = partner_with_dataset(
        console, "shades", "image_classification", ["dark", "light"], images
    )

    page = open_page(console["url"])
    sign_in(page, token)
    page.click(f"[data-dataset='{dataset}']")
    first = page.locator("[data-role=text]").inner_text()
    picture(page, "annotate-text")
    assert first in {item["text"] for item in texts}
    page.keyboard.press("1")  # neg
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('[data-role=text]')?.innerText !== {first!r}")
    page.keyboard.press("2")  # pos
    assert page.locator("[data-role=labels] button.selected").inner_text().endswith("pos")
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-role=empty]")
    assert page.locator("[data-figure=annotations]").inner_text() == "2"
    assert done_labels(partner, dataset) == ["neg", "pos"]

    phone = open_page(console["url"], width=390, height=844)  # a phone-sized screen, its own session
    sign_in(phone, image_token)
    phone.click(f"[data-dataset='{image_dataset}']")
    image = phone.wait_for_selector("[data-role=image]")
    picture(phone, "annotate-image-phone")
    assert image.evaluate("img => img.complete && img.naturalWidth") == 32
    box = image.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, "the image fits the phone's screen"
    skipped = phone.locator(".task").get_attribute("data-task")
    phone.keyboard.press("s")  # skipped: back to the queue for others, never handed to this annotator again
    phone.wait_for_function(f"document.querySelector('.task').dataset.task !== {skipped!r}")
    phone.wait_for_selector("[data-role=image]")
    phone.keyboard.press("2")
    phone.keyboard.press("Enter")
    phone.wait_for_selector("[data-role=empty]")
    assert phone.locator("[data-figure=skips]").inner_text() == "1"
    tasks = partner.labeling.tasks(dataset)
    assert all(task["status"] == "done" for task in tasks)


def test_a_wrong_token_is_refused_with_the_apis_message(console, open_page) -> None:
    page = open_page(console["url"])
    sign_in(page, "fwa_not-a-real-token")
    error = page.wait_for_selector(".field-error")
    picture(page, "sign-in-refused")
    assert "not accepted" in error.inner_text() and "invalid or deactivated annotator token" in error.inner_text()
    assert page.evaluate("sessionStorage.getItem('flywheel.token')") is None
    sign_in(page, "fwk_wrong-partner-key")
    page.wait_for_function("document.querySelector('.field-error')?.innerText.includes('not accepted')")
    assert page.url.endswith("/console/") or "#/sign-in" in page.url or page.url.endswith("#/")


def test_an_annotator_marks_entity_spans_with_the_keyboard(console, open_page) -> None:
    text = "🎉 Ada Lovelace visited Zürich."  # the emoji is one character to the API, two UTF-16 units to a browser
    items = [{"text": text}]
    partner, dataset, token = partner_with_dataset(console, "people", "token_classification", ["PER", "LOC"], items)

    page = open_page(console["url"])
    sign_in(page, token)
    page.click(f"[data-dataset='{dataset}']")
    page.wait_for_selector("[data-role=span-text]")
    for key in ("ArrowRight", "Shift+ArrowRight", "1", "ArrowRight", "ArrowRight", "2"):
        page.keyboard.press(key)  # Ada Lovelace → PER, Zürich → LOC
    assert page.locator("[data-role=spans] li").count() == 2
    page.keyboard.press("z")  # undo LOC …
    assert page.locator("[data-role=spans] li").count() == 1
    page.keyboard.press("2")  # … and mark it again
    page.keyboard.press("1")  # Zürich is already a LOC: an overlapping span is refused, with the reason
    assert "overlaps the LOC span" in page.locator(".form-error").inner_text()
    assert page.locator("[data-role=spans] li").count() == 2
    picture(page, "annotate-spans")
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-role=empty]")

    (task,) = partner.labeling.tasks(dataset)
    assert task["status"] == "done"
    assert task["consensus_spans"] == [
        {"start": 2, "end": 14, "label": "PER"},
        {"start": 23, "end": 29, "label": "LOC"},
    ]
    assert [text[s["start"] : s["end"]] for s in task["consensus_spans"]] == ["Ada Lovelace", "Zürich"]
