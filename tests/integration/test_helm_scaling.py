"""The Helm chart's replica and autoscaling values (docs/scaling.md): rendered by Helm's engine, checked by
kubernetes-validate, as test_helm.py does for the rest of the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (the test extra)")

from tests.integration.test_helm import kubernetes_validate, relay_config, render

CLIENTS_PER_POD = {"type": "Pods", "pods": {"metric": {"name": "notifyrelay_clients"},
                                            "target": {"type": "AverageValue", "averageValue": "5000"}}}


def test_hpa_scales_on_cpu_memory_and_clients_and_scales_down_slowly(tmp_path: Path) -> None:
    """With autoscaling on, the HPA takes CPU, an optional memory target and extra metrics, leaves the replica count
    to itself, and by default removes at most one pod per 5 minutes (each removal moves that pod's clients)."""
    values: dict[str, Any] = {"autoscaling": {"enabled": True, "maxReplicas": 8,
                                              "targetMemoryUtilizationPercentage": 80, "metrics": [CLIENTS_PER_POD]}}
    manifests = render(values)
    kubernetes_validate(manifests, tmp_path)
    spec = manifests["HorizontalPodAutoscaler"]["spec"]
    assert [(m["type"], m.get("resource", {}).get("name")) for m in spec["metrics"]] == [
        ("Resource", "cpu"), ("Resource", "memory"), ("Pods", None)]
    assert spec["maxReplicas"] == 8
    assert spec["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert "replicas" not in manifests["Deployment"]["spec"]


def test_replicas_without_autoscaling_and_workers_per_pod(tmp_path: Path) -> None:
    """replicaCount sets the Deployment's replicas, no HPA is rendered, and config.server.workers reaches the
    daemon's configuration (each pod then runs a supervisor and that many workers)."""
    manifests = render({"replicaCount": 3, "config": {"server": {"workers": 2}}})
    kubernetes_validate(manifests, tmp_path)
    assert "HorizontalPodAutoscaler" not in manifests
    assert manifests["Deployment"]["spec"]["replicas"] == 3
    assert relay_config(manifests, tmp_path).server.workers == 2
