"""The exception for mistakes a user can fix, and the one for an interrupted run."""

from pathlib import Path


class CharLSTMError(Exception):
    """A problem with the user's input, files or settings.

    Its message is a single line that says what is wrong and what to do; the CLI prints it
    as ``error: <message>`` and exits with status 2, without a traceback (running out of
    memory, which is no mistake in the input, exits with 1).
    """


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving ``last/``; it can be resumed."""

    def __init__(self, signum: int, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; {run_dir / 'last'} holds the run so far")
        self.signum, self.run_dir, self.step = signum, run_dir, step

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report a process stopped by that signal."""
        return 128 + self.signum
