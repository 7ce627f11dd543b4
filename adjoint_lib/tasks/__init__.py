"""The paper's three tasks as functions over both profiles (see :mod:`.common`): each task
module has a config dataclass (``CONFIG``; every field a CLI flag), ``default_config(profile)``
and ``run(model, cfg) -> TaskResult``."""
from .common import Profile, TaskModel, TaskResult, build_tiny_sd, load_mini, load_sd, load_task_model
from .loading import SD_MODEL_ID

__all__ = ["TaskModel", "TaskResult", "Profile", "load_task_model", "load_mini", "load_sd", "build_tiny_sd",
           "SD_MODEL_ID"]
