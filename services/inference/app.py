"""The inference service: ONNX Runtime serving (KServe v2 + a friendly predict API), the prediction log and
feedback. `create_app()` is one HTTP process: it loads what the registry serves and keeps it current (see
`promotions.py`). Inference runs no Celery worker: `model.promoted` is broadcast to every replica and heard by
each HTTP process itself, and `prediction.labeled` (ground truth) is consumed from the inference queue by each
HTTP process too (`ground_truth.py`); monitoring runs on a schedule inside them (`policies.py`)."""

from __future__ import annotations

import multiprocessing.util
import weakref
from typing import Any

from flask import Flask

from services.inference import api, monitoring_api, predict_wsgi, v2, v2_wsgi
from services.inference.config import InferenceConfig
from services.inference.models import Base
from services.inference.server import InferenceServer
from shared.runtime import ServiceSpec, create_http_app
from shared.settings import Settings

SPEC = ServiceSpec(
    name="inference",
    title="Flywheel inference API",
    metadata=Base.metadata,
    blueprints=[api.models, api.feedback, monitoring_api.predictions, monitoring_api.monitoring, v2.blp],
    runs_worker=False,
)


def create_app(settings: Settings | None = None, config: InferenceConfig | dict[str, Any] | None = None) -> Flask:
    """One HTTP process (granian calls it as a factory: `granian --interface wsgi --factory
    services.inference.app:create_app`). `config` overrides the inference defaults (tests, benchmarks); a
    deployment sets them with INFERENCE_* variables."""
    app = create_http_app(SPEC, settings)
    app.register_blueprint(v2.fallback)
    runtime = app.extensions["flywheel"]
    server = InferenceServer(runtime, InferenceConfig.from_settings(runtime.settings, config))
    app.extensions["inference"] = server
    # The two routes that carry a replica's traffic are answered before Flask's dispatch, identically (see
    # predict_wsgi and v2_wsgi); v2 inference, the hot path of tensors, goes first.
    if server.config.predict_wsgi_route:
        predict_wsgi.install(app, server)
    if server.config.v2_wsgi_route:
        v2_wsgi.install(app, server)
    server.start()
    runtime.on_close(server.close)
    # Write the buffered prediction log when the process ends. granian's workers leave through
    # multiprocessing, which skips `atexit` but runs multiprocessing's finalizers; those also run at a normal
    # interpreter exit (gunicorn, a test process), so this one hook serves every server.
    multiprocessing.util.Finalize(None, _close_at_exit, args=(weakref.ref(server),), exitpriority=10)
    return app


def _close_at_exit(server: weakref.ref[InferenceServer]) -> None:
    alive = server()
    if alive is not None:
        alive.close()
