"""Who is calling: the caller's Context, and the noauth scheme (`X-Auth-Token: user:project`) that makes one.

Keystone mode makes the same Context from a validated token (app/keystone.py); app/policy.py then decides
what the context may see (`all_projects`, the admin-only fields) and, at each route, what it may do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.errors import BadRequest, Unauthorized

MAX_ID_LENGTH = 255
# Keystone's bootstrap makes admin imply member and member imply reader; noauth gives the same sets
ADMIN_ROLES = frozenset({"admin", "member", "reader"})
MEMBER_ROLES = frozenset({"member", "reader"})
READER_ROLES = frozenset({"reader"})


@dataclass(frozen=True)
class Context:
    user_id: str
    project_id: str
    roles: frozenset[str] = MEMBER_ROLES
    # the roles of a valid X-Service-Token (Nova's); empty without one, and always in noauth
    service_roles: frozenset[str] = frozenset()
    # Keystone's is_admin_project (true unless Keystone names an admin project and this is another one)
    is_admin_project: bool = True
    # decided by the policy (Policy.decide) when the request's context is made:
    # sees and lists every project's resources (rule context_is_admin) ...
    all_projects: bool = False
    # ... is shown a volume's host and its attachments' hosts, and a volume's migration status
    shows_host: bool = False
    shows_migration: bool = False
    # OSSA-2023-003: deleting an attachment a server uses needs a service token (keystone mode only)
    guards_in_use: bool = False

    def sees(self, project_id: str) -> bool:
        """Whether what belongs to `project_id` exists for this caller: its own project's, or anything when
        the policy lets it see every project."""
        return self.all_projects or project_id == self.project_id


def check_path_project(project_id: str, path_project: str | None) -> None:
    """A project in the URL must be the caller's own, admins' included (SPEC 1)."""
    if path_project is not None and path_project != project_id:
        raise BadRequest("Malformed request url")


def context_from_headers(
    headers: Mapping[str, str],
    admin_users: frozenset[str],
    path_project: str | None = None,
    reader_users: frozenset[str] = frozenset(),
) -> Context:
    """noauth: `X-Auth-Token: user:project`, else X-User-Id / X-Project-Id, else 401.

    Users in TETHER_ADMIN_USERS have the role admin, users in TETHER_READER_USERS only reader, everyone
    else member and reader.
    """
    token = headers.get("x-auth-token")
    if token:
        user, sep, project = token.partition(":")
        if not sep:
            project = user
    else:
        user = headers.get("x-user-id") or ""
        project = headers.get("x-project-id") or user
    if not user or not project:
        raise Unauthorized("Authentication required: send X-Auth-Token.")
    if len(user) > MAX_ID_LENGTH or len(project) > MAX_ID_LENGTH:
        # Keystone ids are far shorter; the columns that record them hold 255 characters
        raise Unauthorized(f"Authentication failed: user and project ids are at most {MAX_ID_LENGTH} characters.")
    check_path_project(project, path_project)
    if user in admin_users:
        roles = ADMIN_ROLES
    elif user in reader_users:
        roles = READER_ROLES
    else:
        roles = MEMBER_ROLES
    return Context(user_id=user, project_id=project, roles=roles)
