"""Fixtures the tests and the benchmarks share (``tests/`` and ``bench/`` import it; it imports the product).

- ``testkit.processes``: free ports, child processes started and stopped by process group, readiness waits;
- ``testkit.wsgi``: a WSGI app served on a loopback socket in a thread;
- ``testkit.s3``: a real S3 endpoint (moto's server), in this process or in a child process of its own;
- ``testkit.models``: model version folders: ``metadata.json`` writers and the ONNX export;
- ``testkit.serving``: model versions in object storage, the registry stand-in, reading ``/metrics``.
"""
