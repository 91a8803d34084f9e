"""Who is calling: the noauth token scheme, admin users, and the caller's Context."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.errors import BadRequest, Unauthorized

MAX_ID_LENGTH = 255


@dataclass(frozen=True)
class Context:
    user_id: str
    project_id: str
    is_admin: bool = False

    def sees(self, project_id: str) -> bool:
        """Whether what belongs to `project_id` exists for this caller: its own project's, or anything for an admin."""
        return self.is_admin or project_id == self.project_id


def context_from_headers(
    headers: Mapping[str, str], admin_users: frozenset[str], path_project: str | None = None
) -> Context:
    """noauth: `X-Auth-Token: user:project`, else X-User-Id / X-Project-Id, else 401."""
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
    if path_project is not None and path_project != project:
        raise BadRequest("Malformed request url")
    return Context(user_id=user, project_id=project, is_admin=user in admin_users)
