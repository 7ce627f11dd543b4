"""The paper's three tasks as functions over both profiles (see :mod:`.common`)."""
from .common import TaskModel, build_tiny_sd, load_mini, load_sd, load_task_model

__all__ = ["TaskModel", "load_task_model", "load_mini", "load_sd", "build_tiny_sd"]
