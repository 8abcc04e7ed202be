"""Long stages show progress: a rich spinner line per running stage on a terminal (nested stages share one
display), plain log lines in a log file."""
import io
import logging

from rich.console import Console

from orchestrator.progress import stage_progress


def test_plain_lines_when_not_a_terminal(caplog):
    console = Console(file=io.StringIO(), force_terminal=False)
    with caplog.at_level(logging.INFO, logger="orchestrator.progress"):
        with stage_progress("distill", console=console):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage distill ..." and lines[1].startswith("stage distill done in ")
    assert console.file.getvalue() == ""  # no spinner in a log file


def test_spinner_on_a_terminal_with_nested_stages(caplog):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    with caplog.at_level(logging.INFO, logger="orchestrator.progress"):
        with stage_progress("teacher_inference", console=console):
            with stage_progress("evaluate_teacher", console=console):  # a second line in the same display
                pass
    shown = out.getvalue()
    assert "stage teacher_inference" in shown and "stage evaluate_teacher" in shown
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split(" done")[0] for m in lines] == ["stage evaluate_teacher", "stage teacher_inference"]
    assert not any(m.endswith("...") for m in lines)  # the start lines are the spinner's
