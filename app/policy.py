"""Who may do what: Cinder's policy rules as data, one oslo.policy Enforcer per app, decisions per caller.

Every rule Tether enforces is here under Cinder's name with Cinder's default check string
(cinder/policies/*.py, the Xena-era project-scoped defaults Cinder ships), so an operator's Cinder
`policy.yaml` applies unchanged through TETHER_POLICY_FILE. The base rules (`admin_api`,
`xena_system_admin_or_project_member`, …) are Cinder's too, so a file that says `rule:admin_api` means
what it means there. Rules Cinder does not have (attachment reads, /metrics) carry a note saying so.

Each route asks once, at the door (app/routers/enforce.py), with the target `{project_id: <the project of
the resource it acts on>}`; services never ask.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_policy import policy as oslo

from app.auth import Context

# -- Cinder's base rules (cinder/policies/base.py) ----------------------------------------------------
CONTEXT_IS_ADMIN = "context_is_admin"
ADMIN_API = "admin_api"
ADMIN_OR_OWNER = "admin_or_owner"
SYSTEM_ADMIN_OR_PROJECT_READER = "xena_system_admin_or_project_reader"
SYSTEM_ADMIN_OR_PROJECT_MEMBER = "xena_system_admin_or_project_member"

RULE_ADMIN_API = f"rule:{ADMIN_API}"
RULE_READER = f"rule:{SYSTEM_ADMIN_OR_PROJECT_READER}"
RULE_MEMBER = f"rule:{SYSTEM_ADMIN_OR_PROJECT_MEMBER}"

BASE_RULES: list[oslo.RuleDefault] = [
    oslo.RuleDefault(
        CONTEXT_IS_ADMIN,
        "role:admin",
        description="Decides what is required for the 'is_admin:True' check to succeed; in Tether also who "
        "sees and lists every project's volumes and attachments.",
    ),
    oslo.RuleDefault(
        ADMIN_API,
        "is_admin:True or (role:admin and is_admin_project:True)",
        description="Default rule for most Admin APIs.",
    ),
    oslo.RuleDefault(
        ADMIN_OR_OWNER,
        "is_admin:True or (role:admin and is_admin_project:True) or project_id:%(project_id)s",
        description="Cinder's legacy rule for most non-Admin APIs (no default uses it; policy files may).",
    ),
    oslo.RuleDefault(
        SYSTEM_ADMIN_OR_PROJECT_READER,
        "(role:admin) or (role:reader and project_id:%(project_id)s)",
        description="An admin, or a reader of the target's project.",
    ),
    oslo.RuleDefault(
        SYSTEM_ADMIN_OR_PROJECT_MEMBER,
        "(role:admin) or (role:member and project_id:%(project_id)s)",
        description="An admin, or a member of the target's project.",
    ),
]

# -- volumes (cinder/policies/volumes.py) ----------------------------------------------------------------
VOLUME_CREATE = "volume:create"
VOLUME_GET = "volume:get"
VOLUME_GET_ALL = "volume:get_all"
VOLUME_UPDATE = "volume:update"
VOLUME_DELETE = "volume:delete"
VOLUME_FORCE_DELETE = "volume:force_delete"
VOLUME_HOST_ATTRIBUTE = "volume_extension:volume_host_attribute"
VOLUME_MIG_STATUS_ATTRIBUTE = "volume_extension:volume_mig_status_attribute"
# -- volume metadata (cinder/policies/volume_metadata.py)
VOLUME_METADATA_GET = "volume:get_volume_metadata"
VOLUME_METADATA_CREATE = "volume:create_volume_metadata"
VOLUME_METADATA_UPDATE = "volume:update_volume_metadata"
VOLUME_METADATA_DELETE = "volume:delete_volume_metadata"
# -- attachments (cinder/policies/attachments.py)
ATTACHMENT_CREATE = "volume:attachment_create"
ATTACHMENT_UPDATE = "volume:attachment_update"
ATTACHMENT_DELETE = "volume:attachment_delete"
ATTACHMENT_COMPLETE = "volume:attachment_complete"
# Tether's: Cinder reads attachments under no rule at all (any token of the project), SPEC 11 a reader's
ATTACHMENT_GET = "volume:attachment_get"
ATTACHMENT_GET_ALL = "volume:attachment_get_all"
# -- the classic actions (cinder/policies/volume_actions.py)
_ACTIONS = "volume_extension:volume_actions"
RESERVE = f"{_ACTIONS}:reserve"
UNRESERVE = f"{_ACTIONS}:unreserve"
INITIALIZE_CONNECTION = f"{_ACTIONS}:initialize_connection"
TERMINATE_CONNECTION = f"{_ACTIONS}:terminate_connection"
ATTACH = f"{_ACTIONS}:attach"
DETACH = f"{_ACTIONS}:detach"
BEGIN_DETACHING = f"{_ACTIONS}:begin_detaching"
ROLL_DETACHING = f"{_ACTIONS}:roll_detaching"
_ADMIN_ACTIONS = "volume_extension:volume_admin_actions"
FORCE_DETACH = f"{_ADMIN_ACTIONS}:force_detach"
RESET_STATUS = f"{_ADMIN_ACTIONS}:reset_status"
# Cinder's rule for the os-force_delete action, which Tether does not serve: registered so a policy file
# naming it loads as it does for Cinder (a forced DELETE /volumes/{id} is volume:force_delete, as in Cinder)
FORCE_DELETE_ACTION = f"{_ADMIN_ACTIONS}:force_delete"
# -- volume types and their extra specs (cinder/policies/volume_type.py, type_extra_specs.py)
TYPE_CREATE = "volume_extension:type_create"
TYPE_DELETE = "volume_extension:type_delete"
TYPE_GET = "volume_extension:type_get"
TYPE_GET_ALL = "volume_extension:type_get_all"
EXTRA_SPECS_CREATE = "volume_extension:types_extra_specs:create"
EXTRA_SPECS_DELETE = "volume_extension:types_extra_specs:delete"
EXTRA_SPECS_INDEX = "volume_extension:types_extra_specs:index"
# -- capacity and services (cinder/policies/scheduler_stats.py, services.py)
GET_POOLS = "scheduler_extension:scheduler_stats:get_pools"
SERVICES_INDEX = "volume_extension:services:index"
# Tether's: Prometheus metrics, enforced in keystone mode only (noauth serves them to anyone, as before)
METRICS = "tether:get_metrics"


def _rule(name: str, check_str: str, description: str, *operations: tuple[str, str]) -> oslo.DocumentedRuleDefault:
    return oslo.DocumentedRuleDefault(
        name=name,
        check_str=check_str,
        description=description,
        operations=[{"method": method, "path": path} for method, path in operations],
    )


def _action(name: str, check_str: str, description: str, action: str) -> oslo.DocumentedRuleDefault:
    return _rule(name, check_str, description, ("POST", f"/volumes/{{volume_id}}/action ({action})"))


OPERATION_RULES: list[oslo.DocumentedRuleDefault] = [
    _rule(VOLUME_CREATE, RULE_MEMBER, "Create volume.", ("POST", "/volumes")),
    _rule(VOLUME_GET, RULE_READER, "Show volume.", ("GET", "/volumes/{volume_id}")),
    _rule(
        VOLUME_GET_ALL,
        RULE_READER,
        "List volumes or get summary of volumes.",
        ("GET", "/volumes"),
        ("GET", "/volumes/detail"),
    ),
    _rule(VOLUME_UPDATE, RULE_MEMBER, "Update volume.", ("PUT", "/volumes/{volume_id}")),
    _rule(VOLUME_DELETE, RULE_MEMBER, "Delete volume.", ("DELETE", "/volumes/{volume_id}")),
    _rule(VOLUME_FORCE_DELETE, RULE_ADMIN_API, "Force Delete a volume.", ("DELETE", "/volumes/{volume_id}?force=true")),
    _rule(
        VOLUME_HOST_ATTRIBUTE,
        RULE_ADMIN_API,
        "List or show volume with host attribute (and the host of its attachments).",
        ("GET", "/volumes/{volume_id}"),
        ("GET", "/volumes/detail"),
    ),
    _rule(
        VOLUME_MIG_STATUS_ATTRIBUTE,
        RULE_ADMIN_API,
        "List or show volume with migration status attribute.",
        ("GET", "/volumes/{volume_id}"),
        ("GET", "/volumes/detail"),
    ),
    _rule(
        VOLUME_METADATA_GET,
        RULE_READER,
        "Show volume's metadata or one specified metadata with a given key.",
        ("GET", "/volumes/{volume_id}/metadata"),
        ("GET", "/volumes/{volume_id}/metadata/{key}"),
    ),
    _rule(VOLUME_METADATA_CREATE, RULE_MEMBER, "Create volume metadata.", ("POST", "/volumes/{volume_id}/metadata")),
    _rule(
        VOLUME_METADATA_UPDATE,
        RULE_MEMBER,
        "Replace a volume's metadata dictionary or update a single metadatum with a given key.",
        ("PUT", "/volumes/{volume_id}/metadata"),
        ("PUT", "/volumes/{volume_id}/metadata/{key}"),
    ),
    _rule(
        VOLUME_METADATA_DELETE,
        RULE_MEMBER,
        "Delete a volume's metadatum with the given key.",
        ("DELETE", "/volumes/{volume_id}/metadata/{key}"),
    ),
    _rule(ATTACHMENT_CREATE, RULE_MEMBER, "Create attachment.", ("POST", "/attachments")),
    _rule(ATTACHMENT_UPDATE, RULE_MEMBER, "Update attachment.", ("PUT", "/attachments/{attachment_id}")),
    _rule(ATTACHMENT_DELETE, RULE_MEMBER, "Delete attachment.", ("DELETE", "/attachments/{attachment_id}")),
    _rule(
        ATTACHMENT_COMPLETE,
        RULE_MEMBER,
        "Mark a volume attachment process as completed (in-use)",
        ("POST", "/attachments/{attachment_id}/action (os-complete)"),
    ),
    _rule(
        ATTACHMENT_GET,
        RULE_READER,
        "Show attachment (Tether's rule: Cinder has none).",
        ("GET", "/attachments/{attachment_id}"),
    ),
    _rule(
        ATTACHMENT_GET_ALL,
        RULE_READER,
        "List attachments (Tether's rule: Cinder has none).",
        ("GET", "/attachments"),
        ("GET", "/attachments/detail"),
    ),
    _action(RESERVE, RULE_MEMBER, "Mark volume as reserved.", "os-reserve"),
    _action(UNRESERVE, RULE_MEMBER, "Unmark volume as reserved.", "os-unreserve"),
    _action(INITIALIZE_CONNECTION, RULE_MEMBER, "Initialize volume attachment.", "os-initialize_connection"),
    _action(TERMINATE_CONNECTION, RULE_MEMBER, "Terminate volume attachment.", "os-terminate_connection"),
    _action(ATTACH, RULE_MEMBER, "Add attachment metadata.", "os-attach"),
    _action(DETACH, RULE_MEMBER, "Clear attachment metadata.", "os-detach"),
    _action(BEGIN_DETACHING, RULE_MEMBER, "Begin detach volumes.", "os-begin_detaching"),
    _action(ROLL_DETACHING, RULE_MEMBER, "Roll back volume status to 'in-use'.", "os-roll_detaching"),
    _action(FORCE_DETACH, RULE_ADMIN_API, "Force detach a volume.", "os-force_detach"),
    _action(RESET_STATUS, RULE_ADMIN_API, "Reset status of a volume.", "os-reset_status"),
    _action(
        FORCE_DELETE_ACTION,
        RULE_ADMIN_API,
        "Force delete a volume (an action Tether does not serve).",
        "os-force_delete",
    ),
    _rule(TYPE_CREATE, RULE_ADMIN_API, "Create volume type.", ("POST", "/types")),
    _rule(TYPE_DELETE, RULE_ADMIN_API, "Delete volume type.", ("DELETE", "/types/{type_id}")),
    _rule(
        TYPE_GET, RULE_READER, "Get one specific volume type.", ("GET", "/types/{type_id}"), ("GET", "/types/default")
    ),
    _rule(TYPE_GET_ALL, RULE_READER, "List volume types.", ("GET", "/types")),
    _rule(EXTRA_SPECS_CREATE, RULE_ADMIN_API, "Create type extra specs.", ("POST", "/types/{type_id}/extra_specs")),
    _rule(
        EXTRA_SPECS_DELETE,
        RULE_ADMIN_API,
        "Delete type extra specs.",
        ("DELETE", "/types/{type_id}/extra_specs/{extra_spec_key}"),
    ),
    _rule(EXTRA_SPECS_INDEX, RULE_READER, "List type extra specs.", ("GET", "/types/{type_id}/extra_specs")),
    _rule(GET_POOLS, RULE_ADMIN_API, "List all backend pools.", ("GET", "/scheduler-stats/get_pools")),
    _rule(SERVICES_INDEX, RULE_ADMIN_API, "List all services.", ("GET", "/os-services")),
    _rule(METRICS, RULE_ADMIN_API, "Read Prometheus metrics, in keystone mode (Tether's rule).", ("GET", "/metrics")),
]

RULES: list[oslo.RuleDefault] = [*BASE_RULES, *OPERATION_RULES]

# decisions remembered per (rule, credentials, target): rules never change after load, so one decision is
# always the same decision; oslo.policy spends ~100 µs on one (inspect.getfullargspec per check)
_DECISIONS_KEPT = 8192


class PolicyFileError(ValueError):
    """TETHER_POLICY_FILE is missing or unreadable: the app refuses to start rather than run on defaults."""


def _credentials(ctx: Context) -> dict[str, Any]:
    return {
        "user_id": ctx.user_id,
        "project_id": ctx.project_id,
        "roles": sorted(ctx.roles),
        "service_roles": sorted(ctx.service_roles),
        "is_admin_project": ctx.is_admin_project,
    }


@dataclass
class Policy:
    """The app's one Enforcer: Cinder's defaults, then the policy file's rules over them, loaded once."""

    policy_file: str | None = None
    _enforcer: oslo.Enforcer = field(init=False, repr=False)
    _decisions: OrderedDict[tuple[Any, ...], bool] = field(default_factory=OrderedDict, init=False, repr=False)
    _remember: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        conf = cfg.ConfigOpts()
        # its own ConfigOpts, parsed from nothing: never sys.argv, never /etc/tether
        conf(args=[], project="tether", default_config_files=[], default_config_dirs=[])
        if self.policy_file is None:
            self._enforcer = oslo.Enforcer(conf, use_conf=False)
            self._enforcer.register_defaults(RULES)
            self._enforcer.set_rules({rule.name: rule.check for rule in RULES}, use_conf=False)
        else:
            path = Path(self.policy_file).resolve()
            if not path.is_file():
                raise PolicyFileError(f"TETHER_POLICY_FILE {self.policy_file} does not exist or is not a file.")
            self._enforcer = oslo.Enforcer(conf, policy_file=str(path), overwrite=True)
            self._enforcer.register_defaults(RULES)
            try:
                self._enforcer.load_rules()
            except ValueError as error:
                raise PolicyFileError(f"TETHER_POLICY_FILE {self.policy_file} cannot be read: {error}") from None
            # loaded once: from here on no request stats or re-reads the file
            self._enforcer.use_conf = False
            # an http: check asks a remote server every time, so its decisions are never remembered
            self._remember = not any(
                "http:" in str(check) or "https:" in str(check) for check in self._enforcer.rules.values()
            )

    @property
    def rules(self) -> dict[str, str]:
        """Every rule in force, by name, as a check string (what `oslopolicy-policy-generator` would print)."""
        return {name: str(check) for name, check in self._enforcer.rules.items()}

    def allows(self, ctx: Context, rule: str, project_id: str) -> bool:
        """Whether the caller may do `rule` to what belongs to `project_id`. An unknown rule never allows."""
        key = (rule, project_id, ctx.user_id, ctx.project_id, ctx.roles, ctx.service_roles, ctx.is_admin_project)
        decided = self._decisions.get(key)
        if decided is not None:
            return decided
        creds = _credentials(ctx)
        # Cinder's RequestContext: is_admin is the decision of context_is_admin on the caller's own project
        creds["is_admin"] = bool(self._enforcer.enforce(CONTEXT_IS_ADMIN, {"project_id": ctx.project_id}, creds))
        decided = bool(self._enforcer.enforce(rule, {"project_id": project_id}, creds))
        if self._remember:
            self._decisions[key] = decided
            if len(self._decisions) > _DECISIONS_KEPT:
                self._decisions.popitem(last=False)
        return decided

    def decide(self, ctx: Context) -> Context:
        """The caller's context with what the policy decides about the caller as such (not about one request):
        whether it sees other projects, and which admin-only fields of a volume it is shown."""
        return replace(
            ctx,
            all_projects=self.allows(ctx, CONTEXT_IS_ADMIN, ctx.project_id),
            shows_host=self.allows(ctx, VOLUME_HOST_ATTRIBUTE, ctx.project_id),
            shows_migration=self.allows(ctx, VOLUME_MIG_STATUS_ATTRIBUTE, ctx.project_id),
        )
