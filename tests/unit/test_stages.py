"""Every stage on CPU with tiny models and real images, no Ray."""
import numpy as np
import pytest
import torch

from orchestrator.cache import Cache
from orchestrator.config import DistillConfig, StandinConfig, TeacherConfig, TrainConfig, TransferSetConfig
from orchestrator.data import make_split
from orchestrator.models import Preprocess, create_student, load_teacher
from orchestrator.stages.adapt_teacher import adapt_teacher
from orchestrator.stages.compute import Meter, forward_flops, train_flops
from orchestrator.stages.distill import DistillData, distill_local
from orchestrator.stages.evaluate import evaluate, plot_confusion, score
from orchestrator.stages.losses import LOSSES
from orchestrator.stages.loop import batch_indices, train_supervised
from orchestrator.stages.pretrain import pretrain_standin
from orchestrator.stages.teacher_outputs import teacher_logits
from orchestrator.transfer_sets.base import TransferContext
from orchestrator.transfer_sets.pools import build_transfer_set
from orchestrator.registry import UnknownNameError
from tests.conftest import TINY_RESNET

PRE = Preprocess(1, (28, 28), (0.286,), (0.353,))


def test_kd_loss_matches_hinton_formula():
    kd = LOSSES.get("kd_kl")
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(kd(s, t, T), manual, atol=1e-5)
    assert kd(t, t, T).abs() < 1e-6 and kd(s, t, T) > 0


def test_feature_cosine_loss():
    fc = LOSSES.get("feature_cosine")
    f = torch.randn(3, 8)
    assert fc(f, f).abs() < 1e-6 and torch.isclose(fc(f, -f), torch.tensor(2.0))


def test_batch_indices_split_ranks_and_cover():
    a = np.concatenate(list(batch_indices(100, 8, seed=0, epoch=1, rank=0, world=2)))
    b = np.concatenate(list(batch_indices(100, 8, seed=0, epoch=1, rank=1, world=2)))
    assert len(a) == len(b) and set(a) | set(b) == set(range(100))
    assert np.array_equal(a, np.concatenate(list(batch_indices(100, 8, 0, 1, 0, 2))))  # same order on resume


def test_linear_probe_adaptation_learns(fmnist):
    torch.manual_seed(0)
    t = load_teacher("timm/resnet18", TINY_RESNET)
    t.preprocess = Preprocess(3, (16, 16), (0.3,) * 3, (0.35,) * 3)
    split = make_split(fmnist.train.labels, per_class=20)
    adapt_teacher(t, fmnist.train.subset(split.labeled), 10, TeacherConfig(probe_epochs=100))
    acc = evaluate(t, t.preprocess, fmnist.test, 10).top1
    assert acc > 0.25 and t.head.out_features == 10  # random features + probe: well above chance (0.10)


def test_finetune_adaptation_changes_backbone(fmnist):
    t = load_teacher("timm/resnet18", TINY_RESNET)
    t.preprocess = Preprocess(3, (16, 16), (0.3,) * 3, (0.35,) * 3)
    before = [p.clone() for p in t.backbone.parameters()]
    cfg = TeacherConfig(adapt="finetune", probe_epochs=10, finetune=TrainConfig(epochs=2, batch_size=50))
    adapt_teacher(t, fmnist.train.subset(np.arange(100)), 10, cfg)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.backbone.parameters()))


def test_supervised_loss_decreases(fmnist):
    torch.manual_seed(0)
    s = create_student("timm/resnet10t", 10, PRE, TINY_RESNET)
    hist = train_supervised(s, PRE, fmnist.train.subset(np.arange(300)), TrainConfig(epochs=6, lr=3e-3, batch_size=64))
    assert hist[-1] < hist[0] * 0.8


def tiny_distill_data(fmnist, ckpt):
    logits = teacher_logits(str(ckpt), fmnist.train.images[:400])
    assert logits.shape == (400, 10) and logits.dtype == np.float32
    return DistillData(fmnist.train.images[:400], logits)


def test_distill_loss_decreases(fmnist, tiny_teacher_ckpt, tmp_path):
    data = tiny_distill_data(fmnist, tiny_teacher_ckpt)
    torch.manual_seed(0)
    s = create_student("timm/resnet10t", 10, PRE, TINY_RESNET)
    log = distill_local(s, data, PRE, DistillConfig(epochs=5, batch_size=64, lr=3e-3), tmp_path)
    assert log["loss"][-1] < log["loss"][0] * 0.7 and log["starts"] == [0]


def test_distill_killed_midway_resumes_from_checkpoint(fmnist, tiny_teacher_ckpt, tmp_path):
    data = tiny_distill_data(fmnist, tiny_teacher_ckpt)
    cfg = DistillConfig(epochs=4, batch_size=64, lr=3e-3)

    class Killed(Exception):
        pass

    def kill_after_second(epoch, loss):
        if epoch == 1:
            raise Killed

    s = create_student("timm/resnet10t", 10, PRE, TINY_RESNET)
    with pytest.raises(Killed):
        distill_local(s, data, PRE, cfg, tmp_path, on_epoch=kill_after_second)
    seen = []
    s2 = create_student("timm/resnet10t", 10, PRE, TINY_RESNET)
    log = distill_local(s2, data, PRE, cfg, tmp_path, on_epoch=lambda e, _: seen.append(e))
    assert seen == [2, 3] and log["starts"] == [0, 2] and len(log["loss"]) == 4
    assert not list(tmp_path.glob("*.tmp"))


def _one_epoch(data, cfg, seed=0):
    from orchestrator.stages.distill import FeatureStudent, distill_epoch, make_optimizer

    torch.manual_seed(seed)
    s = create_student("timm/resnet10t", 10, PRE, TINY_RESNET)
    if cfg.feature_weight > 0:
        s = FeatureStudent(s, 64)  # the tiny teacher's feature width
    opt, sched = make_optimizer(s, cfg, len(data.images))
    return distill_epoch(s, opt, sched, data, PRE, cfg, 0, seed), s


def test_online_teacher_gives_the_cached_soft_labels_and_features(fmnist, tiny_teacher_ckpt):
    from orchestrator.stages.distill import online_teacher
    from orchestrator.stages.teacher_outputs import TeacherPredictor

    images = fmnist.train.images[:256]
    cached = TeacherPredictor(str(tiny_teacher_ckpt), features=True)({"image": images, "index": np.arange(256)})
    assert cached["features"].shape == (256, 64) and cached["features"].dtype == np.float16
    logits, feats = online_teacher(tiny_teacher_ckpt)(images)
    assert torch.allclose(logits, torch.from_numpy(cached["logits"]), atol=1e-4)
    assert torch.allclose(feats, torch.from_numpy(cached["features"].astype(np.float32)), atol=2e-2, rtol=1e-2)
    for fw in (0.0, 0.5):  # one epoch from the same init: online and cached training agree
        cfg = DistillConfig(epochs=1, batch_size=64, lr=3e-3, augment=False, feature_weight=fw)
        loss_c, s_c = _one_epoch(DistillData(images, cached["logits"], teacher_features=cached["features"]), cfg)
        loss_o, s_o = _one_epoch(DistillData(images, None, teacher=online_teacher(tiny_teacher_ckpt)), cfg)
        assert loss_o == pytest.approx(loss_c, rel=2e-2)


def test_feature_loss_trains_the_projection_and_yields_a_plain_student(fmnist, tiny_teacher_ckpt, tmp_path):
    from orchestrator.stages.distill import FeatureStudent, student_state
    from orchestrator.stages.teacher_outputs import TeacherPredictor

    images = fmnist.train.images[:400]
    out = TeacherPredictor(str(tiny_teacher_ckpt), features=True)({"image": images, "index": np.arange(400)})
    data = DistillData(images, out["logits"], teacher_features=out["features"])
    torch.manual_seed(0)
    model = FeatureStudent(create_student("timm/resnet10t", 10, PRE, TINY_RESNET), 64)
    logits, proj = model(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10) and proj.shape == (2, 64)
    cfg = DistillConfig(epochs=4, batch_size=64, lr=3e-3, kd_weight=0.0, feature_weight=1.0)
    log = distill_local(model, data, PRE, cfg, tmp_path)  # feature loss only: 1 - cosine falls
    assert log["loss"][-1] < log["loss"][0] * 0.8
    plain = create_student("timm/resnet10t", 10, PRE, TINY_RESNET)
    plain.load_state_dict(student_state(model.state_dict()))  # strict: exactly the student's keys
    x = torch.from_numpy(np.random.default_rng(0).random((2, 1, 28, 28), np.float32))
    model.eval(), plain.eval()
    assert torch.allclose(plain(x), model(x)[0], atol=1e-5)


def test_evaluate_scores_and_plots(tmp_path):
    r = score(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3, ["a", "b", "c"])
    assert r.top1 == 0.75 and r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert r.per_class.tolist() == [1.0, 1.0, 0.5] and r.metrics("s.")["s.acc_class_2"] == 0.5
    png = plot_confusion(r, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_counting_flops_leaves_a_trained_model_untouched(fmnist):
    """A training-mode forward pass moves BatchNorm running statistics: counting must not touch the model."""
    from orchestrator.models import Preprocess, create_student
    from tests.conftest import TINY_RESNET

    m = create_student("timm/resnet10t", 10, Preprocess(1, (28, 28), (0.3,), (0.35,)), TINY_RESNET)
    m.train()(Preprocess(1, (28, 28), (0.3,), (0.35,))(fmnist.train.images[:64]))  # real-image statistics
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_flops(m, (1, 28, 28)), forward_flops(m, (1, 28, 28))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not m.training
    assert all(p.grad is None for p in m.parameters())


def test_flops_counts_match_linear_layer():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert forward_flops(m, (3, 2, 2)) == 2 * 12 * 5
    assert train_flops(m, (3, 2, 2)) == 2 * 2 * 12 * 5  # forward + weight grad (input needs no grad)
    with Meter(devices=2) as meter:
        sum(range(10000))
    assert meter.result.device_seconds == pytest.approx(2 * meter.result.wall_seconds)
    assert meter.result.peak_memory_bytes > 10_000_000


def test_cache_writes_atomically(tmp_path):
    cache = Cache(tmp_path)
    assert cache.lookup("k", "abc") is None
    with pytest.raises(RuntimeError):
        with cache.write("k", "abc") as d:
            (d / "half.npy").write_text("x")
            raise RuntimeError("killed")
    assert cache.lookup("k", "abc") is None and list((tmp_path / "cache" / "k").iterdir()) == []
    with cache.write("k", "abc", {"a": 1}) as d:
        (d / "x.txt").write_text("ok")
    assert (cache.lookup("k", "abc") / "x.txt").read_text() == "ok"
    assert cache.counters() == {"cache_hits_k": 1, "cache_misses_k": 2}


def test_transfer_sources(fmnist, tmp_path):
    split = make_split(fmnist.train.labels, per_class=10)
    ctx = TransferContext(fmnist, split)
    ts = build_transfer_set(ctx, TransferSetConfig())
    assert len(ts) == 900 and ts.images.shape[1:] == (28, 28, 1)
    labeled_bytes = {fmnist.train.images[i].tobytes() for i in split.labeled}
    assert not any(im.tobytes() in labeled_bytes for im in ts.images[:200])
    sub = build_transfer_set(ctx, TransferSetConfig(max_images=100, seed=1))
    assert len(sub) == 100 and sub.key != ts.key
    assert build_transfer_set(ctx, TransferSetConfig(max_images=100, seed=1)).key == sub.key
    from PIL import Image
    for c in ("x", "y"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "test" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (i * 60, 10, 200)).save(tmp_path / "train" / c / f"{i}.png")
            Image.new("RGB", (40, 40)).save(tmp_path / "test" / c / f"{i}.png")
    pool = {"format": "image_folder", "root": str(tmp_path)}
    g = build_transfer_set(ctx, TransferSetConfig(source="generic", pool=pool))
    assert g.images.shape == (8, 28, 28, 1) and g.source == "generic"
    with pytest.raises(UnknownNameError, match="valid choices: generic, retrieval, target_unlabeled"):
        build_transfer_set(ctx, TransferSetConfig(source="laion"))
    with pytest.raises(ValueError, match="needs transfer_set.pool"):
        build_transfer_set(ctx, TransferSetConfig(source="generic"))


def test_standin_pretraining_uses_no_labels_and_learns(fmnist, tmp_path):
    cfg = StandinConfig(model_kwargs=TINY_RESNET, input_size=16, epochs=3, batch_size=100, lr=3e-3)
    losses = []
    t = pretrain_standin(fmnist.train.images[:400], cfg, [0.286], [0.353], on_epoch=lambda e, l: losses.append(l))
    assert losses[-1] < losses[0]
    assert t.head is None and t.preprocess.channels == 3 and t.preprocess.size == (16, 16)
    assert "STAND-IN" in t.provenance and "no target labels" in t.provenance


def test_in_process_teacher_outputs_equal_the_reference_and_write_the_same_shards(fmnist, tiny_teacher_ckpt,
                                                                                   tmp_path):
    import pyarrow.parquet as pq

    from orchestrator.stages.teacher_outputs import teacher_outputs_in_process

    images = fmnist.train.images[:130]
    logits, feats = teacher_outputs_in_process(str(tiny_teacher_ckpt), images, tmp_path / "shards", batch_size=64,
                                               features=True)
    np.testing.assert_allclose(logits, teacher_logits(str(tiny_teacher_ckpt), images), atol=1e-5)
    assert feats.shape == (130, 64) and feats.dtype == np.float16
    table = pq.read_table(next((tmp_path / "shards").glob("*.parquet")))
    assert table["index"].to_pylist() == list(range(130))
    np.testing.assert_allclose(np.stack(table["logits"].to_numpy(zero_copy_only=False)), logits, atol=1e-6)


@pytest.mark.parametrize("mode,images,flops,expected", [
    ("auto", 1900, 15.7e6, 0),      # the smoke run: 0.03 TFLOPs, in this process
    ("auto", 59_400, 63e6, 0),      # the demo's full set: 3.7 TFLOPs, under the measured 4 TFLOPs break-even
    ("auto", 200_000, 63e6, 2),     # 12.6 TFLOPs: an actor pool
    ("ray_data", 10, 1e6, 2), ("in_process", 10**7, 1e9, 0)])
def test_small_inference_passes_run_in_process(mode, images, flops, expected):
    from types import SimpleNamespace

    from orchestrator.config import PipelineConfig
    from orchestrator.methods.common import inference_actors

    cfg = PipelineConfig.model_validate({"name": "t", "teacher": {"inference": mode}})
    assert inference_actors(SimpleNamespace(cfg=cfg), images, flops, 2) == expected
