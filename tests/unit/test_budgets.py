"""Training budgets in optimizer steps (one schedule for every loop), keep-the-better finetuning and the task's
augmentation policy (issue 13: the default recipe must not make a student worse than the labels alone)."""
import inspect

import numpy as np
import pytest
import torch

from orchestrator.config import (AugmentPolicy, ConfigError, DatasetConfig, DistillConfig, FinetuneConfig,
                                 TrainConfig, load_config, resolve_config)
from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages import distill as distill_mod
from orchestrator.stages import loop as loop_mod
from orchestrator.stages import schedule
from orchestrator.stages.augment import augment_batch
from orchestrator.stages.distill import DistillData, distill_local
from orchestrator.stages.finetune import finetune_keep_better, top1
from orchestrator.stages.loop import train_supervised
from orchestrator.stages.schedule import distill_plan, report_epochs, supervised_plan
from tests.conftest import ROOT, TASK, TINY_RESNET

PRE = Preprocess(1, (16, 16), (0.1,), (0.3,))
RAY_TRAIN = ROOT / "orchestrator" / "ray_adapters" / "train.py"


def squares(n: int, seed: int = 0, k: int = 10) -> ImageSet:
    """A trivially learnable 10-class set: class c is a bright 6x6 square at a class-specific place, plus noise.
    (n, 16, 16, 1) uint8, (n,) int64."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.integers(0, 40, (n, 16, 16, 1)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[i, 1 + 4 * r:7 + 4 * r, 1 + 3 * col:7 + 3 * col] = 255
    return ImageSet(x, y)


def tiny_student(seed: int = 0):
    from orchestrator.models.students import create_student

    torch.manual_seed(seed)
    return create_student("timm/resnet10t", 10, PRE, TINY_RESNET)


class StepCounter:
    """Wraps schedule.optimizer_step to count the optimizer steps a loop takes."""

    def __init__(self):
        self.n = 0

    def __call__(self, opt, sched, loss):
        self.n += 1
        return schedule.optimizer_step(opt, sched, loss)


# --- budgets and the one schedule -------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2])
def test_steps_budget_is_the_same_for_every_transfer_set_size(world):
    cfg = DistillConfig(steps=37, epoch_steps=10, batch_size=64)
    for n in (50, 1337, 10_000):
        plan = distill_plan(n, cfg, world)
        assert (plan.total_steps, plan.epochs, plan.epoch_steps) == (37, 4, 10)
        assert [len(plan.steps_of(e)) for e in range(plan.epochs)] == [10, 10, 10, 7]
        assert sum(1 for e in range(plan.epochs) for _ in plan.batches(0, e)) == 37
        assert all(len(b) == 64 for b in plan.batches(0, 0))
    # an epochs budget grows with the data: one reporting epoch is one pass
    by_epochs = [distill_plan(n, DistillConfig(epochs=3, batch_size=64), world).total_steps for n in (64, 640)]
    assert by_epochs == [3, 30 // world] and report_epochs(DistillConfig(epochs=3)) == 3
    assert report_epochs(cfg) == 4 and report_epochs(DistillConfig()) == 20  # default: 2000 steps, reports of 100


def test_default_budgets_documented_rule():
    d = DistillConfig()
    assert d.budget() == ("steps", 2000, 100) and d.epochs is None and d.steps is None
    small, large = distill_plan(1337, d, 2), distill_plan(59_400, d, 2)
    assert small.total_steps == large.total_steps == 2000
    assert TrainConfig().budget() == ("epochs", 30, None)
    # paper 2's multi-source distillation has the same budget and plan
    from orchestrator.config import SourceDistillConfig

    s = SourceDistillConfig()
    assert s.budget() == ("steps", 2000, 100)
    assert distill_plan(1337, s, 2).total_steps == distill_plan(59_400, s, 2).total_steps == 2000
    assert distill_plan(2000, SourceDistillConfig(epochs=6, batch_size=128), 1).total_steps == 6 * 16
    with pytest.raises(ValueError, match="only one budget"):
        SourceDistillConfig(epochs=3, steps=100)


def test_steps_budget_batches_span_passes_and_are_resumable():
    """Under a steps budget the batch stream is pass after pass of fresh permutations, whatever the epoch length."""
    plan = distill_plan(10, DistillConfig(steps=7, epoch_steps=3, batch_size=4), 1)  # 3 steps per pass
    stream = [b for e in range(plan.epochs) for b in plan.batches(5, e)]
    passes = [b for p in range(3) for b in schedule.batch_indices(10, 4, 5, p)][:7]
    assert all(np.array_equal(a, b) for a, b in zip(stream, passes)) and len(stream) == 7
    again = list(plan.batches(5, 1))  # a resumed epoch sees the same batches
    assert all(np.array_equal(a, b) for a, b in zip(again, stream[3:6]))


def test_distill_and_supervised_run_exactly_the_budgeted_steps(monkeypatch, tmp_path):
    counter = StepCounter()
    monkeypatch.setattr(distill_mod, "optimizer_step", counter)
    lab = squares(40)
    for n in (30, 300):
        counter.n = 0
        imgs = squares(n, seed=1).images
        data = DistillData(imgs, np.random.default_rng(0).normal(size=(n, 10)).astype(np.float32), lab)
        log = distill_local(tiny_student(), data, PRE, DistillConfig(steps=5, epoch_steps=2, batch_size=16,
                                                                      ce_weight=0.5), tmp_path / str(n))
        assert counter.n == 5 and log["steps"] == [2, 2, 1] and len(log["loss"]) == 3
    counter = StepCounter()
    monkeypatch.setattr(loop_mod, "optimizer_step", counter)
    for n in (20, 200):
        counter.n = 0
        hist = train_supervised(tiny_student(), PRE, squares(n), TrainConfig(steps=6, epoch_steps=4, batch_size=16))
        assert counter.n == 6 and len(hist) == 2
    counter.n = 0
    train_supervised(tiny_student(), PRE, squares(40), TrainConfig(epochs=2, batch_size=16))
    assert counter.n == 2 * 3  # 2 passes of ceil(40 / 16)


def test_the_lr_schedule_is_one_place(monkeypatch, tmp_path):
    """Distillation (in-process and Ray Train) and supervised training take their schedule from
    schedule.lr_factor, and no loop has its own optimizer step."""
    seen = []
    real = schedule.lr_factor

    def spy(step, total, warmup=0):
        seen.append((total, warmup))
        return real(step, total, warmup)

    monkeypatch.setattr(schedule, "lr_factor", spy)
    train_supervised(tiny_student(), PRE, squares(20), TrainConfig(steps=3, batch_size=8))
    assert seen and set(seen) == {(3, 0)}
    seen.clear()
    model = tiny_student()
    opt, sched = distill_mod.make_optimizer(model, DistillConfig(steps=400, batch_size=8), 20)
    assert set(seen) == {(400, 20)}  # WARMUP_DISTILL: min(200, 400 // 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(DistillConfig().lr * real(0, 400, 20))
    assert supervised_plan(20, TrainConfig(steps=1000)).warmup == 50
    ray_src = RAY_TRAIN.read_text()  # read, not imported: importing Ray takes seconds
    assert "plan = distill_plan(" in ray_src and "range(start, plan.epochs)" in ray_src
    for src in (inspect.getsource(loop_mod), inspect.getsource(distill_mod), ray_src):
        assert "loss.backward()" not in src and "cosine_schedule(opt" not in src


def test_a_budget_of_zero_trains_nothing():
    assert train_supervised(tiny_student(), PRE, squares(20), TrainConfig(steps=0)) == []
    assert supervised_plan(20, TrainConfig(epochs=0)).epochs == 0


# --- config errors ---------------------------------------------------------------------------------------------

def test_ambiguous_budgets_are_rejected():
    with pytest.raises(ValueError, match="only one budget can decide"):
        DistillConfig(epochs=3, steps=100)
    with pytest.raises(ConfigError, match=r"distill: .*both epochs=3 and steps=100 .*set the other to null"):
        load_config(TASK, ["distill.epochs=3", "distill.steps=100"])
    with pytest.raises(ConfigError, match=r"finetune: .*both epochs=3 and steps=5"):
        load_config(TASK, ["finetune.epochs=3", "finetune.steps=5"])
    with pytest.raises(ConfigError, match=r"baseline: .*both epochs=200 and steps=5"):
        load_config(TASK, ["baseline.steps=5"])  # the task sets baseline.epochs: drop it to switch budgets
    with pytest.raises(ConfigError, match="epoch_steps=10 is the reporting epoch of a steps budget"):
        load_config(TASK, ["distill.epochs=3", "distill.epoch_steps=10"])
    with pytest.raises(ConfigError, match="budget of 0 steps trains nothing"):
        load_config(TASK, ["distill.steps=0"])
    with pytest.raises(ConfigError, match="unknown config key 'data.augment.flip'"):
        load_config(TASK, ["data.augment.flip=false"])
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(TASK, ["data.augment.crop_scale=[0.9, 0.5]"])


def test_budgets_switch_cleanly_and_survive_a_round_trip():
    cfg = load_config(TASK, ["baseline.epochs=null", "baseline.steps=40"])
    assert cfg.baseline.budget() == ("steps", 40, 100)
    assert load_config(TASK).finetune.budget() == ("steps", 200, 100)  # the default: 200 steps
    assert load_config(TASK, ["finetune.epochs=5"]).finetune.budget() == ("epochs", 5, None)  # a sweep's fixed
    assert load_config(TASK, ["distill.epochs=4"]).distill.budget() == ("epochs", 4, None)
    # a validated config dumped to a tree (a sweep's base) takes either budget as an override
    tree = load_config(TASK).model_dump(mode="json")
    assert resolve_config(tree, ["distill.epochs=6"]).distill.budget().kind == "epochs"
    assert resolve_config(tree, ["distill.steps=300"]).distill.budget() == ("steps", 300, 100)


# --- keep the better finetune ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """A tiny student trained on the squares task (well above chance on held-out squares)."""
    s = tiny_student()
    train_supervised(s, PRE, squares(200, seed=3), TrainConfig(steps=60, lr=3e-3, batch_size=50, augment=False))
    return s


def test_a_finetune_that_worsens_validation_is_reverted(trained):
    import copy

    s = copy.deepcopy(trained)
    val = squares(100, seed=4)
    before_state = copy.deepcopy(s.state_dict())
    before = top1(s, PRE, val)
    assert before > 0.6
    wrong = squares(50, seed=5)
    wrong.labels = (wrong.labels + 1) % 10  # every label wrong: finetuning must hurt
    cfg = FinetuneConfig(steps=30, lr=1e-2, batch_size=50, augment=False)
    s, rep = finetune_keep_better(s, PRE, wrong, val, cfg)
    assert rep.kept == "before" and rep.checked and rep.val_top1_before == pytest.approx(before)
    assert rep.val_top1_after < rep.val_top1_before and "reverted" in rep.reason and rep.steps == 30
    assert all(torch.equal(v, before_state[k]) for k, v in s.state_dict().items())  # BN statistics too
    assert top1(s, PRE, val) == pytest.approx(before) and rep.val_top1 == pytest.approx(before)
    assert rep.metrics()["finetune_kept"] == 0.0


def test_a_finetune_that_improves_validation_is_kept():
    s = tiny_student()
    val = squares(100, seed=4)
    cfg = FinetuneConfig(steps=60, lr=3e-3, batch_size=50, augment=False)
    s, rep = finetune_keep_better(s, PRE, squares(200, seed=3), val, cfg)
    assert rep.kept == "finetuned" and rep.checked and rep.val_top1_after > rep.val_top1_before
    assert top1(s, PRE, val) == pytest.approx(rep.val_top1_after) and "kept" in rep.reason


def test_a_finetune_that_ties_on_validation_keeps_the_weights_before(trained):
    """A tie is not evidence for the finetune (50-image validation splits tie often): the weights before it
    stay. lr 1e-9 with BatchNorm frozen leaves every prediction as it was."""
    import copy

    s = copy.deepcopy(trained)
    before_state = copy.deepcopy(s.state_dict())
    cfg = FinetuneConfig(steps=3, lr=1e-9, batch_size=50, augment=False, freeze_bn=True)
    s, rep = finetune_keep_better(s, PRE, squares(50, seed=5), squares(100, seed=4), cfg)
    assert rep.checked and rep.val_top1_after == rep.val_top1_before and rep.kept == "before"
    assert "did not improve" in rep.reason
    assert all(torch.equal(v, before_state[k]) for k, v in s.state_dict().items())


def test_without_validation_it_finetunes_and_says_so(trained):
    import copy

    wrong = squares(50, seed=5)
    wrong.labels = (wrong.labels + 1) % 10
    cfg = FinetuneConfig(steps=5, lr=1e-2, batch_size=50, augment=False)
    _, rep = finetune_keep_better(copy.deepcopy(trained), PRE, wrong, None, cfg)
    assert rep.kept == "finetuned" and not rep.checked and rep.val_top1_before is None
    assert "no validation split" in rep.reason
    _, rep = finetune_keep_better(copy.deepcopy(trained), PRE, wrong, squares(20),
                                  cfg.model_copy(update={"keep_better": False}))
    assert rep.kept == "finetuned" and not rep.checked and "keep_better is off" in rep.reason


# --- augmentation policy ---------------------------------------------------------------------------------------

def asymmetric(b: int = 64) -> torch.Tensor:
    """(b, 1, 28, 28) float32: a bright bar in the left quarter (a mirror puts it in the right quarter)."""
    x = torch.zeros(b, 1, 28, 28)
    x[:, :, 6:22, 3:7] = 1.0
    return x


def centre_x(x: torch.Tensor) -> torch.Tensor:
    """(b,) float32: the horizontal centre of mass of each image, in pixels."""
    cols = torch.arange(x.shape[-1], dtype=torch.float32)
    return (x.sum(dim=(1, 2)) * cols).sum(1) / x.sum(dim=(1, 2, 3)).clamp_min(1e-6)


def test_no_hflip_never_flips_many_seeds():
    policy = AugmentPolicy(hflip=False, crop_scale=(0.7, 1.0), brightness=0.2, contrast=0.2)
    for seed in range(50):
        out = augment_batch(asymmetric(), policy, torch.Generator().manual_seed(seed))
        assert (centre_x(out) < 10).all(), seed  # the bar stays left (at x ~4.5 +- shift/crop), never mirrored
    still = augment_batch(asymmetric(8), AugmentPolicy(hflip=False, max_shift=0.0))
    assert torch.allclose(still, asymmetric(8), atol=1e-5)  # no shift, no crop, no flip: the identity
    flipped = augment_batch(asymmetric(), AugmentPolicy(hflip=True, max_shift=0.0), torch.Generator().manual_seed(0))
    assert (centre_x(flipped) > 18).any() and (centre_x(flipped) < 10).any()  # the check can see a flip


def test_hflip_defaults_by_data_kind():
    assert load_config(TASK).data.augment_policy().hflip is True  # Fashion-MNIST: clothing mirrors fine
    assert load_config(ROOT / "tasks" / "mnist.yaml").data.augment_policy().hflip is False
    assert DatasetConfig(format="mnist_csv").augment_policy().hflip is False
    assert DatasetConfig(format="image_folder", root="x").augment_policy().hflip is False
    assert DatasetConfig(format="torchvision", name="EMNIST").augment_policy().hflip is False
    assert DatasetConfig(format="torchvision", name="CIFAR10").augment_policy().hflip is True
    assert DatasetConfig(format="image_folder", root="x", augment={"hflip": True}).augment_policy().hflip is True
    assert loop_mod.augment_policy(True).hflip is False  # no task policy given: the label-preserving default


def test_the_task_policy_reaches_every_training_loop(monkeypatch, tmp_path):
    seen = []

    def spy(x, policy, generator=None):
        seen.append(policy)
        return x

    monkeypatch.setattr(loop_mod, "augment_batch", spy)
    mnist = load_config(ROOT / "tasks" / "mnist.yaml").data.augment_policy()
    train_supervised(tiny_student(), PRE, squares(20), TrainConfig(steps=2, batch_size=10), augment=mnist)
    finetune_keep_better(tiny_student(), PRE, squares(20), squares(10), FinetuneConfig(steps=2, batch_size=10),
                         augment=mnist)
    data = DistillData(squares(20).images, np.zeros((20, 10), np.float32), squares(20))
    distill_local(tiny_student(), data, PRE, DistillConfig(steps=2, batch_size=10, ce_weight=0.5), tmp_path,
                  augment=mnist)
    assert len(seen) == 2 + 2 + 2 * 2 and all(p.hflip is False for p in seen)
    seen.clear()
    train_supervised(tiny_student(), PRE, squares(20), TrainConfig(steps=2, batch_size=10, augment=False),
                     augment=mnist)
    assert seen == []  # the stage's own augment: false still turns it off
    # the Ray Train adapter's loop (here in process: the same loop as a worker group's) takes distill_ray's policy
    from orchestrator.ray_adapters.train import distill_ray

    wider = mnist.model_copy(update={"max_shift": 0.2, "brightness": 0.1})
    d = tmp_path / "transfer"
    d.mkdir()
    np.save(d / "images.npy", squares(20).images)
    np.save(d / "logits.npy", np.zeros((20, 10), np.float32))
    np.savez(d / "labeled.npz", images=squares(20).images, labels=squares(20).labels)
    distill_ray(d, "timm/resnet10t", TINY_RESNET, 10, PRE.to_dict(),
                DistillConfig(steps=2, batch_size=10, ce_weight=0.5, num_workers=0).model_dump(mode="json"), 0,
                tmp_path / "runs", "policy", 0, False, augment=wider.model_dump(mode="json"))
    assert len(seen) == 2 * 2 and all(p == wider for p in seen)  # not the default policy (= mnist's)


def test_fixmatch_weak_and_strong_views_follow_the_task_flip():
    from orchestrator.stages.fixmatch import StrongView, weak_view

    img = np.zeros((64, 8, 8, 1), np.uint8)
    img[:, :, :4] = 255  # left half white: a mirrored copy has it on the right
    no_flip = AugmentPolicy(hflip=False, max_shift=0.0)
    torch.manual_seed(0)
    assert torch.equal(weak_view(img, no_flip), torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255)
    flipped = weak_view(img, AugmentPolicy(hflip=True, max_shift=0.0))[:, 0]  # (64, 8, 8)
    assert 0 < int((flipped[:, :, 0] == 0).all(dim=1).sum()) < 64  # some mirrored, some not
    strong = StrongView(1, 0.0, 0, no_flip)
    strong.ras = [lambda t: t] * len(strong.ras)  # only the weak part: RandAugment may rotate or shear
    assert (strong(img)[:, 0, :, :4].mean() > strong(img)[:, 0, :, 4:].mean())


def test_teacher_finetune_gets_the_task_policy(monkeypatch):
    from orchestrator.config import TeacherConfig
    from orchestrator.stages import adapt_teacher as at

    seen = []
    monkeypatch.setattr(at, "train_supervised", lambda *a, **k: seen.append(k.get("augment")))
    monkeypatch.setattr(at, "predict", lambda fn, pre, images, *a: np.zeros((len(images), 4), np.float32))

    class T(torch.nn.Module):
        preprocess = PRE

        def features(self, x):
            return x

    policy = load_config(ROOT / "tasks" / "mnist.yaml").data.augment_policy()
    at.adapt_teacher(T(), squares(20), 10, TeacherConfig(adapt="finetune", probe_epochs=1), augment=policy)
    assert seen == [policy] and seen[0].hflip is False
