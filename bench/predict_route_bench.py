"""Issue #23's text target: `python -m bench.v2_route_bench --text`, under its own name for `make bench`.

The friendly API's `:predict` through its plain WSGI route and through Flask, MiniLM with one raw text per
request, each beside raw ONNX Runtime; writes bench/results/predict_route.json. See bench/v2_route_bench.py.
"""

from __future__ import annotations

import sys

from bench.v2_route_bench import main as route_main


def main(argv: list[str] | None = None) -> int:
    return route_main(["--text", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
