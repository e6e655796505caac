"""Where rayft runs: local or existing Ray clusters and Ray Jobs submission."""

from rayft.cluster.jobs import jobs, submission, submit
from rayft.cluster.status import status

__all__ = ["jobs", "status", "submission", "submit"]
