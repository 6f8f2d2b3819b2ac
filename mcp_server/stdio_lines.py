"""The stdio transport's input, read line by line before the SDK reads it.

A request whose id is no integer or string (1.5, 1.0, true, null, an object, a list) is read by the
SDK as a notification, which it never answers: the client would wait forever. Such a line is
answered here with an Invalid Request error (id null, as JSON-RPC 2.0 says where the id cannot be
echoed) and does not reach the SDK. Everything else passes as it came; the SDK's own parse failures
are answered by server.AnswersUnreadable.
"""
import json
import logging
import os
import re

import anyio
from mcp.shared.message import SessionMessage
from mcp.types import INVALID_REQUEST, ErrorData, JSONRPCError

from mcp_server.core.models import Refusal

log = logging.getLogger(__name__)
SHOWN_ID_CHARS = 80  # of a wrong id echoed in the error
SURROGATE = re.compile("[\ud800-\udfff]")  # what json.loads leaves of an unpaired \\uD800-\\uDFFF escape


def unreadable_id(line: str) -> str | None:
    """A request's id that the SDK cannot read, as JSON, or None: a good id, no id (a
    notification), no method (a response) or no JSON object at all (the SDK's parse answers it)."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):  # nested too deep for json: the SDK's own parser answers it
        return None
    if not isinstance(message, dict) or "id" not in message or "method" not in message:
        return None
    request_id = message["id"]
    if isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool)):
        return None
    return json.dumps(request_id)[:SHOWN_ID_CHARS]


def wire_stdin():
    """The client's stdin as UTF-8 text lines, as the SDK reads it; fd 0 then points at the null
    device (the SDK's own claim does the same), so no child of the server reads the client's lines."""
    wire = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return anyio.wrap_file(open(wire, encoding="utf-8", errors="replace"))


class CheckedLines:
    """The lines of `lines` with a readable id (or none); the others are answered on the write
    stream given by answer_on, which the transport makes after it starts reading."""

    def __init__(self, lines):
        self.lines, self.answers, self.ready = lines, None, anyio.Event()

    def answer_on(self, write_stream) -> None:
        self.answers = write_stream
        self.ready.set()

    def __aiter__(self):
        return self.checked()

    async def checked(self):
        async for line in self.lines:
            wrong = unreadable_id(line)
            if wrong is None:
                yield line
                continue
            message = (f"Invalid request: its id {wrong} is neither an integer nor a string, so no answer could "
                       "carry it: send the request again with an integer or string id (a message without an id is "
                       "a notification, never answered).")
            await self.ready.wait()
            await self.answers.send(SessionMessage(JSONRPCError(
                jsonrpc="2.0", id=None, error=ErrorData(code=INVALID_REQUEST, message=message))))
            log.warning("answered a request with an unreadable id %s", wrong)


# --- the arguments' text, once the SDK has read them (server.refusals_as_tool_errors) ---

def not_unicode(text: str) -> str:
    """A text's first unpaired surrogate, as the escape that sent it (the text itself cannot be
    written back: it is not encodable as UTF-8)."""
    return f"\\u{ord(SURROGATE.search(text)[0]):04x}"


def check_text(arguments: dict) -> None:
    """Every string argument must be valid Unicode: an unpaired surrogate would be refused by the
    ledger's, git's and the answer's UTF-8 encoders halfway through a tool, and no answer could echo it.
    Strings inside an argument too (review 93: a sweep's choice trained a trial, then failed its answer)."""
    for name, value in arguments.items():
        if found := unpaired(value):
            raise Refusal(f"{name} holds an unpaired surrogate ({not_unicode(found)}), which is not valid "
                          "Unicode text: send it as plain UTF-8 text, without that character, and retry.")


def unpaired(value) -> str | None:
    """The first string in value (a key or an item at any depth, our models' fields: the SDK's Context is none of
    the arguments) holding an unpaired surrogate."""
    if isinstance(value, str):
        return value if SURROGATE.search(value) else None
    value = value.model_dump() if type(value).__module__.startswith("mcp_server.") else value
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := unpaired(item))), None)
