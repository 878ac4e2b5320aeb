"""Voice annotation for Molmo Studio: spoken image descriptions -> PixMo-Cap records.

Modules (none imports Gradio; the UI lives in ``app/annotate_tab.py``):

- ``protocol``: the seven PixMo guiding questions, timer rules, recording checks (pure).
- ``audio``:    decode uploads, lossless FLAC audio receipts, local microphone (sounddevice).
- ``asr``:      faster-whisper wrapper (lazy load, VAD, segment timestamps, offline message).
- ``store``:    SQLite (WAL) project store: image queue, claims, atomic saves, review state, progress.
- ``session``:  one annotator's work on one image and its rules (what the Annotate tab runs).
- ``review``:   admin review: queue of pending annotations, accept / edit and accept / reject,
                per-annotator statistics.
- ``caption``:  caption drafting from transcripts with a text-only language model.
- ``export``:   PixMo-Cap parquet export (accepted annotations; ``include_unreviewed``: all not
                rejected) / import.
- ``cli``:      command-line entry points used by ``launch.py``.
"""
