"""Quality benchmark: does fine-tuning beat ten lines of scikit-learn, and by how much, reliably?

`python -m bench.quality_bench` (results in bench/results/quality.json). On the demo's data (cli/demo_data.py):

- text: the docstring paragraphs of four standard-library packages, labeled by package;
- images: scikit-learn's handwritten digits as 32x32 PNGs.

For each, `--labels` items (300) are drawn as the partner's labeled data, each label wrong with probability
`--noise` (10%, as the demo's annotators), and split like a snapshot's train and validation parts by content hash
(90% / 10%; the validation part chooses the epoch). A separate held-out test split (`--test` items, clean labels,
never trained or selected on) scores every model. The recipe is the service's own: `resolve_hyperparameters`
defaults, `prepare_text_task` / `prepare_image_task` and `Trainer`, with the training seed varied over `--seeds`.
The classical baseline is `services.training.baselines.fit_classical` on the same train split, as every run
trains it. Reported per configuration: macro-F1 per seed, mean, spread (max - min), the baseline's macro-F1, the
lift (mean - baseline) and the training seconds per seed.

`--set name=value` overrides a hyper-parameter of every configuration; `--ablate` also runs the recipe with each
documented option flipped (docs/training.md gives the measured figures), the differential-privacy rows included:
`--skip-recipe --ablate 'frozen head' 'dp eps 8' 'dp eps 1'` (the head alone, without and with DP-SGD).
`--search TRIALS` adds a row for runs with a recipe search (`search_once`: the service's default space, sampler
and pruner; trials see the train and validation splits only, and the winner is scored on the test split).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from torch.utils.data import DataLoader

from bench.common import machine, write_results
from cli.demo_data import DIGIT_LABELS, TEXT_LABELS, digit_images, shuffled, stdlib_docstrings
from services.training.base_models import DEFAULT_BASE_MODELS
from services.training.baselines import fit_classical
from services.training.data import Example, SnapshotData
from services.training.evaluate import macro_f1
from services.training.schemas import resolve_hyperparameters
from services.training.search import TrialStopped, distributions, pruner_named
from services.training.search_space import resolve_search
from services.training.trainer import EpochReport, Recipe, Trainer, TrainerHooks, predict, seed_everything
from shared.storage.filesystem import FileStore
from shared.tables import render

TEXT = "text_classification"
IMAGE = "image_classification"
TASK_SETTINGS: dict[str, dict[str, Any]] = {IMAGE: {"image_size": 32}}
"""What the demo asks for too: its digits are 32x32 images (224, the default, costs 49x the compute for nothing)."""
TARGET_LIFT = 0.05
TARGET_SPREAD = 0.03
FROZEN_HEAD: dict[str, dict[str, Any]] = {
    TEXT: {"freeze_encoder": True, "wide": False, "class_weighted_loss": False, "max_length": 128},
    IMAGE: {"freeze_encoder": True, "class_weighted_loss": False},
}
"""The non-private reference of the differential-privacy rows: what DP-SGD trains (the head alone, no wide layer,
no class weights, a fixed max_length), without clipping and noise; every DP row trains at the same head rate."""
DP_HEAD_RATE = {"head_learning_rate": 1e-2}
DP_TOP_LAYERS = {TEXT: 2, IMAGE: 1}
"""The DP rows with more than the head: MiniLM's top 2 layers; images the last stage (ResNet-18's layer4, 8.4M
parameters, already a per-item gradient of 34 MB), with the non-private reference training the same layers."""
PRIVACY_ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    task_type: {
        "frozen head": {**frozen, **DP_HEAD_RATE},
        "dp eps 8": {**frozen, **DP_HEAD_RATE, "dp_epsilon": 8},
        "dp eps 1": {**frozen, **DP_HEAD_RATE, "dp_epsilon": 1},
        f"top {top} (no DP)": {**frozen, **DP_HEAD_RATE, "trainable_layers": top},
        f"dp eps 8 top {top}": {**frozen, **DP_HEAD_RATE, "trainable_layers": top, "dp_epsilon": 8},
        f"dp eps 1 top {top}": {**frozen, **DP_HEAD_RATE, "trainable_layers": top, "dp_epsilon": 1},
    }
    for task_type, frozen in FROZEN_HEAD.items()
    for top in [DP_TOP_LAYERS[task_type]]
}
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    TEXT: {
        "wide off": {"wide": False},
        "label_smoothing 0.1": {"label_smoothing": 0.1},
        "fgm eps 1.0": {"adversarial": "fgm", "adversarial_epsilon": 1.0},
        "token_dropout 0.1": {"token_dropout": 0.1},
        "layer_decay 0.8": {"layer_decay": 0.8},
        "reinit_layers 1": {"reinit_layers": 1},
        "pooling cls": {"pooling": "cls"},
        "learning_rate 2e-5": {"learning_rate": 2e-5},
        "learning_rate 1e-4": {"learning_rate": 1e-4},
        "epochs 2": {"epochs": 2},
        "epochs 6": {"epochs": 6},
        "batch_size 16": {"batch_size": 16},
        "warmup_ratio 0": {"warmup_ratio": 0.0},
        "warmup_ratio 0.2": {"warmup_ratio": 0.2},
    },
    IMAGE: {
        "label_smoothing 0.1": {"label_smoothing": 0.1},
        "augment off": {"augment": False},
        "epochs 20": {"epochs": 20},
        "batch_size 32": {"batch_size": 32},
        "warmup_ratio 0": {"warmup_ratio": 0.0},
    },
}
for _task_type, _rows in PRIVACY_ABLATIONS.items():
    ABLATIONS[_task_type].update(_rows)


@dataclass
class Task:
    task_type: str
    labels: list[str]
    data: SnapshotData
    test: list[Example]
    base_model: str


def _split(content: bytes) -> str:
    return "validation" if int(hashlib.sha256(content).hexdigest()[:8], 16) % 10 == 0 else "train"


def make_task(task_type: str, *, labels: int, noise: float, test: int, seed: int = 7) -> Task:
    """`labels` noisy labeled items (train/validation by content hash) and `test` clean held-out ones."""
    if task_type == TEXT:
        names, pairs = list(TEXT_LABELS), [(text.encode(), label) for text, label in stdlib_docstrings()]
    else:
        names, pairs = list(DIGIT_LABELS), digit_images()
    base_model = DEFAULT_BASE_MODELS[task_type]  # what a run without `base_model` trains, as the demo's do
    pairs = shuffled(pairs, seed)
    rng = random.Random(seed)  # noqa: S311 - reproducible label noise, not a secret
    splits: dict[str, list[Example]] = {"train": [], "validation": []}
    for number, (content, label) in enumerate(pairs[:labels]):
        index = names.index(label)
        if rng.random() < noise:
            index = rng.choice([i for i in range(len(names)) if i != index])
        splits[_split(content)].append(Example(f"lab_{number:05d}", index, content))
    held_out = [
        Example(f"test_{number:05d}", names.index(label), content)
        for number, (content, label) in enumerate(pairs[labels : labels + test])
    ]
    data = SnapshotData(labels=names, train=splits["train"], validation=splits["validation"], manifest_sha256="0" * 64)
    return Task(task_type, names, data, held_out, base_model)


def _prepare(task: Task, hp: dict[str, Any]) -> Any:
    if task.task_type == TEXT:
        from services.training.text_model import prepare_text_task

        return prepare_text_task(task.data, hp, task.base_model)
    import tempfile

    from services.training.image_model import prepare_image_task

    # No imported base weights here (none ship offline): the backbone starts untrained, as in the demo.
    return prepare_image_task(FileStore(tempfile.mkdtemp(prefix="quality-bench-")), task.data, hp, task.base_model)


def _test_batches(task: Task, prepared: Any, batch_size: int) -> DataLoader:
    if task.task_type == TEXT:
        from services.training.text_model import TextItems

        items: Any = TextItems([e.content.decode() for e in task.test], [e.label for e in task.test])
    else:
        from services.training.image_model import ImageItems, decode_rgb, eval_transform

        size = prepared.export.preprocessing["size"][0]
        items = ImageItems([decode_rgb(e) for e in task.test], [e.label for e in task.test], eval_transform(size))
    return DataLoader(items, batch_size=batch_size, collate_fn=prepared.eval_collate, shuffle=False)


def _trainer(task: Task, hp: dict[str, Any], hooks: TrainerHooks | None = None) -> tuple[Any, Trainer]:
    seed_everything(hp["seed"])
    prepared = _prepare(task, hp)
    trainer = Trainer(
        prepared.model,
        prepared.train_set,
        prepared.val_set,
        prepared.train_collate,
        Recipe.from_hyperparameters(hp, task.data.train_label_counts()),
        hooks=hooks,
        eval_collate=prepared.eval_collate,
        head_prefixes=prepared.head_prefixes,
        lr_scale=prepared.lr_scale,
        embedding_parameter=prepared.embedding_parameter,
    )
    return prepared, trainer


def train_once(task: Task, hp: dict[str, Any]) -> dict[str, Any]:
    """One run of the service's recipe: its test macro-F1, the epoch kept and the seconds it took."""
    started = time.perf_counter()
    prepared, trainer = _trainer(task, hp)
    fit = trainer.fit()
    seconds = time.perf_counter() - started
    logits, labels = predict(trainer.core, _test_batches(task, prepared, 64), trainer.device)
    return {
        "macro_f1": macro_f1(labels, logits.argmax(1)),
        "accuracy": float((logits.argmax(1) == labels).mean()),
        "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "train_seconds": round(seconds, 1),
        "chosen": prepared.chosen,
        "privacy": fit.privacy,
    }


class _TrialHooks(TrainerHooks):
    """The service's trial hooks without its database: each epoch's validation macro-F1 goes to optuna, and the
    trial stops when the pruner says so (`services.training.search.TrialHooks`)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.history: list[float] = []

    def on_epoch_end(self, report: EpochReport, checkpoint: dict[str, Any], best_state: dict | None) -> None:
        self.history.append(round(report.macro_f1, 4))
        self.trial.report(report.macro_f1, report.epoch)
        if not report.finished and self.trial.should_prune():
            raise TrialStopped(f"pruned after epoch {report.epoch}")


def search_once(task: Task, base: dict[str, Any], seed: int, trials: int, pruner: str) -> dict[str, Any]:
    """A run with a recipe search, as the service runs it: `trials` optuna trials (TPE, the task's default space,
    the named pruner) trained on the train split and scored on validation only; the winner (best validation
    macro-F1) is trained again with the run's seed and scored on the held-out test split."""
    started = time.perf_counter()
    space = resolve_search(task.task_type, {"trials": trials, "max_seconds": 86400, "pruner": pruner}, launch="queue")[
        "space"
    ]
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner_named(pruner)
    )
    records = []
    for _ in range(trials):
        trial = study.ask(distributions(space))
        hooks = _TrialHooks(trial)
        hp = resolve_hyperparameters(task.task_type, {**base, **trial.params, "seed": seed})
        _, trainer = _trainer(task, hp, hooks)
        try:
            value: float | None = trainer.fit().best_macro_f1
            study.tell(trial, value)
            state = "complete"
        except TrialStopped:
            value, state = None, "pruned"
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        records.append({"params": trial.params, "state": state, "validation_macro_f1": value, "history": hooks.history})
        print(f"      trial {trial.number}: {state} {hooks.history} {trial.params}", flush=True)
    chosen = study.best_trial.params
    result = train_once(task, resolve_hyperparameters(task.task_type, {**base, **chosen, "seed": seed}))
    result["train_seconds"] = round(time.perf_counter() - started, 1)
    return {**result, "chosen_params": chosen, "trials": records}


def wide_alone(task: Task, hp: dict[str, Any]) -> dict[str, Any]:
    """The recipe's wide layer on its own (word-piece TF-IDF + logistic regression, no encoder): what the ensemble
    adds over its linear half is the encoder's share of the lift."""
    from services.training.base_models import TEXT_ENCODERS
    from services.training.text_model import TextCollator, choose_max_length, fit_wide, load_tokenizer

    tokenizer = load_tokenizer(TEXT_ENCODERS[task.base_model]())
    texts = [e.content.decode() for e in task.data.train]
    max_length = hp["max_length"] or choose_max_length(tokenizer, texts)
    wide = fit_wide(tokenizer, texts, [e.label for e in task.data.train], len(task.labels), max_length, hp["wide_c"])
    assert wide is not None  # the benchmark's train split holds every class
    batch = TextCollator(tokenizer, max_length).encode([e.content.decode() for e in task.test])
    with torch.no_grad():
        predictions = wide(batch["input_ids"], batch["attention_mask"]).argmax(1).numpy()
    return {"wide_c": hp["wide_c"], "macro_f1": macro_f1(np.asarray([e.label for e in task.test]), predictions)}


def classical(task: Task) -> dict[str, Any]:
    started = time.perf_counter()
    answers = fit_classical(task.task_type, task.data.train, task.test)
    y_true = np.asarray([e.label for e in task.test])
    return {
        "method": answers.method,
        "macro_f1": macro_f1(y_true, answers.predictions),
        "accuracy": float((answers.predictions == y_true).mean()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def measure(
    task: Task,
    overrides: dict[str, Any],
    seeds: list[int],
    baseline: dict[str, Any],
    search: tuple[int, str] | None = None,
) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        if search:
            runs.append({"seed": seed, **search_once(task, overrides, seed, *search)})
        else:
            hp = resolve_hyperparameters(task.task_type, {**overrides, "seed": seed})
            runs.append({"seed": seed, **train_once(task, hp)})
        spent = f", epsilon {runs[-1]['privacy']['epsilon']:.3f}" if runs[-1]["privacy"] else ""
        print(
            f"    seed {seed}: macro-F1 {runs[-1]['macro_f1']:.4f} in {runs[-1]['train_seconds']}s{spent}", flush=True
        )
    scores = [run["macro_f1"] for run in runs]
    mean = float(np.mean(scores))
    return {
        "overrides": overrides,
        "hyperparameters": resolve_hyperparameters(task.task_type, overrides),
        "runs": runs,
        "mean_macro_f1": mean,
        "spread": float(max(scores) - min(scores)),
        "baseline_macro_f1": baseline["macro_f1"],
        "lift": mean - baseline["macro_f1"],
        "mean_train_seconds": float(np.mean([run["train_seconds"] for run in runs])),
    }


def table(task_type: str, results: dict[str, dict[str, Any]]) -> str:
    headers = ["configuration", "macro-F1 per seed", "mean", "spread", "baseline", "lift", "s/run", "target"]
    rows = []
    for name, result in results.items():
        met = result["lift"] >= TARGET_LIFT and result["spread"] <= TARGET_SPREAD
        rows.append(
            [
                name,
                " ".join(f"{run['macro_f1']:.3f}" for run in result["runs"]),
                f"{result['mean_macro_f1']:.3f}",
                f"{result['spread']:.3f}",
                f"{result['baseline_macro_f1']:.3f}",
                f"{result['lift']:+.3f}",
                f"{result['mean_train_seconds']:.0f}",
                "met" if met else "not met",
            ]
        )
    return f"{task_type}\n" + render(headers, rows, align="<<>>>>><", rule=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("text", "image", "both"), default="both")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a JSON value")
    parser.add_argument(
        "--ablate",
        nargs="*",
        default=None,
        metavar="NAME",
        help="also flip each documented option, or only those named (e.g. --ablate 'wide off')",
    )
    parser.add_argument(
        "--skip-recipe", action="store_true", help="run only the ablations (the recipe's own row measured elsewhere)"
    )
    parser.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="TRIALS",
        help="also run the recipe search with TRIALS trials per seed (the winner scored on the test split)",
    )
    parser.add_argument("--pruner", default="median", choices=("median", "successive_halving", "none"))
    parser.add_argument("--results", default="quality", help="bench/results/<RESULTS>.json (default quality)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {name for flips in ABLATIONS.values() for name in flips}
    if args.ablate and set(args.ablate) - known:
        parser.error(f"unknown ablation(s) {sorted(set(args.ablate) - known)}; known: {sorted(known)}")
    overrides = {name: json.loads(value) for name, value in (item.split("=", 1) for item in args.set)}
    seeds = [42 + 1000 * i for i in range(args.seeds)]
    task_types = {"text": [TEXT], "image": [IMAGE], "both": [TEXT, IMAGE]}[args.task]
    report: dict[str, Any] = {"machine": machine(), "labels": args.labels, "noise": args.noise, "test": args.test}
    tables = []
    for task_type in task_types:
        task = make_task(task_type, labels=args.labels, noise=args.noise, test=args.test)
        baseline = classical(task)
        print(
            f"{task_type}: {len(task.data.train)} train, {len(task.data.validation)} validation, "
            f"{len(task.test)} test items; {baseline['method']} macro-F1 {baseline['macro_f1']:.4f}",
            flush=True,
        )
        base = {**TASK_SETTINGS.get(task_type, {}), **overrides}
        if task_type == TEXT:
            report["wide_alone"] = wide_alone(task, resolve_hyperparameters(TEXT, base))
            print(f"  the wide layer alone: macro-F1 {report['wide_alone']['macro_f1']:.4f}", flush=True)
        configurations = {} if args.skip_recipe else {"recipe" + (f" {overrides}" if overrides else ""): base}
        if args.ablate is not None:
            for name, flip in ABLATIONS[task_type].items():
                if args.ablate and name not in args.ablate:
                    continue
                configurations[name] = {**base, **flip}
        results = {}
        for name, config in configurations.items():
            print(f"  {name}", flush=True)
            results[name] = measure(task, config, seeds, baseline)
        if args.search:
            name = f"search {args.search} trials ({args.pruner})"
            print(f"  {name}", flush=True)
            results[name] = measure(task, base, seeds, baseline, search=(args.search, args.pruner))
        report[task_type] = {"baseline": baseline, "configurations": results}
        tables.append(table(task_type, results))
    print("\n" + "\n\n".join(tables))
    path = write_results(args.results, report)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
