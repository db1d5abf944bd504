"""Render and validate refreshd's Kubernetes manifests.

    .venv/bin/python deploy/ci/check_manifests.py

For every overlay in deploy/overlays/ (and each file in deploy/examples/):

1. ``kubectl kustomize`` renders it;
2. ``kubernetes-validate --strict`` checks every core object against the
   Kubernetes OpenAPI schemas (oldest and newest version we support);
3. custom resources (ServiceMonitor, PrometheusRule, ScaledObject) go to
   ``validate-crds.mjs`` (their CRD schemas, and no unknown fields);
4. the deployment's promises are checked on the rendered objects: replicas,
   grace period above the drain, probes, security context, config from a
   ConfigMap whose values the worker accepts, secrets only from Secrets, the
   network policy's egress, the KEDA query.

Exits non-zero on any failure, naming the overlay, object and rule.
"""

# ruff: noqa: S603, S607 - runs fixed local tools (kubectl, kubernetes-validate, node, promtool)

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from worker.errors import ConfigError  # noqa: E402
from worker.settings import Settings  # noqa: E402

BIN = Path(sys.executable).parent
KUBECTL = str(BIN / "kubectl")
KUBERNETES_VALIDATE = str(BIN / "kubernetes-validate")
NODE_CHECK = ROOT / "deploy" / "ci" / "validate-crds.mjs"
RULES_FILE = ROOT / "dashboards" / "prometheus" / "refreshd.rules.yml"
ENCRYPTION_EXAMPLE = ROOT / "deploy" / "examples" / "encryption-keys-secret.yaml"

#: Kubernetes versions the core objects must be valid for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CORE_API_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}
CRD_API_GROUPS = {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}

#: Egress the worker needs: DNS, Redis/Valkey, HTTPS to token endpoints.
ALLOWED_EGRESS = {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 443)}

#: Ranges HTTPS egress must exclude: private, shared (CGNAT), link-local
#: (cloud metadata). The worker refuses them too (worker/egress.py).
PRIVATE_RANGES = {
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
}


#: Seconds a stopping worker may still need after the drain grace: a request
#: already sent runs to its answer (a profile's timeout_s, 10 s by default, at
#: most 30 s here) and its commit lands or goes to the spool (worker.spool).
COMMIT_TAIL_S = 30.0

Obj = dict[str, Any]


@dataclasses.dataclass
class Report:
    failures: list[str] = dataclasses.field(default_factory=list)

    def check(self, ok: bool, where: str, message: str) -> None:
        if not ok:
            self.failures.append(f"{where}: {message}")


def render(target: Path) -> list[Obj]:
    if target.is_dir():
        out = subprocess.run(
            [KUBECTL, "kustomize", str(target)], capture_output=True, text=True, check=False
        )
        if out.returncode:
            raise RuntimeError(f"kubectl kustomize {target} failed:\n{out.stderr}")
        text = out.stdout
    else:
        text = target.read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name') or '(generateName)'}"


def validate_core(where: str, objs: list[Obj], report: Report) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(objs, f)
        path = f.name
    try:
        for version in KUBERNETES_VERSIONS:
            out = subprocess.run(
                [KUBERNETES_VALIDATE, "--strict", "--quiet", "-k", version, path],
                capture_output=True,
                text=True,
                check=False,
            )
            text = (out.stdout + out.stderr).strip()
            # An unknown kind is only a warning to kubernetes-validate; here every
            # core object must have been checked.
            ok = out.returncode == 0 and "Couldn't find schema" not in text
            report.check(ok, where, f"kubernetes-validate --strict -k {version}:\n{text}")
            if ok:
                print(f"  kubernetes-validate --strict -k {version}: {len(objs)} object(s) ok")
    finally:
        Path(path).unlink()


def pod_specs(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objs:
        spec = obj.get("spec", {})
        if obj.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield obj, spec["template"]["spec"]
        elif obj.get("kind") == "Pod":
            yield obj, spec


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_pod_security(where: str, owner: Obj, pod: Obj, report: Report) -> None:
    w = f"{where} {name_of(owner)}"
    psc = pod.get("securityContext", {})
    report.check(psc.get("runAsNonRoot") is True, w, "pod securityContext.runAsNonRoot: true")
    report.check(psc.get("runAsUser", 1) != 0, w, "pod must not run as uid 0")
    report.check(
        psc.get("seccompProfile", {}).get("type") in {"RuntimeDefault", "Localhost"},
        w,
        "pod seccompProfile RuntimeDefault",
    )
    report.check(
        pod.get("automountServiceAccountToken") is False, w, "automountServiceAccountToken: false"
    )
    report.check(pod.get("enableServiceLinks") is False, w, "enableServiceLinks: false")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        cw = f"{w} container {c['name']}"
        sc = c.get("securityContext", {})
        report.check(sc.get("allowPrivilegeEscalation") is False, cw, "allowPrivilegeEscalation")
        report.check(sc.get("readOnlyRootFilesystem") is True, cw, "readOnlyRootFilesystem")
        report.check(sc.get("privileged") is not True, cw, "privileged")
        report.check("ALL" in sc.get("capabilities", {}).get("drop", []), cw, "drop ALL caps")
        report.check(
            "memory" in c.get("resources", {}).get("limits", {}), cw, "a memory limit is required"
        )
        requests = c.get("resources", {}).get("requests", {})
        report.check({"cpu", "memory"} <= set(requests), cw, "cpu and memory requests")
        for env in c.get("env", []):
            value = str(env.get("value", ""))
            report.check(
                not re.search(r"://[^/@\s]*:[^/@\s]+@", value),
                cw,
                f"env {env['name']} has a password inline; use a secretKeyRef",
            )
            report.check(
                "value" not in env or not re.search(r"PASSWORD|SECRET|TOKEN", env["name"]),
                cw,
                f"env {env['name']} looks secret; use a secretKeyRef",
            )


def check_egress_peers(
    where: str, rule: Obj, rule_ports: set[tuple[str, Any]], report: Report
) -> None:
    """Only DNS may go anywhere: Redis goes to selected pods or named
    addresses, HTTPS to public addresses (every ipBlock excludes the private
    ranges, or names a narrower block that is not one of them)."""
    peers = rule.get("to", [])
    if rule_ports <= {("UDP", 53), ("TCP", 53)}:
        return
    report.check(bool(peers), where, f"egress to {sorted(rule_ports)} names its destinations")
    blocks = [p["ipBlock"] for p in peers if "ipBlock" in p]
    if ("TCP", 6379) in rule_ports:
        report.check(
            all(b["cidr"] not in {"0.0.0.0/0", "::/0"} for b in blocks),
            where,
            "Redis egress goes to Redis pods or addresses, not to anywhere",
        )
    if ("TCP", 443) in rule_ports:
        for block in blocks:
            if block["cidr"] == "0.0.0.0/0":
                missing = PRIVATE_RANGES - set(block.get("except", []))
                report.check(
                    not missing, where, f"HTTPS egress to 0.0.0.0/0 excepts {sorted(missing)}"
                )
            elif block["cidr"] == "::/0":
                excepted = set(block.get("except", []))
                report.check(
                    {"fc00::/7", "fe80::/10"} <= excepted,
                    where,
                    "HTTPS to ::/0 excepts ULA, link-local",
                )
        report.check(
            all("ipBlock" in p for p in peers), where, "HTTPS egress names address blocks only"
        )


def check_key_ring(
    where: str,
    w: str,
    pod: Obj,
    container: Obj,
    env: dict[str, str],
    secret_refs: dict[str, Any],
    report: Report,
) -> None:
    """The key ring comes from a Secret mounted read-only as a file, never
    from a ConfigMap or an inline value; production overlays encrypt."""
    report.check(
        "REFRESHD_ENCRYPTION_KEYS" not in env,
        w,
        "REFRESHD_ENCRYPTION_KEYS (the keys themselves) inline or in the ConfigMap; mount the "
        "Secret as a file (components/encryption)",
    )
    if Path(where).name.startswith("prod"):
        report.check(
            "REFRESHD_ENCRYPTION_KEYS_FILE" in env or "REFRESHD_ENCRYPTION_KEYS" in secret_refs,
            w,
            "production encrypts secrets at rest (components/encryption)",
        )
    path = env.get("REFRESHD_ENCRYPTION_KEYS_FILE")
    if not path:
        return
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")]
    report.check(
        len(mounts) == 1, w, f"REFRESHD_ENCRYPTION_KEYS_FILE {path} is on a mounted volume"
    )
    for mount in mounts:
        report.check(mount.get("readOnly") is True, w, "the key ring is mounted readOnly")
        volume: Obj = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
        secret = volume.get("secret")
        report.check(secret is not None, w, "the key ring volume is a Secret")
        if secret is not None:
            report.check(
                secret.get("optional") is not True,
                w,
                "the key ring Secret is not optional: a worker must not start without its keys",
            )
            report.check(
                secret.get("defaultMode", 0o644) & 0o007 == 0,
                w,
                "the key ring file is not world-readable (defaultMode 0440)",
            )


@contextmanager
def key_ring_stand_in(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The settings with REFRESHD_ENCRYPTION_KEYS_FILE pointing at a fresh
    throwaway ring (the real one lives in the cluster), so the rest of the
    configuration can be checked as the worker would."""
    if "REFRESHD_ENCRYPTION_KEYS_FILE" not in env:
        yield env
        return
    from worker.keyring import generate_key

    with tempfile.TemporaryDirectory() as tmp:
        ring = Path(tmp) / "keyring"
        ring.write_text(f"ci:{generate_key()}\n")
        yield env | {"REFRESHD_ENCRYPTION_KEYS_FILE": str(ring)}


#: a key ring entry holding a real AES-256 key (32 bytes: 43 base64 characters
#: and padding), in base64 or base64url
KEY_MATERIAL = re.compile(
    r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{1,16}:[A-Za-z0-9+/_-]{43}=?(?![A-Za-z0-9+/=_-])"
)


def check_no_key_material(report: Report) -> None:
    """No file under deploy/ holds an encryption key: the example Secret
    carries a placeholder the worker refuses, and so must any other."""
    from worker.keyring import parse_key_ring

    for path in sorted((ROOT / "deploy").rglob("*")):
        if not path.is_file() or "node_modules" in path.parts or path.suffix == ".json":
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        where = str(path.relative_to(ROOT))
        for match in KEY_MATERIAL.finditer(text):
            try:
                parse_key_ring(match.group(0), source=where, one_per_line=True)
            except ConfigError:
                continue  # looks like one, is not one
            report.check(False, where, "holds an encryption key; keys never go into git")
    example = yaml.safe_load(ENCRYPTION_EXAMPLE.read_text())
    try:
        parse_key_ring(example["stringData"]["keyring"], source="example", one_per_line=True)
    except ConfigError:
        pass
    else:
        report.check(
            False, str(ENCRYPTION_EXAMPLE), "the placeholder must be refused by the worker"
        )


def check_refreshd(where: str, objs: list[Obj], report: Report) -> None:
    by_kind: dict[str, list[Obj]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    deployments = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == "refreshd"]
    report.check(len(deployments) == 1, where, "exactly one Deployment named refreshd")
    if not deployments:
        return
    dep = deployments[0]
    w = f"{where} Deployment/refreshd"
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    container = next(c for c in pod["containers"] if c["name"] == "refreshd")

    # -- replicas (or KEDA's minimum)
    scaled = [
        s
        for s in by_kind.get("ScaledObject", [])
        if s["spec"]["scaleTargetRef"]["name"] == "refreshd"
    ]
    if scaled:
        spec = scaled[0]["spec"]
        report.check(spec.get("minReplicaCount", 0) >= 2, where, "KEDA minReplicaCount >= 2")
        report.check("replicas" not in dep["spec"], w, "no fixed replicas next to a ScaledObject")
        for trig in spec["triggers"]:
            query = trig.get("metadata", {}).get("query", "")
            report.check(trig["type"] == "prometheus", where, "KEDA trigger is prometheus")
            report.check("refreshd_backlog" in query, where, "KEDA scales on refreshd_backlog")
            report.check(
                "scheduled_credentials" not in query and "zcard" not in query.lower(),
                where,
                "KEDA must not scale on future work (ZCARD / scheduled credentials)",
            )
            report.check(
                query.replace(" ", "").startswith("max("),
                where,
                "refreshd_backlog is Redis-wide (each replica reports it): use max(), not sum()",
            )
    else:
        report.check(dep["spec"].get("replicas", 1) >= 2, w, "replicas >= 2")

    # -- configuration: ConfigMap values the worker accepts, secrets from Secrets
    env: dict[str, str] = {}
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    for source in container.get("envFrom", []):
        report.check("secretRef" not in source, w, "settings come from the ConfigMap")
        ref = source.get("configMapRef", {}).get("name")
        report.check(ref in configmaps, w, f"envFrom ConfigMap {ref} is part of the overlay")
        if ref in configmaps:
            env |= configmaps[ref].get("data", {})
    report.check(
        "REFRESHD_REDIS_URL" not in env, w, "REFRESHD_REDIS_URL (has the password) not in config"
    )
    secret_refs = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret_refs[item["name"]] = ref
    report.check("REFRESHD_REDIS_URL" in secret_refs, w, "REFRESHD_REDIS_URL from a secretKeyRef")
    for key, value in env.items():
        report.check(
            not re.search(r"://[^/@\s]*:[^/@\s]+@", value), w, f"{key} holds a password inline"
        )
    check_key_ring(where, w, pod, container, env, secret_refs, report)
    try:
        with key_ring_stand_in(env) as checked:
            settings = Settings.from_env(
                checked
                | {"REFRESHD_REDIS_URL": "redis://localhost:6379/0", "REFRESHD_WORKER_ID": "x"}
            )
    except ConfigError as exc:
        report.check(False, w, f"the worker would refuse this configuration: {exc}")
        return
    all_interfaces = "0.0.0.0"  # noqa: S104 - compared with, never bound
    report.check(settings.http_host == all_interfaces, w, "REFRESHD_HTTP_HOST must be 0.0.0.0")
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    report.check(
        ports.get("metrics") == settings.http_port,
        w,
        f"container port 'metrics' = REFRESHD_HTTP_PORT ({settings.http_port})",
    )

    # -- graceful shutdown
    grace = pod.get("terminationGracePeriodSeconds", 30)
    floor = settings.drain_grace_s + COMMIT_TAIL_S
    report.check(
        grace > floor,
        w,
        f"terminationGracePeriodSeconds {grace} must exceed drain grace "
        f"{settings.drain_grace_s:g} s + {COMMIT_TAIL_S:g} s for a request out and its commit",
    )

    # -- probes
    def probe_path(kind: str) -> str | None:
        probe = container.get(kind)
        if not probe or "httpGet" not in probe:
            return None
        port = probe["httpGet"]["port"]
        report.check(port in ("metrics", settings.http_port), w, f"{kind} targets the metrics port")
        path: str = probe["httpGet"]["path"]
        return path

    report.check(probe_path("livenessProbe") == "/healthz", w, "liveness on /healthz (never Redis)")
    report.check(probe_path("readinessProbe") == "/readyz", w, "readiness on /readyz")
    report.check(probe_path("startupProbe") == "/healthz", w, "a startup probe on /healthz")
    startup = container.get("startupProbe", {})
    report.check(
        startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 30,
        w,
        "the startup probe allows at least 30 s",
    )

    # -- service account
    sa_name = pod.get("serviceAccountName", "default")
    sas = [s for s in by_kind.get("ServiceAccount", []) if s["metadata"]["name"] == sa_name]
    report.check(
        len(sas) == 1 and sas[0].get("automountServiceAccountToken") is False,
        where,
        f"ServiceAccount {sa_name} in the overlay, automountServiceAccountToken: false",
    )

    # -- Service, ServiceMonitor, PDB, NetworkPolicy select the worker pods
    services = [
        s for s in by_kind.get("Service", []) if matches(s["spec"].get("selector", {}), pod_labels)
    ]
    report.check(len(services) == 1, where, "one Service selects the worker pods")
    for svc in services:
        names = {p.get("name") for p in svc["spec"]["ports"]}
        report.check("metrics" in names, where, "the Service has a port named metrics")
        for monitor in by_kind.get("ServiceMonitor", []):
            sel = monitor["spec"]["selector"].get("matchLabels", {})
            mw = f"{where} {name_of(monitor)}"
            report.check(matches(sel, svc["metadata"]["labels"]), mw, "selects the Service")
            for ep in monitor["spec"]["endpoints"]:
                report.check(ep.get("port") in names, mw, f"endpoint port {ep.get('port')}")
                report.check(ep.get("path", "/metrics") == "/metrics", mw, "path /metrics")
    pdbs = [
        p
        for p in by_kind.get("PodDisruptionBudget", [])
        if matches(p["spec"]["selector"].get("matchLabels", {}), pod_labels)
    ]
    report.check(len(pdbs) == 1, where, "a PodDisruptionBudget covers the worker pods")
    policies = [
        p
        for p in by_kind.get("NetworkPolicy", [])
        if matches(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels)
    ]
    report.check(len(policies) == 1, where, "a NetworkPolicy covers the worker pods")
    for policy in policies:
        pw = f"{where} {name_of(policy)}"
        report.check("Egress" in policy["spec"].get("policyTypes", []), pw, "restricts egress")
        for rule in policy["spec"].get("egress", []):
            rule_ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])}
            report.check(bool(rule_ports), pw, "every egress rule names its ports")
            report.check(
                rule_ports <= ALLOWED_EGRESS,
                pw,
                f"egress only to DNS, Redis and HTTPS, not {sorted(rule_ports - ALLOWED_EGRESS)}",
            )
            check_egress_peers(pw, rule, rule_ports, report)

    # -- PrometheusRule is the generated rule file
    rule_groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    for rule in by_kind.get("PrometheusRule", []):
        report.check(
            rule["spec"]["groups"] == rule_groups,
            f"{where} {name_of(rule)}",
            "differs from dashboards/prometheus/refreshd.rules.yml (run dashboards/generate.py)",
        )


def main() -> int:
    report = Report()
    crds: dict[str, Obj] = {}
    targets = sorted((ROOT / "deploy" / "overlays").iterdir())
    targets += sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    for target in targets:
        where = str(target.relative_to(ROOT))
        print(f"{where}:")
        try:
            objs = render(target)
        except RuntimeError as exc:
            report.check(False, where, str(exc))
            continue
        kinds = sorted({name_of(o) for o in objs})
        print(f"  rendered {len(objs)} object(s): {', '.join(kinds)}")
        core = [o for o in objs if o.get("apiVersion") in CORE_API_GROUPS]
        for obj in objs:
            api = obj.get("apiVersion")
            report.check(
                api in CORE_API_GROUPS | CRD_API_GROUPS, where, f"{name_of(obj)}: unexpected {api}"
            )
            if api in CRD_API_GROUPS:
                crds[json.dumps(obj, sort_keys=True)] = obj
        validate_core(where, core, report)
        for owner, pod in pod_specs(objs):
            check_pod_security(where, owner, pod, report)
        if target.is_dir():
            check_refreshd(where, objs, report)
            for ns in (o for o in objs if o["kind"] == "Namespace"):
                report.check(
                    ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
                    == "restricted",
                    where,
                    f"{name_of(ns)} enforces the restricted Pod Security Standard",
                )

    check_no_key_material(report)
    print(f"custom resources ({len(crds)} distinct):")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(crds.values()), f)
        path = f.name
    try:
        node = subprocess.run(["node", str(NODE_CHECK), path], check=False)
        report.check(node.returncode == 0, "custom resources", "validate-crds.mjs failed")
    finally:
        Path(path).unlink()

    if report.failures:
        print(f"\n{len(report.failures)} manifest check(s) failed:", file=sys.stderr)
        for failure in report.failures:
            print(f"  FAIL {failure}", file=sys.stderr)
        return 1
    print("manifests: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
