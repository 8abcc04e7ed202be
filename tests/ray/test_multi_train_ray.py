"""Paper 2's multi-source distillation on Ray Train (orchestrator/ray_adapters/multi_train.py): two workers
read two sources' signals entries and train one student; the state loads into the plain student."""
import numpy as np


def test_multi_distill_ray_trains_from_two_source_entries(tmp_path, local_ray):
    from orchestrator.config import SourceTransferConfig
    from orchestrator.models import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.ray_adapters.multi_train import multi_distill_ray
    from orchestrator.stages.distill import student_state
    from tests.conftest import TINY_RESNET

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 16, 16, 1), dtype=np.uint8)
    entries = []
    for name, dim in (("a", 12), ("b", 7)):
        d = tmp_path / name
        d.mkdir()
        np.save(d / "images.npy", images)
        np.save(d / "pseudo.npy", np.log(rng.dirichlet(np.ones(4), 64)).astype(np.float32))
        np.save(d / "features.npy", rng.normal(size=(64, dim)).astype(np.float16))
        entries.append({"name": name, "weight": 0.5, "entry": str(d)})
    pre = Preprocess(1, (16, 16), (0.5,), (0.5,))
    cfg = SourceTransferConfig(distill={"epochs": 2, "batch_size": 16, "num_workers": 2})
    labeled = {"images": images[:8], "labels": np.arange(8) % 4}
    state, log = multi_distill_ray(entries, labeled, "timm/resnet10t", TINY_RESNET, 4, pre.to_dict(),
                                   cfg.model_dump(mode="json"), 0, str(tmp_path / "ray"), "multi-test")
    assert len(log["loss"]) == 2 and np.isfinite(log["loss"]).all() and any(k.startswith("projs.1") for k in state)
    create_student("timm/resnet10t", 4, pre, TINY_RESNET).load_state_dict(student_state(state))
