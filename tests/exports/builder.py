"""A small fixture builder for export tests: users, instances with real tiny PNGs in the store, samples with
sub-instructions, reviews, MLLM verdicts and decisions, plus the standard database every export test uses."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.db.models import (
    Decision,
    Instance,
    MllmJudgement,
    Review,
    Sample,
    SubInstruction,
    Turn,
    User,
)
from mcie.db.session import session_scope
from mcie.db.store import ImageStore, register_images

T0 = datetime(2025, 1, 1, tzinfo=UTC)
OPERATIONS = ("add", "remove", "change")
BOX_SOURCES = ("mllm", "diff", None, "human")


def png(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny, real PNG whose bytes differ for every seed."""
    image = PILImage.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53 + 7) % 256))
    image.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass
class Builder:
    session: Session
    store: ImageStore
    users: dict[str, int] = field(default_factory=dict)
    next_seed: int = 1

    def image(self, seed: int | None = None) -> str:
        if seed is None:
            seed, self.next_seed = self.next_seed, self.next_seed + 1
        stored = self.store.put_bytes(png(seed), f"seed-{seed}.png")
        register_images(self.session, [stored])
        return stored.sha256

    def user(self, username: str, role: str = "rater") -> int:
        """The id of user ``username``, created (with ``role``) if the database has none."""
        existing = self.session.scalar(select(User.id).where(User.username == username))
        if existing is not None:
            self.users[username] = existing
            return existing
        user = User(username=username, role=role)
        self.session.add(user)
        self.session.flush()
        self.users[username] = user.id
        return user.id

    def instance(self, dataset: str, external_id: str, n_turns: int, source: str | None = None,
                 license: str | None = None) -> Instance:
        instance = Instance(dataset=dataset, external_id=external_id, source_image=source or self.image(),
                            n_turns=n_turns, license=license)
        self.session.add(instance)
        self.session.flush()
        for index in range(1, n_turns + 1):
            self.session.add(Turn(instance_id=instance.id, index=index, instruction=f"{external_id} edit {index}",
                                  operation=OPERATIONS[index % 3], result_image=self.image()))
        self.session.flush()
        return instance

    def sample(
        self,
        instance: Instance,
        first: int,
        last: int,
        *,
        status: str = "accepted",
        reviews: tuple[tuple[str, bool, int, int], ...] = (),
        decision: tuple[str, str] | None = ("accepted", "rule"),
        decided_at: datetime | None = None,
        lead: str | None = None,
        verdict: str | None = None,
    ) -> int:
        text = ", then ".join(f"{instance.external_id} edit {i}" for i in range(first, last + 1))
        sample = Sample(instance_id=instance.id, first_turn=first, last_turn=last, instruction=text, status=status)
        self.session.add(sample)
        self.session.flush()
        for k, turn in enumerate(range(first, last + 1)):
            source = BOX_SOURCES[(sample.id + k) % len(BOX_SOURCES)]
            box: dict[str, Any] = {}
            if source is not None:
                box = {"box_x0": 0.1 * k % 0.5, "box_y0": 0.2, "box_x1": 0.6 + 0.1 * (k % 3), "box_y1": 0.9,
                       "box_source": source, "box_score": 0.5 + k / 10}
            self.session.add(SubInstruction(sample_id=sample.id, turn_index=turn, text=f"{instance.external_id} "
                                            f"edit {turn}", operation=OPERATIONS[turn % 3], **box))
        for username, consistent, quality, complexity in reviews:
            if username not in self.users:
                self.user(username)
            self.session.add(Review(sample_id=sample.id, user_id=self.users[username], consistent=consistent,
                                    quality=quality, complexity=complexity, comment="private note"))
        if verdict is not None:
            self.session.add(MllmJudgement(sample_id=sample.id, stage="conflict", model="qwen-test",
                                           prompt_version="v1", cache_key="c" * 64, verdict=verdict, score=0.9))
        if decision is not None:
            outcome, source = decision
            lead_id = None
            if source == "lead":
                lead = lead or "lena"
                if lead not in self.users:
                    self.user(lead, role="lead")
                lead_id = self.users[lead]
            self.session.add(Decision(sample_id=sample.id, outcome=outcome, source=source, decided_by=lead_id,
                                      rule={"quality_above": 3} if source == "rule" else None,
                                      created_at=decided_at or T0))
        self.session.flush()
        return sample.id


@dataclass(frozen=True)
class SmallDb:
    accepted: tuple[int, ...]
    rejected: tuple[int, ...]
    other: tuple[int, ...]
    by_name: dict[str, int]


def build_small_db(url: str, store: ImageStore) -> SmallDb:
    """Three instances over two datasets; accepted, rejected and undecided samples with 0-3 reviews each.

    ``by_name`` keys: a12, a23, a13 (instance demo/a1, 3 turns), b12 (demo/b1, shares a1's source image),
    c12, c34, c24, c14 (seed/c1, 4 turns). "seed" is recorded as CC-BY-NC-4.0, "demo" states no licence.
    """
    with session_scope(url) as session:
        b = Builder(session, store)
        for name in ("alice", "bob", "carol"):
            b.user(name)
        b.user("lena", role="lead")
        a = b.instance("demo", "a1", 3)
        names: dict[str, int] = {}
        names["a12"] = b.sample(a, 1, 2, reviews=(("alice", True, 4, 4), ("bob", True, 5, 4)), verdict="no_conflict",
                                decided_at=T0 + timedelta(days=1))
        names["a23"] = b.sample(a, 2, 3, reviews=(("carol", True, 4, 5),), decided_at=T0 + timedelta(days=2))
        names["a13"] = b.sample(a, 1, 3, status="rejected", reviews=(("alice", False, 2, 3),),
                                decision=("rejected", "rule"))
        bi = b.instance("demo", "b1", 2, source=a.source_image)
        names["b12"] = b.sample(bi, 1, 2, reviews=(("alice", True, 4, 4), ("bob", False, 4, 5), ("carol", True, 5, 4)),
                                decision=("accepted", "lead"), verdict="conflict", decided_at=T0 + timedelta(days=3))
        c = b.instance("seed", "c1", 4, license="CC-BY-NC-4.0")
        names["c12"] = b.sample(c, 1, 2, reviews=(("bob", True, 5, 5),), decided_at=T0 + timedelta(days=4))
        names["c34"] = b.sample(c, 3, 4, reviews=(("carol", True, 4, 4), ("alice", True, 4, 3)),
                                decided_at=T0 + timedelta(days=5))
        names["c24"] = b.sample(c, 2, 4, status="in_review", reviews=(("bob", True, 3, 3),), decision=None)
        names["c14"] = b.sample(c, 1, 4, status="needs_adjudication", reviews=(("alice", True, 4, 4),
                                ("carol", False, 2, 2)), decision=None)
    accepted = tuple(names[k] for k in ("a12", "a23", "b12", "c12", "c34"))
    return SmallDb(accepted, (names["a13"],), (names["c24"], names["c14"]), names)
