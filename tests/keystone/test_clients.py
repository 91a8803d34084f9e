"""Real clients, unmodified, finding a keystone-mode `tether serve` through Keystone's catalog (SPEC 11).

Tether is registered as the README says (`volumev3` and `block-storage` at `…/v3/%(project_id)s`); the
cinder CLI and openstacksdk (a clouds.yaml) log in with a password and with an application credential.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_server_cinderclient import parse_table
from tests.conftest import IN_CI, Server, start_server, stop_server
from tests.keystone.keystone import PASSWORD, Cloud

CINDER = Path(sys.executable).parent / "cinder"
pytestmark = pytest.mark.skipif(not CINDER.exists() and not IN_CI, reason="python-cinderclient is not installed")


@pytest.fixture(scope="module")
def catalog_server(cloud: Cloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TETHER_AUTH": "keystone",
        "TETHER_KEYSTONE_AUTH_URL": cloud.url,
        "TETHER_KEYSTONE_USERNAME": "tether",
        "TETHER_KEYSTONE_PASSWORD": PASSWORD,
        "TETHER_KEYSTONE_PROJECT_NAME": "service",
    }
    running = start_server(tmp_path_factory.mktemp("keystone-clients"), env)
    cloud.register_tether(running.base)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def application_credential(cloud: Cloud) -> tuple[str, str]:
    return cloud.application_credential("alice")


def cinder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # nothing of the caller's OS_* environment: only what the command line (and `env`, an openrc) says
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    result = subprocess.run(
        [str(CINDER), "--os-volume-api-version", "3.71", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**clean, **(env or {})},
    )
    assert result.returncode == 0, f"cinder {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


def password_args(cloud: Cloud) -> list[str]:
    return [
        "--os-auth-url",
        cloud.url,
        "--os-username",
        "alice",
        "--os-password",
        PASSWORD,
        "--os-project-name",
        "demo",
        "--os-user-domain-name",
        "Default",
        "--os-project-domain-name",
        "Default",
    ]


def wait_available(run: Any, volume_id: str) -> None:
    deadline = time.monotonic() + 30
    while (status := run(volume_id)) != "available":
        assert time.monotonic() < deadline, f"volume {volume_id} is {status}"
        time.sleep(0.2)


def test_cinder_cli_with_a_password_and_cinderclient_with_an_application_credential(
    catalog_server: Server, cloud: Cloud, application_credential: tuple[str, str]
) -> None:
    from cinderclient import client as cinderclient
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    name = f"cli-{uuid.uuid4().hex[:6]}"
    created = parse_table(cinder(*password_args(cloud), "create", "--name", name, "1").stdout)
    volume_id = {row["Property"]: row["Value"] for row in created}["id"]
    # cinderclient's CLI cannot log in with an application credential (it insists on a project, which Keystone
    # refuses to scope an application credential to), so its library does, on a keystoneauth session: the
    # same client code, finding Tether in the same catalog
    auth = v3.ApplicationCredential(
        auth_url=cloud.url,
        application_credential_id=application_credential[0],
        application_credential_secret=application_credential[1],
    )
    volumes = cinderclient.Client("3.71", session=session.Session(auth=auth)).volumes
    wait_available(lambda vid: volumes.get(vid).status, volume_id)
    shown = volumes.get(volume_id)
    assert getattr(shown, "os-vol-tenant-attr:tenant_id") == cloud.users["alice"].project_id
    assert name in {v.name for v in volumes.list()}
    listed = parse_table(cinder(*password_args(cloud), "list").stdout)
    assert name in {row["Name"] for row in listed}
    volumes.delete(volume_id)


def test_openstacksdk_from_a_clouds_yaml(
    catalog_server: Server, cloud: Cloud, application_credential: tuple[str, str], tmp_path: Path
) -> None:
    import openstack.config
    import openstack.connection

    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n"
        "  tether-password:\n"
        "    auth:\n"
        f"      auth_url: {cloud.url}\n"
        "      username: alice\n"
        f"      password: {PASSWORD}\n"
        "      project_name: demo\n"
        "      user_domain_name: Default\n"
        "      project_domain_name: Default\n"
        "    region_name: RegionOne\n"
        "  tether-application-credential:\n"
        "    auth_type: v3applicationcredential\n"
        "    auth:\n"
        f"      auth_url: {cloud.url}\n"
        f"      application_credential_id: {application_credential[0]}\n"
        f"      application_credential_secret: {application_credential[1]}\n"
        "    region_name: RegionOne\n"
    )
    config = openstack.config.OpenStackConfig(config_files=[str(clouds)], load_envvars=False)
    for name in ("tether-password", "tether-application-credential"):
        conn = openstack.connection.Connection(config=config.get_one(cloud=name))
        try:
            volume = conn.block_storage.create_volume(size=1, name=f"sdk-{uuid.uuid4().hex[:6]}")
            conn.block_storage.wait_for_status(volume, "available", interval=0.2, wait=30)
            assert volume.id in {v.id for v in conn.block_storage.volumes()}
            # the bare-metal path: an attachment with a connector, completed, deleted
            attachment = conn.block_storage.create_attachment(
                volume.id, connector={"initiator": "iqn.1993-08.org.debian:01:sdk", "host": "sdk"}
            )
            assert attachment.connection_info["target_iqn"].endswith(volume.id)
            conn.block_storage.complete_attachment(attachment)
            assert conn.block_storage.get_volume(volume.id).status == "in-use"
            conn.block_storage.delete_attachment(attachment, ignore_missing=False)
            conn.block_storage.delete_volume(volume, ignore_missing=False)
        finally:
            conn.close()
