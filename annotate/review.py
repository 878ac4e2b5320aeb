"""Admin review of saved annotations: the queue, the decisions, and per-annotator statistics.

Every annotation starts ``pending``. An admin decides once:

    pending --accept(...)------------------------> accepted   (optionally with an edited transcript / caption)
    pending --reject(reason)---------------------> rejected   (the image goes back to the queue)

A decision is final: a second decision on the same annotation (by anyone, also two admins at once)
is refused and changes nothing. Nothing the annotator or the speech model produced is overwritten: an
edit is stored next to the original (``reviewed_transcript``, ``reviewed_caption``) and the export uses
it. A rejected annotation keeps its row, audio receipt and the reason; it stops counting towards its
image, so ``Store.next_image`` hands the image out again, to other annotators and to its own annotator
alike (who is told the reviewer's reason when they get it back).

    item = next_pending(store)                      # oldest pending first; None when none is left
    accept(store, item.record.id, "admin")          # as the annotator wrote it
    accept(store, id, "admin", transcript="...", caption="...")   # edited, then accepted
    reject(store, id, "admin", "mumbled, half of it is missing")
    annotator_stats(store)                          # records, speaking time, words/min, rejection rate
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import AlreadyReviewedError, AnnotationRecord, Store, StoreError

PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"
MAX_REASON_CHARS = 1000


class ReviewError(StoreError):
    """A review step was refused; the message says why and what to do (nothing was changed)."""


@dataclass
class ReviewItem:
    """A pending annotation with what a reviewer needs to judge it."""

    record: AnnotationRecord
    image_path: str | None  # as stored (relative to the project folder, or absolute)
    image_url: str | None
    abs_path: Path | None  # the local image file, None for URL-only images
    image_status: str  # active | flagged | missing
    caption: dict[str, Any] | None  # Store.current_caption of the image
    pending: int  # pending annotations in the project, this one included

    @property
    def display_name(self) -> str:
        return self.image_path or self.image_url or f"image {self.record.image_id}"


def _reviewer(name: str | None) -> str:
    n = (name or "").strip()
    if not n:
        raise ReviewError("No reviewer name: a review is recorded with who made it.")
    return n


def _pending(store: Store, annotation_id: int) -> AnnotationRecord:
    try:
        rec = store.annotation(int(annotation_id))
    except (TypeError, ValueError):
        raise ReviewError(f"Annotation id {annotation_id!r} is not a number; press 'Next' to load one.") from None
    if rec.review_state != PENDING:
        raise ReviewError(f"Annotation {rec.id} was already {rec.review_state} by {rec.reviewer} at "
                          f"{rec.reviewed_at}; a review decision is final. Nothing was changed.")
    return rec


def item(store: Store, annotation_id: int) -> ReviewItem:
    """The review view of one annotation (any state)."""
    rec = store.annotation(int(annotation_id))
    img = store.image(rec.image_id)
    return ReviewItem(
        record=rec,
        image_path=img["path"],
        image_url=img["url"],
        abs_path=store.abs(img["path"]) if img["path"] else None,
        image_status=img["status"],
        caption=store.current_caption(rec.image_id),
        pending=store.review_counts()[PENDING],
    )


def next_pending(store: Store, after_id: int | None = None) -> ReviewItem | None:
    """The oldest pending annotation (lowest id); with ``after_id``, the oldest one after it, wrapping
    around to the oldest (so a reviewer can pass over one for now). None when nothing is pending."""
    found = store.pending_reviews(after_id=after_id, limit=1)
    if not found and after_id is not None:
        found = store.pending_reviews(limit=1)
    return item(store, found[0].id) if found else None


def accept(
    store: Store,
    annotation_id: int,
    reviewer: str,
    transcript: str | None = None,
    caption: str | None = None,
) -> AnnotationRecord:
    """Accept a pending annotation, optionally with the reviewer's edits.

    Args:
        transcript: the transcript as the reviewer wants it exported; None, or the annotator's text
            unchanged (whitespace aside), means no edit.
        caption: the image's caption as the reviewer wants it; None, or the current caption
            unchanged, means no edit.

    Raises:
        ReviewError: already reviewed, an empty edited transcript, or an emptied caption.
        StoreError: no such annotation, or the database refused the write.
    """
    who = _reviewer(reviewer)
    rec = _pending(store, annotation_id)
    new_transcript = None
    if transcript is not None:
        t = transcript.strip()
        if not t:
            raise ReviewError(f"Not accepted: the edited transcript of annotation {rec.id} is empty. Put the text "
                              "back (or reject the annotation, with a reason).")
        if t != rec.transcript.strip():
            new_transcript = t
    new_caption = None
    if caption is not None:
        c = caption.strip()
        current = store.current_caption(rec.image_id)
        if not c and current:
            raise ReviewError(f"Not accepted: the caption of image {rec.image_id} was emptied. Write one, or put "
                              "the shown caption back.")
        if c and (current is None or c != current["caption"].strip()):
            new_caption = c
    return _decide(store, rec.id, ACCEPTED, who, transcript=new_transcript, caption=new_caption)


def reject(store: Store, annotation_id: int, reviewer: str, reason: str) -> AnnotationRecord:
    """Reject a pending annotation: its image goes back to the queue. ``reason`` is required (the
    annotator is shown it when they get the image back).

    Raises:
        ReviewError: no reason, a reason over MAX_REASON_CHARS, or already reviewed.
    """
    who = _reviewer(reviewer)
    why = (reason or "").strip()
    if not why:
        raise ReviewError("Not rejected: give a reason (for example 'describes another image', 'mostly silence', "
                          "'half of the objects missing'); the annotator sees it.")
    if len(why) > MAX_REASON_CHARS:
        raise ReviewError(f"Not rejected: the reason has {len(why)} characters; keep it under {MAX_REASON_CHARS}.")
    rec = _pending(store, annotation_id)
    return _decide(store, rec.id, REJECTED, who, reason=why)


def _decide(store: Store, annotation_id: int, state: str, reviewer: str, **kw: Any) -> AnnotationRecord:
    try:
        return store.set_review(annotation_id, state, reviewer, **kw)
    except AlreadyReviewedError as e:  # another reviewer decided in the meantime
        raise ReviewError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Statistics


STATS_HEADERS = ["annotator", "records", "speaking time (s)", "words per minute", "accepted", "rejected",
                 "pending", "rejection rate"]


@dataclass
class AnnotatorStats:
    """One annotator's numbers over all their records (rejected ones included).

    ``words_per_minute`` = words of the annotator's own transcripts of the records that have audio,
    divided by the minutes of that audio (None without audio); ``rejection_rate`` = rejected /
    (accepted + rejected), None while nothing of theirs was reviewed."""

    annotator: str
    records: int
    speaking_seconds: float
    words: int  # in the transcripts of records with audio
    accepted: int
    rejected: int
    pending: int

    @property
    def reviewed(self) -> int:
        return self.accepted + self.rejected

    @property
    def words_per_minute(self) -> float | None:
        return self.words / (self.speaking_seconds / 60.0) if self.speaking_seconds > 0 else None

    @property
    def rejection_rate(self) -> float | None:
        return self.rejected / self.reviewed if self.reviewed else None

    def row(self) -> list:
        """The row of the statistics table (``STATS_HEADERS``), rounded for display."""
        wpm, rate = self.words_per_minute, self.rejection_rate
        return [self.annotator, self.records, round(self.speaking_seconds, 1),
                None if wpm is None else round(wpm, 1), self.accepted, self.rejected, self.pending,
                None if rate is None else round(rate, 3)]


def word_count(text: str) -> int:
    return len((text or "").split())


def annotator_stats(store: Store) -> list[AnnotatorStats]:
    """Per-annotator statistics from the store, by annotator name."""
    by: dict[str, AnnotatorStats] = {}
    for a in store.annotations():
        st = by.setdefault(a.annotator, AnnotatorStats(a.annotator, 0, 0.0, 0, 0, 0, 0))
        st.records += 1
        if a.duration:
            st.speaking_seconds += float(a.duration)
            st.words += word_count(a.transcript)
        if a.review_state == ACCEPTED:
            st.accepted += 1
        elif a.review_state == REJECTED:
            st.rejected += 1
        else:
            st.pending += 1
    return [by[k] for k in sorted(by)]
