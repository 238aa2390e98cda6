"""One ComponentResource per concept of the topology: a Site (its cluster's provider, namespace,
credentials, etcd member, app servers, gateway, policies), a Cell (its PostgreSQL member in each
site), and the optional load generator and monitoring.

Owns: turning the rendered component configuration (``watertight.render``, the same functions
the local runtime uses) into Kubernetes objects, each declared with its site's provider and its
component as parent. Never: render a flag, a Patroni key or an app setting itself: a difference
from the local runtime belongs in ``render.KubernetesEndpoints``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pulumi
import pulumi_kubernetes as k8s
import yaml
from cardcore.platform import auth
from pulumi_kubernetes.apps import v1 as apps
from pulumi_kubernetes.autoscaling import v2 as autoscaling
from pulumi_kubernetes.autoscaling import v2beta2 as autoscaling_v2beta2
from pulumi_kubernetes.core import v1 as core
from pulumi_kubernetes.meta import v1 as meta
from pulumi_kubernetes.networking import v1 as networking

from watertight import render
from watertight.kube_names import (
    ANNOTATION_ACTIVE_REPLICAS,
    API_CLIENTS_DIR,
    API_CLIENTS_FILE,
    API_CLIENTS_SECRET,
    API_TOKENS_DIR,
    API_TOKENS_SECRET,
    CREDENTIALS_SECRET,
    DEFAULT_DENY_POLICY,
    DRAIN_CONFIG_MAP,
    DRAIN_FILE,
    ETCD_CONTAINER,
    LOCUST_CONTAINER,
    LOCUST_MASTER,
    LOCUST_WORKER,
    MEMBER_GUARD,
    PATRONI_CONFIG_DIR,
    PATRONI_CONTAINER,
    PATRONI_FILE,
    WATCHDOG_PIPE,
)
from watertight.kube_names import POSTGRES_DATA_DIR as POSTGRES_DATA_PATH
from watertight.topology import CENTERS, Topology
from watertight_infra import kube, monitoring
from watertight_infra.settings import HPA_V2_SINCE, PodSize, SiteSettings, StackSettings
from watertight_infra.sizing import Plan

TYPE_PREFIX = "watertight:infra"

# paths inside the images (core-app/Containerfile)
PYTHON = "python"
CORE_CONFIG_DIR = "/etc/cardcore"
POSTGRES_DATA_DIR = Path(POSTGRES_DATA_PATH)  # holds pgdata/, the socket and pgpass
ETCD_DATA_MOUNT = "/var/lib/etcd"
ETCD_DATA_DIR = Path(ETCD_DATA_MOUNT) / "data"  # etcd creates it 0700 inside the volume
LOCUSTFILE = "/loadtests/locustfile.py"
# where the gateway pods mount the drain ConfigMap: a directory (a subPath mount never sees the update)
DRAIN_DIR = "/etc/cardcore-drain"
CORE_USER_ID = 10001
POSTGRES_USER_ID = 999
ETCD_USER_ID = 65532
LEADER_GATE_SIZE = PodSize(cpu_millis=50, memory_mib=64)
LOCUST_MASTER_PORT = 5557
LOCUST_WEB_PORT = 8089

APP_MODULE = "cardcore"  # python -m cardcore --config FILE: what render_local starts
GATEWAY_MODULE = "cardcore.gateway"
PATRONI_MODULE = "patroni"


def app_command(config_file: str) -> list[str]:
    return [PYTHON, "-m", APP_MODULE, "--config", config_file]


def gateway_command(config_file: str) -> list[str]:
    return [PYTHON, "-m", GATEWAY_MODULE, "--config", config_file]


def patroni_command(config_file: str) -> list[str]:
    """Patroni under the member guard, as the local runtime runs it (render.render_local): the
    guard is the container's PID 1, so a Patroni that dies takes PostgreSQL with it (the guard
    fences it and exits; the kubelet starts the container again), a Patroni that freezes while it
    leads is fenced at ttl // 2 by its watchdog, and a guard that dies ends the container's PID
    namespace, every process in it included."""
    pid_file = render.pgdata(POSTGRES_DATA_DIR) / "postmaster.pid"
    guard = [PYTHON, MEMBER_GUARD, "--watchdog", WATCHDOG_PIPE, "--pid-file", str(pid_file)]
    return [*guard, "--", PYTHON, "-m", PATRONI_MODULE, config_file]


# run by the patroni image's python before Patroni, at the first start of a standby-center member
LEADER_GATE = """\
import os, sys, time, urllib.request
pgdata, url, wait_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
if os.path.exists(os.path.join(pgdata, "PG_VERSION")):
    print("data present: nothing to wait for"); sys.exit(0)
deadline = time.monotonic() + wait_s
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                print(url + ": it holds the leader lock, starting as its replica"); sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
print(url + ": no leader lock after %g s: starting anyway, the first member up leads" % wait_s)
"""


def leader_gate_command(pgdata: str, leader_api_url: str, wait_s: int) -> list[str]:
    # /leader: 200 from the holder of the leader lock, a primary or (failback re-cloning the
    # centers from dr) a standby leader; /primary would make the second member wait out a standby
    return [PYTHON, "-c", LEADER_GATE, pgdata, f"{leader_api_url}/leader", str(wait_s)]


def settings_json(settings: dict[str, Any]) -> str:
    return msgspec.json.format(msgspec.json.encode(settings), indent=2).decode() + "\n"


@dataclass(frozen=True)
class Secrets:
    """The Pulumi secrets, as Outputs: they reach Kubernetes Secrets only."""

    superuser_password: pulumi.Output[str]
    replication_password: pulumi.Output[str]
    pan_key_hex: pulumi.Output[str]
    api_tokens: pulumi.Output[str]  # JSON {"acquirer": ..., "channel": ..., "operator": ...}
    api_tokens_previous: pulumi.Output[str] | None = None  # the same, while a rotation is under way


def api_tokens_of(text: str, key: str = "apiTokens") -> dict[str, str]:
    """The token of each client kind in a ``watertight:apiTokens`` value; ValueError names what is wrong."""
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(
            f'watertight:{key} must be JSON: {{"acquirer": ..., "channel": ..., "operator": ...}}'
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"watertight:{key} must be a JSON object of the three client kinds")
    missing = [kind for kind in auth.KINDS if not isinstance(value.get(kind), str) or not value[kind]]
    if missing:
        raise ValueError(f"watertight:{key}: no token for {', '.join(missing)}")
    return {kind: value[kind] for kind in auth.KINDS}


def _accepted_tokens(current: str, previous: str | None) -> str:
    """The servers' tokens file: digests of the current tokens and, during a rotation, the previous."""
    tokens = {render.SECRET_API_TOKENS: api_tokens_of(current)}
    if previous:
        tokens[render.SECRET_API_TOKENS_PREVIOUS] = api_tokens_of(previous, "apiTokensPrevious")
    return render.api_tokens_document(tokens)


@dataclass(frozen=True)
class Context:
    """What every component reads: settings, topology, endpoints and the plan."""

    settings: StackSettings
    topology: Topology
    endpoints: render.KubernetesEndpoints
    plan: Plan
    secrets: Secrets

    def site(self, name: str) -> SiteSettings:
        return self.settings.sites[name]

    def other_networks(self, site: str, among: tuple[str, ...] | None = None) -> list[str]:
        """The networks of every site but ``site`` (optionally only of ``among``)."""
        chosen = [s for s in (among or tuple(self.topology.sites)) if s != site]
        return list(dict.fromkeys(n for s in chosen for n in self.settings.sites[s].networks))

    def monitoring_peers(self) -> list[networking.NetworkPolicyPeerArgs]:
        if not self.settings.monitoring.crds_present:
            return []
        return [kube.from_namespace(self.settings.monitoring.namespace)]


def _opts(parent: pulumi.Resource, provider: k8s.Provider, **more: Any) -> pulumi.ResourceOptions:
    return pulumi.ResourceOptions(parent=parent, provider=provider, **more)


def _cross_site_annotations(context: Context, site: str, component: str) -> dict[str, str]:
    annotations = dict(context.settings.cross_site_service_annotations)
    if context.settings.cross_site_service_type == "LoadBalancer":
        # external-dns publishes the name the other sites use (render.KubernetesEndpoints.host)
        annotations.setdefault(
            "external-dns.alpha.kubernetes.io/hostname", context.endpoints.host(site, component)
        )
    return annotations


# ---- site ----------------------------------------------------------------------------------------


class Site(pulumi.ComponentResource):
    """One site: its own cluster (an explicit provider), the namespace, the credentials, the
    default-deny policy, the site's etcd member (and at dr the dr copies' own etcd), the app
    servers and the gateway (idle at dr)."""

    provider: k8s.Provider
    namespace: core.Namespace
    drain: core.ConfigMap

    def __init__(self, name: str, context: Context, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(f"{TYPE_PREFIX}:Site", name, None, opts)
        self.name = name
        site = context.site(name)
        self.provider = k8s.Provider(
            f"{name}-cluster",
            kubeconfig=site.kubeconfig,
            context=site.context,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.namespace = core.Namespace(
            f"{name}-namespace",
            metadata=kube.metadata(context.settings.namespace_of(name), None, kube.labels(name, "namespace")),
            opts=_opts(self, self.provider),
        )
        self.namespace_name: pulumi.Output[str] = self.namespace.metadata.apply(lambda m: m.name or "")
        self.credentials = core.Secret(
            f"{name}-credentials",
            metadata=kube.metadata(CREDENTIALS_SECRET, self.namespace_name, kube.labels(name, "credentials")),
            type="Opaque",
            string_data={
                render.SECRET_SUPERUSER_PASSWORD: context.secrets.superuser_password,
                render.SECRET_REPLICATION_PASSWORD: context.secrets.replication_password,
            },
            opts=_opts(self, self.provider),
        )
        tokens = context.secrets.api_tokens
        previous = context.secrets.api_tokens_previous
        accepted = (
            pulumi.Output.all(tokens, previous).apply(lambda both: _accepted_tokens(both[0], both[1]))
            if previous is not None
            else tokens.apply(lambda current: _accepted_tokens(current, None))
        )
        self.api_tokens = core.Secret(
            f"{name}-api-tokens",
            metadata=kube.metadata(API_TOKENS_SECRET, self.namespace_name, kube.labels(name, "credentials")),
            type="Opaque",
            string_data={render.API_TOKENS_FILE: accepted},
            opts=_opts(self, self.provider),
        )
        self.api_clients = core.Secret(
            f"{name}-api-clients",
            metadata=kube.metadata(API_CLIENTS_SECRET, self.namespace_name, kube.labels(name, "credentials")),
            type="Opaque",
            string_data={
                API_CLIENTS_FILE: tokens.apply(
                    lambda current: json.dumps({render.SECRET_API_TOKENS: api_tokens_of(current)})
                ),
                auth.OPERATOR: tokens.apply(lambda current: api_tokens_of(current)[auth.OPERATOR]),
            },
            opts=_opts(self, self.provider),
        )
        networking.NetworkPolicy(
            f"{name}-default-deny-ingress",
            metadata=kube.metadata(DEFAULT_DENY_POLICY, self.namespace_name, kube.labels(name, "policy")),
            spec=networking.NetworkPolicySpecArgs(
                pod_selector=meta.LabelSelectorArgs(), policy_types=["Ingress"], ingress=[]
            ),
            opts=_opts(self, self.provider),
        )
        # the runbooks own its data from the first apply on: `pulumi up` must not undo a drain
        self.drain = core.ConfigMap(
            f"{name}-drain",
            metadata=kube.metadata(DRAIN_CONFIG_MAP, self.namespace_name, kube.labels(name, "drain")),
            data={DRAIN_FILE: json.dumps({"drained_cells": []})},
            opts=_opts(self, self.provider, ignore_changes=["data"]),
        )
        self.etcd = EtcdMember(name, context, self, dr_local=False)
        if name == render.DR_SITE:
            self.etcd_dr = EtcdMember(name, context, self, dr_local=True)
        # dr's too, at zero replicas: the activate-dr runbook scales them up when both centers are lost
        self.app = AppTier(name, "app", context, self)
        self.gateway = AppTier(name, "gateway", context, self)
        if context.settings.monitoring.crds_present:
            self.monitoring = monitoring.Monitoring(
                name, context.settings, context.topology, self, self.provider, self.namespace_name
            )
        self.register_outputs({"namespace": self.namespace_name})


def credential_env(env_name: str, key: str) -> core.EnvVarArgs:
    return core.EnvVarArgs(
        name=env_name,
        value_from=core.EnvVarSourceArgs(
            secret_key_ref=core.SecretKeySelectorArgs(name=CREDENTIALS_SECRET, key=key)
        ),
    )


def _data_claim(name: str, size_gib: int, storage_class: str | None) -> core.PersistentVolumeClaimArgs:
    return core.PersistentVolumeClaimArgs(
        metadata=meta.ObjectMetaArgs(name=name),
        spec=core.PersistentVolumeClaimSpecArgs(
            access_modes=["ReadWriteOnce"],
            storage_class_name=storage_class,
            resources=core.VolumeResourceRequirementsArgs(requests={"storage": f"{size_gib}Gi"}),
        ),
    )


# ---- etcd ----------------------------------------------------------------------------------------


class EtcdMember(pulumi.ComponentResource):
    """The site's member of the three-site etcd (Patroni's consensus), or at dr the single-member
    etcd of the dr copies (``dr_local``)."""

    def __init__(self, site: str, context: Context, parent: Site, dr_local: bool) -> None:
        component = render.ETCD_DR_NAME if dr_local else render.etcd_name(site)
        super().__init__(f"{TYPE_PREFIX}:EtcdMember", component, None, pulumi.ResourceOptions(parent=parent))
        topology, endpoints, settings = context.topology, context.endpoints, context.settings
        if dr_local:
            kind = "etcd-dr"
            argv = render.etcd_dr_args(topology, endpoints, ETCD_DATA_DIR)
            client_port, peer_port = topology.ports.etcd_dr_client, topology.ports.etcd_dr_peer
        else:
            kind = "etcd"
            argv = render.etcd_args(topology, endpoints, site, ETCD_DATA_DIR)
            client_port, peer_port = topology.ports.etcd_client, topology.ports.etcd_peer
        pod_labels = kube.labels(site, kind, component=component)
        namespace = parent.namespace_name
        opts = _opts(self, parent.provider)
        claim = "data"
        self.stateful_set = apps.StatefulSet(
            f"{component}-statefulset",
            metadata=kube.metadata(component, namespace, pod_labels),
            spec=apps.StatefulSetSpecArgs(
                service_name=component,
                replicas=1,
                selector=meta.LabelSelectorArgs(match_labels=kube.selector_labels(site, component)),
                template=core.PodTemplateSpecArgs(
                    metadata=meta.ObjectMetaArgs(
                        labels=pod_labels,
                        annotations={kube.ANNOTATION_CONFIG_CHECKSUM: kube.checksum(*argv)},
                    ),
                    spec=core.PodSpecArgs(
                        security_context=kube.pod_security(ETCD_USER_ID),
                        topology_spread_constraints=kube.spread(site, component),
                        termination_grace_period_seconds=30,
                        containers=[
                            core.ContainerArgs(
                                name=ETCD_CONTAINER,
                                image=settings.images.etcd,
                                image_pull_policy=settings.images.pull_policy,
                                # the rendered flags; only the binary's path is the image's
                                command=[settings.etcd_binary],
                                args=argv[1:],
                                ports=[kube.port("client", client_port), kube.port("peer", peer_port)],
                                # serializable: the member itself answers, with or without quorum
                                # (a partitioned member is not restarted for it); etcd 3.4 ignores
                                # it, so its liveness asks another path (etcdLivenessPath)
                                readiness_probe=kube.http_probe("/health?serializable=true", "client", 5, 3),
                                liveness_probe=kube.http_probe(
                                    settings.etcd_liveness_path, "client", 10, 6, 10
                                ),
                                resources=kube.resources(settings.resources.etcd),
                                security_context=kube.container_security(),
                                volume_mounts=[
                                    core.VolumeMountArgs(name=claim, mount_path=ETCD_DATA_MOUNT),
                                    kube.tmp_mount(),
                                ],
                            )
                        ],
                        volumes=[kube.tmp_volume()],
                    ),
                ),
                volume_claim_templates=[
                    _data_claim(claim, settings.resources.etcd_storage_gib, context.site(site).storage_class)
                ],
            ),
            opts=opts,
        )
        self.service = core.Service(
            f"{component}-service",
            metadata=kube.metadata(
                component, namespace, pod_labels, _cross_site_annotations(context, site, component)
            ),
            spec=kube.service_spec(
                site,
                component,
                {"client": client_port, "peer": peer_port},
                settings.cross_site_service_type,
                publish_not_ready=True,
            ),
            opts=opts,
        )
        # a voluntary eviction waits for the operator: losing a member costs the quorum's margin
        kube.disruption_budget(
            f"{component}-pdb",
            kube.metadata(component, namespace, pod_labels),
            site,
            component,
            min_available=1,
            max_unavailable=None,
            kubernetes_minor=context.settings.kubernetes_minor(),
            opts=opts,
        )
        if dr_local:
            # only the dr copies' Patroni; a single member has no peers
            rules = [kube.ingress([kube.from_kind("patroni")], client_port)]
        else:
            rules = [
                kube.ingress(
                    [kube.from_kind("patroni"), *kube.from_networks(context.other_networks(site))],
                    client_port,
                ),
                kube.ingress(kube.from_networks(context.other_networks(site)), peer_port),
            ]
        networking.NetworkPolicy(
            f"{component}-policy",
            metadata=kube.metadata(component, namespace, kube.labels(site, "policy", component=component)),
            spec=kube.ingress_policy_spec(site, component, rules),
            opts=opts,
        )
        self.register_outputs(
            {"client_url": endpoints.etcd_dr_client_url() if dr_local else endpoints.etcd_client_url(site)}
        )


# ---- app servers and gateways -------------------------------------------------------------------


class AppTier(pulumi.ComponentResource):
    """A site's app servers (``kind`` app) or gateway (``kind`` gateway): a Deployment sized by
    the plan, its settings, Service, PodDisruptionBudget, autoscaler and NetworkPolicy. At dr they
    are declared idle (zero replicas, no autoscaler), as the local runtime keeps dr's until the
    activate-dr runbook starts them."""

    def __init__(self, site: str, kind: str, context: Context, parent: Site) -> None:
        component = render.app_name(site) if kind == "app" else render.gateway_name(site)
        super().__init__(f"{TYPE_PREFIX}:AppTier", component, None, pulumi.ResourceOptions(parent=parent))
        topology, endpoints, settings, plan = (
            context.topology,
            context.endpoints,
            context.settings,
            context.plan,
        )
        namespace = parent.namespace_name
        opts = _opts(self, parent.provider)
        pod_labels = kube.labels(site, kind, component=component)
        settings_name = f"{component}-settings"
        env: list[core.EnvVarArgs] = [core.EnvVarArgs(name="PYTHONUNBUFFERED", value="1")]
        if kind == "app":
            file_name = "app.json"
            listen_port = topology.ports.app
            # the settings hold the PAN key: a Secret, never a ConfigMap
            tokens_file = f"{API_TOKENS_DIR}/{render.API_TOKENS_FILE}"
            public = render.app_settings(topology, endpoints, site, "", tokens_file)
            config_text = context.secrets.pan_key_hex.apply(
                lambda key: settings_json(
                    render.app_settings(topology, endpoints, site, _pan_key(key), tokens_file)
                )
            )
            settings_object: pulumi.Resource = core.Secret(
                f"{component}-settings",
                metadata=kube.metadata(settings_name, namespace, pod_labels),
                type="Opaque",
                string_data={file_name: config_text},
                opts=opts,
            )
            settings_volume = core.VolumeArgs(
                name="settings",
                secret=core.SecretVolumeSourceArgs(secret_name=settings_name, default_mode=0o440),
            )
            command = app_command(f"{CORE_CONFIG_DIR}/{file_name}")
            env.append(credential_env("PGPASSWORD", render.SECRET_SUPERUSER_PASSWORD))
            size = settings.resources.app
            replicas, replicas_max = plan.app_replicas_per_center, plan.app_replicas_max_per_center
            peers = [
                kube.from_kind("gateway"),
                # the other center's gateway sends this site's app servers the cells it cannot
                # serve; dr's gateway only ever names dr's app servers
                *(kube.from_networks(context.other_networks(site, CENTERS)) if site in CENTERS else []),
                *context.monitoring_peers(),
            ]
            service_type = settings.cross_site_service_type
            annotations = _cross_site_annotations(context, site, component)
            checksum = kube.checksum(settings_json(public))
        else:
            file_name = "gateway.json"
            listen_port = topology.ports.gateway
            text = settings_json(
                render.gateway_settings(
                    topology,
                    endpoints,
                    site,
                    drain_file=f"{DRAIN_DIR}/{DRAIN_FILE}",
                    api_tokens_file=f"{API_TOKENS_DIR}/{render.API_TOKENS_FILE}",
                )
            )
            settings_object = core.ConfigMap(
                f"{component}-settings",
                metadata=kube.metadata(settings_name, namespace, pod_labels),
                data={file_name: text},
                opts=opts,
            )
            settings_volume = core.VolumeArgs(
                name="settings", config_map=core.ConfigMapVolumeSourceArgs(name=settings_name)
            )
            command = gateway_command(f"{CORE_CONFIG_DIR}/{file_name}")
            size = settings.resources.gateway
            replicas, replicas_max = plan.gateway_replicas_per_center, plan.gateway_replicas_max_per_center
            service_type = settings.gateway_service_type
            annotations = {}
            checksum = kube.checksum(text)
        volumes = [
            settings_volume,
            kube.tmp_volume(),
            core.VolumeArgs(
                name="api-tokens",
                secret=core.SecretVolumeSourceArgs(secret_name=API_TOKENS_SECRET, default_mode=0o440),
            ),
        ]
        mounts = [
            core.VolumeMountArgs(name="settings", mount_path=CORE_CONFIG_DIR, read_only=True),
            kube.tmp_mount(),
            core.VolumeMountArgs(name="api-tokens", mount_path=API_TOKENS_DIR, read_only=True),
        ]
        if kind == "gateway":
            volumes.append(
                core.VolumeArgs(
                    name="drain", config_map=core.ConfigMapVolumeSourceArgs(name=DRAIN_CONFIG_MAP)
                )
            )
            mounts.append(core.VolumeMountArgs(name="drain", mount_path=DRAIN_DIR, read_only=True))
        idle = site not in CENTERS
        # the size the runbooks scale it back to: dr's when activate-dr starts it (`pulumi up` then
        # leaves its replicas alone), a center's when failback starts the fenced center again
        deployment_annotations = {ANNOTATION_ACTIVE_REPLICAS: str(replicas)}
        if idle:
            replicas = 0
        self.deployment = apps.Deployment(
            f"{component}-deployment",
            metadata=kube.metadata(component, namespace, pod_labels, deployment_annotations),
            spec=apps.DeploymentSpecArgs(
                replicas=replicas,
                selector=meta.LabelSelectorArgs(match_labels=kube.selector_labels(site, component)),
                strategy=apps.DeploymentStrategyArgs(
                    type="RollingUpdate",
                    rolling_update=apps.RollingUpdateDeploymentArgs(max_unavailable=0, max_surge="25%"),
                ),
                template=core.PodTemplateSpecArgs(
                    metadata=meta.ObjectMetaArgs(
                        labels=pod_labels, annotations={kube.ANNOTATION_CONFIG_CHECKSUM: checksum}
                    ),
                    spec=core.PodSpecArgs(
                        security_context=kube.pod_security(CORE_USER_ID),
                        topology_spread_constraints=kube.spread(site, component),
                        automount_service_account_token=False,
                        containers=[
                            core.ContainerArgs(
                                name=kind,
                                image=settings.images.core,
                                image_pull_policy=settings.images.pull_policy,
                                command=command,
                                env=env,
                                ports=[kube.port("http", listen_port)],
                                readiness_probe=kube.http_probe("/readyz", "http", 2, 2),
                                liveness_probe=kube.http_probe("/healthz", "http", 5, 3, 5),
                                resources=kube.resources(size),
                                security_context=kube.container_security(),
                                volume_mounts=mounts,
                            )
                        ],
                        volumes=volumes,
                    ),
                ),
            ),
            opts=_opts(
                self,
                parent.provider,
                depends_on=[settings_object, parent.credentials, parent.drain, parent.api_tokens],
                ignore_changes=["spec.replicas"] if idle else None,
            ),
        )
        core.Service(
            f"{component}-service",
            metadata=kube.metadata(component, namespace, pod_labels, annotations),
            spec=kube.service_spec(
                site, component, {"http": listen_port}, service_type, publish_not_ready=False
            ),
            opts=opts,
        )
        kube.disruption_budget(
            f"{component}-pdb",
            kube.metadata(component, namespace, pod_labels),
            site,
            component,
            min_available=None,
            max_unavailable=1,
            kubernetes_minor=context.settings.kubernetes_minor(),
            opts=opts,
        )
        if not idle:  # an autoscaler cannot hold a Deployment at zero
            self._autoscaler(component, namespace, pod_labels, replicas, replicas_max, settings, opts)
        if kind == "gateway":
            rules = [kube.ingress(None, listen_port)]  # clients: the one door from outside
        else:
            rules = [kube.ingress(peers, listen_port)]
        networking.NetworkPolicy(
            f"{component}-policy",
            metadata=kube.metadata(component, namespace, kube.labels(site, "policy", component=component)),
            spec=kube.ingress_policy_spec(site, component, rules),
            opts=opts,
        )
        self.url = endpoints.app_url(site) if kind == "app" else endpoints.gateway_url(site)
        self.register_outputs({"url": self.url, "replicas": replicas})

    def _autoscaler(
        self,
        component: str,
        namespace: pulumi.Output[str],
        pod_labels: dict[str, str],
        replicas: int,
        replicas_max: int,
        settings: StackSettings,
        opts: pulumi.ResourceOptions,
    ) -> None:
        # autoscaling/v2, or on a cluster older than 1.23 v2beta2, whose spec has the same fields
        api: Any = autoscaling if settings.kubernetes_minor() >= HPA_V2_SINCE else autoscaling_v2beta2
        api.HorizontalPodAutoscaler(
            f"{component}-hpa",
            metadata=kube.metadata(component, namespace, pod_labels),
            spec=api.HorizontalPodAutoscalerSpecArgs(
                scale_target_ref=api.CrossVersionObjectReferenceArgs(
                    api_version="apps/v1", kind="Deployment", name=component
                ),
                min_replicas=replicas,
                max_replicas=replicas_max,
                metrics=[
                    api.MetricSpecArgs(
                        type="Resource",
                        resource=api.ResourceMetricSourceArgs(
                            name="cpu",
                            target=api.MetricTargetArgs(
                                type="Utilization",
                                average_utilization=round(settings.sizing.target_cpu_utilization * 100),
                            ),
                        ),
                    )
                ],
            ),
            opts=opts,
        )


def _pan_key(value: str) -> str:
    key = value.strip().lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError("watertight:panKeyHex must be 64 hexadecimal characters (32 bytes)")
    return key


# ---- cells ---------------------------------------------------------------------------------------


class Cell(pulumi.ComponentResource):
    """A cell's database: a Patroni member in each center (one cluster, synchronous mode) and the
    dr copy (a standby cluster with its own scope in dr's own etcd)."""

    def __init__(self, cell: int, context: Context, sites: dict[str, Site]) -> None:
        super().__init__(f"{TYPE_PREFIX}:Cell", f"cell-{cell}", None)
        self.cell = cell
        self.leader_site = context.topology.leader_site(cell)
        self.members = {name: CellMember(cell, site, context, self) for name, site in sites.items()}
        self.register_outputs(
            {
                "leader_site": self.leader_site,
                "sync_standby_site": context.topology.standby_site(cell),
                "scope": render.scope(cell),
                "dr_scope": render.dr_scope(cell),
            }
        )


class CellMember(pulumi.ComponentResource):
    """A cell's Patroni + PostgreSQL member in one site."""

    def __init__(self, cell: int, site: Site, context: Context, parent: Cell) -> None:
        component = render.pg_name(cell, site.name)
        super().__init__(f"{TYPE_PREFIX}:CellMember", component, None, pulumi.ResourceOptions(parent=parent))
        topology, settings = context.topology, context.settings
        self.config = render.patroni_config(
            topology,
            context.endpoints,
            cell,
            site.name,
            POSTGRES_DATA_DIR,
            Path(settings.postgres_bin_dir),
            watchdog_device=Path(WATCHDOG_PIPE),
        )
        text = yaml.safe_dump(self.config, sort_keys=False)
        namespace = site.namespace_name
        opts = _opts(self, site.provider)
        pod_labels = kube.labels(site.name, "patroni", cell, component)
        config_name = f"{component}-patroni"
        postgres_port, patroni_port = topology.postgres_port(cell), topology.patroni_port(cell)
        config_map = core.ConfigMap(
            f"{component}-patroni-config",
            metadata=kube.metadata(config_name, namespace, pod_labels),
            data={PATRONI_FILE: text},
            opts=opts,
        )
        # the env names render.patroni_env gives the local runtime, each from the Secret's key
        env = [
            credential_env(env_name, key)
            for env_name, key in render.patroni_env({key: key for key in render.REQUIRED_SECRETS}).items()
        ]
        claim = "data"
        data_mount = core.VolumeMountArgs(name=claim, mount_path=str(POSTGRES_DATA_DIR))
        init_containers = []
        if site.name == topology.standby_site(cell):
            # Patroni has no preferred leader: both centers' members would race for the cell's
            # first leadership. The standby center's member starts once the leader center's leads.
            leader_api = context.endpoints.patroni_api_url(cell, topology.leader_site(cell))
            init_containers.append(
                core.ContainerArgs(
                    name="wait-for-leader",
                    image=settings.images.patroni,
                    image_pull_policy=settings.images.pull_policy,
                    command=leader_gate_command(
                        str(render.pgdata(POSTGRES_DATA_DIR)),
                        leader_api,
                        settings.leader_bootstrap_wait_seconds,
                    ),
                    resources=kube.resources(LEADER_GATE_SIZE),
                    security_context=kube.container_security(),
                    volume_mounts=[data_mount],
                )
            )
        self.stateful_set = apps.StatefulSet(
            f"{component}-statefulset",
            metadata=kube.metadata(component, namespace, pod_labels),
            spec=apps.StatefulSetSpecArgs(
                service_name=component,
                replicas=1,
                selector=meta.LabelSelectorArgs(match_labels=kube.selector_labels(site.name, component)),
                template=core.PodTemplateSpecArgs(
                    metadata=meta.ObjectMetaArgs(
                        labels=pod_labels, annotations={kube.ANNOTATION_CONFIG_CHECKSUM: kube.checksum(text)}
                    ),
                    spec=core.PodSpecArgs(
                        security_context=kube.pod_security(POSTGRES_USER_ID),
                        # members of the site's cells on different hosts where the cluster allows
                        topology_spread_constraints=[
                            core.TopologySpreadConstraintArgs(
                                max_skew=1,
                                topology_key=kube.HOST_KEY,
                                when_unsatisfiable="ScheduleAnyway",
                                label_selector=kube.kind_selector("patroni"),
                            )
                        ],
                        automount_service_account_token=False,
                        termination_grace_period_seconds=30,
                        init_containers=init_containers or None,
                        containers=[
                            core.ContainerArgs(
                                name=PATRONI_CONTAINER,
                                image=settings.images.patroni,
                                image_pull_policy=settings.images.pull_policy,
                                command=patroni_command(f"{PATRONI_CONFIG_DIR}/{PATRONI_FILE}"),
                                env=env,
                                ports=[
                                    kube.port("postgres", postgres_port),
                                    kube.port("patroni", patroni_port),
                                ],
                                # Patroni's own answers: ready = PostgreSQL running (leader or
                                # replica); alive = Patroni's loop turns
                                readiness_probe=kube.http_probe("/readiness", "patroni", 2, 3),
                                liveness_probe=kube.http_probe("/liveness", "patroni", 5, 6, 30),
                                resources=kube.resources(settings.resources.postgres),
                                security_context=kube.container_security(),
                                volume_mounts=[
                                    core.VolumeMountArgs(name=claim, mount_path=str(POSTGRES_DATA_DIR)),
                                    core.VolumeMountArgs(
                                        name="config", mount_path=PATRONI_CONFIG_DIR, read_only=True
                                    ),
                                    core.VolumeMountArgs(name="shm", mount_path="/dev/shm"),
                                    kube.tmp_mount(),
                                ],
                            )
                        ],
                        volumes=[
                            core.VolumeArgs(
                                name="config", config_map=core.ConfigMapVolumeSourceArgs(name=config_name)
                            ),
                            # PostgreSQL's dynamic shared memory; the runtime's default /dev/shm is 64 MiB
                            core.VolumeArgs(
                                name="shm",
                                empty_dir=core.EmptyDirVolumeSourceArgs(medium="Memory", size_limit="256Mi"),
                            ),
                            kube.tmp_volume(),
                        ],
                    ),
                ),
                volume_claim_templates=[
                    _data_claim(
                        claim, settings.resources.postgres_storage_gib, context.site(site.name).storage_class
                    )
                ],
            ),
            opts=_opts(self, site.provider, depends_on=[config_map, site.credentials]),
        )
        core.Service(
            f"{component}-service",
            metadata=kube.metadata(
                component, namespace, pod_labels, _cross_site_annotations(context, site.name, component)
            ),
            spec=kube.service_spec(
                site.name,
                component,
                {"postgres": postgres_port, "patroni": patroni_port},
                settings.cross_site_service_type,
                publish_not_ready=True,
            ),
            opts=opts,
        )
        # a drain waits until the operator moved the leader away (patronictl switchover): an
        # evicted primary costs the cell a failover, an evicted standby its RPO 0
        kube.disruption_budget(
            f"{component}-pdb",
            kube.metadata(component, namespace, pod_labels),
            site.name,
            component,
            min_available=1,
            max_unavailable=None,
            kubernetes_minor=context.settings.kubernetes_minor(),
            opts=opts,
        )
        # this member takes PostgreSQL from this site's app servers and, by address, from the other
        # sites (the cell's members replicate, their app servers connect); Patroni's API the same
        remote = kube.from_networks(context.other_networks(site.name))
        rules = [
            kube.ingress([kube.from_kind("app"), *remote], postgres_port),
            kube.ingress([*remote, *context.monitoring_peers()], patroni_port),
        ]
        networking.NetworkPolicy(
            f"{component}-policy",
            metadata=kube.metadata(component, namespace, kube.labels(site.name, "policy", cell, component)),
            spec=kube.ingress_policy_spec(site.name, component, rules),
            opts=opts,
        )
        self.register_outputs(
            {"scope": self.config["scope"], "host": context.endpoints.postgres_host(cell, site.name)}
        )


# ---- load generator ------------------------------------------------------------------------------


class LoadGenerator(pulumi.ComponentResource):
    """Locust master and workers in one center, offering the headline load to that center's
    gateway (or the entry when configured). The master's web UI is reached by port-forward."""

    def __init__(self, context: Context, site: Site) -> None:
        super().__init__(f"{TYPE_PREFIX}:LoadGenerator", "locust", None, pulumi.ResourceOptions(parent=site))
        settings, plan = context.settings, context.plan
        namespace = site.namespace_name
        opts = _opts(self, site.provider)
        host = settings.entry_url or context.endpoints.gateway_url(site.name)
        master, worker = LOCUST_MASTER, LOCUST_WORKER
        rates = [
            "--rate-financial",
            str(round(settings.load.financial_tps)),
            "--rate-nonfinancial",
            str(round(settings.load.nonfinancial_tps)),
        ]
        for component, replicas, command, ports in (
            (
                master,
                1,
                ["locust", "-f", LOCUSTFILE, "--master", "--host", host, *rates],
                {"master": LOCUST_MASTER_PORT, "web": LOCUST_WEB_PORT},
            ),
            (
                worker,
                plan.locust_workers,
                ["locust", "-f", LOCUSTFILE, "--worker", "--master-host", master],
                {},
            ),
        ):
            pod_labels = kube.labels(site.name, component, component=component)
            container = core.ContainerArgs(
                name=LOCUST_CONTAINER,
                image=settings.images.locust,
                image_pull_policy=settings.images.pull_policy,
                command=command,
                env=[
                    core.EnvVarArgs(name="HOME", value="/tmp"),
                    # every process reads the tokens itself: they never cross the master-worker wire
                    core.EnvVarArgs(
                        name="WATERTIGHT_API_TOKENS", value=f"{API_CLIENTS_DIR}/{API_CLIENTS_FILE}"
                    ),
                ],
                ports=[kube.port(name, number) for name, number in ports.items()] or None,
                readiness_probe=kube.tcp_probe("master", 5, 3) if ports else None,
                liveness_probe=kube.http_probe("/", "web", 10, 6, 10) if ports else None,
                resources=kube.resources(settings.resources.locust_worker),
                security_context=kube.container_security(),
                volume_mounts=[
                    kube.tmp_mount(),
                    core.VolumeMountArgs(name="api-clients", mount_path=API_CLIENTS_DIR, read_only=True),
                ],
            )
            apps.Deployment(
                f"{component}-deployment",
                # activate-dr fences its center by scaling it to zero; failback starts it again at this size
                metadata=kube.metadata(
                    component, namespace, pod_labels, {ANNOTATION_ACTIVE_REPLICAS: str(replicas)}
                ),
                spec=apps.DeploymentSpecArgs(
                    replicas=replicas,
                    selector=meta.LabelSelectorArgs(match_labels=kube.selector_labels(site.name, component)),
                    template=core.PodTemplateSpecArgs(
                        metadata=meta.ObjectMetaArgs(labels=pod_labels),
                        spec=core.PodSpecArgs(
                            security_context=kube.pod_security(CORE_USER_ID),
                            topology_spread_constraints=kube.spread(site.name, component),
                            automount_service_account_token=False,
                            containers=[container],
                            volumes=[
                                kube.tmp_volume(),
                                core.VolumeArgs(
                                    name="api-clients",
                                    secret=core.SecretVolumeSourceArgs(
                                        secret_name=API_CLIENTS_SECRET,
                                        default_mode=0o440,
                                        items=[
                                            core.KeyToPathArgs(key=API_CLIENTS_FILE, path=API_CLIENTS_FILE)
                                        ],
                                    ),
                                ),
                            ],
                        ),
                    ),
                ),
                opts=opts,
            )
            kube.disruption_budget(
                f"{component}-pdb",
                kube.metadata(component, namespace, pod_labels),
                site.name,
                component,
                min_available=None,
                max_unavailable=1,
                kubernetes_minor=context.settings.kubernetes_minor(),
                opts=opts,
            )
        core.Service(
            f"{master}-service",
            metadata=kube.metadata(master, namespace, kube.labels(site.name, master, component=master)),
            spec=kube.service_spec(
                site.name,
                master,
                {"master": LOCUST_MASTER_PORT, "web": LOCUST_WEB_PORT},
                "ClusterIP",
                publish_not_ready=False,
            ),
            opts=opts,
        )
        networking.NetworkPolicy(
            f"{master}-policy",
            metadata=kube.metadata(master, namespace, kube.labels(site.name, "policy", component=master)),
            spec=kube.ingress_policy_spec(
                site.name, master, [kube.ingress([kube.from_kind(worker)], LOCUST_MASTER_PORT)]
            ),
            opts=opts,
        )
        self.register_outputs({"host": host, "workers": plan.locust_workers})
