"""What the evaluation commands share at their end: run, turn bad input into one line, write the JSON, print paths."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("eval")


def run_evaluation(
    args: argparse.Namespace,
    evaluate: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """``evaluate(args)``; on ``ValueError``/``OSError`` print one ``error: ...`` line and return 2; otherwise print
    ``report(result)``, write the result as JSON to ``args.out`` and print that path (and a ``plot`` path if any)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = evaluate(args)
    except (ValueError, OSError) as err:
        logger.debug("evaluation failed", exc_info=True)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the library wrote
        return 2
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)
    if result.get("plot"):
        print(result["plot"])
    return 0


def configure_logging() -> None:
    """Warnings from libraries, progress messages from the evaluation commands (for ``__main__``)."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("eval").setLevel(logging.INFO)
