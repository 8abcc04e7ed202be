"""A resumed sweep must not train again a trial whose end the driver already recorded (its row.json)."""
import json
from types import SimpleNamespace

from orchestrator.sweeps.trial import run_trial


def _trial_dir(tmp_path, status: str, final: bool = False):
    tdir = tmp_path / "trials" / "t1"
    tdir.mkdir(parents=True)
    (tdir / "attempts.log").write_text("2026-12-01T08:15:39 start\n")
    row = {"trial_id": "t1", "status": status, "val_top1": 0.42, "epoch": 1, "test_top1": None,
           "tags": {"student": "timm/resnet10t"}}
    (tdir / "row.json").write_text(json.dumps(row))
    if final:
        (tdir / "final.json").write_text(json.dumps({"val_top1": 0.5, "kt_final": 1.0, "kt_tags": {}}))
    return tdir


def test_trial_stopped_early_before_the_kill_is_re_reported_not_retrained(tmp_path):
    tdir = _trial_dir(tmp_path, "stopped")
    reports = []
    # a context without a space or teacher: training would fail at once, so returning proves it did not train
    out = run_trial(SimpleNamespace(sweep_dir=str(tmp_path)), "t1", {}, reports.append)
    assert reports == [out] and out["val_top1"] == 0.42 and out["epoch"] == 1 and "kt_final" not in out
    assert out["kt_tags"] == {"student": "timm/resnet10t"}
    log = (tdir / "attempts.log").read_text()
    assert log.count(" start") == 1 and "re-reported its early stop" in log


def test_finished_trial_re_reports_its_final_result(tmp_path):
    tdir = _trial_dir(tmp_path, "completed", final=True)
    reports = []
    out = run_trial(SimpleNamespace(sweep_dir=str(tmp_path)), "t1", {}, reports.append)
    assert out["kt_final"] == 1.0 and out["val_top1"] == 0.5 and reports == [out]
    assert (tdir / "attempts.log").read_text().count("start") == 1


def test_trial_reports_are_logged_at_their_distillation_epoch():
    """MLflow steps follow the epoch, not Tune's training_iteration, which restarts at 1 when a resumed sweep
    runs a trial again while its Ray Train run resumes from a later epoch."""
    from orchestrator.ray_adapters.tune import result_step

    assert result_step({"epoch": 2, "training_iteration": 1}) == 2
    assert result_step({"kt_final": 1.0, "distill_epochs": 2.0, "training_iteration": 2}) == 3
    assert result_step({"kt_final": 1.0, "distill_epochs": 0.0, "training_iteration": 1}) == 1  # supervised


def test_a_trial_committed_before_its_row_is_in_the_ledger(tmp_path):
    """The driver died after a trial wrote its commit (final.json) but before the ledger wrote its row (or after
    an earlier "stopped" row): the sweep's rows, CSV and `kt report` take the trial as completed from its commit;
    a trial without a commit or a row (still running at the kill) is not a row."""
    from orchestrator.sweeps.driver import load_rows

    trials = tmp_path / "trials"
    final = {"val_top1": 0.61, "test_top1": 0.6, "student_flops": 1e6, "kt_final": 1.0, "time_data_s": 0.5,
             "kt_tags": {"student": "timm/resnet10t"}, "kt_params": {"student": "r10t"}}
    (trials / "a").mkdir(parents=True)
    (trials / "a" / "final.json").write_text(json.dumps(final))  # committed, no row
    (trials / "b").mkdir()  # an early-stop row and no commit: stays stopped
    (trials / "b" / "row.json").write_text(json.dumps({"trial_id": "b", "status": "stopped", "val_top1": 0.3}))
    (trials / "c").mkdir()  # started, killed before anything
    (trials / "d").mkdir()
    (trials / "d" / "final.json").write_text(json.dumps(final))
    (trials / "d" / "row.json").write_text(json.dumps({"trial_id": "d", "status": "completed", "val_top1": 0.61}))
    rows = load_rows(tmp_path)
    assert [(r["trial_id"], r["status"]) for r in rows] == [("a", "completed"), ("b", "stopped"), ("d", "completed")]
    a = rows[0]
    assert a["val_top1"] == 0.61 and a["params"] == {"student": "r10t"} and a["time_data_s"] == 0.5
    assert a["tags"] == {"student": "timm/resnet10t"} and a["error"] is None
    assert rows[2] == {"trial_id": "d", "status": "completed", "val_top1": 0.61}  # the ledger's row, as written


class _FakeRuns:
    """ChildRuns' interface over dicts: one child run a killed driver left RUNNING, with steps 1-3 logged."""

    def __init__(self):
        self.logged = {"r1": {1, 2, 3}}
        self.calls = []

    def find(self, key):
        return ("r1", "RUNNING") if key == "t1" else None

    def reopen(self, run_id):
        self.calls.append(("reopen", run_id))

    def logged_steps(self, run_id, key):
        return self.logged.get(run_id, set())

    def log(self, run_id, metrics, step, tags=None, params=None):
        self.calls.append(("log", run_id, step))
        self.logged.setdefault(run_id, set()).add(step)


def test_resumed_driver_logs_a_re_reported_result_once():
    """The killed driver had logged a committed trial's final result (step 3) but not ended its run: after the
    resume, the trial's re-report is not logged a second time; a step not logged yet still is."""
    from orchestrator.ray_adapters.tune import TrialLedger

    ledger = TrialLedger("sqlite:///unused.db", "0", "parent", "/tmp", "s", row=dict, total=1)
    ledger._client = fake = _FakeRuns()
    trial = SimpleNamespace(trial_id="t1", config={})
    ledger.on_trial_result(0, [], trial, {"kt_final": 1.0, "distill_epochs": 2.0, "val_top1": 0.5})
    assert fake.calls == [("reopen", "r1")]
    ledger.on_trial_result(0, [], trial, {"epoch": 4, "val_top1": 0.6})
    assert fake.calls[-1] == ("log", "r1", 4)


def test_resumed_training_run_backfills_the_epochs_a_killed_driver_missed():
    """The killed driver died after epoch 2's checkpoint was persisted but before it logged that report: the
    resumed Ray Train run's first report carries the earlier epochs (``kt_earlier``) and the missing step 2 is
    logged once, with both metrics; steps already logged are not logged again."""
    from orchestrator.ray_adapters.tune import TrialLedger

    ledger = TrialLedger("sqlite:///unused.db", "0", "parent", "/tmp", "s", row=dict, total=1)
    ledger._client = fake = _FakeRuns()
    fake.logged["r1"] = {1}
    logged = []
    fake.log = lambda run_id, metrics, step, tags=None, params=None: logged.append((step, metrics))
    trial = SimpleNamespace(trial_id="t1", config={})
    ledger.on_trial_result(0, [], trial, {"epoch": 3, "loss": 0.7, "val_top1": 0.4,
                                          "kt_earlier": {"loss": [0.9, 0.8], "val_top1": [0.2, 0.3]}})
    assert logged[0] == (2, {"loss": 0.8, "val_top1": 0.3})
    assert [s for s, _ in logged] == [2, 3] and logged[1][1]["val_top1"] == 0.4
    assert "kt_earlier" not in logged[1][1]
    logged.clear()
    fake.logged["r1"] = {1, 2, 3}
    ledger.on_trial_result(0, [], trial, {"kt_final": 1.0, "distill_epochs": 3.0, "val_top1": 0.5,
                                          "kt_earlier": {"loss": [0.9, 0.8, 0.7], "val_top1": [0.2, 0.3, 0.4]}})
    assert [s for s, _ in logged] == [4]  # the final report (after finetuning), nothing twice
