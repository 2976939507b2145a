"""Ahead-of-time plans: compile every program a run keeps resident for a named TPU slice, on a CPU.

topologies (the slices and their per-chip figures) -> plan (the run's parts, as training.setup builds
them) -> programs (each program through the trainer's own jitted functions) -> analysis (the compiler's
memory, collectives or refusal) + flops (analytic work and rooflines) -> report (the per-chip table and
the verdict). Entry point: `python -m dig_jax.main --mode=aot --topology=...`.
"""
