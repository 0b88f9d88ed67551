"""No pickle on the wire or in storage, and credentials never reach the logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import INTERNAL_TOKEN
from tests.helpers import bearer, create_dataset, create_partner

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "services", ROOT / "shared"]


def product_sources() -> list[Path]:
    return [path for folder in PRODUCT for path in folder.rglob("*.py")]


def test_no_pickle_in_product_code() -> None:
    offenders = []
    for path in product_sources():
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", text, re.MULTILINE):
            offenders.append(f"{path.relative_to(ROOT)} imports pickle")
        if re.search(r"\bjoblib\.load\(|\bnp\.load\([^)]*allow_pickle\s*=\s*True", text):
            offenders.append(f"{path.relative_to(ROOT)} loads pickles")
        for call in re.finditer(r"torch\.load\((.*)$", text, re.MULTILINE):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)


def test_celery_accepts_json_only(settings) -> None:
    from shared.events.celery_app import make_celery

    for service in ("ingestion", "training"):
        conf = make_celery(settings, service).conf
        assert conf.accept_content == ["json"] and conf.task_serializer == "json"


def test_keys_and_tokens_never_reach_the_logs(platform, logs) -> None:
    ingestion = platform("ingestion")
    labeling = platform("labeling")
    issued = create_partner(ingestion.client)
    key = issued["api_key"]
    dataset = create_dataset(ingestion.client, key)
    ingestion.client.post(f"/v1/datasets/{dataset['id']}/items", json={"items": [{"text": "x"}]}, headers=bearer(key))
    labeling.client.get(f"/v1/datasets/{dataset['id']}/tasks", headers=bearer(key))
    ingestion.client.get("/v1/partners", headers=bearer(INTERNAL_TOKEN))
    ingestion.client.get("/v1/partners", headers=bearer("fwk_" + "wrong" * 9))
    dumped = json.dumps(logs.lines)
    assert logs.lines, "the flow should have logged"
    assert key not in dumped and key[10:] not in dumped
    assert INTERNAL_TOKEN not in dumped
