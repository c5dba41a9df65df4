"""Runs jobs on this host: supervised processes that outlive the agent, GPU pinning, logs."""

from meshgpu.runner.jobenv import (
    ClusterInfo,
    JobEnvInputs,
    JobIdentity,
    command_argv,
    job_environment,
    join_commands,
)
from meshgpu.runner.process import JobLaunch, JobResult, ProcessRunner

__all__ = [
    "ClusterInfo",
    "JobEnvInputs",
    "JobIdentity",
    "JobLaunch",
    "JobResult",
    "ProcessRunner",
    "command_argv",
    "job_environment",
    "join_commands",
]
