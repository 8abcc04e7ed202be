"""Issue 27: cached augmented-view soft labels (FKD), teacher ensembles, FixMatch at a stated images-seen budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import AugmentPolicy, DistillConfig, FixMatchConfig, resolve_config
from orchestrator.stages.views import (TopKSoftLabels, compress, compression_cost, draw_views, expand,
                                       render_views)
from tests.conftest import TINY_RESNET


def test_views_are_drawn_once_from_the_policy_and_rendered_exactly():
    policy = AugmentPolicy(hflip=False, max_shift=0.1)
    p = draw_views(50, 4, policy, 0.4, seed=3)
    assert p.shape == (200, 7) and p.dtype == np.float32
    assert np.array_equal(p, draw_views(50, 4, policy, 0.4, seed=3))  # seeded: the same views every time
    assert not np.array_equal(p, draw_views(50, 4, policy, 0.4, seed=4))
    area = p[:, 0] * p[:, 1]
    assert area.min() >= 0.4 * 0.99 - 1e-6 and p[:, :2].max() <= 1 and (p[:, 4] == 0).all()  # no flip: digits
    assert np.abs(p[:, 2]).max() <= (1 - p[:, 0]).max() + 0.2 + 1e-6
    flips = draw_views(50, 4, policy.model_copy(update={"hflip": True}), 0.4, seed=3)[:, 4]
    assert 0.3 < flips.mean() < 0.7
    img = np.random.default_rng(0).integers(0, 256, (2, 12, 10, 1), dtype=np.uint8)
    ident = np.array([[1, 1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1]], np.float32)  # the image; its mirror
    out = render_views(img, ident)
    unit = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(out[0], unit[0], atol=1e-5) and torch.allclose(out[1], unit[1].flip(-1), atol=1e-5)


def test_topk_compression_keeps_the_top_classes_and_spreads_the_rest():
    logits = np.random.default_rng(0).normal(0, 3, (64, 10)).astype(np.float32)
    classes, logp = compress(logits, 3)
    assert classes.shape == (64, 3) and logp.dtype == np.float16
    full = torch.log_softmax(torch.from_numpy(logits), 1).numpy()
    back = expand(classes, logp, 10)
    assert np.allclose(np.exp(back).sum(1), 1, atol=2e-3)  # a distribution again
    assert (back.argmax(1) == logits.argmax(1)).all()
    rows = np.arange(64)[:, None]
    assert np.allclose(back[rows, classes], full[rows, classes], atol=2e-3)
    other = np.ones_like(back, bool)
    other[rows, classes] = False
    assert np.allclose(back[other].reshape(64, 7), back[other].reshape(64, 7)[:, :1])  # the rest: one value
    assert np.allclose(expand(*compress(logits, 10), 10), full, rtol=2e-3, atol=2e-3)  # k = C: float16 only
    cost = compression_cost(logits, 3, 4.0)
    assert cost["top1_changed"] == 0 and 0 < cost["kept_mass"] < 1 and cost["kl_at_temperature"] > 0
    assert np.array_equal(TopKSoftLabels(classes, logp, 10)[np.array([5, 2])], back[[5, 2]])


def test_the_students_input_is_pixel_for_pixel_the_crop_the_teacher_labelled(fmnist, tmp_path, monkeypatch):
    """The teacher labels every cached view; the distillation loop then feeds the student each view. With the
    teacher's preprocessing set to the student's, the student's input tensor for view v must equal the
    teacher's input for v exactly, and the teacher's output on it must be the stored soft label of v."""
    from orchestrator.models import Preprocess, load_teacher
    from orchestrator.models.students import create_student
    from orchestrator.stages import distill as distill_mod
    from orchestrator.stages.distill import DistillData, distill_epoch, make_optimizer
    from orchestrator.stages.teacher_outputs import teacher_outputs_in_process

    images = np.asarray(fmnist.train.images[:24])  # (24, 28, 28, 1) uint8, real
    pre = Preprocess(1, (28, 28), (0.3,), (0.35,))  # the student's input, and (for this test) the teacher's
    torch.manual_seed(0)
    teacher = load_teacher("timm/resnet18", TINY_RESNET)
    teacher.preprocess, teacher.head = pre, torch.nn.Linear(teacher.feature_dim, 10)
    teacher.backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), teacher.backbone)  # 1-channel input
    ckpt = tmp_path / "t.pt"  # never written: the patched loader serves the teacher above, watched
    k = 3
    params = draw_views(len(images), k, AugmentPolicy(hflip=True, max_shift=0.1, brightness=0.2), 0.35, seed=0)
    seen_by_teacher: list[torch.Tensor] = []
    from orchestrator.models import teachers as teachers_mod

    real_load = teachers_mod.load_model_checkpoint

    def load_and_watch(path):
        t = real_load(path) if str(path) != str(ckpt) else teacher.eval()
        t.backbone.register_forward_pre_hook(lambda m, a: seen_by_teacher.append(a[0].detach().clone()))
        return t

    monkeypatch.setattr(teachers_mod, "load_model_checkpoint", load_and_watch)
    logits = teacher_outputs_in_process(str(ckpt), images, tmp_path / "shards", batch_size=16, views=(params, k))
    teacher_input = torch.cat(seen_by_teacher)  # (N x k, 1, 28, 28): rows in view order
    assert logits.shape == (len(images) * k, 10) and teacher_input.shape[0] == len(images) * k

    seen_by_student: list[tuple[np.ndarray, torch.Tensor]] = []
    real_inputs = DistillData.inputs

    def watch(self, v, batch, preprocess, augment, device):
        x = real_inputs(self, v, batch, preprocess, augment, device)
        seen_by_student.append((np.asarray(v).copy(), x.detach().clone()))
        return x

    monkeypatch.setattr(DistillData, "inputs", watch)
    data = DistillData(images, logits, views=params, k=k)
    cfg = DistillConfig(steps=3, batch_size=8, views=k, augment=True, num_workers=0)  # augment must not apply
    student = create_student("timm/resnet10t", 10, pre, TINY_RESNET)
    opt, sched = make_optimizer(student, cfg, data.items)
    distill_mod.distill_epoch(student, opt, sched, data, pre, cfg, 0, seed=0)
    assert len(seen_by_student) == 3
    with torch.no_grad():
        for v, x in seen_by_student:
            assert torch.equal(x, teacher_input[v])  # pixel for pixel
            assert torch.allclose(teacher(x), torch.from_numpy(logits[v]), atol=1e-4)


def test_a_view_entry_trains_over_n_times_k_items(fmnist):
    from orchestrator.stages.distill import DistillData

    imgs = np.asarray(fmnist.train.images[:10])
    assert DistillData(imgs, None).items == 10
    assert DistillData(imgs, None, views=draw_views(10, 4, AugmentPolicy(), 0.5, 0), k=4).items == 40


def test_views_refuse_what_they_cannot_cache():
    with pytest.raises(Exception, match="teacher_outputs is online"):
        resolve_config({}, ["distill.views=4", "distill.teacher_outputs=online"])
    with pytest.raises(Exception, match="feature_weight"):
        resolve_config({}, ["distill.views=4", "distill.feature_weight=0.5"])


def test_views_and_ensembles_enter_the_keys_they_change():
    from orchestrator.graph import stage_key

    keys = {"adapted_teacher": "a" * 16, "transfer_set": "b" * 16, "data": "c" * 16, "teacher_outputs": "d" * 16,
            "teacher": "e" * 16}
    base = resolve_config({})
    views = resolve_config({}, ["distill.views=4"])
    assert stage_key("teacher_outputs", base, keys) != stage_key("teacher_outputs", views, keys)
    assert stage_key("teacher_outputs", views, keys) != stage_key(
        "teacher_outputs", resolve_config({}, ["distill.views=4", "distill.view_topk=2"]), keys)
    ens = resolve_config({}, ["teacher.ensemble=[{id: pypi/efficientnet_lite1}]"])
    assert stage_key("adapted_teacher", base, keys) != stage_key("adapted_teacher", ens, keys)
    assert [m.id for m in ens.teacher.members()] == ["pypi/efficientnet_lite0", "pypi/efficientnet_lite1"]
    assert all(not m.ensemble for m in ens.teacher.members())
    # the first member's own key is the single teacher's: its adaptation is shared with single-teacher runs
    first = base.model_copy(update={"teacher": ens.teacher.members()[0]})
    assert stage_key("adapted_teacher", first, keys) == stage_key("adapted_teacher", base, keys)


def test_an_ensemble_averages_its_members_probabilities_and_survives_its_file(fmnist, tmp_path):
    from orchestrator.models import Preprocess, load_teacher, save_model_checkpoint
    from orchestrator.models.teachers import load_model_checkpoint
    from orchestrator.models.ensemble import EnsembleTeacher

    torch.manual_seed(0)
    members = []
    for side in (16, 24):
        t = load_teacher("timm/resnet18", TINY_RESNET)
        t.preprocess = Preprocess(3, (side, side), (0.3,) * 3, (0.35,) * 3)
        t.head = torch.nn.Linear(t.feature_dim, 10)
        members.append(t.eval())
    ens = EnsembleTeacher(members, ["a@16", "b@24"]).eval()
    imgs = np.asarray(fmnist.test.images[:6])
    x = ens.preprocess(imgs)  # [0, 1] at the largest member size
    assert x.shape == (6, 3, 24, 24) and float(x.min()) >= 0 and float(x.max()) <= 1
    with torch.no_grad():
        # each member preprocesses the ensemble's [0, 1] input (resize, normalise) itself
        probs = torch.stack([torch.softmax(m(m.preprocess.from_unit(x)), 1) for m in members]).mean(0)
        out = ens(x)
        assert torch.allclose(out.exp(), probs, atol=1e-4)
        assert ens.features(x).shape == (6, sum(m.feature_dim for m in members))
        back = load_model_checkpoint(save_model_checkpoint(ens, tmp_path / "ens.pt", fmnist.classes))
        assert isinstance(back, EnsembleTeacher) and back.names == ["a@16", "b@24"]
        assert torch.allclose(back(back.preprocess(imgs)), out, atol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        EnsembleTeacher(members[:1], ["a"])


def test_fixmatch_trains_exactly_the_images_seen_it_reports(fmnist):
    from orchestrator.models import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.stages.fixmatch import fixmatch_train

    pre = Preprocess(1, (28, 28), (0.3,), (0.35,))
    cfg = FixMatchConfig(batch_size=4, mu=3, curve_points=2)
    calls = []
    torch.manual_seed(0)
    _, flog = fixmatch_train(create_student("timm/resnet10t", 10, pre, TINY_RESNET), pre,
                             fmnist.train.subset(np.arange(20)), np.asarray(fmnist.train.images[20:200]), cfg, 5,
                             evaluate=lambda m: calls.append(m.training) or 0.5)
    assert flog["images_seen"] == 5 * 4 * (1 + 3) and len(flog["loss"]) == 5
    assert [s for s, _ in flog["curve"]] == [2, 5] and calls == [False, False]  # the EMA model, in eval mode
    with pytest.raises(Exception, match="both"):
        FixMatchConfig(steps=3, images_seen=100)


def test_fixmatchs_default_budget_is_the_distillations_images_seen(fmnist, tmp_path):
    from orchestrator.methods.fixmatch import fixmatch_budget

    class Split:
        labeled, unlabeled = np.arange(60), np.arange(60, 1000)

    class Ctx:
        split = Split()

    Ctx.cfg = resolve_config({}, ["distill.steps=50", "distill.batch_size=64", "distill.ce_weight=0.5",
                                  "distill.num_workers=0", "fixmatch.batch_size=8", "fixmatch.mu=7"])
    steps, seen = fixmatch_budget(Ctx())
    assert seen >= 50 * (64 + 60) > seen - 64 and steps == seen // 64  # (1 + 7) x 8 images a step
    Ctx.cfg = resolve_config({}, ["fixmatch.images_seen=1000", "fixmatch.batch_size=10", "fixmatch.mu=4"])
    assert fixmatch_budget(Ctx()) == (20, 1000)
    Ctx.cfg = resolve_config({}, ["fixmatch.steps=7", "fixmatch.batch_size=10", "fixmatch.mu=4"])
    assert fixmatch_budget(Ctx()) == (7, 350)
