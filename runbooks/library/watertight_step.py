#!/usr/bin/python
"""Ansible module: one step of a Watertight runbook on the local target, or one the kubernetes
target runs on the controller (the RPO of an ack log).

Thin on purpose: the step itself (idempotent, bounded, with a check mode) lives in
``watertight.runbooks.ops`` so the CLI, the chaos actions and these playbooks share it. Runs under
the interpreter that has watertight installed (the runner sets ansible_python_interpreter).
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: watertight_step
short_description: One step of a Watertight runbook (switchover, drain, fence, promote dr...)
options:
  step: {description: the step, required: true, type: str}
  run_dir: {description: run directory of the local topology, required: true, type: path}
  cell: {description: cell number, type: int}
  site: {description: a site name, type: str}
  to_site: {description: the center that takes over, type: str}
  drained: {description: drain (true) or bring back (false), type: bool}
  ack_log: {description: ack log of the load to check for lost transactions, type: path}
  found_keys:
    description: the idempotency keys the cells' ledgers hold (kubernetes, where psql lists them)
    type: list
    elements: str
  phase: {description: the phase of a rotation (begin or finish), type: str}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 (DOCUMENTATION first, as Ansible modules do)

READ_ONLY = ("facts", "ack_log_window", "rpo_of_ack_log")  # every other step takes check=


def main() -> None:
    from watertight.runbooks import failback, ops, rotation

    steps = {**ops.STEPS, **failback.STEPS, **rotation.STEPS}
    module = AnsibleModule(
        argument_spec={
            "step": {"type": "str", "required": True, "choices": sorted(steps)},
            "run_dir": {"type": "path", "required": True},
            "cell": {"type": "int"},
            "site": {"type": "str"},
            "to_site": {"type": "str"},
            "drained": {"type": "bool"},
            "ack_log": {"type": "path"},
            "found_keys": {"type": "list", "elements": "str"},
            "phase": {"type": "str"},
        },
        supports_check_mode=True,
    )
    params = module.params
    arguments = {
        name: params[name]
        for name in ("cell", "site", "to_site", "drained", "ack_log", "found_keys", "phase")
        if params[name] is not None
    }
    if params["step"] not in READ_ONLY:
        arguments["check"] = module.check_mode
    try:
        result = steps[params["step"]](params["run_dir"], **arguments)
    except TypeError as error:
        module.fail_json(msg=f"step {params['step']}: wrong arguments: {error}")
    except ops.StepError as error:
        module.fail_json(msg=str(error))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
