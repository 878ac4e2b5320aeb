"""Handlers sort failures in two: input errors reach the user verbatim and are not logged as errors;
bugs (an internal ValueError, TypeError, ...) are logged with their traceback and a reference id, and
the user gets a short apology quoting the same id, never the internal message or a traceback."""

from __future__ import annotations

import logging
import re

import gradio as gr
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from annotate.store import StoreError
from app import train_tab
from app.annotate_tab import AnnotateHandlers
from app.handlers import Handlers, user_errors
from app.service import MolmoService
from molmo_core.errors import ModelUnloadedError, MolmoInputError

from app_helpers import *  # noqa: F401,F403
from app_helpers import ScriptedRunner, make_client, running_app

REF = re.compile(r"\(ref ([0-9a-f]{8})\)")
INTERNAL = "operands could not be broadcast together with shapes (3,) (4,)"  # must never reach the user


class BuggyRunner(ScriptedRunner):
    """A runner with a bug: every generation raises an internal ValueError."""

    def stream(self, image, prompt, **kwargs):
        raise ValueError(INTERNAL)


def _service(runner: ScriptedRunner) -> MolmoService:
    service = MolmoService(loader=lambda source, **_: runner)
    service.load("scripted", wait=True)
    return service


def _ref_of(message: str) -> str:
    m = REF.search(message)
    assert m, f"no (ref ...) in the message: {message!r}"
    return m.group(1)


def _assert_apology_and_log(message: str, caplog, action: str) -> None:
    """The user's message is the apology with a ref; one ERROR log record carries the same ref and the
    traceback of the internal error."""
    assert message.startswith(f"Something went wrong on our side while {action} (ref "), message
    assert "server log" in message and INTERNAL not in message and "Traceback" not in message
    ref = _ref_of(message)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "molmo_studio"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    record = errors[0]
    assert f"(ref {ref})" in record.getMessage() and action in record.getMessage()
    assert record.exc_info and record.exc_info[0] is ValueError
    text = caplog.text
    assert "Traceback (most recent call last)" in text and f"ValueError: {INTERNAL}" in text
    assert "in stream" in text  # the frame where the bug was raised is in the log


def test_internal_value_error_is_logged_with_a_ref_and_shown_as_an_apology(caplog, images):
    h = Handlers(_service(BuggyRunner()))
    with caplog.at_level(logging.INFO, logger="molmo_studio"), pytest.raises(gr.Error) as e:
        h.point(str(images[0]), "coins")
    _assert_apology_and_log(e.value.message, caplog, "pointing")


def test_internal_error_in_a_streaming_handler_is_logged_with_a_ref(caplog, images):
    h = Handlers(_service(BuggyRunner()))
    with caplog.at_level(logging.INFO, logger="molmo_studio"), pytest.raises(gr.Error) as e:
        list(h.ask(str(images[0]), "What is this?", []))
    _assert_apology_and_log(e.value.message, caplog, "answering")


def test_each_failure_gets_its_own_ref(caplog, images):
    h = Handlers(_service(BuggyRunner()))
    refs = set()
    for _ in range(3):
        with pytest.raises(gr.Error) as e:
            h.count(str(images[0]), "coins")
        refs.add(_ref_of(e.value.message))
    assert len(refs) == 3


def test_input_errors_are_shown_verbatim_and_not_logged_as_errors(caplog, images):
    h = Handlers(_service(ScriptedRunner()))
    with caplog.at_level(logging.INFO, logger="molmo_studio"):
        with pytest.raises(gr.Error) as e:
            h.point(str(images[0]), "   ")  # an empty phrase: MolmoInputError from the prompt builder
        assert "empty" in e.value.message and not REF.search(e.value.message)
        with pytest.raises(gr.Error) as e:
            h.load_model("  ", None, 12)  # no checkpoint chosen
        assert e.value.message.startswith("Choose a checkpoint") and not REF.search(e.value.message)

        class Refusing(MolmoService):
            def read_clock(self, image):
                raise MolmoInputError("The image is 3x2 pixels; expected at least 28x28. Upload a larger photo.")

        with pytest.raises(gr.Error) as e:
            Handlers(Refusing()).read_clock(None)
        assert e.value.message == "The image is 3x2 pixels; expected at least 28x28. Upload a larger photo."
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_the_wrapper_keeps_a_handlers_own_gr_error_and_annotation_errors():
    @user_errors("testing")
    def refuses():
        raise gr.Error("Pick a device first.")

    @user_errors("testing")
    def store_refuses():
        raise StoreError("Nothing was saved: the annotation database refused the write (disk full).")

    with pytest.raises(gr.Error) as e:
        refuses()
    assert e.value.message == "Pick a device first."
    with pytest.raises(gr.Error) as e:
        store_refuses()
    assert e.value.message == "Nothing was saved: the annotation database refused the write (disk full)."


def test_annotate_caption_draft_bug_is_logged_but_a_model_message_is_not(caplog):
    h = AnnotateHandlers(lambda: BuggyRunner(), transcriber=None, rules=None)
    with caplog.at_level(logging.INFO, logger="molmo_studio"), pytest.raises(gr.Error) as e:
        h.draft("a red car on a street", "", None)
    _assert_apology_and_log(e.value.message, caplog, "drafting the caption")
    caplog.clear()

    class Unloaded(ScriptedRunner):
        def generate(self, image, prompt, **kwargs):
            raise ModelUnloadedError("The model was unloaded (or replaced) while this answer was being generated; ask again.")

    h = AnnotateHandlers(lambda: Unloaded(), transcriber=None, rules=None)
    _, caption, status = h.draft("a red car on a street", "", None)
    assert "The model was unloaded" in status and "ask again" in status
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_train_tab_handlers_use_the_same_wrapper(caplog):
    def buggy_source():
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'str'")

    with caplog.at_level(logging.INFO, logger="molmo_studio"), pytest.raises(gr.Error) as e:
        train_tab.start_run(buggy_source, "", "clocks:4", "", "", "lora", 1, None, 1, 1, 1, 4, False, 0.0)
    assert e.value.message.startswith("Something went wrong on our side while starting the run (ref ")
    ref = _ref_of(e.value.message)
    assert f"(ref {ref})" in caplog.text and "TypeError: unsupported operand" in caplog.text


def test_through_gradio_client_the_user_sees_the_ref_and_the_log_has_the_traceback(caplog, images):
    with caplog.at_level(logging.INFO, logger="molmo_studio"), running_app(_service(BuggyRunner())) as (_, url):
        client = make_client(url)
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(images[0])), "coins", api_name="/point")
        message = str(e.value)
        with pytest.raises(AppError) as e2:  # an input error on the same server: verbatim, no ref
            client.predict(handle_file(str(images[0])), "  ", api_name="/point")
        client.close()
    _assert_apology_and_log(message, caplog, "pointing")
    assert "empty" in str(e2.value) and not REF.search(str(e2.value))
