"""The end-to-end flywheel timing: from the retrain threshold being crossed to the new version serving.

Starts the platform with `flywheel up --detach` (file store, Redis DB 8, free ports) in a temporary home,
then, per repeat, pushes exactly `threshold` labeled digits (the partner's labels are the consensus with
overlap 1) and times each stage as the services report it: threshold crossed (the push that completes the
count returns) → training run created → run finished → version registered → inference serving it. The
baseline beside it is the training run's own wall time (the floor the loop cannot beat), so the ratio says
how much the platform adds around training. Writes bench/results/flywheel.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Progress, Stats, describe_machine, machine, write_results
from cli.demo_data import DIGIT_LABELS, digit_images, shuffled
from cli.launcher import LaunchError, detached_platform
from shared.client import Flywheel, answer_or_none, wait_for
from shared.tables import NUMBERS, print_table

TOKEN = "bench-internal-token"  # noqa: S105 - a throwaway platform's token, local to this run


def one_cycle(operator: Flywheel, threshold: int, epochs: int, cycle: int) -> dict[str, float]:
    issued = operator.ingestion.create_partner(f"bench-{cycle}-{int(time.time())}")
    partner = operator.with_token(issued["api_key"])
    dataset = partner.ingestion.create_dataset(
        "digits", "image_classification", list(DIGIT_LABELS), overlap=1, retrain_threshold=threshold
    )["id"]
    wait_for(lambda: answer_or_none(lambda: partner.labeling.dataset(dataset)), timeout=30, what="labeling")
    partner.labeling.settings(dataset, training_hyperparameters={"epochs": epochs, "image_size": 32})
    digits = shuffled(digit_images(), seed=cycle)[:threshold]
    holdout = digits[0][0]
    started = time.monotonic()
    for start in range(0, threshold, 200):
        batch = digits[start : start + 200]
        partner.ingestion.push(dataset, [{"image": png, "label": label} for png, label in batch])
    crossed = time.monotonic()
    run = wait_for(lambda: partner.training.list_runs(dataset_id=dataset), timeout=60, what="a run")[0]
    created = time.monotonic()
    run = wait_for(
        lambda: (r := partner.training.get_run(run["id"]))["status"] in {"succeeded", "failed"} and r,
        timeout=900,
        what="training",
    )
    finished = time.monotonic()
    if run["status"] != "succeeded":
        raise RuntimeError(f"the run failed: {run.get('failure_reason')}")
    wait_for(lambda: answer_or_none(lambda: partner.registry.versions("digits")), timeout=60, what="registration")
    registered = time.monotonic()
    wait_for(
        lambda: answer_or_none(lambda: partner.inference.predict("digits", images=[holdout])),
        timeout=120,
        what="serving",
        interval=0.1,
    )
    serving = time.monotonic()
    training_wall = _training_seconds(run)
    return {
        "push_s": crossed - started,
        "to_run_created_s": created - crossed,
        "run_s": finished - created,
        "training_wall_s": training_wall,
        "to_registered_s": registered - finished,
        "to_serving_s": serving - registered,
        "threshold_to_serving_s": serving - crossed,
    }


def _training_seconds(run: dict[str, Any]) -> float:
    from datetime import datetime

    if run.get("started_at") and run.get("finished_at"):
        return (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds()
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threshold", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    say = Progress()
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    env = dict(os.environ, REDIS_URL="redis://127.0.0.1:6379/8", FLYWHEEL_INTERNAL_TOKEN=TOKEN)
    env.pop("S3_ENDPOINT", None)
    say("starting the platform (flywheel up --detach)")
    cycles: list[dict[str, float]] = []
    try:
        with detached_platform(home, env) as urls:
            operator = Flywheel.from_urls(urls, TOKEN)
            for cycle in range(1, args.repeats + 1):
                say(f"cycle {cycle}/{args.repeats}: push {args.threshold} labeled digits, wait for the new version")
                cycles.append(one_cycle(operator, args.threshold, args.epochs, cycle))
                say(f"  threshold → serving in {cycles[-1]['threshold_to_serving_s']:.1f}s")
    except LaunchError as exc:
        print(exc, file=sys.stderr)
        return 1
    stats = {key: Stats.of([c[key] for c in cycles]) for key in cycles[0]}
    loop = stats["threshold_to_serving_s"]
    floor = stats["training_wall_s"]
    rows = [[key, stats[key].show(1)] for key in cycles[0]]
    print(describe_machine(machine()))
    print_table(["stage", "seconds (median ±IQR)"], rows, align=NUMBERS, rule=True)
    overhead = loop.median / floor.median if floor.median else None
    print(f"threshold → serving {loop.median:.1f}s vs training alone {floor.median:.1f}s: ratio {overhead:.2f}")
    write_results(
        "flywheel",
        {
            "machine": machine(),
            "threshold": args.threshold,
            "epochs": args.epochs,
            "stages": {key: stat.as_dict() for key, stat in stats.items()},
            "ratio_loop_to_training": overhead,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
