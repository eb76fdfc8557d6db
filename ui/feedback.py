"""The feedback file (`--feedback-file`): one JSON line per like or dislike, holding what the
server itself sent, never what the browser's kept chat claims.

The browser keeps the chat and can edit it, so a rating names only an answer id. The
server keeps a record of each answer it gave (question text, file names, answer text),
bounded in count and size, and writes that record when the answer is rated. An id the
server does not know (a forged or edited chat, or an answer older than the records kept)
is not written. Lines are bounded in size, and in number per hour, so a script that
clicks Like in a loop cannot fill the disk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("ui.feedback")

MAX_RECORDS = 2000              # answers remembered for rating (the oldest go first)
MAX_QUESTION_CHARS = 4000       # of a question, as written in the file
MAX_ANSWER_CHARS = 16000        # of an answer, as written in the file
MAX_FILES = 16                  # file names per line
LINES_PER_HOUR = 600            # feedback lines written per hour, all users together


@dataclass(frozen=True)
class AnswerRecord:
    """What the server sent for one answer, already cut to the file's bounds."""

    model: str
    question: str
    files: tuple[str, ...]
    answer: str


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"


class FeedbackLog:
    """Answer records and the JSON-lines file they are written to when rated (thread-safe)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._records: OrderedDict[str, AnswerRecord] = OrderedDict()
        self._written: list[float] = []          # times of the lines of the last hour
        self._lock = threading.Lock()

    def remember(self, model: str, question: str, files: list[str], answer: str) -> str:
        """Keep what was sent for one answer; returns its id (stored with the answer's turn)."""
        answer_id = uuid.uuid4().hex
        record = AnswerRecord(model, _cut(question, MAX_QUESTION_CHARS),
                              tuple(name[:200] for name in files[:MAX_FILES]),
                              _cut(answer, MAX_ANSWER_CHARS))
        with self._lock:
            self._records[answer_id] = record
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)
        return answer_id

    def rate(self, answer_id: object, rating: str | None, session: str) -> str | None:
        """Write one line for a known answer; returns None when written, else why not."""
        with self._lock:
            record = self._records.get(answer_id) if isinstance(answer_id, str) else None
            if record is None:
                return "this answer is not one this server remembers giving"
            now = self.clock()
            self._written = [t for t in self._written if now - t < 3600]
            if len(self._written) >= LINES_PER_HOUR:
                return f"more than {LINES_PER_HOUR} ratings were written in the last hour"
            self._written.append(now)
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                    "model": record.model, "session": session[:8], "answer_id": answer_id,
                    "rating": rating, "question": record.question,
                    "files": list(record.files), "answer": record.answer}
            try:
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            except OSError as exc:
                log.warning("feedback file %s: %s", self.path, exc)
                return "the feedback file cannot be written"
        return None
