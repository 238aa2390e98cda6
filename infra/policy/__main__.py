"""The policy pack: `pulumi preview --policy-pack policy` (from infra/). The policies themselves
are watertight_infra.policies, where the tests call them."""

from pulumi_policy import PolicyPack

from watertight_infra.policies import PACK_NAME, POLICIES

PolicyPack(name=PACK_NAME, policies=POLICIES)
