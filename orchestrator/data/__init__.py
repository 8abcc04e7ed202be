"""Task data: image sets in memory, dataset loaders, labeled/unlabeled splits."""
from orchestrator.data.images import ImageSet, TaskData
from orchestrator.data.errors import DataError, SplitError
from orchestrator.data.loaders import load_task_data
from orchestrator.data.splits import Split, make_split

__all__ = ["ImageSet", "TaskData", "DataError", "SplitError", "load_task_data", "Split", "make_split"]
