"""The Helm chart through Helm's own engine (helm-python-sdk); every manifest checked by kubernetes-validate."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from notifyrelay.config import load_config
from notifyrelay.ops.metrics import Metrics

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (the test extra)")

ROOT = Path(__file__).resolve().parents[2]
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "notifyrelay"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: kubernetes-validate has no schema for them

CUSTOM_VALUES: dict[str, Any] = {
    "replicaCount": 3,
    "dsn": {"existingSecret": "app-database", "existingSecretKey": "relay-dsn"},
    "ports": {"websocket": 9000, "admin": 9001},
    "config": {
        "server": {"allowed_origins": ["https://app.example"], "max_connections": 500},
        "coalesce": {"window_ms": 100},
        "shutdown": {"timeout_s": 30},
        "auth": {"mode": "jwt", "jwt_secret_file": "/etc/notifyrelay/jwt/secret"},
    },
    "channels": [
        {"name": "activity_progress"},
        {"name": "system_stability", "key": "json:scope", "include_payload": True},
    ],
    "drainSeconds": 10,
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "extraEnv": [{"name": "PGSSLMODE", "value": "verify-full"}],
    "extraVolumes": [{"name": "jwt", "secret": {"secretName": "relay-jwt"}}],
    "extraVolumeMounts": [{"name": "jwt", "mountPath": "/etc/notifyrelay/jwt", "readOnly": True}],
}


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The chart rendered by Helm's engine: ``{kind: manifest}`` (empty templates left out)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        rendered = chart.render(values, name="relay", namespace="apps", is_install=True)
    manifests: dict[str, dict[str, Any]] = {}
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            for document in yaml.safe_load_all(text):
                if document:
                    manifests[document["kind"]] = document
    return manifests


def kubernetes_validate(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> str:
    """Run the kubernetes-validate command in strict mode on every built-in manifest; return its output."""
    files = []
    for kind, manifest in manifests.items():
        if kind not in OPERATOR_KINDS:
            path = tmp_path / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(manifest))
            files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(files), result.stdout
    return result.stdout


def check_monitoring(manifests: dict[str, dict[str, Any]]) -> None:
    """The Prometheus Operator resources (CRDs, which kubernetes-validate has no schema for) scrape the Service's
    admin port, and every metric their alerts use is one the daemon really exports."""
    monitor = manifests["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"] == manifests["Service"]["spec"]["selector"]
    ports = {p["name"] for p in manifests["Service"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    exported = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in ("", "_total", "_bucket", "_sum", "_count")
    }
    assert manifests["PrometheusRule"]["spec"] == yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"  # job="notifyrelay", as the rules select
    for rule in manifests["PrometheusRule"]["spec"]["groups"][0]["rules"]:
        used = set(re.findall(r"\bnotifyrelay_[a-z_]+", rule["expr"]))
        assert used <= exported, (rule["alert"], used - exported)


def test_chart_alert_rules_are_the_shared_ones() -> None:
    """The chart ships deploy/prometheus/alerts.yml unchanged, so there is one set of alerts to keep right."""
    shipped = ROOT / "deploy/helm/notifyrelay/files/alerts.yml"
    assert shipped.read_text() == (ROOT / "deploy/prometheus/alerts.yml").read_text()


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return containers[0]


def relay_config(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> Any:
    """The rendered config.toml, loaded and validated by the daemon's own configuration loader."""
    path = tmp_path / "config.toml"
    path.write_text(manifests["ConfigMap"]["data"]["config.toml"])
    (tmp_path / "dsn").write_text("postgresql://relay@db/app\n")
    return load_config(path, environ={"NOTIFYRELAY_DSN_FILE": str(tmp_path / "dsn")})


@pytest.mark.parametrize("values", [None, CUSTOM_VALUES], ids=["default", "custom"])
def test_chart_lints_clean(values: dict[str, Any] | None) -> None:
    """`helm lint --strict` finds no error or warning with the default values or with a full set of custom ones."""
    report = helm.lint(CHART, values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_default_render_is_valid_and_hardened(tmp_path: Path) -> None:
    """With default values every manifest passes kubernetes-validate --strict, and the pod is locked down and probed."""
    manifests = render()
    assert set(manifests) == {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    kubernetes_validate(manifests, tmp_path)

    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    relay = container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert relay["securityContext"]["readOnlyRootFilesystem"] is True
    assert relay["securityContext"]["allowPrivilegeEscalation"] is False
    assert relay["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    config = relay_config(manifests, tmp_path)
    drain = int(relay["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + config.shutdown.timeout_s
    assert config.admin.listen == "0.0.0.0:9090" and config.server.listen == "0.0.0.0:8765"
    assert "env" not in relay  # no DSN given: libpq's PG* variables, from extraEnv when set


def test_custom_render_is_valid_and_follows_the_values(tmp_path: Path) -> None:
    """With custom values (existing Secret, HPA, monitoring, other ports) every manifest validates and says so."""
    manifests = render(CUSTOM_VALUES)
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} <= set(manifests)
    assert "Secret" not in manifests  # the existing one is used
    kubernetes_validate(manifests, tmp_path)
    check_monitoring(manifests)

    deployment = manifests["Deployment"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    pod = deployment["spec"]["template"]["spec"]
    relay = container(manifests)
    dsn_volume = next(v for v in pod["volumes"] if v["name"] == "dsn")
    assert dsn_volume["secret"]["secretName"] == "app-database"
    assert dsn_volume["secret"]["items"] == [{"key": "relay-dsn", "path": "dsn"}]
    assert {"name": "NOTIFYRELAY_DSN_FILE", "value": "/etc/notifyrelay/secret/dsn"} in relay["env"]
    assert [p["containerPort"] for p in relay["ports"]] == [9000, 9001]
    assert pod["terminationGracePeriodSeconds"] > 10 + 30
    assert manifests["PodDisruptionBudget"]["spec"] == {
        "minAvailable": 1, "selector": manifests["Deployment"]["spec"]["selector"]
    }
    assert manifests["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "admin"

    config = relay_config(manifests, tmp_path)
    assert config.server.listen == "0.0.0.0:9000" and config.admin.listen == "0.0.0.0:9001"
    assert config.coalesce.window_ms == 100 and config.server.allowed_origins == ["https://app.example"]
    assert config.auth.mode == "jwt" and config.shutdown.timeout_s == 30
    assert [(c.name, c.key, c.include_payload) for c in config.channels] == [
        ("activity_progress", "payload", False), ("system_stability", "json:scope", True),
    ]


def test_dsn_value_becomes_a_mounted_secret(tmp_path: Path) -> None:
    """A DSN given as a value lands in the chart's own Secret, mounted as a file, never in the environment."""
    dsn = "postgresql://relay:s3cret@db:5432/app"
    manifests = render({"dsn": {"value": dsn}})
    kubernetes_validate(manifests, tmp_path)
    secret = manifests["Secret"]
    assert base64.b64decode(secret["data"]["dsn"]).decode() == dsn
    relay = container(manifests)
    assert all("s3cret" not in str(env) for env in relay["env"])
    assert {"name": "dsn", "mountPath": "/etc/notifyrelay/secret", "readOnly": True} in relay["volumeMounts"]


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"server": {"listen": "0.0.0.0:1"}}},
        {"config": {"dsn": "postgresql://x"}},
        {"channels": []},
        {"replicas": 3},
        {"channels": [{"name": "x", "key": "column:id"}]},
    ],
    ids=["listen-is-the-charts", "dsn-not-in-config", "no-channels", "unknown-value", "bad-key-mode"],
)
def test_schema_rejects_mistakes(values: dict[str, Any]) -> None:
    """values.schema.json turns a likely mistake into an error before anything is rendered."""
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_readme_sidecar_snippet_is_valid(tmp_path: Path) -> None:
    """The chart README's sidecar pod spec passes kubernetes-validate --strict and its config.toml loads."""
    readme = (CHART / "README.md").read_text()
    snippet = readme[readme.index("## As a sidecar"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    manifests = {doc["kind"]: doc for doc in yaml.safe_load_all(snippet) if doc}
    assert set(manifests) == {"Deployment", "ConfigMap"}
    kubernetes_validate(manifests, tmp_path)
    config = relay_config(manifests, tmp_path)
    assert config.server.listen == "127.0.0.1:8765"
