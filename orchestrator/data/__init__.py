"""The data plane: image sets (arrays or lazy views of image shards), loaders, ingest, shards, decode, splits.
Imports: config, registry, storage, cache."""
from orchestrator.data.images import ImageSet, TaskData
from orchestrator.data.errors import DataError, SplitError
from orchestrator.data.loaders import load_task_data
from orchestrator.data.splits import Split, make_split

__all__ = ["ImageSet", "TaskData", "DataError", "SplitError", "load_task_data", "Split", "make_split"]
