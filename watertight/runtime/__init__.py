"""Runtimes: where the topology runs. ``local`` runs every site as processes on this machine;
the Kubernetes target comes with the Pulumi programs. Chaos actions, the drill and runbooks talk
to a runtime through the same fault-control interface (``target.Target``)."""
