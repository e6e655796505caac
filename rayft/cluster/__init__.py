"""Where rayft runs: local or existing Ray clusters, Ray Jobs submission, KubeRay manifests."""

from rayft.cluster.jobs import jobs, submission, submit
from rayft.cluster.k8s import render
from rayft.cluster.status import status

__all__ = ["jobs", "render", "status", "submission", "submit"]
