"""The Lua scripts of the job state machine, one `.lua` file each under `service/lua/`.

Every state change of a job is one script, so it is atomic and fenced by the attempt number.
A script that starts with the line ``-- requires: lib.lua`` runs after the shared helpers of
`lib.lua` (`set_state`, `state_event`). The stores register each script once per client
(`register_script`: EVALSHA, falling back to EVAL after a Redis restart).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["lua"]

_REQUIRES_LIB = "-- requires: lib.lua"


@cache
def lua(name: str) -> str:
    """The source of `service/lua/<name>.lua`, with `lib.lua` before it where it asks."""
    folder = resources.files("service").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text("utf-8")
    if _REQUIRES_LIB in text:
        text = folder.joinpath("lib.lua").read_text("utf-8") + "\n" + text
    return text
