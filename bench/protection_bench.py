"""What data protection costs on the hot path, in process: image metadata stripping per pushed photo, and the key
check (cached verification, expiry and scope) per request.

    python -m bench.protection_bench            # three photo sizes, 9 repeats each: about a minute on 2 cores
    python -m bench.protection_bench --quick    # two sizes, 3 repeats: a few seconds

- images: for a JPEG (with EXIF, GPS and a comment, as a phone writes it) and a PNG (with eXIf and a text chunk) at
  each size, the time of `inspect_image` (what ingestion did before: validation, one full decode) and of
  `prepare_image` (validation, stripping, and the check that the stripped image decodes to the same size: a
  second full decode), per image; the difference is what stripping adds to a push.
- keys: `KeyVerifier.verify` of a cached key (the common case: one SHA-256, a cache hit, the expiry check) plus
  `check_scope`, per call.

Results go to bench/results/protection.json; docs/security.md quotes them.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image, PngImagePlugin

from bench.common import Progress, Stats, describe_machine, machine, write_results
from services.ingestion.images import inspect_image, prepare_image
from shared.auth import KeyVerifier, Principal, check_scope, hash_api_key
from shared.tables import NUMBERS, print_table

SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080), "4000x3000": (4000, 3000)}
QUICK_SIZES = ("640x480", "1920x1080")


def photo(fmt: str, size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x0112] = 6
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    buffer = io.BytesIO()
    if fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        text.add_text("Location", "12 rue de Rivoli")
        image.save(buffer, format="PNG", exif=exif, pnginfo=text)
    else:
        image.save(buffer, format="JPEG", exif=exif, comment=b"holiday", quality=90)
    return buffer.getvalue()


def per_call(function: Callable[[], Any], repeats: int, calls: int = 1) -> Stats:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - started) / calls)
    return Stats.of(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 repeats (a few seconds)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 9
    progress = Progress()
    info = machine()
    print(describe_machine(info))
    rows, results = [], {}
    for name in QUICK_SIZES if args.quick else tuple(SIZES):
        for fmt in ("JPEG", "PNG"):
            data = photo(fmt, SIZES[name])
            before = per_call(lambda data=data: inspect_image(data), repeats)
            after = per_call(lambda data=data: prepare_image(data), repeats)
            stripped = prepare_image(data)[1]
            added = after.median - before.median
            results[f"{fmt}-{name}"] = {
                "bytes": len(data),
                "stripped_bytes": len(stripped),
                "inspect_s": before,
                "prepare_s": after,
                "added_s": added,
            }
            rows.append(
                [
                    f"{fmt} {name}",
                    f"{len(data):,}",
                    f"{len(data) - len(stripped):,}",
                    f"{before.median * 1000:.1f}",
                    f"{after.median * 1000:.1f}",
                    f"{added * 1000:+.1f}",
                    f"{after.median / before.median:.2f}x",
                ]
            )
            progress(f"{fmt} {name} done")
    headers = ["image", "bytes", "removed", "inspect ms", "prepare ms", "added ms", "ratio"]
    print_table(headers, rows, align=NUMBERS, rule=True)

    key = "fwk_bench"
    principal = Principal("ptn_bench", "key_bench", expires_at=datetime.now(UTC) + timedelta(days=1))
    verifier = KeyVerifier(lambda digest: principal if digest == hash_api_key(key) else None, ttl_seconds=3600)

    def check() -> None:
        check_scope(verifier.verify(key), "push")

    keys = per_call(check, repeats, calls=20_000)
    results["key_check_s"] = keys
    print(f"key check (cached verify + expiry + scope): {keys.median * 1e6:.2f} µs per request")
    write_results("protection", {"machine": info, "quick": args.quick, "results": results})
    progress("bench/results/protection.json written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
