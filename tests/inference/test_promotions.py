"""The reconcile loop's schedule: at once, then backing off while the registry is down, then every interval."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from services.inference.promotions import Reconciler


class ScriptedRepository:
    """Answers each reconcile with the next scripted outcome (True: the registry answered)."""

    def __init__(self, outcomes: list[bool]) -> None:
        self.outcomes = list(outcomes)
        self.reconciled = threading.Event()

    def request_reconcile(self) -> Future:
        future: Future = Future()
        future.set_result(self.outcomes.pop(0))
        return future


class RecordedWaits:
    """Stands in for the loop's stop event: records each wait and stops once the script is played."""

    def __init__(self, repository: ScriptedRepository) -> None:
        self.repository = repository
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return not self.repository.outcomes

    def set(self) -> None:
        pass


def waits_between(outcomes: list[bool], interval: float) -> list[float]:
    repository = ScriptedRepository(outcomes)
    reconciler = Reconciler(repository, interval)
    reconciler._stop = RecordedWaits(repository)
    reconciler._loop()
    return reconciler._stop.waits


def test_the_reconcile_backs_off_while_the_registry_is_down_and_polls_once_it_answers() -> None:
    script = [False] * 7 + [True, True, False, True]
    assert waits_between(script, 30.0) == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 1.0, 30.0]


def test_the_reconcile_never_waits_longer_than_its_interval() -> None:
    assert waits_between([False, False, True], 0.5) == [0.0, 0.5, 0.5, 0.5]
