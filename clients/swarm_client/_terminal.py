"""Text from the orchestrator (ideas, titles, outputs, errors, worker ids), made inert for a terminal.

Whoever wrote an idea, and the model that answered it, can put anything in these strings. Shown
as they are, they would be read as rich markup (`[/]` crashes the CLI; `[link=…]` makes a live
hyperlink) or as the terminal's own commands: escape sequences clear the screen, move the cursor,
retitle the window or hide a link's address (OSC 8); a carriage return or a bidi override makes a
line show other than what it says. So the CLI renders such text only as `Text`, never as markup,
after `strip_controls`; its JSON lines escape what JSON itself leaves raw.
"""

from __future__ import annotations

import re

from rich.text import Text

# Whole sequences first, so that their arguments do not show as litter: CSI (ESC [ … final byte),
# strings ended by BEL or ST (OSC ESC ], DCS ESC P, SOS ESC X, PM ESC ^, APC ESC _; an unended one
# runs to the end, as a terminal would swallow it), two- and three-byte escapes, and the 8-bit
# (C1) forms of CSI and those strings.
_SEQUENCES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
    r"|[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
)
# Then any control character left (all of C0 but tab and newline, DEL, C1) and the bidi controls.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# JSON escapes C0 itself; these it would leave raw.
_JSON_ESCAPES = {
    code: f"\\u{code:04x}" for code in (*range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def strip_controls(text: str) -> str:
    return _CONTROLS.sub("", _SEQUENCES.sub("", text))


def safe_text(text: str, style: str = "") -> Text:
    """Untrusted text as a rich Text: shown as written, never as markup or terminal commands."""
    return Text(strip_controls(text), style=style)


def escape_json_controls(line: str) -> str:
    """A JSON document with the control characters JSON allows raw in strings escaped (same value)."""
    return line.translate(_JSON_ESCAPES)
