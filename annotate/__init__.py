"""Voice annotation for Molmo Studio: spoken image descriptions -> PixMo-Cap records.

Modules (none imports Gradio; the UI lives in ``app/annotate_tab.py``):

- ``protocol``: the seven PixMo guiding questions, timer rules, recording checks (pure).
- ``audio``:    decode uploads, lossless FLAC audio receipts, local microphone (sounddevice).
- ``asr``:      faster-whisper wrapper (lazy load, VAD, segment timestamps, offline message).
- ``store``:    SQLite (WAL) project store: image queue, claims, atomic saves, progress.
- ``caption``:  caption drafting from transcripts with a text-only language model.
- ``export``:   PixMo-Cap parquet export / import.
- ``cli``:      command-line entry points used by ``launch.py``.
"""
