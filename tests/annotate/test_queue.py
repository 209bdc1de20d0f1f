"""The review queue leases samples in priority order, never twice to a user, never beyond a sample's target, on SQLite
and PostgreSQL; leases expire; calibration and gold samples get what they should; 20 reviewers at once stay exact."""

from __future__ import annotations

import random
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, literal, select

from mcie.annotate.project import ProjectConfig
from mcie.annotate.queue import (
    MAX_LEASES,
    QueueError,
    calibration_clause,
    expire_leases,
    gold_draw,
    is_calibration,
    next_sample,
    release,
    reviews_wanted,
)
from mcie.annotate.reviews import Answer, ReviewError, skip_sample, submit_review
from mcie.db.migrate import upgrade
from mcie.db.models import Assignment, AssignmentPurpose, AssignmentState, Decision, Review, Sample, SampleStatus
from mcie.db.session import session_scope
from tests.annotate.factories import configure, make_gold, make_sample, make_samples, make_user, make_users
from tests.annotate.tx import write_tx

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
YES = Answer(consistent=True, quality=4, complexity=4)


def _status(url: str, sample_id: int) -> SampleStatus:
    with session_scope(url) as session:
        return session.get(Sample, sample_id).status


def _assignment_state(url: str, user_id: int, sample_id: int) -> AssignmentState:
    with session_scope(url) as session:
        return session.scalar(
            select(Assignment.state).where(Assignment.user_id == user_id, Assignment.sample_id == sample_id)
        )


def _plain_project(url: str, **changes) -> None:
    """No gold, no calibration, one review per sample, unless changed."""
    with session_scope(url) as session:
        configure(session, **({"gold_rate": 0.0, "calibration_share": 0.0} | changes))


# ----------------------------------------------------------------------------------------------------------
# pure helpers


def test_calibration_membership_is_stable_proportional_and_monotone() -> None:
    ids = range(1, 20_001)
    members = [i for i in ids if is_calibration(i, 0.10)]
    assert 0.099 < len(members) / len(ids) < 0.101
    assert members == [i for i in ids if is_calibration(i, 0.10)]  # stable
    assert set(members) <= {i for i in ids if is_calibration(i, 0.25)}  # raising the share only adds samples
    assert not any(is_calibration(i, 0.0) for i in ids) and all(is_calibration(i, 1.0) for i in ids)
    with pytest.raises(QueueError, match="calibration share"):
        is_calibration(1, 1.5)
    config = ProjectConfig(calibration_share=0.5, calibration_reviews=3, reviews_per_sample=1)
    assert {reviews_wanted(i, config) for i in ids if is_calibration(i, 0.5)} == {3}
    assert {reviews_wanted(i, config) for i in ids if not is_calibration(i, 0.5)} == {1}


def test_gold_draw_is_deterministic_at_the_rate() -> None:
    draws = [gold_draw(7, n, 0.05) for n in range(20_000)]
    assert draws == [gold_draw(7, n, 0.05) for n in range(20_000)]
    assert 0.045 < sum(draws) / len(draws) < 0.055
    assert not any(gold_draw(7, n, 0.0) for n in range(1000))


def test_calibration_sql_matches_python(migrated_url: str) -> None:
    with session_scope(migrated_url) as session:
        ids = [s.id for s in make_samples(session, 40)]
        in_sql = set(session.scalars(select(Sample.id).where(calibration_clause(Sample.id, 0.3))))
        largest = 2**31 - 1  # the largest PostgreSQL integer id must not overflow
        assert session.scalar(select(calibration_clause(literal(largest), 0.3))) == is_calibration(largest, 0.3)
    assert in_sql == {i for i in ids if is_calibration(i, 0.3)}
    assert 0 < len(in_sql) < len(ids)


# ----------------------------------------------------------------------------------------------------------
# leasing


def test_priority_order_reload_prefetch_and_two_lease_limit(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url)
    with session_scope(url) as session:
        low, high_a, high_b, mid = (make_sample(session, priority=p).id for p in (0.2, 0.9, 0.9, 0.5))
        rita = make_user(session).id

    first = write_tx(url, next_sample, rita, now=T0)
    assert first is not None and first.sample_id == high_a and first.purpose == "regular"
    assert first.expires_at == T0 + timedelta(minutes=20)
    assert write_tx(url, next_sample, rita, now=T0 + timedelta(minutes=1)) == first  # a reload gets the same sample
    prefetched = write_tx(url, next_sample, rita, exclude=[first.sample_id], now=T0)
    assert prefetched is not None and prefetched.sample_id == high_b  # same priority: lower id first
    assert write_tx(url, next_sample, rita, exclude=[first.sample_id], now=T0) == prefetched
    with pytest.raises(QueueError, match=f"already holds {MAX_LEASES} leased samples"):
        write_tx(url, next_sample, rita, exclude=[high_a, high_b], now=T0)
    assert _status(url, high_a) == _status(url, high_b) == SampleStatus.in_review
    assert _status(url, mid) == SampleStatus.ready

    write_tx(url, submit_review, rita, high_a, YES, time_spent_s=12, now=T0)
    assert write_tx(url, next_sample, rita, now=T0) == prefetched  # the prefetched one becomes current
    write_tx(url, submit_review, rita, high_b, YES, time_spent_s=12, now=T0)
    order = []
    while (lease := write_tx(url, next_sample, rita, now=T0)) is not None:
        order.append(lease.sample_id)
        write_tx(url, submit_review, rita, lease.sample_id, YES, now=T0)
    assert order == [mid, low]


def test_only_active_reviewers_get_samples(migrated_url: str) -> None:
    with session_scope(migrated_url) as session:
        make_sample(session)
        participant = make_user(session, role="participant").id
        disabled = make_user(session, active=False).id
    with pytest.raises(QueueError, match="participant"):
        write_tx(migrated_url, next_sample, participant)
    with pytest.raises(QueueError, match="disabled"):
        write_tx(migrated_url, next_sample, disabled)
    with pytest.raises(QueueError, match="no user"):
        write_tx(migrated_url, next_sample, 999_999)


def test_never_the_same_sample_twice_and_skip_frees_the_slot(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann, bob = (u.id for u in make_users(session, 2))

    assert write_tx(url, next_sample, ann, now=T0).sample_id == sample
    assert write_tx(url, next_sample, bob, now=T0) is None  # its only slot is leased
    with pytest.raises(ReviewError, match="reason is required"):
        write_tx(url, skip_sample, ann, sample, "  ")
    write_tx(url, skip_sample, ann, sample, "the target image does not load", now=T0)
    assert _assignment_state(url, ann, sample) == AssignmentState.skipped
    assert _status(url, sample) == SampleStatus.ready
    assert write_tx(url, next_sample, ann, now=T0) is None  # never again, though it still needs a review
    assert write_tx(url, next_sample, bob, now=T0).sample_id == sample
    bob_expired = T0 + timedelta(hours=2)
    assert write_tx(url, next_sample, ann, now=bob_expired) is None  # not even once bob's lease is over
    with pytest.raises(ReviewError, match="skipped"):
        write_tx(url, submit_review, ann, sample, YES)


def test_expired_leases_return_the_sample(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url, lease_minutes=20)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann, bob = (u.id for u in make_users(session, 2))

    write_tx(url, next_sample, ann, now=T0)
    assert write_tx(url, next_sample, bob, now=T0 + timedelta(minutes=19)) is None
    assert write_tx(url, expire_leases, now=T0 + timedelta(minutes=10)) == 0
    assert write_tx(url, expire_leases, now=T0 + timedelta(minutes=20)) == 1
    assert _assignment_state(url, ann, sample) == AssignmentState.expired
    assert _status(url, sample) == SampleStatus.ready
    assert write_tx(url, next_sample, bob, now=T0 + timedelta(minutes=21)).sample_id == sample
    assert _status(url, sample) == SampleStatus.in_review
    assert write_tx(url, next_sample, ann, now=T0 + timedelta(minutes=21)) is None  # ann saw it already


def test_an_expired_lease_frees_the_slot_before_any_sweep(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann, bob = (u.id for u in make_users(session, 2))
    write_tx(url, next_sample, ann, now=T0)
    assert write_tx(url, next_sample, bob, now=T0 + timedelta(minutes=25)).sample_id == sample  # no expire_leases call
    assert write_tx(url, next_sample, ann, now=T0 + timedelta(minutes=26)) is None
    assert _assignment_state(url, ann, sample) == AssignmentState.expired  # ann's own call expired it


def test_release_gives_the_lease_back(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann, bob = (u.id for u in make_users(session, 2))
    write_tx(url, next_sample, ann, now=T0)
    assert write_tx(url, release, ann, sample, now=T0) is True
    assert write_tx(url, release, ann, sample, now=T0) is False
    assert _status(url, sample) == SampleStatus.ready
    assert write_tx(url, next_sample, bob, now=T0).sample_id == sample


def test_calibration_samples_collect_three_reviews_and_others_one(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url, calibration_share=0.5, calibration_reviews=3, reviews_per_sample=1)
    with session_scope(url) as session:
        samples = [s.id for s in make_samples(session, 8)]
        raters = [u.id for u in make_users(session, 4)]
    calibration = {s for s in samples if is_calibration(s, 0.5)}
    assert 0 < len(calibration) < len(samples)

    purposes = {}
    for rater in raters:
        while (lease := write_tx(url, next_sample, rater, now=T0)) is not None:
            purposes[lease.sample_id] = lease.purpose
            write_tx(url, submit_review, rater, lease.sample_id, YES, now=T0)
    with session_scope(url) as session:
        counts = dict(session.execute(select(Review.sample_id, func.count()).group_by(Review.sample_id)).all())
        statuses = dict(session.execute(select(Sample.id, Sample.status)).all())
    assert counts == {s: 3 if s in calibration else 1 for s in samples}
    assert {purposes[s] for s in calibration} == {"calibration"}
    assert {purposes[s] for s in samples if s not in calibration} == {"regular"}
    assert set(statuses.values()) == {SampleStatus.accepted}


def test_gold_is_mixed_in_at_the_rate_and_never_counted(migrated_url: str) -> None:
    url = migrated_url
    _plain_project(url, gold_rate=0.5)
    with session_scope(url) as session:
        regular = [s.id for s in make_samples(session, 12)]
        gold = [s.id for s in make_samples(session, 4, priority=1.0)]
        for sample_id in gold:
            make_gold(session, session.get(Sample, sample_id))
        rita, rob = (u.id for u in make_users(session, 2))

    leases = []
    while (lease := write_tx(url, next_sample, rita, now=T0)) is not None:
        leases.append(lease)
        write_tx(url, submit_review, rita, lease.sample_id, Answer(False, 1, 1), now=T0)
    # the k-th lease is gold exactly when the draw says so and an unseen gold sample is left
    expected, gold_left = [], len(gold)
    for k in range(len(leases)):
        is_gold = gold_draw(rita, k, 0.5) and gold_left > 0
        gold_left -= is_gold
        expected.append("gold" if is_gold else "regular")
    assert [lease.purpose for lease in leases] == expected
    assert sorted(lease.sample_id for lease in leases if lease.purpose == "gold") == gold  # each once
    assert sorted(lease.sample_id for lease in leases if lease.purpose == "regular") == regular
    with session_scope(url) as session:
        assert {session.get(Sample, s).status for s in gold} == {SampleStatus.ready}  # never settled
        assert session.scalar(select(func.count()).where(Decision.sample_id.in_(gold))) == 0
        assert {session.get(Sample, s).status for s in regular} == {SampleStatus.rejected}
    # a gold review never fills a pool slot, and with gold_rate 0 nobody gets gold
    _plain_project(url, gold_rate=0.0)
    assert write_tx(url, next_sample, rob, now=T0) is None


def test_a_long_blocked_front_is_paged_through(migrated_url: str) -> None:
    """More blocked samples than the first window (32) at the head of the queue."""
    url = migrated_url
    _plain_project(url)
    with session_scope(url) as session:
        rita = make_user(session)
        samples = make_samples(session, 40, priority=0.9)
        target = make_sample(session, priority=0.1).id
        for sample in samples:
            session.add(
                Assignment(
                    sample_id=sample.id,
                    user_id=rita.id,
                    state=AssignmentState.skipped,
                    purpose=AssignmentPurpose.regular,
                    lease_expires_at=T0,
                    skip_reason="not for me",
                )
            )
        rita_id = rita.id
    assert write_tx(url, next_sample, rita_id, now=T0).sample_id == target


# ----------------------------------------------------------------------------------------------------------
# concurrency


@pytest.mark.postgres
def test_twenty_reviewers_at_once_on_postgres(postgres_url: str) -> None:
    """20 threads work the queue at once; some abandon leases, which expire (via ``now``) and go to others."""
    upgrade(postgres_url)
    _work_the_queue_at_once(postgres_url)


def test_twenty_reviewers_at_once_on_sqlite(sqlite_url: str) -> None:
    """The same on SQLite, where BEGIN IMMEDIATE serializes the writers."""
    upgrade(sqlite_url)
    _work_the_queue_at_once(sqlite_url)


def _work_the_queue_at_once(url: str) -> None:
    with session_scope(url) as session:
        configure(session, gold_rate=0.0, calibration_share=0.3, calibration_reviews=3, lease_minutes=20)
        samples = [s.id for s in make_samples(session, 60)]
        reviewers = [u.id for u in make_users(session, 20)]
    config = ProjectConfig(calibration_share=0.3, calibration_reviews=3)
    wanted = {s: reviews_wanted(s, config) for s in samples}
    submitted: list[tuple[int, int]] = []  # (user, sample) of every submit that returned
    abandoned: list[tuple[int, int]] = []
    refused: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(reviewers))

    def submit(user_id: int, sample_id: int, now: datetime, seconds: float) -> None:
        try:
            write_tx(url, submit_review, user_id, sample_id, YES, time_spent_s=seconds, now=now)
        except ReviewError as exc:  # only a late submit on a sample that got all its reviews may be refused
            with lock:
                refused.append(str(exc))
            return
        with lock:
            submitted.append((user_id, sample_id))

    def work(user_id: int, now: datetime, rng: random.Random, abandon: bool) -> int | None:
        """Review until the queue is empty; with ``abandon``, walk away from one lease (kept until it expires)."""
        left_behind: int | None = None
        while (
            lease := write_tx(url, next_sample, user_id, exclude=[left_behind] if left_behind else [], now=now)
        ) is not None:
            if abandon and left_behind is None and rng.random() < 0.5:
                left_behind = lease.sample_id
                with lock:
                    abandoned.append((user_id, lease.sample_id))
                continue
            submit(user_id, lease.sample_id, now, rng.uniform(5, 60))
        return left_behind

    def reviewer(index: int, user_id: int) -> None:
        try:
            rng = random.Random(index)
            barrier.wait()
            work(user_id, T0, rng, abandon=index % 2 == 0)
            barrier.wait()
            work(user_id, T0 + timedelta(minutes=30), rng, abandon=False)  # every first-round lease has expired
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=(k, u)) for k, u in enumerate(reviewers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert refused == []  # with the clock the same for everybody, no submit may be turned away
    assert abandoned, "the test should abandon some leases"
    # a late submit on an abandoned (expired) lease is refused once others have done the sample
    for user_id, sample_id in abandoned:
        submit(user_id, sample_id, T0 + timedelta(hours=1), 10.0)
    assert len(refused) == len(abandoned)
    assert all("already has all its reviews" in message for message in refused)

    with session_scope(url) as session:
        reviews = session.execute(select(Review.user_id, Review.sample_id)).all()
        statuses = dict(session.execute(select(Sample.id, Sample.status)).all())
        pairs = session.execute(select(Assignment.user_id, Assignment.sample_id)).all()
    per_sample = Counter(sample for _, sample in reviews)
    assert len(set(reviews)) == len(reviews)  # no duplicate review
    assert len(set(pairs)) == len(pairs)  # nobody was given a sample twice
    assert set(submitted) == {tuple(r) for r in reviews}  # no lost submit, nothing unexplained
    assert all(per_sample[s] <= wanted[s] for s in samples)  # no sample over its target
    assert per_sample == {s: wanted[s] for s in samples}  # and abandoned samples came back and got done
    assert all(status == SampleStatus.accepted for status in statuses.values())
    assert {s for _, s in abandoned} <= set(per_sample)


@pytest.mark.parametrize(
    ("service", "args"),
    [(next_sample, (1,)), (release, (1, 1)), (expire_leases, ())],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_the_queue_refuses_a_session_that_is_not_a_write_transaction(sqlite_url: str, service, args) -> None:
    with session_scope(sqlite_url) as session, pytest.raises(RuntimeError, match=f"{service.__name__} reads then"):
        service(session, *args)
