"""The data path's typed view of a run's settings (:class:`pipeline.flow.job.FlowJob`) matches the
job that runs build (:class:`pipeline.runs.settings.EmbedJob`)."""

from __future__ import annotations

import dataclasses
import typing

from pipeline.flow.job import FlowJob
from pipeline.runs.settings import EmbedJob


def test_embed_job_is_a_flow_job() -> None:
    job = EmbedJob(catalog="c.csv", output="out")
    assert isinstance(job, FlowJob)


def test_every_flow_field_is_an_embed_job_field_of_the_same_type() -> None:
    fields = {f.name: f for f in dataclasses.fields(EmbedJob)}
    hints = typing.get_type_hints(EmbedJob)
    wanted = [n for n, v in vars(FlowJob).items() if isinstance(v, property)]
    assert len(wanted) >= 10
    for name in wanted:
        assert name in fields, f"FlowJob.{name} is not an EmbedJob field"
        got = typing.get_type_hints(FlowJob.__dict__[name].fget)["return"]
        assert str(got).replace("typing.", "") == str(hints[name]).replace("typing.", ""), name


def test_a_job_missing_a_field_is_not_a_flow_job() -> None:
    @dataclasses.dataclass(frozen=True)
    class Partial:
        checkpoint: str = "msd"

    assert not isinstance(Partial(), FlowJob)
