"""Responders that put a model behind Samvad's WebSocket (see ``samvad.responder``).

``samvad.responders.gemini`` talks to Gemini through ``google-genai``
(``samvad[gemini]``); ``samvad.adk.responder`` runs an ADK agent
(``samvad[adk]``). Both tell the model about a barge-in the same way:
"""

from __future__ import annotations

from samvad.interruptions import Interruption

__all__ = ["interruption_note"]


def interruption_note(interruption: Interruption) -> str:
    """What the model is told, with the next message, about a barge-in."""
    heard = interruption.heard.strip()
    cut = interruption.cut.strip()
    if not heard:
        return "[The user interrupted you before hearing any of your previous reply.]"
    if not cut:
        return f'[The user interrupted you just as you finished saying: "{heard}".]'
    return (
        "[The user interrupted your previous reply. "
        f'They heard only: "{heard}". They did not hear: "{cut}".]'
    )
