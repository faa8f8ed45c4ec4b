"""TrainingProgress: the bar on a terminal, plain paced lines elsewhere, quiet and disabled."""

from __future__ import annotations

import io
import math

import pytest

from charlstm.progress import PLAIN_EVERY_SECONDS, TrainingProgress

LN2 = math.log(2)


class Terminal(io.StringIO):
    """What a terminal looks like to the progress bar."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(stream: io.StringIO, clock: Clock | None = None, **kw) -> TrainingProgress:
    return TrainingProgress(stream=stream, clock=clock or Clock(), **kw)


def test_a_budget_line_shows_its_share_bpc_speed_and_time_left():
    stream, clock = io.StringIO(), Clock()
    bar = progress(stream, clock, budget=300)
    bar.show_training(1.62, 81_000.4)
    bar.show_validation(1.812 * LN2)
    clock.now += PLAIN_EVERY_SECONDS
    bar.update(400, 130.0)
    assert stream.getvalue() == (
        "step 400 | 43% of 5m00s | train 2.337 bpc | 81,000 chars/s | val 1.812 bpc | 2m50s left\n"
    )


def test_without_a_terminal_there_are_no_carriage_returns():
    stream, clock = io.StringIO(), Clock()
    with progress(stream, clock, budget=60) as bar:
        for step in range(1, 200):
            clock.now += 1.0
            bar.update(step, step * 0.3)
            if step % 50 == 0:
                bar.write(f"step {step}: validation loss ...")
        bar.finish(199, 60.0)
    assert "\r" not in stream.getvalue()
    assert "\x1b" not in stream.getvalue()


def test_plain_lines_are_paced_by_the_clock():
    stream, clock = io.StringIO(), Clock()
    bar = progress(stream, clock, max_steps=1000)
    for step in range(1, 30):  # 29 s: not yet
        clock.now += 1.0
        bar.update(step, float(step))
    assert stream.getvalue() == ""
    clock.now += 1.0
    bar.update(30, 30.0)
    assert stream.getvalue().count("\n") == 1
    for step in range(31, 60):  # another 29 s: still one line
        clock.now += 1.0
        bar.update(step, float(step))
    assert stream.getvalue().count("\n") == 1
    clock.now += 1.0
    bar.update(60, 60.0)
    assert stream.getvalue().count("\n") == 2


def test_a_step_limit_shows_steps_their_share_and_the_time_left_at_this_pace():
    stream, clock = io.StringIO(), Clock()
    bar = progress(stream, clock, max_steps=1000)
    bar.update(200, 50.0)  # a resumed run: the pace is this session's
    clock.now += PLAIN_EVERY_SECONDS
    bar.update(400, 150.0)  # 0.5 s a step, evaluations included
    assert stream.getvalue() == "step 400/1,000 | 40% | 5m00s left\n"


def test_with_no_limit_it_counts_steps_and_time():
    stream, clock = io.StringIO(), Clock()
    bar = progress(stream, clock)
    clock.now += PLAIN_EVERY_SECONDS
    bar.update(1234, 75.0)
    assert stream.getvalue() == "step 1,234 | 1m15s elapsed\n"


def test_finish_shows_the_final_figures_at_once():
    stream, clock = io.StringIO(), Clock()
    bar = progress(stream, clock, budget=300)
    bar.update(10, 5.0)
    bar.show_validation(1.5 * LN2)  # the closing evaluation
    bar.finish(990, 298.0)
    bar.close()
    assert stream.getvalue() == "step 990 | 99% of 5m00s | val 1.500 bpc | 4m58s in all\n"


def test_a_terminal_gets_a_bar_of_the_budget():
    stream, clock = Terminal(), Clock()
    bar = progress(stream, clock, budget=300)
    bar.show_training(1.62, 81_000)
    clock.now += 1.0
    bar.update(400, 150.0)
    bar.write("step 400: validation loss 1.2560 nats/char")
    bar.show_validation(1.812 * LN2)
    bar.finish(900, 299.0)
    bar.close()
    out = stream.getvalue()
    assert "\r" in out
    assert " 50%|" in out  # 150 s of 300
    assert "step 400 | train 2.337 bpc | 81,000 chars/s | 2m30s left" in out
    assert "step 400: validation loss 1.2560 nats/char\n" in out
    # The last frame, kept on screen: the final share and the best validation loss in bpc.
    last = out.rstrip("\n").split("\r")[-1]
    assert last.startswith("100%|")
    assert last.endswith(
        "| step 900 | train 2.337 bpc | 81,000 chars/s | val 1.812 bpc | 4m59s in all"
    )
    assert "% of" not in out  # the bar shows the share; the text does not repeat it


def test_a_terminal_redraws_at_most_ten_times_a_second():
    stream, clock = Terminal(), Clock()
    bar = progress(stream, clock, max_steps=10_000)
    for step in range(1, 1001):
        clock.now += 0.001  # a millisecond a step: one second in all
        bar.update(step, step / 1000)
    bar.close()
    frames = stream.getvalue().count("step ")
    assert 5 <= frames <= 12


def test_an_open_ended_terminal_bar_is_a_counter():
    stream, clock = Terminal(), Clock()
    bar = progress(stream, clock)
    clock.now += 1.0
    bar.update(42, 3.0)
    bar.close()
    assert stream.getvalue().rstrip("\n").split("\r")[-1] == "step 42 | 3s elapsed"


@pytest.mark.parametrize("stream_type", [io.StringIO, Terminal])
def test_quiet_hides_the_bar_but_not_messages(stream_type):
    stream, clock = stream_type(), Clock()
    bar = progress(stream, clock, budget=300, quiet=True)
    for step in range(1, 100):
        clock.now += 1.0
        bar.update(step, float(step))
        bar.show_training(1.0, 1000.0)
    bar.show_validation(1.0)
    bar.finish(99, 99.0)
    bar.close()
    assert stream.getvalue() == ""
    bar.write("warning: something to know")
    assert stream.getvalue() == "warning: something to know\n"


@pytest.mark.parametrize("stream_type", [io.StringIO, Terminal])
def test_disabled_shows_nothing_at_all(stream_type):
    stream, clock = stream_type(), Clock()
    with progress(stream, clock, max_steps=10, enabled=False) as bar:
        clock.now += 100.0
        bar.update(5, 5.0)
        bar.write("step 5: validation loss ...")
        bar.finish(10, 10.0)
    assert stream.getvalue() == ""


def test_the_stream_defaults_to_standard_error(capsys):
    bar = TrainingProgress(budget=60)
    bar.finish(3, 2.0)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "step 3 | 3% of 1m00s | 2s in all\n"
