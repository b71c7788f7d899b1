"""The ExperimentQueue feature for orchestrators: submit a whole ppu.v1 experiment, get its
state, follow it to its end as an observable command, cancel it."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import TIMEOUT_S, Daemon, wait_until
from sila2.client import SilaClient
from sila_follow import follow
from test_commands import parameter_of

QUEUE = "ExperimentQueue"


def experiment(name: str, segments: list[dict]) -> str:
    """A ppu.v1.ExperimentSpec in protobuf JSON (the Experiment parameter)."""
    return json.dumps(
        {
            "name": name,
            "sampleId": f"S-{name}",
            "labels": {"via": "sila"},
            "steps": [{"furnace": {"segments": segments}}],
        }
    )


def state(client: SilaClient, exp_id: str):  # noqa: ANN201
    return client.ExperimentQueue.GetExperiment(ExperimentId=exp_id)


def test_submit_get_follow(daemon: Daemon, client: SilaClient) -> None:
    q = client.ExperimentQueue
    exp_id = q.SubmitExperiment(
        Experiment=experiment(
            "sila-queue-ok",
            [{"ramp": {"temperatureC": 90.0, "rateCPerMin": 20.0}}, {"hold": {"durationS": 300.0}}],
        )
    ).ExperimentId
    got = state(client, exp_id)
    assert got.StepCount == 1, got  # one furnace step of two segments
    follow_run = q.FollowExperiment(ExperimentId=exp_id)
    infos = follow(client, QUEUE, "FollowExperiment", follow_run.execution_uuid, TIMEOUT_S)
    assert infos[-1].status == "finishedSuccessfully", infos
    done = follow_run.get_responses()
    assert "SUCCEEDED" in done.State.upper(), done
    assert not done.Error, done
    assert "SUCCEEDED" in state(client, exp_id).State.upper()
    # The same experiment in ppuctl, with its labels.
    shown = daemon.ppuctl_json("show", exp_id)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown
    assert shown["spec"]["labels"] == {"via": "sila"}, shown
    assert shown["spec"]["sample_id"] == "S-sila-queue-ok", shown
    assert isinstance(q.QueueLength.get(), int)


def test_cancel_ends_the_follow(daemon: Daemon, client: SilaClient) -> None:
    q = client.ExperimentQueue
    # A 40-hour hold (max_hold_s is 48 h): still running when it is cancelled.
    exp_id = q.SubmitExperiment(
        Experiment=experiment(
            "sila-queue-cancel",
            [{"step": {"temperatureC": 60.0}}, {"hold": {"durationS": 144000.0}}],
        )
    ).ExperimentId
    follow_run = q.FollowExperiment(ExperimentId=exp_id)
    infos: list = []
    followed = threading.Thread(
        target=lambda: infos.extend(
            follow(client, QUEUE, "FollowExperiment", follow_run.execution_uuid, TIMEOUT_S)
        ),
        daemon=True,
    )
    followed.start()
    wait_until(
        "the experiment to run", lambda: "RUNNING" in state(client, exp_id).State.upper()
    )
    q.CancelExperiment(ExperimentId=exp_id, Reason="orchestrator changed its plan")
    followed.join(TIMEOUT_S)
    assert infos, "FollowExperiment did not end after the cancel"
    assert infos[-1].status in ("finishedSuccessfully", "finishedWithError"), infos
    shown = daemon.ppuctl_json("show", exp_id)
    assert shown["state"] == "EXPERIMENT_STATE_CANCELLED", shown
    assert "orchestrator changed its plan" in shown.get("message", ""), shown
    got = state(client, exp_id)
    assert "CANCELLED" in got.State.upper(), got


def test_a_bad_experiment_is_a_validation_error(client: SilaClient) -> None:
    from sila2.framework import ValidationError

    with pytest.raises(ValidationError) as err:
        client.ExperimentQueue.SubmitExperiment(
            Experiment=experiment("sila-queue-bad", [{"ramp": {"temperatureC": 5000.0, "rateCPerMin": 20.0}}])
        )
    assert parameter_of(err.value) == (
        "ppu/queue/ExperimentQueue/v1/Command/SubmitExperiment/Parameter/Experiment"
    ), err.value
    assert "temperature_c" in err.value.message, err.value.message
