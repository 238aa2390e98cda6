"""What `pulumi up` runs: the program is watertight_infra.program (README, "Deploying to
Kubernetes with Pulumi")."""

from watertight_infra.program import main

main()
