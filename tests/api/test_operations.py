"""Operator views: Prometheus metrics and JSON log lines."""

import json
import logging
from typing import Any

import pytest

from app.logs import mask
from tests.conftest import Api


async def test_metrics_count_requests_backend_calls_and_resources(api: Api) -> None:
    volume = await api.create_volume()
    connector = {"initiator": "iqn.1993-08.org.debian:01:metrics", "host": "h1"}
    created = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert created.status_code == 200
    await api.get(f"/volumes/{volume['id']}")
    await api.get("/volumes/does-not-exist")

    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'tether_http_requests_total{method="POST",route="/v3/attachments",status="200"} 1.0' in text
    assert 'tether_http_requests_total{method="GET",route="/v3/volumes/{volume_id}",status="404"} 1.0' in text
    assert 'tether_http_request_duration_seconds_count{method="POST",route="/v3/volumes"}' in text
    # one named storage operation per connect: the export and its ACL together
    assert 'tether_backend_operation_duration_seconds_count{operation="connect"} 1.0' in text
    assert 'tether_backend_operation_duration_seconds_count{operation="create_volume"} 1.0' in text
    assert 'tether_node_up{node="tether"} 1.0' in text
    assert "tether_dispatcher_queue_depth 0.0" in text
    assert "tether_dispatcher_busy_workers 0.0" in text
    assert 'tether_attachments{status="attaching"}' in text
    assert 'tether_volumes{status="attaching"}' in text


async def test_backend_failures_are_counted(api: Api) -> None:
    volume = await api.create_volume()
    api.app.state.backends.target.faults.fail("add_initiator")
    connector = {"initiator": "iqn.1993-08.org.debian:01:metrics", "host": "h1"}
    failed = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert failed.status_code == 500
    text = (await api.client.get("/metrics")).text
    assert 'tether_backend_operation_failures_total{operation="connect"} 1.0' in text


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"log_json": True, "log_level": "DEBUG"}


async def test_json_logs_carry_ids_and_never_the_chap_secret(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    volume = await api.create_volume()
    api.app.state.backends.target.faults.fail("add_initiator")
    connector = {"initiator": "iqn.1993-08.org.debian:01:logs", "host": "h1"}
    failed = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert failed.status_code == 500
    attached = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert attached.status_code == 200
    secret = attached.json()["attachment"]["connection_info"]["auth_password"]
    logging.getLogger("tether.test").info("connection_info %s", attached.json()["attachment"]["connection_info"])

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    failure = next(line for line in lines if "connecting attachment" in line["message"])
    assert failure["request_id"] == failed.headers["x-openstack-request-id"]
    assert failure["project_id"] == api.project
    assert failure["volume_id"] == volume["id"]
    assert failure["attachment_id"]
    assert failure["level"] == "ERROR"
    assert secret not in json.dumps(lines)
    assert any("'auth_password': '***'" in line["message"] for line in lines)


def test_mask_hides_chap_and_passwords() -> None:
    assert mask("CHAP user1 s3cr3t") == "CHAP user1 ***"
    assert mask('{"auth_password": "abc", "x": 1}') == '{"auth_password": "***", "x": 1}'
    assert mask("tgtadm --password=abc") == "tgtadm --password=***"
