"""Stage 2, expand: every instance's contiguous windows of 2..n turns become samples in the database.

For each instance that has no samples yet, :func:`pipeline.expand.plan_samples` plans its n(n-1)/2 windows, and the
samples (status ``filtering``) and their sub-instructions (one per turn of the window, with its operation) are
written in bulk. An instance's samples are written in one transaction with it, so a crash leaves every instance either
fully expanded or not at all, and a re-run expands only what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import exists, func, insert, select
from sqlalchemy.orm import Session

from mcie.db.models import Instance, Sample, SampleStatus, SubInstruction, Turn
from mcie.db.session import session_scope
from mcie.pipeline.expand import plan_samples


@dataclass
class ExpandReport:
    instances: int = 0
    samples: int = 0
    sub_instructions: int = 0
    single_turn_instances: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _pending_instance_ids(session: Session, after: int, limit: int) -> list[int]:
    """Instances of 2+ turns with no samples yet, by id, after ``after``."""
    has_samples = exists().where(Sample.instance_id == Instance.id)
    query = (
        select(Instance.id)
        .where(~has_samples, Instance.n_turns >= 2, Instance.id > after)
        .order_by(Instance.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def expand_stage(url: str, *, batch_size: int = 2000, on_batch: Callable[[int], None] | None = None) -> ExpandReport:
    """Expand every instance that has no samples yet; returns what was written."""
    report = ExpandReport()
    with session_scope(url) as session:
        report.single_turn_instances = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.n_turns < 2)
        )
    last_seen = 0
    while True:
        with session_scope(url) as session:
            ids = _pending_instance_ids(session, last_seen, batch_size)
            if not ids:
                break
            rows = session.execute(
                select(Turn.instance_id, Turn.index, Turn.instruction)
                .where(Turn.instance_id.in_(ids))
                .order_by(Turn.instance_id, Turn.index)
            ).all()
            by_instance: dict[int, list[str]] = {}
            for instance_id, _index, instruction in rows:
                by_instance.setdefault(instance_id, []).append(instruction)
            sample_rows: list[dict[str, object]] = []
            plans = []
            for instance_id in ids:
                for plan in plan_samples(by_instance.get(instance_id, [])):
                    plans.append(plan)
                    sample_rows.append({
                        "instance_id": instance_id,
                        "first_turn": plan.first_turn,
                        "last_turn": plan.last_turn,
                        "instruction": plan.instruction,
                        "status": SampleStatus.filtering,
                        "priority": 0.0,
                    })
            last_seen = ids[-1]
            if not sample_rows:
                continue
            sample_ids = session.scalars(
                insert(Sample).returning(Sample.id, sort_by_parameter_order=True), sample_rows
            ).all()
            sub_rows = [
                {"sample_id": sample_id, "turn_index": sub.turn_index, "text": sub.text, "operation": sub.operation}
                for sample_id, plan in zip(sample_ids, plans, strict=True)
                for sub in plan.sub_instructions
            ]
            session.execute(insert(SubInstruction), sub_rows)
            report.instances += len(ids)
            report.samples += len(sample_rows)
            report.sub_instructions += len(sub_rows)
        if on_batch is not None:
            on_batch(len(ids))
    return report
