"""A retried create-with-connector on real iSCSI: `tether serve` on file volumes exported by a private tgtd.

The retry with the same Idempotency-Key gets the first answer (the same connection_info, CHAP secret included),
makes no backend call, and tgtd still has exactly one ACL: the one the first request added.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.test_e2e_tgt import A, B, Caller, Stack, assert_admits, assert_refuses, connector, targets
from tests.storage.tgtd import TgtDaemon

pytestmark = pytest.mark.storage

HEADER = "Idempotency-Key"


@pytest.fixture
def stack(clean_tgtd: TgtDaemon, tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path, clean_tgtd)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def api(stack: Stack) -> Caller:
    return stack.caller(f"p{uuid.uuid4().hex[:12]}")


def test_a_retried_create_with_a_connector_leaves_one_acl_and_the_same_connection_info(
    stack: Stack, api: Caller, tgtd: TgtDaemon
) -> None:
    volume = api.create_volume()
    key = str(uuid.uuid4())
    body = {
        "attachment": {
            "volume_uuid": volume["id"],
            "instance_uuid": str(uuid.uuid4()),
            "connector": connector(A, "host-a"),
        }
    }
    first = api.http.post("/attachments", json=body, headers={HEADER: key})
    assert first.status_code == 200, first.text
    info = first.json()["attachment"]["connection_info"]
    assert targets(tgtd)[info["target_iqn"]].acls == {A}

    for _ in range(3):
        again = api.http.post("/attachments", json=body, headers={HEADER: key})
        assert again.status_code == 200, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == first.content
        assert again.json()["attachment"]["connection_info"] == info

    target = targets(tgtd)[info["target_iqn"]]
    assert target.acls == {A}
    assert target.accounts == [info["auth_username"]]
    listed = api.ok("GET", f"/attachments?volume_id={volume['id']}")["attachments"]
    assert [a["id"] for a in listed] == [first.json()["attachment"]["id"]]
    # the answer a retry got works: the initiator logs in with its CHAP secret, and no other does
    assert_admits(info, A)
    assert_refuses(info, B)

    # the same key for another host is another request: refused, and tgtd is left as it was
    other = {"attachment": {**body["attachment"], "connector": connector(B, "host-b")}}
    refused = api.http.post("/attachments", json=other, headers={HEADER: key})
    assert refused.status_code == 422, refused.text
    assert targets(tgtd)[info["target_iqn"]].acls == {A}

    api.complete(first.json()["attachment"]["id"])
    assert api.detach(first.json()["attachment"]["id"]) == []
    assert info["target_iqn"] not in targets(tgtd)
