"""Teachers (open_clip, timm, pypi, checkpoint backends), students, export; each carries its preprocessing.
Imports: data, ids, registry, config."""
from orchestrator.models.preprocess import Preprocess
from orchestrator.models.teachers import Teacher, load_teacher, save_model_checkpoint
from orchestrator.models.students import create_student

__all__ = ["Preprocess", "Teacher", "load_teacher", "save_model_checkpoint", "create_student"]
