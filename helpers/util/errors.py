"""The one exception type whose message is a single actionable line (every notebook)."""


class TutorialError(RuntimeError):
    """A bad input or environment problem, explained in one line that says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
