"""20 reviewers work the review queue at once over HTTP: the app served by uvicorn on a migrated PostgreSQL database,
each reviewer with their own httpx client and login, using the JSON review API (lease -> submit) in threads.

Half of them walk away from their first lease (they keep it and ask for another one next to it). When the queue is
empty for everybody, those leases are expired with ``queue.expire_leases(session, now=<after the lease time>)``,
and a second round finishes their samples. Checked: no duplicate review, no sample over its target (``reviews_wanted``),
no lost submit (every 201 is in the database, with its id, and nothing else is), the expired leases went back to
the queue and were finished by others, and a late submit on an abandoned sample is refused with 409.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from mcie.annotate.accounts import hash_password
from mcie.annotate.project import ProjectConfig
from mcie.annotate.queue import expire_leases, reviews_wanted, utc
from mcie.config import load_settings
from mcie.db.models import Assignment, AssignmentState, Review, Sample, SampleStatus
from mcie.db.session import session_scope
from tests.annotate.browser import live_server
from tests.annotate.factories import configure, make_samples, make_user
from tests.annotate.tx import write_tx

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N_REVIEWERS = 20
N_SAMPLES = 60
PASSWORD = "correct-horse-9"
CONFIG = {"gold_rate": 0.0, "calibration_share": 0.3, "calibration_reviews": 3, "reviews_per_sample": 1,
          "lease_minutes": 20}


class Reviewer:
    """One reviewer's browser-less session: their own cookies, CSRF token and record of what the server said."""

    def __init__(self, base_url: str, username: str, user_id: int) -> None:
        self.username = username
        self.user_id = user_id
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=60)
        self.headers: dict[str, str] = {}
        self.created: list[tuple[int, int]] = []  # (sample, review id) of every 201
        self.abandoned: int | None = None
        self.unexpected: list[str] = []

    def log_in(self) -> None:
        form = self.http.get("/login")
        token = re.search(r"name=csrf value='([^']+)'", form.text)
        assert token, form.text
        response = self.http.post("/login", data={"username": self.username, "password": PASSWORD,
                                                  "csrf": token.group(1)})
        assert response.status_code == 303, response.text
        self.headers = {"X-CSRF-Token": self.http.get("/api/review/csrf").json()["csrf_token"]}

    def work(self, rng: random.Random, *, abandon: bool) -> None:
        """Lease and submit until the queue is empty; with ``abandon``, keep the first lease and never submit it."""
        while True:
            params = {"exclude": self.abandoned} if self.abandoned is not None else None
            response = self.http.get("/api/review/next", params=params)
            if response.status_code == 204:
                return
            if response.status_code != 200:
                self.unexpected.append(f"next: {response.status_code} {response.text}")
                return
            sample_id = response.json()["sample_id"]
            if abandon and self.abandoned is None:
                self.abandoned = sample_id
                continue
            answer = {"consistent": True, "quality": rng.randint(4, 5), "complexity": 4,
                      "time_spent_s": rng.uniform(5, 60)}
            submitted = self.http.post(f"/api/review/{sample_id}", json=answer, headers=self.headers)
            if submitted.status_code != 201:
                self.unexpected.append(f"submit {sample_id}: {submitted.status_code} {submitted.text}")
                return
            self.created.append((sample_id, submitted.json()["review_id"]))


def _run_all(reviewers: list[Reviewer], task) -> None:
    """Run ``task(index, reviewer)`` for every reviewer in its own thread, all starting together."""
    barrier = threading.Barrier(len(reviewers))
    errors: list[BaseException] = []

    def run(index: int, reviewer: Reviewer) -> None:
        try:
            barrier.wait(timeout=60)
            task(index, reviewer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k, r), name=f"reviewer-{k}") for k, r in enumerate(reviewers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a reviewer thread hung"
    assert errors == []


@pytest.mark.parametrize("migrated_url", ["postgres"], indirect=True)
def test_twenty_reviewers_over_http_on_postgres(migrated_url: str, tmp_path: Path) -> None:
    url = migrated_url
    password_hash = hash_password(PASSWORD)
    with session_scope(url) as session:
        configure(session, **CONFIG)
        samples = [s.id for s in make_samples(session, N_SAMPLES)]
        users = [make_user(session, f"http-rater{k:02d}") for k in range(N_REVIEWERS)]
        for user in users:
            user.password_hash = password_hash
        accounts = [(u.username, u.id) for u in users]
    wanted = {s: reviews_wanted(s, ProjectConfig(**CONFIG)) for s in samples}
    assert 1 < sum(wanted.values()) / len(wanted) < 3  # both ordinary and calibration samples

    settings = load_settings(data_dir=tmp_path, database_url=url, blob_url=str(tmp_path / "blobs"), secret_key=None)
    with live_server(settings, mount_ui=False) as base:
        reviewers = [Reviewer(base, name, user_id) for name, user_id in accounts]
        try:
            _run_all(reviewers, lambda k, r: r.log_in())
            # round 1: every even-numbered reviewer walks away from their first sample
            _run_all(reviewers, lambda k, r: r.work(random.Random(k), abandon=k % 2 == 0))
            abandoned = {r.user_id: r.abandoned for r in reviewers if r.abandoned is not None}
            assert len(abandoned) >= N_REVIEWERS // 4, "the test should abandon leases"
            with session_scope(url) as session:
                first_round = Counter(session.scalars(select(Review.sample_id)))
                leased = session.execute(
                    select(Assignment.user_id, Assignment.sample_id, Assignment.lease_expires_at)
                    .where(Assignment.state == AssignmentState.leased)
                ).all()
            assert {(u, s) for u, s, _ in leased} == set(abandoned.items())  # only the abandoned leases are held
            held = Counter(abandoned.values())
            assert all(first_round[s] + held[s] == wanted[s] for s in samples)  # the held slots are all that is left
            # the leases run out: expire them as the server's sweep would after the lease time
            later = max(utc(t) for _, _, t in leased) + timedelta(seconds=1)
            assert write_tx(url, expire_leases, now=later) == len(abandoned)
            with session_scope(url) as session:
                states = dict(session.execute(select(Sample.id, Sample.status)).all())
            assert all(states[s] in (SampleStatus.ready, SampleStatus.in_review) for s in abandoned.values())
            # round 2: the abandoned samples come back to the queue and the others finish them
            _run_all(reviewers, lambda k, r: r.work(random.Random(100 + k), abandon=False))
            # a late submit on an abandoned lease: the sample has all its reviews from others now
            late = {}
            for r in reviewers:
                if r.abandoned is not None:
                    response = r.http.post(f"/api/review/{r.abandoned}", json={"consistent": True, "quality": 4,
                                                                               "complexity": 4}, headers=r.headers)
                    late[r.user_id] = (response.status_code, response.json()["detail"])
        finally:
            for r in reviewers:
                r.http.close()

    assert [m for r in reviewers for m in r.unexpected] == []
    assert all(code == 409 and "already has all its reviews" in detail for code, detail in late.values()), late
    created = {(r.user_id, sample_id, review_id) for r in reviewers for sample_id, review_id in r.created}
    with session_scope(url) as session:
        reviews = session.execute(select(Review.user_id, Review.sample_id, Review.id)).all()
        pairs = session.execute(select(Assignment.user_id, Assignment.sample_id)).all()
        statuses = dict(session.execute(select(Sample.id, Sample.status)).all())
        still_leased = session.scalar(select(Assignment.id).where(Assignment.state == AssignmentState.leased))
    per_sample = Counter(sample for _, sample, _ in reviews)
    assert len({(u, s) for u, s, _ in reviews}) == len(reviews)  # no duplicate review
    assert len(set(pairs)) == len(pairs)  # nobody was given a sample twice
    assert {tuple(r) for r in reviews} == created  # every 201 is in the database, and nothing else
    assert len(created) == sum(len(r.created) for r in reviewers)
    assert all(per_sample[s] <= wanted[s] for s in samples)  # no sample over its target
    assert per_sample == wanted  # and every sample, the abandoned ones included, got all its reviews
    assert all(status == SampleStatus.accepted for status in statuses.values())
    for user_id, sample_id in abandoned.items():
        assert (user_id, sample_id) not in {(u, s) for u, s, _ in reviews}  # finished by someone else
    assert still_leased is None
    busiest = Counter(u for u, _, _ in reviews).most_common()
    assert len(busiest) >= N_REVIEWERS // 2  # the work was spread over many reviewers, not done by one thread
