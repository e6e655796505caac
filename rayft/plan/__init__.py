"""`rayft plan`: memory, cluster size, time and cost of a job, from the job file alone."""

from rayft.plan.job import check, plan
from rayft.plan.render import render

__all__ = ["check", "plan", "render"]
