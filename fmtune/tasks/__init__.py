"""Tasks, one module each, registered by name in ``TASKS`` (see ``fmtune.tasks.base``)."""

from fmtune.tasks.audio import AudioClassification
from fmtune.tasks.base import CAPABILITIES, TASKS, UNKNOWN, Task, task_class, task_from_state
from fmtune.tasks.classification import Classification
from fmtune.tasks.detection import Detection
from fmtune.tasks.generation import Generation
from fmtune.tasks.multilabel import MultiLabel
from fmtune.tasks.regression import Regression
from fmtune.tasks.segmentation import Segmentation
from fmtune.tasks.speech import SpeechRecognition
from fmtune.tasks.token_classification import TokenClassification

__all__ = ["AudioClassification", "CAPABILITIES", "TASKS", "UNKNOWN", "Classification", "Detection", "Generation",
           "MultiLabel",
           "Regression", "Segmentation", "SpeechRecognition", "Task", "TokenClassification", "task_class",
           "task_from_state"]
