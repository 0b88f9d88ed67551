"""Image metadata is stripped on ingestion: a photo's EXIF (GPS included), text chunks and comments are not stored,
and its pixels are: byte for byte for PNG, decoded identically for JPEG (no re-encoding)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, PngImagePlugin

from tests.ingestion.test_imports import upload, wait_finished, zip_of
from tests.ingestion.test_push import download

pytestmark = pytest.mark.timeout(180)

GPS_IFD = 0x8825
PARIS = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}


def photo(fmt: str, *, orientation: int = 1, seed: int = 0) -> bytes:
    """A small photo with the metadata a phone writes: camera make and serial, GPS position, a comment."""
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0xA431] = "SERIAL-123456"  # BodySerialNumber
    exif[0x0112] = orientation
    exif.get_ifd(GPS_IFD).update(PARIS)
    gradient = Image.linear_gradient("L").resize((40, 30)).point(lambda v: (v + seed * 37) % 256)
    image = Image.merge("RGB", (gradient, gradient.rotate(90, expand=False), gradient.transpose(0)))
    buffer = io.BytesIO()
    if fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        text.add_text("Location", "12 rue de Rivoli, Paris")
        image.save(buffer, format="PNG", exif=exif, pnginfo=text)
    else:
        image.save(buffer, format="JPEG", exif=exif, comment=b"taken at 12 rue de Rivoli", quality=90)
    raw = buffer.getvalue()
    with Image.open(io.BytesIO(raw)) as check:
        assert dict(check.getexif().get_ifd(GPS_IFD)) == PARIS, "the test photo carries GPS"
    return raw


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


def assert_clean(stored: bytes, original: bytes, fmt: str) -> None:
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == fmt
        exif = image.getexif()
        assert not exif.get_ifd(GPS_IFD), "no GPS"
        assert set(exif) <= {0x0112}, f"only the orientation may remain: {dict(exif)}"
        assert not {"Location", "comment", "xmp"} & set(image.info)
    for secret in (b"Rivoli", b"SERIAL-123456", b"PhoneMaker"):
        assert secret not in stored
    assert pixels(stored) == pixels(original), "pixels unchanged"


def test_a_pushed_jpeg_and_png_come_back_without_gps_exif_and_with_the_same_pixels(tenant) -> None:
    jpeg, png = photo("JPEG", orientation=6), photo("PNG")
    pushed = tenant.push(
        tenant.images["id"],
        [{"image": base64.b64encode(jpeg).decode(), "label": "cat"}, {"image": base64.b64encode(png).decode()}],
    )
    assert pushed.status_code == 200, pushed.get_json()
    stored_jpeg, stored_png = (download(tenant, item["item_id"]) for item in pushed.get_json()["items"])
    assert_clean(stored_jpeg, jpeg, "JPEG")
    assert_clean(stored_png, png, "PNG")
    with Image.open(io.BytesIO(stored_jpeg)) as image:
        assert image.getexif()[0x0112] == 6, "the orientation stays, so the photo still displays upright"
    with Image.open(io.BytesIO(stored_png)) as before, Image.open(io.BytesIO(png)) as after:
        assert before.tobytes() == after.tobytes() and before.mode == after.mode
    # What was removed is on the item record; the item's size and hash are of the stored bytes.
    item = tenant.service.client.get(
        f"/v1/items/{pushed.get_json()['items'][0]['item_id']}", headers=tenant.headers
    ).get_json()
    assert item["redactions"] == {"exif": 1, "comment": 1} and item["size"] == len(stored_jpeg)


def test_multipart_uploads_and_zip_imports_are_stripped_too(tenant, worker) -> None:
    jpeg = photo("JPEG", seed=1)
    multipart = tenant.service.client.post(
        f"/v1/datasets/{tenant.images['id']}/items",
        data={"files": [(io.BytesIO(jpeg), "holiday.jpg")]},
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert multipart.status_code == 200, multipart.get_json()
    assert_clean(download(tenant, multipart.get_json()["items"][0]["item_id"]), jpeg, "JPEG")

    png = photo("PNG", seed=2)
    response = upload(tenant, tenant.images["id"], zip_of({"dog/beach.png": png}), "application/zip")
    assert response.status_code == 202, response.get_json()
    with worker("ingestion"):
        done = wait_finished(tenant, response.get_json()["id"])
    assert done["accepted"] == 1, done
    items = tenant.service.client.get(
        f"/v1/datasets/{tenant.images['id']}/items?label=dog", headers=tenant.headers
    ).get_json()["items"]
    assert_clean(download(tenant, items[0]["id"]), png, "PNG")


def _variant(kind: str) -> bytes:
    exif = Image.Exif()
    exif[0xA431] = "SERIAL-123456"
    exif.get_ifd(GPS_IFD).update(PARIS)
    image = Image.effect_noise((48, 32), 64).convert("RGB")
    buffer = io.BytesIO()
    if kind == "progressive-jpeg":
        image.save(buffer, format="JPEG", exif=exif, progressive=True, restart_marker_rows=1)
    elif kind == "jpeg-with-trailing-data":
        image.save(buffer, format="JPEG", exif=exif)
        buffer.write(b"SERIAL-123456 appended after the end of the image")
    elif kind == "webp":
        image.save(buffer, format="WEBP", lossless=True, exif=exif, xmp=b"<x:xmpmeta>Rivoli</x:xmpmeta>")
    else:
        frames = [Image.new("RGB", (16, 16), (80 * i, 10, 10)) for i in range(3)]
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0, comment=b"Rivoli")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["progressive-jpeg", "jpeg-with-trailing-data", "webp", "animated-gif"])
def test_other_layouts_and_formats_lose_their_metadata_too(tenant, kind: str) -> None:
    original = _variant(kind)
    assert b"Rivoli" in original or b"SERIAL-123456" in original
    pushed = tenant.push(tenant.images["id"], [{"image": base64.b64encode(original).decode()}])
    assert pushed.status_code == 200, pushed.get_json()
    stored = download(tenant, pushed.get_json()["items"][0]["item_id"])
    assert b"Rivoli" not in stored and b"SERIAL-123456" not in stored
    with Image.open(io.BytesIO(stored)) as clean, Image.open(io.BytesIO(original)) as before:
        assert not clean.getexif().get_ifd(GPS_IFD)
        assert getattr(clean, "n_frames", 1) == getattr(before, "n_frames", 1)
        for frame in range(getattr(before, "n_frames", 1)):
            before.seek(frame)
            clean.seek(frame)
            assert clean.convert("RGB").tobytes() == before.convert("RGB").tobytes(), f"frame {frame}"
