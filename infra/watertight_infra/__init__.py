"""The Pulumi program of infra/: the topology of watertight.topology on three Kubernetes clusters.

``settings`` (the stack's config), ``sizing`` (pods for the load), ``kube`` (shared builders),
``components`` (Site, EtcdMember, AppTier, Cell, CellMember, LoadGenerator), ``monitoring``,
``program`` (what ``pulumi up`` runs), ``policies`` (the CrossGuard pack's checks) and
``harness`` (the program under Pulumi's mocks: tests and snapshots).
"""
