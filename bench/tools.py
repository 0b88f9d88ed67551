"""The benchmark's own tools (py-spy, a peer model server), each in a virtualenv of its own, never the project's.

A tool is installed on first use from the configured package index into `TOOLS/<name>` (by default
`~/.cache/flywheel/bench-tools/<name>`; `FLYWHEEL_BENCH_TOOLS` moves it), and reinstalled when what it asks for
changes: the virtualenv keeps the requirements it was built with in a stamp file, written last, so that an
install cut short is redone rather than used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

TOOLS = Path(os.environ.get("FLYWHEEL_BENCH_TOOLS", Path.home() / ".cache" / "flywheel" / "bench-tools"))
STAMP = "flywheel-bench-tool.txt"


def tool_venv(name: str, requirements: list[str]) -> Path:
    """The virtualenv `TOOLS/name` with `requirements` pip-installed (built on first use, or when they change)."""
    root = TOOLS / name
    wanted = "\n".join(requirements) + "\n"
    stamp = root / STAMP
    if stamp.exists() and stamp.read_text() == wanted:
        return root
    print(f"installing {' '.join(requirements)} into {root} (first use)", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    pip = [str(root / "bin" / "pip"), "install", "-q", *requirements]
    installed = subprocess.run(pip, env=tool_env(root), capture_output=True, text=True, check=False)
    if installed.returncode:
        raise RuntimeError(f"could not install {requirements} into {root}:\n{installed.stderr[-3000:]}")
    stamp.write_text(wanted)
    return root


def tool_env(root: Path) -> dict[str, str]:
    """This process's environment for a program of the virtualenv `root`: its `bin` first on PATH, and nothing
    that would put the project's packages (or its virtualenv) in front of the tool's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env
