"""The policy table against Cinder's defaults, and what each persona may do under them (SPEC 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from oslo_policy import _parser

from app.auth import ADMIN_ROLES, MEMBER_ROLES, READER_ROLES, Context, context_from_headers
from app.policy import Policy, PolicyFileError
from app.routers.volume_actions import ACTION_POLICIES, ACTIONS
from app.routers.volume_metadata import POLICIES as METADATA_POLICIES

MEMBER = "rule:xena_system_admin_or_project_member"
READER = "rule:xena_system_admin_or_project_reader"
ADMIN = "rule:admin_api"

# Cinder's rule names and default check strings (cinder/policies/*.py, as `oslopolicy-sample-generator
# --namespace cinder` prints them), for every rule Tether enforces
CINDER_DEFAULTS = {
    "context_is_admin": "role:admin",
    "admin_api": "is_admin:True or (role:admin and is_admin_project:True)",
    "admin_or_owner": "is_admin:True or (role:admin and is_admin_project:True) or project_id:%(project_id)s",
    "xena_system_admin_or_project_reader": "(role:admin) or (role:reader and project_id:%(project_id)s)",
    "xena_system_admin_or_project_member": "(role:admin) or (role:member and project_id:%(project_id)s)",
    "volume:create": MEMBER,
    "volume:get": READER,
    "volume:get_all": READER,
    "volume:update": MEMBER,
    "volume:delete": MEMBER,
    "volume:force_delete": ADMIN,
    "volume_extension:volume_host_attribute": ADMIN,
    "volume_extension:volume_mig_status_attribute": ADMIN,
    "volume:get_volume_metadata": READER,
    "volume:create_volume_metadata": MEMBER,
    "volume:update_volume_metadata": MEMBER,
    "volume:delete_volume_metadata": MEMBER,
    "volume:attachment_create": MEMBER,
    "volume:attachment_update": MEMBER,
    "volume:attachment_delete": MEMBER,
    "volume:attachment_complete": MEMBER,
    "volume_extension:volume_actions:reserve": MEMBER,
    "volume_extension:volume_actions:unreserve": MEMBER,
    "volume_extension:volume_actions:initialize_connection": MEMBER,
    "volume_extension:volume_actions:terminate_connection": MEMBER,
    "volume_extension:volume_actions:attach": MEMBER,
    "volume_extension:volume_actions:detach": MEMBER,
    "volume_extension:volume_actions:begin_detaching": MEMBER,
    "volume_extension:volume_actions:roll_detaching": MEMBER,
    "volume_extension:volume_admin_actions:force_detach": ADMIN,
    "volume_extension:volume_admin_actions:reset_status": ADMIN,
    "volume_extension:volume_admin_actions:force_delete": ADMIN,
    "volume_extension:type_create": ADMIN,
    "volume_extension:type_delete": ADMIN,
    "volume_extension:type_get": READER,
    "volume_extension:type_get_all": READER,
    "volume_extension:types_extra_specs:create": ADMIN,
    "volume_extension:types_extra_specs:delete": ADMIN,
    "volume_extension:types_extra_specs:index": READER,
    "scheduler_extension:scheduler_stats:get_pools": ADMIN,
    "volume_extension:services:index": ADMIN,
}
# Tether's own rules, where Cinder has none
TETHER_RULES = {"volume:attachment_get": READER, "volume:attachment_get_all": READER, "tether:get_metrics": ADMIN}

P, Q = "p-own", "q-other"
PERSONAS = {
    "admin": Context("root", "admin", ADMIN_ROLES),
    "member": Context("alice", P, MEMBER_ROLES),
    "reader": Context("rita", P, READER_ROLES),
    "other member": Context("bob", Q, MEMBER_ROLES),
    "no role": Context("nobody", P, frozenset()),
    "service": Context("nova", "service", frozenset({"service"})),
}
# who passes a rule of each kind on project P's resources
MAY = {
    MEMBER: {"admin", "member"},
    READER: {"admin", "member", "reader"},
    ADMIN: {"admin"},
}


def normal(check_str: str) -> str:
    return str(_parser.parse_rule(check_str))


def test_every_cinder_rule_is_registered_with_cinders_default() -> None:
    rules = Policy().rules
    for name, check_str in {**CINDER_DEFAULTS, **TETHER_RULES}.items():
        assert name in rules, name
        assert rules[name] == normal(check_str), name
    # nothing registered that this table does not know about
    assert set(rules) == set(CINDER_DEFAULTS) | set(TETHER_RULES)


def test_spec_11s_check_strings_are_what_the_rules_expand_to() -> None:
    assert normal(CINDER_DEFAULTS["xena_system_admin_or_project_member"]) == normal(
        "(role:admin) or (role:member and project_id:%(project_id)s)"
    )
    assert normal(CINDER_DEFAULTS["xena_system_admin_or_project_reader"]) == normal(
        "(role:admin) or (role:reader and project_id:%(project_id)s)"
    )


def test_every_route_enforces_a_registered_rule() -> None:
    registered = set(Policy().rules)
    assert set(ACTION_POLICIES) == set(ACTIONS)
    assert set(ACTION_POLICIES.values()) <= registered
    assert set(METADATA_POLICIES.values()) <= registered


OPERATIONS = {name: check for name, check in {**CINDER_DEFAULTS, **TETHER_RULES}.items() if check in MAY}


@pytest.mark.parametrize("rule", sorted(OPERATIONS))
def test_each_persona_under_each_default(rule: str) -> None:
    enforcer = Policy()
    allowed = {name for name, ctx in PERSONAS.items() if enforcer.allows(ctx, rule, P)}
    assert allowed == MAY[OPERATIONS[rule]], rule


def test_base_rules_personas() -> None:
    enforcer = Policy()
    admin, member = PERSONAS["admin"], PERSONAS["member"]
    assert enforcer.allows(admin, "context_is_admin", P)
    assert not enforcer.allows(member, "context_is_admin", P)
    # admin_or_owner: the project's anyone, or an admin
    assert enforcer.allows(PERSONAS["no role"], "admin_or_owner", P)
    assert not enforcer.allows(PERSONAS["other member"], "admin_or_owner", P)
    # as in Cinder, role:admin anywhere is is_admin, so admin_api's is_admin_project half only matters once a
    # policy file narrows context_is_admin
    elsewhere = Context("root", "admin", ADMIN_ROLES, is_admin_project=False)
    assert enforcer.allows(elsewhere, "admin_api", P)


def test_is_admin_project_counts_once_context_is_admin_asks_for_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text('"context_is_admin": "role:admin and is_admin_project:True"\n')
    enforcer = Policy(str(path))
    elsewhere = Context("root", "admin", ADMIN_ROLES, is_admin_project=False)
    assert not enforcer.allows(elsewhere, "admin_api", P)
    assert not enforcer.decide(elsewhere).all_projects
    assert enforcer.allows(PERSONAS["admin"], "admin_api", P)


def test_the_decided_context() -> None:
    enforcer = Policy()
    admin = enforcer.decide(PERSONAS["admin"])
    assert (admin.all_projects, admin.shows_host, admin.shows_migration) == (True, True, True)
    assert admin.sees(Q)
    member = enforcer.decide(PERSONAS["member"])
    assert (member.all_projects, member.shows_host, member.shows_migration) == (False, False, False)
    assert member.sees(P)
    assert not member.sees(Q)


def test_unknown_rules_never_allow() -> None:
    assert not Policy().allows(PERSONAS["admin"], "volume:no_such_rule", P)


def test_noauth_roles() -> None:
    admins, readers = frozenset({"admin"}), frozenset({"rita"})
    assert context_from_headers({"x-auth-token": "admin:admin"}, admins, None, readers).roles == ADMIN_ROLES
    assert context_from_headers({"x-auth-token": "rita:p"}, admins, None, readers).roles == READER_ROLES
    assert context_from_headers({"x-auth-token": "alice:p"}, admins, None, readers).roles == MEMBER_ROLES
    # in noauth every caller is its own service: no service roles, and no in-use detach guard
    ctx = context_from_headers({"x-auth-token": "nova:service", "x-service-token": "x"}, admins, None, readers)
    assert (ctx.service_roles, ctx.guards_in_use) == (frozenset(), False)


def test_a_policy_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "# Cinder's policy.yaml format\n"
        '"volume:create": "rule:admin_api"\n'
        '"xena_system_admin_or_project_reader": "role:reader and project_id:%(project_id)s"\n'
        '"volume:some_future_rule": "role:admin"\n'
    )
    enforcer = Policy(str(path))
    assert not enforcer.allows(PERSONAS["member"], "volume:create", P)
    assert enforcer.allows(PERSONAS["admin"], "volume:create", P)
    # a base rule overridden changes every rule that uses it: the admin no longer reads other projects
    assert not enforcer.allows(PERSONAS["admin"], "volume:get", P)
    assert enforcer.allows(PERSONAS["member"], "volume:get", P)
    # the defaults it does not name stay
    assert enforcer.allows(PERSONAS["member"], "volume:delete", P)
    assert enforcer.rules["volume:some_future_rule"] == "role:admin"


def test_a_missing_or_broken_policy_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="does not exist"):
        Policy(str(tmp_path / "nowhere.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text('"volume:create": [unclosed\n')
    with pytest.raises(PolicyFileError, match="cannot be read"):
        Policy(str(broken))


def test_decisions_are_remembered_unless_a_rule_asks_a_server(tmp_path: Path) -> None:
    enforcer = Policy()
    assert enforcer.allows(PERSONAS["member"], "volume:get", P)
    assert enforcer._decisions
    path = tmp_path / "policy.yaml"
    path.write_text('"volume:get": "http://127.0.0.1:9/check"\n')
    remote = Policy(str(path))
    assert not remote._remember
