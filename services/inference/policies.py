"""Monitoring policies: per model, what is watched, how much traffic goes to labeling and to a shadow version,
and which thresholds trigger a retrain; per tenant, how long the prediction log is kept.

A policy (defaults below, overridden per model with `PUT /v1/monitoring/models/{name}/policy`) is evaluated
every `schedule_s` on the last `window_s` of the log, for each version the model serves:

- `prediction_drift`: Jensen-Shannon distance of the predicted classes from the version's evaluation
  baseline above `prediction_drift_threshold`, with the chi-square test of homogeneity of the two count
  vectors below `drift_p_value` (a small test split alone is noisy enough to put two samples of one
  distribution 0.2 apart);
- `confidence_drift`: KS statistic of the confidences against the baseline's above
  `confidence_drift_threshold`, with p below `drift_p_value`;
- `input_drift`: KS statistic of text length (`chars`) or image `brightness` against the evaluation set's
  inputs above `input_drift_threshold`, with p below `drift_p_value`;
- `unknown_token_drift`: the mean unknown-token rate differs from the evaluation set's by more than
  `unknown_rate_threshold`;
- all four judged only once the window holds `min_samples` predictions of the version, and the input kinds only
  when the version's evaluation report recorded its inputs (older reports: not judged, the report says so);
- `accuracy_drop`: live accuracy below the baseline's accuracy by more than `accuracy_drop_threshold`, judged
  once `min_labeled` predictions of the window have ground truth;
- `schedule`: `retrain_every_s` seconds since the last scheduled retrain (off by default).

One process of all replicas evaluates a model at a time: the evaluation takes a Redis key (`SET NX`, expiring
after `schedule_s`), which is the schedule too. An alert that fires is a row (`monitor_alerts`), a JSON log
line (`monitoring_alert_fired`), the gauge `flywheel_monitor_alert` at 1, and one `model.degraded` per
evaluation (in the same transaction as the alerts) that makes labeling freeze a snapshot and request a
retrain with the alert's reason; the new version then meets the promotion gate. An active alert does not fire
again; it resolves (`monitoring_alert_resolved`, gauge 0) when an evaluation with enough samples finds the
version back within its threshold.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import delete, select

from services.inference import monitoring
from services.inference.baseline import Baseline, Baselines
from services.inference.metrics import InferenceMetrics
from services.inference.models import MonitorAlert, MonitorPolicy, Prediction, ShadowPrediction, TenantRetention
from services.inference.repository import LoadedVersion, ModelRepository, ServedModel
from shared.artifacts import RAW_BUCKET
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

DEFAULT_POLICY: dict[str, Any] = {
    "window_s": 3600,
    "schedule_s": 300,
    "min_samples": 200,
    "min_labeled": 30,
    "prediction_drift_threshold": 0.2,
    "confidence_drift_threshold": 0.3,
    "drift_p_value": 0.01,
    "accuracy_drop_threshold": 0.05,
    "input_drift_threshold": 0.3,
    "unknown_rate_threshold": 0.05,
    "retrain_every_s": None,
    "sample_rate": 0.0,
    "shadow_version": None,
    "shadow_rate": 0.0,
}
DEFAULT_RETENTION_DAYS = 30
POLICY_CACHE_S = 5.0
LOCK_PREFIX = "flywheel:inference:monitor"
RETENTION_EVERY_S = 3600
DRIFT_KINDS = ("prediction_drift", "confidence_drift", "input_drift", "unknown_token_drift")


class Monitor:
    def __init__(
        self, runtime: Runtime, repository: ModelRepository, metrics: InferenceMetrics, interval_s: float
    ) -> None:
        self.runtime = runtime
        self.repository = repository
        self.metrics = metrics
        self.interval_s = interval_s
        self.baselines = Baselines(runtime.storage)
        self._policies: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- policies and retention -------------------------------------------------------------------------

    def policy(self, tenant: str, model_name: str) -> dict[str, Any]:
        """The model's policy (defaults with its overrides), cached a few seconds for the request path: a hit is
        one dict lookup and a clock read, no lock (a dict's get and set are atomic under the GIL)."""
        key = (tenant, model_name)
        cached = self._policies.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        with self.runtime.db.session() as session:
            row = session.get(MonitorPolicy, key)
            stored = dict(row.policy) if row else {}
        policy = {**DEFAULT_POLICY, **stored}
        self._policies[key] = (now + POLICY_CACHE_S, policy)
        return policy

    def set_policy(self, tenant: str, model_name: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self.runtime.db.session() as session:
            row = session.get(MonitorPolicy, (tenant, model_name), with_for_update=not self.runtime.db.is_sqlite)
            if row is None:
                row = MonitorPolicy(tenant=tenant, model_name=model_name, policy={})
                session.add(row)
            row.policy = {**row.policy, **changes}
            policy = {**DEFAULT_POLICY, **row.policy}
        self._policies[(tenant, model_name)] = (time.monotonic() + POLICY_CACHE_S, policy)
        log.info("monitoring_policy_changed", tenant=tenant, model_name=model_name, **changes)
        return policy

    def retention_days(self, tenant: str) -> int:
        with self.runtime.db.session() as session:
            row = session.get(TenantRetention, tenant)
            return row.days if row else DEFAULT_RETENTION_DAYS

    def set_retention(self, tenant: str, days: int) -> int:
        with self.runtime.db.session() as session:
            row = session.get(TenantRetention, tenant)
            if row is None:
                session.add(TenantRetention(tenant=tenant, days=days))
            else:
                row.days = days
        log.info("prediction_log_retention_changed", tenant=tenant, days=days)
        return days

    def prune(self, now: datetime | None = None) -> int:
        """Delete each tenant's log rows (and shadow answers, and whole days of packed inputs) past retention."""
        now = now or datetime.now(UTC)
        removed = 0
        with self.runtime.db.session() as session:
            tenants = set(session.scalars(select(Prediction.tenant).distinct()))
            custom = {row.tenant: row.days for row in session.scalars(select(TenantRetention))}
        for tenant in sorted(tenants):
            cutoff = now - timedelta(days=custom.get(tenant, DEFAULT_RETENTION_DAYS))
            with self.runtime.db.session() as session:
                old = select(Prediction.id).where(Prediction.tenant == tenant, Prediction.created_at < cutoff)
                session.execute(
                    delete(ShadowPrediction).where(
                        ShadowPrediction.tenant == tenant, ShadowPrediction.prediction_id.in_(old)
                    )
                )
                result = session.execute(
                    delete(Prediction).where(Prediction.tenant == tenant, Prediction.created_at < cutoff)
                )
                removed += result.rowcount or 0
            self._prune_inputs(tenant, cutoff)
        if removed:
            log.info("prediction_log_pruned", rows=removed)
        return removed

    def _prune_inputs(self, tenant: str, cutoff: datetime) -> None:
        """Packed inputs live under `<tenant>/predictions/YYYY/MM/DD/`: a whole day before the cutoff goes."""
        prefix = f"{tenant}/predictions/"
        try:
            for info in list(self.runtime.storage.list(RAW_BUCKET, prefix)):
                day = info.key[len(prefix) : len(prefix) + 10]
                try:
                    stamp = datetime.strptime(day, "%Y/%m/%d").replace(tzinfo=UTC)
                except ValueError:
                    continue
                if stamp + timedelta(days=1) <= cutoff:
                    self.runtime.storage.delete(RAW_BUCKET, info.key)
        except Exception as exc:  # storage down: rows are gone, their bytes go next time
            log.warning("prediction_inputs_prune_failed", tenant=tenant, error=str(exc)[:300])

    # -- reading ----------------------------------------------------------------------------------------

    def baseline(self, loaded: LoadedVersion) -> Baseline | None:
        return self.baselines.get(loaded.tenant, loaded.model_name, loaded.version, loaded.artifacts, loaded.metadata)

    def report(self, model: ServedModel, *, windows: int, window_s: float) -> dict[str, Any]:
        """Every window, every version side by side: traffic, quality, drift, inputs; shadow; resources."""
        now = datetime.now(UTC)
        bounds = monitoring.window_bounds(now, window_s, windows)
        with self.runtime.db.session() as session:
            rows = monitoring.load_rows(session, model.tenant, model.name, bounds[0][0], now)
            shadow = [monitoring.shadow(session, model.tenant, model.name, start, end) for start, end in bounds]
        grouped = monitoring.split_rows(rows, bounds)
        state = model.state
        baselines = {version: self.baseline(loaded) for version, loaded in state.versions.items()}
        versions = sorted(set(state.versions) | {v for window in grouped for v in window})
        routing = state.routing
        with self.runtime.db.session() as session:
            alerts = session.scalars(
                select(MonitorAlert).where(
                    MonitorAlert.tenant == model.tenant,
                    MonitorAlert.model_name == model.name,
                    MonitorAlert.active.is_(True),
                )
            ).all()
        return {
            "model_name": model.name,
            "window_s": window_s,
            "policy": self.policy(model.tenant, model.name),
            "versions": [
                {
                    "version": version,
                    "role": _role(version, routing),
                    "baseline": baselines[version].describe() if baselines.get(version) else None,
                    "resources": resources(state.versions.get(version)),
                }
                for version in versions
            ],
            "windows": [
                {
                    "start": start.isoformat(),
                    "end": end.isoformat(),
                    "versions": {
                        str(version): monitoring.version_window(window.get(version, []), baselines.get(version))
                        for version in versions
                    },
                    "shadow": {str(version): answers for version, answers in shadow_window.items()},
                }
                for (start, end), window, shadow_window in zip(bounds, grouped, shadow, strict=True)
            ],
            "alerts": [describe_alert(alert) for alert in alerts],
        }

    # -- evaluating -------------------------------------------------------------------------------------

    def evaluate(self, model: ServedModel, now: datetime | None = None) -> dict[str, Any]:
        """Check the policy on the last window for each version the model serves; fire and resolve alerts."""
        now = now or datetime.now(UTC)
        policy = self.policy(model.tenant, model.name)
        since = now - timedelta(seconds=policy["window_s"])
        state = model.state
        serving = sorted(state.routing.versions) if state.routing else []
        with self.runtime.db.session() as session:
            rows = monitoring.load_rows(session, model.tenant, model.name, since, now)
        findings: list[dict[str, Any]] = []
        checked: list[dict[str, Any]] = []
        for version in serving:
            loaded = state.versions.get(version)
            if loaded is None:
                continue
            version_rows = [row for row in rows if row.version == version]
            found, judged = check(policy, version_rows, self.baseline(loaded))
            checked.append({"version": version, "predictions": len(version_rows), "judged": sorted(judged)})
            for finding in found:
                findings.append({**finding, "version": version})
            for signal, value in _signals(version_rows, self.baseline(loaded)).items():
                if value is not None:
                    self.metrics.drift.labels(model.tenant, model.name, str(version), signal).set(value)
            accuracy = monitoring.quality(version_rows)["accuracy"]
            if accuracy is not None:
                self.metrics.live_accuracy.labels(model.tenant, model.name, str(version)).set(accuracy)
            self._resolve(model, version, judged - {f["kind"] for f in found}, now)
        if serving and policy.get("retrain_every_s"):
            finding = self._schedule_due(model, policy, now)
            if finding is not None:
                findings.append({**finding, "version": state.routing.version})
        fired = self._fire(model, findings, now)
        log.info(
            "monitoring_policy_evaluated",
            tenant=model.tenant,
            model_name=model.name,
            versions=checked,
            fired=[alert["kind"] for alert in fired],
        )
        return {"evaluated_at": now.isoformat(), "versions": checked, "fired": fired}

    def _schedule_due(self, model: ServedModel, policy: dict[str, Any], now: datetime) -> dict[str, Any] | None:
        with self.runtime.db.session() as session:
            last = session.scalar(
                select(MonitorAlert.created_at)
                .where(
                    MonitorAlert.tenant == model.tenant,
                    MonitorAlert.model_name == model.name,
                    MonitorAlert.kind == "schedule",
                )
                .order_by(MonitorAlert.created_at.desc())
                .limit(1)
            )
        every = float(policy["retrain_every_s"])
        if last is not None and (now - _aware(last)).total_seconds() < every:
            return None
        return {
            "kind": "schedule",
            "value": None,
            "threshold": every,
            "samples": 0,
            "reason": f"scheduled retrain: every {every:.0f}s",
            "details": {},
        }

    def _fire(self, model: ServedModel, findings: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
        if not findings:
            return []
        fired: list[MonitorAlert] = []
        with self.runtime.db.session() as session:
            active = {
                (alert.model_version, alert.kind)
                for alert in session.scalars(
                    select(MonitorAlert).where(
                        MonitorAlert.tenant == model.tenant,
                        MonitorAlert.model_name == model.name,
                        MonitorAlert.active.is_(True),
                    )
                )
            }
            for finding in findings:
                if (finding["version"], finding["kind"]) in active:
                    continue
                alert = MonitorAlert(
                    id=f"alr_{uuid.uuid4().hex[:20]}",
                    tenant=model.tenant,
                    model_name=model.name,
                    model_version=finding["version"],
                    kind=finding["kind"],
                    reason=finding["reason"],
                    value=finding["value"],
                    threshold=finding["threshold"],
                    samples=finding["samples"],
                    details=finding["details"],
                    # a scheduled retrain is an occasion, not a condition: it does not stay active
                    active=finding["kind"] != "schedule",
                    created_at=now,
                )
                session.add(alert)
                fired.append(alert)
            if fired:
                first = fired[0]
                envelope = self.runtime.bus.publish(
                    session,
                    "model.degraded",
                    {
                        "model_name": model.name,
                        "model_version": first.model_version,
                        "dataset_id": model.dataset_id,
                        "alert_id": first.id,
                        "kind": first.kind,
                        "reason": "; ".join(alert.reason for alert in fired)[:400],
                        "value": first.value,
                        "threshold": first.threshold,
                        "samples": first.samples,
                    },
                    tenant=model.tenant,
                )
                for alert in fired:
                    alert.event_id = envelope.event_id
            described = [describe_alert(alert) for alert in fired]
        for alert in described:
            self.metrics.alert.labels(model.tenant, model.name, str(alert["model_version"]), alert["kind"]).set(
                1 if alert["active"] else 0
            )
            self.metrics.alerts_fired.labels(model.tenant, model.name, alert["kind"]).inc()
            log.warning(
                "monitoring_alert_fired",
                tenant=model.tenant,
                model_name=model.name,
                model_version=alert["model_version"],
                alert_id=alert["id"],
                kind=alert["kind"],
                reason=alert["reason"],
                value=alert["value"],
                threshold=alert["threshold"],
                samples=alert["samples"],
                event_id=alert["event_id"],
            )
        return described

    def _resolve(self, model: ServedModel, version: int, kinds: set[str], now: datetime) -> None:
        if not kinds:
            return
        with self.runtime.db.session() as session:
            alerts = session.scalars(
                select(MonitorAlert).where(
                    MonitorAlert.tenant == model.tenant,
                    MonitorAlert.model_name == model.name,
                    MonitorAlert.model_version == version,
                    MonitorAlert.kind.in_(sorted(kinds)),
                    MonitorAlert.active.is_(True),
                )
            ).all()
            for alert in alerts:
                alert.active = False
                alert.resolved_at = now
                self.metrics.alert.labels(model.tenant, model.name, str(version), alert.kind).set(0)
                log.info(
                    "monitoring_alert_resolved",
                    tenant=model.tenant,
                    model_name=model.name,
                    model_version=version,
                    alert_id=alert.id,
                    kind=alert.kind,
                )

    def alerts(self, tenant: str, model_name: str | None, active: bool | None, limit: int) -> list[dict[str, Any]]:
        query = select(MonitorAlert).where(MonitorAlert.tenant == tenant)
        if model_name:
            query = query.where(MonitorAlert.model_name == model_name)
        if active is not None:
            query = query.where(MonitorAlert.active.is_(active))
        with self.runtime.db.session() as session:
            rows = session.scalars(query.order_by(MonitorAlert.created_at.desc()).limit(limit)).all()
            return [describe_alert(alert) for alert in rows]

    # -- the schedule -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def tick(self) -> int:
        """Evaluate each served model whose schedule is due (and prune the log hourly): one process at a time."""
        evaluated = 0
        if self._claim(f"{LOCK_PREFIX}:retention", RETENTION_EVERY_S):
            _guarded("prediction_log_prune_failed", self.prune)
        for model in self.repository.models():
            if not model.ready:
                continue
            policy = self.policy(model.tenant, model.name)
            if self._claim(f"{LOCK_PREFIX}:{model.tenant}:{model.name}", int(policy["schedule_s"])):
                _guarded("monitoring_policy_evaluation_failed", lambda m=model: self.evaluate(m))
                evaluated += 1
        return evaluated

    def _claim(self, key: str, seconds: int) -> bool:
        try:
            return bool(self.runtime.redis.set(key, "1", nx=True, ex=max(1, seconds)))
        except redis.RedisError as exc:
            log.warning("monitoring_schedule_unavailable", error=str(exc)[:200])
            return False


def check(policy: dict[str, Any], rows: list[monitoring.Row], baseline: Baseline | None) -> tuple[list[dict], set]:
    """The thresholds one version's window crosses, and the kinds it had enough samples to judge at all."""
    found: list[dict[str, Any]] = []
    judged: set[str] = set()
    if baseline is not None and len(rows) >= policy["min_samples"]:
        result = monitoring.drift(rows, baseline)
        details = {"class_distribution": result["class_distribution"], "baseline": baseline.class_distribution}
        js, chi2_p = result["prediction_js"], result["prediction_chi2_pvalue"]
        if js is not None and chi2_p is not None:
            judged.add("prediction_drift")
            details["p_value"] = chi2_p
            if js > policy["prediction_drift_threshold"] and chi2_p < policy["drift_p_value"]:
                found.append(
                    _finding(
                        "prediction_drift",
                        js,
                        policy["prediction_drift_threshold"],
                        len(rows),
                        details,
                        "predicted classes drifted (Jensen-Shannon",
                    )
                )
        ks, p_value = result["confidence_ks"], result["confidence_ks_pvalue"]
        if ks is not None:
            judged.add("confidence_drift")
            if ks > policy["confidence_drift_threshold"] and p_value < policy["drift_p_value"]:
                details = {"confidence_mean": result["confidence_mean"], "p_value": p_value}
                found.append(
                    _finding(
                        "confidence_drift",
                        ks,
                        policy["confidence_drift_threshold"],
                        len(rows),
                        details,
                        "confidences drifted (KS",
                    )
                )
    if baseline is not None and len(rows) >= policy["min_samples"]:
        _check_inputs(policy, rows, baseline, found, judged)
    live = monitoring.quality(rows)
    if baseline is not None and baseline.accuracy is not None and live["labeled"] >= policy["min_labeled"]:
        judged.add("accuracy_drop")
        floor = baseline.accuracy - policy["accuracy_drop_threshold"]
        if live["accuracy"] < floor:
            found.append(
                {
                    "kind": "accuracy_drop",
                    "value": live["accuracy"],
                    "threshold": floor,
                    "samples": live["labeled"],
                    "reason": f"live accuracy {live['accuracy']:.3f} on {live['labeled']} labeled predictions is "
                    f"below the evaluation baseline {baseline.accuracy:.3f} by more than "
                    f"{policy['accuracy_drop_threshold']}",
                    "details": {**live, "baseline_accuracy": baseline.accuracy},
                }
            )
    return found, judged


def _check_inputs(
    policy: dict[str, Any], rows: list[monitoring.Row], baseline: Baseline, found: list[dict], judged: set[str]
) -> None:
    """Input drift against the evaluation set's inputs (nothing judged when the report recorded none)."""
    result = monitoring.input_drift(rows, baseline)
    if not result["judged"]:
        return
    tested = [name for name in monitoring.INPUT_KS if f"{name}_ks" in result]
    if tested:
        judged.add("input_drift")
        shifted = [
            name
            for name in tested
            if result[f"{name}_ks"] > policy["input_drift_threshold"]
            and result[f"{name}_ks_pvalue"] < policy["drift_p_value"]
        ]
        if shifted:
            name = max(shifted, key=lambda n: result[f"{n}_ks"])
            what = {"chars": "text length", "brightness": "image brightness"}[name]
            found.append(
                _finding(
                    "input_drift",
                    result[f"{name}_ks"],
                    policy["input_drift_threshold"],
                    len(rows),
                    {**result, "statistic": name},
                    f"inputs drifted: {what} (KS",
                )
            )
    if "unknown_rate_diff" in result:
        judged.add("unknown_token_drift")
        if abs(result["unknown_rate_diff"]) > policy["unknown_rate_threshold"]:
            found.append(
                _finding(
                    "unknown_token_drift",
                    abs(result["unknown_rate_diff"]),
                    policy["unknown_rate_threshold"],
                    len(rows),
                    result,
                    f"unknown-token rate {result['unknown_rate']:.3f} against {result['baseline_unknown_rate']:.3f}"
                    " on the evaluation set (difference",
                )
            )


def _finding(kind: str, value: float, threshold: float, samples: int, details: dict, what: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "value": value,
        "threshold": threshold,
        "samples": samples,
        "reason": f"{what} {value:.3f} > {threshold} over {samples} predictions)",
        "details": details,
    }


def _signals(rows: list[monitoring.Row], baseline: Baseline | None) -> dict[str, float | None]:
    if not rows:
        return {}
    result = monitoring.drift(rows, baseline)
    inputs = monitoring.input_drift(rows, baseline)
    return {
        "prediction_js": result["prediction_js"],
        "prediction_chi2_pvalue": result["prediction_chi2_pvalue"],
        "confidence_ks": result["confidence_ks"],
        **{f"input_{name}_ks": inputs.get(f"{name}_ks") for name in monitoring.INPUT_KS},
        "unknown_rate_diff": inputs.get("unknown_rate_diff"),
    }


def _role(version: int, routing: Any) -> str:
    if routing is None:
        return "loaded"
    if version == routing.version:
        return "production"
    return "canary" if version in routing.versions else "loaded"


def resources(loaded: LoadedVersion | None) -> dict[str, Any] | None:
    """This process's resource use by a loaded version (Prometheus sums them over replicas)."""
    if loaded is None:
        return None
    totals = loaded.observer.totals
    return {
        "rows": totals["rows"],
        "batches": totals["batches"],
        "compute_seconds": round(totals["compute_seconds"], 6),
        "queue_rejections": totals.get("queue_rejections", 0),
        "memory_bytes": loaded.memory_bytes,
        "provider": loaded.provider,
    }


def describe_alert(alert: MonitorAlert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "model_name": alert.model_name,
        "model_version": alert.model_version,
        "kind": alert.kind,
        "reason": alert.reason,
        "value": alert.value,
        "threshold": alert.threshold,
        "samples": alert.samples,
        "details": alert.details,
        "active": alert.active,
        "event_id": alert.event_id,
        "created_at": _aware(alert.created_at).isoformat(),
        "resolved_at": _aware(alert.resolved_at).isoformat() if alert.resolved_at else None,
    }


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _guarded(event: str, work: Callable[[], Any]) -> None:
    try:
        work()
    except Exception as exc:  # the schedule keeps running whatever one evaluation hits
        log.warning(event, error=repr(exc)[:300])
