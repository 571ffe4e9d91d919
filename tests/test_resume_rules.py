"""Every accepted setting takes effect (issue 23): a resume applies the keys declared applied from the
resumed step on, exactly as a run whose config changed at that step, refuses the others before
anything is written, and the run's record says what was in effect. Tiny DiT, as in test_training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers.training_utils import EMAModel

from atdiff.cli import main
from atdiff.config import config_from_dict
from atdiff.errors import UsageError
from atdiff.training import TrainingDiverged, list_checkpoints, loop, train
from atdiff.training.checkpoint import ABANDONED, verify
from atdiff.training.optim import make_lr_scheduler
from atdiff.training.tensor_tree import load_tree
from test_training import TINY, assert_same_run, one_thread, straight, tiny, write_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: equal means untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("atdiff train: error: ") and "Traceback" not in err, err
    return errors[0]


class SwitchingLR(torch.optim.lr_scheduler.LambdaLR):
    """A schedule whose base rate changes after ``at`` steps: what a config changed at that step means."""

    def __init__(self, optimizer, lr_lambdas, at: int, before: float, after: float):
        self.at, self.before, self.after = at, before, after
        super().__init__(optimizer, lr_lambdas)

    def get_lr(self):
        base = self.before if self.last_epoch < self.at else self.after
        return [base * rate(self.last_epoch) for rate in self.lr_lambdas]


def schedule_of(t):
    """The LR schedule a training section gives, on an optimizer of its own (made without drawing from the RNG)."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(2)]  # as atdiff.training.optim makes them
    return make_lr_scheduler(torch.optim.AdamW(groups, lr=t.learning_rate), t)


# ------------------------------------------------------------------------------------------------
# Applied keys
# ------------------------------------------------------------------------------------------------


def test_a_resume_that_changes_the_lr_and_ema_decay_equals_a_run_whose_config_changed_at_that_step(straight, tmp_path, monkeypatch):
    resumed = copy_run(straight[0], tmp_path)
    train(tiny(resumed, learning_rate=5e-4, ema_decay=0.5, log_with="tensorboard"), resume=str(resumed / "checkpoint-3"))

    # The same run without a resume: its schedule and EMA switch to the new values after step 3.
    monkeypatch.setattr(loop, "make_lr_scheduler", lambda optimizer, t: SwitchingLR(
        optimizer, schedule_of(t).lr_lambdas, at=3, before=2e-3, after=5e-4))
    ema_step = EMAModel.step

    def switching_ema_step(self, parameters):
        if self.optimization_step == 3:
            self.decay = 0.5
        return ema_step(self, parameters)

    monkeypatch.setattr(EMAModel, "step", switching_ema_step)
    straight_changed = tmp_path / "straight-changed"
    train(tiny(straight_changed, log_with="tensorboard"))
    assert_same_run(resumed, straight_changed)

    # Without the change the run would have ended elsewhere: the test can fail.
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_run(resumed, straight[0])

    # The record: what changed at step 3, in the run folder, the checkpoint and training_stats.json.
    history = [{"step": 3, "changed": {"training.ema_decay": {"from": 0.9, "to": 0.5},
                                       "training.learning_rate": {"from": 2e-3, "to": 5e-4}}}]
    assert json.loads((resumed / "config_history.json").read_text()) == history
    assert json.loads((resumed / "checkpoint-6" / "config_history.json").read_text()) == history
    assert json.loads((resumed / "training_stats.json").read_text())["config_history"] == history
    assert yaml.safe_load((resumed / "config.yaml").read_text())["training"]["learning_rate"] == 5e-4
    groups = load_tree(resumed / "checkpoint-6" / "optimizer.safetensors")["param_groups"]
    assert [g["initial_lr"] for g in groups] == [5e-4, 5e-4]
    assert load_tree(resumed / "checkpoint-6" / "ema.safetensors")["decay"] == 0.5
    # The schedule's own state is the straight run's too (a resume does not step it again).
    counted = [load_tree(run / "checkpoint-6" / "scheduler.safetensors")["_step_count"] for run in (resumed, straight_changed)]
    assert counted[0] == counted[1]


def test_weight_decay_and_betas_reach_the_restored_optimizer(straight, tmp_path):
    out = copy_run(straight[0], tmp_path)
    train(tiny(out, max_steps=7, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95), resume="latest")
    decaying, exempt = load_tree(out / "checkpoint-7" / "optimizer.safetensors")["param_groups"]
    assert decaying["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0  # ATConv's difference_control: never
    assert tuple(decaying["betas"]) == tuple(exempt["betas"]) == (0.8, 0.95)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")  # the reference schedule, stepped alone
def test_a_longer_run_re_derives_the_schedule(straight, tmp_path):
    """max_steps is applied: the cosine schedule is that of the longer run at every step from the resumed one on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = copy_run(straight[0], tmp_path)
    cfg = tiny(out, max_steps=12, log_every=1, log_with="tensorboard")
    train(cfg, resume="latest")
    reference, rates = schedule_of(cfg.training), []
    for _ in range(12):
        rates.append(reference.get_last_lr()[0])  # rates[s - 1]: the rate of step s
        reference.step()
    scheduler = load_tree(out / "checkpoint-12" / "scheduler.safetensors")
    assert scheduler["base_lrs"] == [2e-3, 2e-3] and scheduler["last_epoch"] == 12
    assert scheduler["_last_lr"] == reference.get_last_lr()
    # Every resumed step, the first included, trained at the 12-step schedule's rate (the restored
    # optimizer held the 6-step schedule's, which ends at 0).
    events = EventAccumulator(str(out / "logs" / "atdiff")).Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr") if e.step > 6}
    assert logged == {s: pytest.approx(rates[s - 1]) for s in range(7, 13)} and logged[7] > 0


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
def test_the_logged_rate_is_the_rate_of_the_logged_step(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = straight
    cfg = tiny(out)
    reference = schedule_of(cfg.training)
    rates = []  # rates[s - 1]: the rate step s trains at
    for _ in range(cfg.training.max_steps):
        rates.append(reference.get_last_lr()[0])
        reference.step()
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")))).Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    assert logged == {s: pytest.approx(rates[s - 1]) for s in (2, 4, 6)}
    assert logged[2] == pytest.approx(1e-3)  # step 2 of 2 warm-up steps: half the rate


def test_a_harmless_data_key_may_change(straight, tmp_path):
    """data.num_workers changes how batches are loaded, not which: the run ends as an unchanged resume does."""
    out, unchanged = copy_run(straight[0], tmp_path), tmp_path / "unchanged"
    shutil.copytree(straight[0], unchanged)
    raw = tiny(out, max_steps=7, log_with="tensorboard").to_dict()
    raw["data"]["num_workers"] = 1
    assert train(config_from_dict(raw), resume="latest").step == 7
    train(tiny(unchanged, max_steps=7, log_with="tensorboard"), resume="latest")
    assert_same_run(out, unchanged, step=7)


# ------------------------------------------------------------------------------------------------
# Refused keys
# ------------------------------------------------------------------------------------------------

REFUSED = {
    "another seed": (["--seed", "5"], r"training.seed was 0 there and is 5 now; the data order .*Resume with training.seed=0"),
    "another batch size": (["training.batch_size=16"], r"training.batch_size was 8 there and is 16 now; the run's position in the data"),
    "another mixer": (["model.token_mixer=attention"], r"model.token_mixer was 'atconv' there and is 'attention' now; the checkpoint holds this model's weights"),
    "another objective": (["objective.type=ddpm"], r"objective.type was 'flow_matching' there and is 'ddpm' now"),
    "other flips": (["data.random_flip=false"], r"data.random_flip was True there and is False now"),
    "fewer steps than done": (["--max-steps", "5"], r"training.max_steps=5 is below the 6 steps .*checkpoint-6 has done; pass --max-steps 6 or more"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_change_that_cannot_apply_is_one_line_before_anything_is_written(straight, tmp_path, capsys, case):
    arguments, message = REFUSED[case]
    out = copy_run(straight[0], tmp_path)
    config = write_config(tiny(out, max_steps=8), tmp_path / "config.yaml")
    before = folder_state(out)
    assert main(["train", "--config", str(config), "--resume", "latest", *arguments]) == 2
    line = one_line_error(capsys)
    assert re.search(message, line), line
    assert folder_state(out) == before


def test_a_flag_and_a_key_value_for_one_key_must_agree(tmp_path, capsys):
    config = write_config(tiny(tmp_path / "run"), tmp_path / "config.yaml")
    assert main(["train", "--config", str(config), "--batch-size", "8", "training.batch_size=16"]) == 2
    assert "--batch-size 8 and training.batch_size=16 both set training.batch_size; give it once" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_flag_and_a_key_value_that_agree_are_one_setting():
    from atdiff.train_cli import check_no_conflicts

    check_no_conflicts({"training.batch_size": 8}, ["training.batch_size=8", "training.learning_rate=1e-3"])


@pytest.mark.parametrize("objective, inert", [
    ({"type": "flow_matching", "prediction_type": "v_prediction"}, "objective.prediction_type=v_prediction does nothing with objective.type=flow_matching (it applies only with objective.type ddpm)"),
    ({"type": "flow_matching", "beta_schedule": "scaled_linear"}, "objective.beta_schedule=scaled_linear does nothing with objective.type=flow_matching"),
    ({"type": "ddpm", "timestep_sampling": "logit_normal"}, "objective.timestep_sampling=logit_normal does nothing with objective.type=ddpm (it applies only with objective.type flow_matching)"),
])
def test_a_key_that_does_nothing_under_the_objective_is_refused(objective, inert):
    raw = {**TINY, "objective": objective}
    with pytest.raises(UsageError) as refused:
        config_from_dict(raw)
    assert str(refused.value).startswith(inert) and str(refused.value).endswith("; drop it")
    config_from_dict({**TINY, "objective": {**objective, "type": "ddpm" if objective["type"] == "flow_matching" else "flow_matching"}})


# ------------------------------------------------------------------------------------------------
# The record of an abandoned line
# ------------------------------------------------------------------------------------------------


def test_the_final_pipeline_and_stats_of_an_abandoned_line_move_with_it(straight, tmp_path):
    """Resuming an older checkpoint of a finished run: until the new line ends, the folder holds no
    pipeline (it is not finished), and no stats of the other line."""
    out = copy_run(straight[0], tmp_path)
    stats_before = (out / "training_stats.json").read_bytes()
    with pytest.raises(TrainingDiverged):  # the new line stops before its end
        train(tiny(out, learning_rate=1e9, max_grad_norm=None, log_with="tensorboard"), resume=str(out / "checkpoint-3"))
    abandoned = next((out / ABANDONED).glob("atdiff-*"))
    assert not (out / "model_index.json").exists() and not (out / "model").exists()
    assert (abandoned / "model_index.json").is_file() and (abandoned / "model").is_dir() and (abandoned / "scheduler").is_dir()
    assert (abandoned / "training_stats.json").read_bytes() == stats_before
    assert not (out / "training_stats.json").exists() or json.loads((out / "training_stats.json").read_text())["steps"] <= 5


def test_a_resume_with_nothing_left_to_train_records_its_changes(straight, tmp_path):
    out = copy_run(straight[0], tmp_path)
    raw = tiny(out, log_with="tensorboard").to_dict()
    raw["sampling"]["seed"] = 7
    train(config_from_dict(raw), resume="latest")
    history = [{"step": 6, "changed": {"sampling.seed": {"from": 0, "to": 7}}}]
    assert json.loads((out / "config_history.json").read_text()) == history
    stats = json.loads((out / "training_stats.json").read_text())
    assert stats["config_history"] == history and stats["images_per_s"] is not None  # the figures are kept


def test_grids_and_evals_of_an_abandoned_line_move_with_it(straight, tmp_path):
    out = copy_run(straight[0], tmp_path)
    (out / "evals").mkdir()
    (out / "evals" / "step-3.json").write_text('{"step": 3}\n')  # as training wrote it, of this line
    (out / "evals" / "step-6.json").write_text('{"step": 6}\n')
    old_grid = (out / "samples" / "step-0000004.png").read_bytes()
    raw = tiny(out, max_steps=6, log_with="tensorboard").to_dict()
    raw["sampling"]["seed"] = 7
    train(config_from_dict(raw), resume=str(out / "checkpoint-3"))

    abandoned = next((out / ABANDONED).glob("atdiff-*"))
    assert sorted(str(p.relative_to(abandoned)) for p in abandoned.rglob("step-*") if p.is_file()) == [
        "evals/step-6.json", "samples/step-0000004.png", "samples/step-0000006.png"]
    verify(abandoned / "checkpoint-6")
    assert (abandoned / "samples" / "step-0000004.png").read_bytes() == old_grid
    assert (out / "samples" / "step-0000004.png").read_bytes() != old_grid  # drawn again, with seed 7
    assert sorted(p.name for p in (out / "evals").iterdir()) == ["step-3.json"]
    assert json.loads((out / "config_history.json").read_text()) == [
        {"step": 3, "changed": {"sampling.seed": {"from": 0, "to": 7}}}]
    # TensorBoard shows the new line only: the abandoned line's steps 4 and 6 are purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = out / "logs" / "atdiff"
    assert len(list(scalars.glob("events.out.tfevents.*"))) == 2  # one file a session
    events = EventAccumulator(str(scalars)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]


# ------------------------------------------------------------------------------------------------
# The divergence advice
# ------------------------------------------------------------------------------------------------


# Sane steps with checkpoints every 2 (only the newest kept), then the rate jumps (JumpingLR).
DIVERGING = dict(max_steps=30, checkpoint_every=2, checkpoints_total_limit=1, lr_scheduler="constant",
                 lr_warmup_steps=0, learning_rate=1e-3, max_grad_norm=None, sample_every=0)


class JumpingLR(torch.optim.lr_scheduler.LambdaLR):
    """The rate x300 after step 14, x1e6 after step 20: the loss spikes, then overflows."""

    def get_lr(self):
        factor = 1 if self.last_epoch < 14 else 300 if self.last_epoch < 20 else 1e6
        return [base * factor for base in self.base_lrs]


def test_the_divergence_advice_works(tmp_path, monkeypatch, capsys):
    """Sane steps, then the rate jumps: the loss spikes, finite but ruined checkpoints follow, then
    NaN. The last checkpoint from before the spike survives pruning and is named; resuming it with a
    lower rate trains to the end at that rate."""
    out = tmp_path / "run"

    with monkeypatch.context() as patch:
        patch.setattr(loop, "make_lr_scheduler", lambda optimizer, t: JumpingLR(optimizer, lambda step: 1.0))
        with pytest.raises(TrainingDiverged) as diverged:
            train(tiny(out, **DIVERGING))
    steps = [step for step, _ in list_checkpoints(out)]
    assert steps[0] == 14 and steps[-1] >= 18, steps  # before the spike, and a finite one after it (limit 1)
    message = str(diverged.value)
    assert f"the last checkpoint is {out / f'checkpoint-{steps[-1]}'}, but the loss spiked at step 16" in message  # the first loss of the x300 weights
    assert f"{out / 'checkpoint-14'} is the last from before it" in message
    assert message.endswith(f"then resume with --resume {out / 'checkpoint-14'}.")

    lower = tiny(out, **{**DIVERGING, "learning_rate": 1e-4})
    result = train(lower, resume=str(out / "checkpoint-14"))
    assert result.step == 30 and all(torch.isfinite(torch.tensor(result.losses)))
    groups = load_tree(out / "checkpoint-30" / "optimizer.safetensors")["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4, 1e-4]
    assert json.loads((out / "config_history.json").read_text()) == [
        {"step": 14, "changed": {"training.learning_rate": {"from": 1e-3, "to": 1e-4}}}]


def test_a_spike_is_still_watched_after_a_resume(tmp_path, monkeypatch):
    """Interrupted while the loss is spiking: the resumed run still keeps (and names) the checkpoint from before the spike."""
    out = tmp_path / "run"

    monkeypatch.setattr(loop, "make_lr_scheduler", lambda optimizer, t: JumpingLR(optimizer, lambda step: 1.0))
    train(tiny(out, **{**DIVERGING, "max_steps": 18}))  # stopped mid-spike (as by Ctrl-C): checkpoint-18 is ruined
    assert [step for step, _ in list_checkpoints(out)] == [14, 18]
    with pytest.raises(TrainingDiverged) as diverged:
        train(tiny(out, **DIVERGING), resume="latest")
    assert [step for step, _ in list_checkpoints(out)][0] == 14
    assert str(diverged.value).endswith(f"then resume with --resume {out / 'checkpoint-14'}.")


def test_weights_that_sample_nan_stop_the_run_as_divergence(straight, tmp_path):
    """Finite weights that overflow when sampled (a step at rate 1e9): the grid is not drawn, the run
    stops as diverged and says what to do."""
    out = copy_run(straight[0], tmp_path)
    with pytest.raises(TrainingDiverged) as diverged:
        train(tiny(out, learning_rate=1e9, max_grad_norm=None, log_with="tensorboard"), resume=str(out / "checkpoint-3"))
    assert str(diverged.value).startswith("after step 4, the EMA weights sample NaN or infinite values (finite, but blown up); "
                                          f"stopped without saving (the last good checkpoint is {out / 'checkpoint-3'})")
    assert not (out / "samples" / "step-0000004.png").exists()
