"""The user study's database edge: creating a study from a folder, invites, the participant's flow, votes, results.

One module per concern, every public name re-exported here (``from mcie.annotate.study import enrol``): ``common``
(constants, errors, types, shared lookups), ``creation`` (from a folder or from previews; opening and closing),
``participants`` (invites, access, listing, sequences), ``flow`` (screens, votes, advancing) and ``results`` (the
votes frame, export, exclusions, results).

Every function takes the caller's :class:`~sqlalchemy.orm.Session` as its first parameter and never commits: the
caller owns the transaction (``with session_scope(url, write=True) as session: enrol(session, study_id)``). Those
that read then write refuse a session not begun with ``session_scope(write=True)`` (:func:`db.session.require_write`):
:func:`create_study_from_previews`, :func:`set_study_status`, :func:`enrol`, :func:`revoke_invite`,
:func:`assign_participant`, :func:`current_item` (it assigns the sequence on first use; :func:`quick_current_item` is
the read-only path), :func:`cast_vote`, :func:`advance` and :func:`set_excluded`. :func:`create_study_from_folder`
alone takes the database URL: it stores the images between its read and its write transaction, so no lock is held
while files are copied. Images go through the :class:`~db.store.ImageStore` passed in. The design
(:mod:`annotate.study_design`) and the statistics (:mod:`annotate.study_analysis`) are pure modules called from here.

Creating a study from a folder (:func:`create_study_from_folder`)::

    study/
      items.jsonl            one JSON object per line: {"id": "0001", "source_image": "sources/0001.png",
                             "instruction": "...", "attention_check": "method-name" (optional)}
      sources/0001.png       source images, anywhere under the folder (paths relative to it)
      mcie-e1/0001.png       one sub-folder per method holding <item id>.png for every item
      smartedit/0001.png

Method folders are the sub-folders of the study folder, except hidden ones (``.``/``_`` prefix) and those holding
source images (or name them with ``methods=``). Everything is checked before anything is written: a malformed line,
an unknown attention answer, and every missing or unreadable image are reported together (with their paths) in one
:class:`StudyFolderError`, and no study is created.

The participant's flow. A participant is enrolled (:func:`enrol`: an account with the ``participant`` role and no
password is created if needed, and a random invite token is returned once; only its sha256 is stored, and enrolling
again replaces it). :func:`participant_from_token` resolves an invite link. The participant's sequence is
materialised from the design into ``study_assignments`` on their first screen (:func:`assign_participant`; the n-th
participant to start takes the design's n-th sequence). :func:`current_item` returns the first screen not yet
completed - the outputs labelled A, B, C ... in the recorded screen order, never the method names - so a participant
who closes the browser resumes where they stopped. :func:`cast_vote` stores a choice per criterion (changeable until
:func:`advance` moves on; votes on completed or later screens are refused); :func:`advance` needs a vote on every
criterion and marks the participant finished after the last screen.

A study can also be made from review samples and the model's finished ``previews`` rows
(:func:`create_study_from_previews`: the window source and the sample's instruction per item, one model version per
method, optionally the ground truth as ``reference``), checked as thoroughly as a folder. For the web app
(:mod:`annotate.web`): :func:`invite_problem` says why a link does not work, :func:`participant_study` finds
the study of a participant who logs in with a password, :func:`may_see_image` limits a participant to the images of
their own items, :func:`upcoming_images` lets the screen warm the browser's cache, and :func:`list_studies`,
:func:`resolve_study` and :func:`resolve_participant` serve the CLI and the leads' pages. A vote on the current screen
takes one read and locks the screen's row on PostgreSQL, so it cannot cross an :func:`advance` of the same screen.

Votes are stored with the method chosen (``chosen_output_id``; NULL = none acceptable), its 1-based screen position
(``shown_position``, A = 1), the screen order and the latency (of the latest change). :func:`votes_frame` builds the
analysis input, :func:`export_votes` writes the raw votes, :func:`study_results` applies the recorded exclusions and
calls :func:`annotate.study_analysis.results`.
"""

from __future__ import annotations

from mcie.annotate.study.common import (
    CRITERION_RE,
    DEFAULT_CRITERIA,
    EXPORT_COLUMNS,
    ITEM_FIELDS,
    ITEM_ID_RE,
    ITEMS_FILE,
    LABELS,
    METHOD_RE,
    OUTPUT_SUFFIX,
    ItemScreen,
    ParticipantStatus,
    ScreenOutput,
    StudyAccessError,
    StudyError,
    StudyFolderError,
    StudyNotOpenError,
    StudyPreviewsError,
    StudyProgress,
    StudyReport,
    assignment_count,
    get_enrolment,
    get_study,
    hash_token,
)
from mcie.annotate.study.creation import (
    ItemSpec,
    check_study_folder,
    create_study_from_folder,
    create_study_from_previews,
    parse_items,
    set_study_status,
)
from mcie.annotate.study.flow import (
    advance,
    cast_vote,
    current_item,
    participant_progress,
    quick_current_item,
)
from mcie.annotate.study.participants import (
    INVITE_CLOSED,
    INVITE_DISABLED,
    INVITE_DRAFT,
    INVITE_REVOKED,
    INVITE_UNKNOWN,
    StudySummary,
    assign_participant,
    enrol,
    invite_problem,
    list_studies,
    may_see_image,
    participant_from_token,
    participant_study,
    participants_status,
    resolve_participant,
    resolve_study,
    revoke_invite,
    upcoming_images,
)
from mcie.annotate.study.results import (
    VOTES_FRAME_COLUMNS,
    export_votes,
    set_excluded,
    study_results,
    votes_frame,
)

__all__ = [
    "CRITERION_RE",
    "DEFAULT_CRITERIA",
    "EXPORT_COLUMNS",
    "INVITE_CLOSED",
    "INVITE_DISABLED",
    "INVITE_DRAFT",
    "INVITE_REVOKED",
    "INVITE_UNKNOWN",
    "ITEMS_FILE",
    "ITEM_FIELDS",
    "ITEM_ID_RE",
    "LABELS",
    "METHOD_RE",
    "OUTPUT_SUFFIX",
    "VOTES_FRAME_COLUMNS",
    "ItemScreen",
    "ItemSpec",
    "ParticipantStatus",
    "ScreenOutput",
    "StudyAccessError",
    "StudyError",
    "StudyFolderError",
    "StudyNotOpenError",
    "StudyPreviewsError",
    "StudyProgress",
    "StudyReport",
    "StudySummary",
    "advance",
    "assign_participant",
    "assignment_count",
    "cast_vote",
    "check_study_folder",
    "create_study_from_folder",
    "create_study_from_previews",
    "current_item",
    "enrol",
    "export_votes",
    "get_enrolment",
    "get_study",
    "hash_token",
    "invite_problem",
    "list_studies",
    "may_see_image",
    "parse_items",
    "participant_from_token",
    "participant_progress",
    "participant_study",
    "participants_status",
    "quick_current_item",
    "resolve_participant",
    "resolve_study",
    "revoke_invite",
    "set_excluded",
    "set_study_status",
    "study_results",
    "upcoming_images",
    "votes_frame",
]
