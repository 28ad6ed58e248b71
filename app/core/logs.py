"""Access logs without query strings: a credential put in a URL is refused (400), but the
request line uvicorn logs would still carry it. The path stays; the query becomes `?…`."""

from __future__ import annotations

import logging

__all__ = ["RedactQueryStrings", "install_access_log_redaction"]


class RedactQueryStrings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, sep, _ = args[2].partition("?")
            if sep:
                record.args = (*args[:2], f"{path}?…", *args[3:])
        return True


def install_access_log_redaction() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryStrings) for f in logger.filters):
        logger.addFilter(RedactQueryStrings())
