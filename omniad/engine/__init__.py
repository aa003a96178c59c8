"""Training and evaluation engine: one loop for every method, preemption-safe."""

#: Exit code of a job that checkpointed on SIGTERM/SIGUSR1 and wants to be requeued
#: (EX_TEMPFAIL). Slurm's requeue and Snakemake's retries restart it; it resumes.
PREEMPTED_EXIT = 75
