"""What the evaluation commands share at their end: run, report bad input in one line (``ldm.errors``), write the
JSON, print paths."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

from ldm.errors import check_writable_folder, run_reporting

logger = logging.getLogger("eval")


def run_evaluation(
    args: argparse.Namespace,
    evaluate: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """``evaluate(args)``; on a :class:`~ldm.errors.UserError` print one ``error: ...`` line and return 2 (any
    other error keeps its traceback); otherwise print ``report(result)``, write the result as JSON to ``args.out``
    and print that path (and a ``plot`` path if any)."""

    def body() -> None:
        check_writable_folder(args.out.parent, f"--out {args.out}: its folder")  # before the computation
        result = evaluate(args)
        print(report(result))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(args.out)
        if result.get("plot"):
            print(result["plot"])

    return run_reporting(body, "evaluation")


def configure_logging() -> None:
    """Warnings from libraries, progress messages from the evaluation commands (for ``__main__``)."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("eval").setLevel(logging.INFO)
