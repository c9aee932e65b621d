"""Run one function in several threads at once, collecting what each returned and whatever escaped."""

import threading


def at_once(fn, n: int) -> tuple[list, list[str]]:
    """``fn()`` in ``n`` threads started together; ``(results, repr of each exception)`` once all have ended."""
    results, errors = [], []

    def one():
        try:
            results.append(fn())
        except Exception as exc:  # noqa: BLE001 - the caller asserts on whatever escaped
            errors.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
