"""User-facing error types. Messages say what was found, what was expected and what to do."""


class MolmoInputError(ValueError):
    """Bad user input: an unreadable or huge image, an empty or too long prompt."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, downloaded or loaded."""


class ModelUnloadedError(RuntimeError):
    """The model was unloaded (or replaced) before or while a request was served."""


def download_hint(repo_id: str, local_dir: str, use: str | None = None) -> str:
    """The one "download it elsewhere" sentence: the exact command to run on a machine with internet access
    and where the folder goes. Every such message (checkpoints, launch notices, the Whisper model) uses it.

    `hf` is the command line of huggingface_hub (the pinned version no longer installs `huggingface-cli`).

    >>> download_hint("allenai/Molmo-7B-D-0924", "./checkpoints/Molmo-7B-D-0924")[:95]
    'On a machine with internet access run `hf download allenai/Molmo-7B-D-0924 --local-dir ./checkp'
    """
    hint = (f"On a machine with internet access run `hf download {repo_id} --local-dir {local_dir}` (the `hf` "
            f"command comes with `pip install huggingface_hub`), then copy that folder to {local_dir} here")
    return hint + (f" and {use}." if use else ".")
