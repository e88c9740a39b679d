"""The reference backend: a plan for the CPU/GPU runtime (numpy spec and torch executors)."""

from .plan import ReferencePlan, Step, build_plan

__all__ = ["ReferencePlan", "Step", "build_plan"]
