"""The door (SPEC 11): each route's one policy decision, made against the project of what it acts on.

A route calls one of these first, once its body is parsed: `await api.auth.volume(volume_id, rule)`. The target
is `{project_id: <the resource's project>}`, as Cinder's `context.authorize(rule, target_obj=volume)`. What
the caller cannot see is a 404 before it can be a 403, so another project's volume looks exactly like a
missing one, to readers too.
"""

from __future__ import annotations

from app.auth import Context
from app.errors import Forbidden
from app.policy import Policy
from app.services.attachments import AttachmentService
from app.services.volumes import VolumeService


class Authorizer:
    def __init__(self, policy: Policy, ctx: Context, volumes: VolumeService, attachments: AttachmentService) -> None:
        self.policy = policy
        self.ctx = ctx
        self.volumes = volumes
        self.attachments = attachments

    def _allows(self, rules: tuple[str, ...], project_id: str) -> bool:
        return all(self.policy.allows(self.ctx, rule, project_id) for rule in rules)

    def _require(self, rules: tuple[str, ...], project_id: str) -> None:
        if not self._allows(rules, project_id):
            raise Forbidden()

    def caller(self, *rules: str) -> None:
        """Creates, lists and what belongs to no project (types, pools): the target is the caller's project."""
        self._require(rules, self.ctx.project_id)

    async def volume(self, volume_id: str, *rules: str) -> None:
        ctx = self.ctx
        # a caller that sees only its own project either acts on its own project's volume (the same decision)
        # or on one it cannot see, which the service answers 404: no lookup on the allowed path
        if not ctx.all_projects and self._allows(rules, ctx.project_id):
            return
        self._require(rules, await self.volumes.project_of(ctx, volume_id))

    async def attachment(self, attachment_id: str, *rules: str) -> None:
        ctx = self.ctx
        if not ctx.all_projects and self._allows(rules, ctx.project_id):
            return
        self._require(rules, await self.attachments.project_of(ctx, attachment_id))
