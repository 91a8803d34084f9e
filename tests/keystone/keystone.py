"""A real Keystone for SPEC 11's tests and benchmarks, and its admin API (tests/keystone/conftest.py starts it).

Keystone 30.0.0 runs from .venvs/keystone (scripts/client-venvs) on SQLite in a temporary directory: its
database, Fernet token, receipt and credential keys all live there, never under /etc/keystone. gunicorn
serves it with its options in a gunicorn.conf.py and no arguments at all (oslo.config parses sys.argv,
so any option on gunicorn's command line crashes its workers).

`Cloud` is Keystone's admin API and the users the tests share, made once (make_cloud): the project `demo`
with a member (alice) and a reader (rita), the project `other` with a member (bob) and a reader (olga), the
bootstrap admin, and in the project `service` the users Tether validates tokens as (`tether`) and Nova sends
its service token as (`nova`), both with the role service. Tests that revoke or expire a token make tokens
of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT, free_port

VENV = ROOT / ".venvs" / "keystone"
ADMIN_PASSWORD = "keystone-admin-secret"
PASSWORD = "tether-test-password"
START_TIMEOUT = 90.0


class Keystone:
    """One Keystone (and its gunicorn) in `home`; stop() and start() again keep its database and keys."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v3"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("OS_")}}
        self.env["OS_KEYSTONE_CONFIG_FILES"] = str(home / "keystone.conf")
        self.log = home / "keystone.log"

    def _manage(self, *args: str) -> None:
        result = subprocess.run(
            # keystone-manage reads only --config-file (OS_KEYSTONE_CONFIG_FILES is the WSGI app's), and without
            # one it writes its keys under /etc/keystone
            [str(VENV / "bin" / "keystone-manage"), "--config-file", str(self.home / "keystone.conf"), *args],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"keystone-manage {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def install(self) -> None:
        """keystone.conf, the database and the keys in `home`, and the bootstrap admin, region and endpoints."""
        for repository in ("fernet", "receipts", "credential"):
            (self.home / repository).mkdir(mode=0o700)
        (self.home / "keystone.conf").write_text(
            "[DEFAULT]\nuse_stderr = true\n"
            f"[database]\nconnection = sqlite:///{self.home}/keystone.db\n"
            # every key repository in the temporary directory: fernet_setup also makes receipt keys, which
            # would otherwise go to /etc/keystone/fernet-keys
            f"[fernet_tokens]\nkey_repository = {self.home}/fernet\n"
            f"[fernet_receipts]\nkey_repository = {self.home}/receipts\n"
            f"[credential]\nkey_repository = {self.home}/credential\n"
            # bcrypt's fewest rounds: a password login costs milliseconds, not a quarter second
            "[identity]\npassword_hash_rounds = 4\n"
            "[token]\nexpiration = 3600\n"
        )
        (self.home / "gunicorn.conf.py").write_text(
            'wsgi_app = "keystone.wsgi.api:application"\n'
            f'bind = "127.0.0.1:{self.port}"\n'
            "workers = 2\n"
            "timeout = 120\n"
            # gunicorn 27 otherwise shares one control socket between instances
            "control_socket_disable = True\n"
        )
        self._manage("db_sync")
        self._manage("fernet_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage(
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-admin-url",
            self.url,
            "--bootstrap-internal-url",
            self.url,
            "--bootstrap-public-url",
            self.url,
            "--bootstrap-region-id",
            "RegionOne",
        )

    def start(self) -> None:
        with self.log.open("ab") as log:
            # a bare `gunicorn`, from the folder that holds gunicorn.conf.py
            self.process = subprocess.Popen(
                [str(VENV / "bin" / "gunicorn")], cwd=self.home, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Keystone did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Keystone down for the block, and up again after it (its tokens stay valid: same keys)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class User:
    name: str
    id: str
    project: str
    project_id: str
    password: str = PASSWORD
    token: str = ""


@dataclass
class Cloud:
    """Keystone's admin API over plain HTTP, and the users every test shares."""

    keystone: Keystone
    http: httpx.Client
    users: dict[str, User] = field(default_factory=dict)
    projects: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.keystone.url

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = None, status: int = 200) -> Any:
        headers = {"X-Auth-Token": token} if token else {}
        response = self.http.request(method, f"{self.url}{path}", json=body, headers=headers)
        assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def password_token(self, user: str, password: str, project: str) -> str:
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}},
                },
                "scope": {"project": {"name": project, "domain": {"id": "default"}}},
            }
        }
        response = self.http.post(f"{self.url}/auth/tokens?nocatalog", json=body)
        assert response.status_code == 201, response.text
        return response.headers["X-Subject-Token"]

    def token(self, name: str) -> str:
        """A fresh token of one of the cloud's users (never cached anywhere yet)."""
        user = self.users[name]
        return self.password_token(user.name, user.password, user.project)

    def project(self, name: str) -> str:
        if name not in self.projects:
            found = self.call("GET", f"/projects?name={name}")["projects"]
            if found:
                self.projects[name] = found[0]["id"]
            else:
                body = {"project": {"name": name, "domain_id": "default"}}
                self.projects[name] = self.call("POST", "/projects", body, status=201)["project"]["id"]
        return self.projects[name]

    def user(self, name: str, project: str, *roles: str) -> User:
        project_id = self.project(project)
        body = {"user": {"name": name, "password": PASSWORD, "domain_id": "default", "default_project_id": project_id}}
        user_id = self.call("POST", "/users", body, status=201)["user"]["id"]
        for role in roles:
            self.call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{self.roles[role]}", status=204)
        user = User(name, user_id, project, project_id)
        user.token = self.password_token(name, PASSWORD, project)
        self.users[name] = user
        return user

    def application_credential(self, name: str, *, expires_at: datetime | None = None) -> tuple[str, str]:
        """(id, secret) of a new application credential of the user `name` (made with the user's own token)."""
        user = self.users[name]
        body: dict[str, Any] = {"application_credential": {"name": f"tether-{uuid.uuid4().hex[:8]}"}}
        if expires_at is not None:
            body["application_credential"]["expires_at"] = expires_at.strftime("%Y-%m-%dT%H:%M:%S")
        made = self.call("POST", f"/users/{user.id}/application_credentials", body, token=user.token, status=201)
        return made["application_credential"]["id"], made["application_credential"]["secret"]

    def application_credential_token(self, credential_id: str, secret: str) -> str:
        body = {
            "auth": {
                "identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": credential_id, "secret": secret},
                }
            }
        }
        response = self.http.post(f"{self.url}/auth/tokens?nocatalog", json=body)
        assert response.status_code == 201, response.text
        return response.headers["X-Subject-Token"]

    def revoke(self, token: str) -> None:
        response = self.http.delete(f"{self.url}/auth/tokens", headers={"X-Subject-Token": token})
        assert response.status_code == 204, response.text

    def register_tether(self, base: str) -> None:
        """Tether in the catalog, as the README says: volumev3 and block-storage at `<base>/v3/%(project_id)s`."""
        url = f"{base}/v3/%(project_id)s"
        for kind, name in (("volumev3", "cinderv3"), ("block-storage", "block-storage")):
            for old in self.call("GET", f"/services?type={kind}")["services"]:
                self.call("DELETE", f"/services/{old['id']}", status=204)
            body = {"service": {"type": kind, "name": name, "description": "Tether"}}
            service_id = self.call("POST", "/services", body, status=201)["service"]["id"]
            for interface in ("public", "internal", "admin"):
                endpoint = {"service_id": service_id, "interface": interface, "url": url, "region_id": "RegionOne"}
                self.call("POST", "/endpoints", {"endpoint": endpoint}, status=201)


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def make_cloud(keystone: Keystone, http: httpx.Client) -> Cloud:
    """The users every test shares (and the benchmark's), in a fresh Keystone."""
    world = Cloud(keystone, http)
    admin_token = world.password_token("admin", ADMIN_PASSWORD, "admin")
    http.headers["X-Auth-Token"] = admin_token
    world.roles = {role["name"]: role["id"] for role in world.call("GET", "/roles")["roles"]}
    admin = world.call("GET", "/users?name=admin")["users"][0]
    world.users["admin"] = User("admin", admin["id"], "admin", world.project("admin"), ADMIN_PASSWORD, admin_token)
    world.user("tether", "service", "service")
    world.user("nova", "service", "service")
    world.user("alice", "demo", "member")
    world.user("rita", "demo", "reader")
    world.user("bob", "other", "member")
    world.user("olga", "other", "reader")
    return world
