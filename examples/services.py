"""Loaded by ``adk web`` / ``adk api_server`` from this directory: registers
Samvad's ``samvad://`` session service URI scheme with ADK."""

import samvad.adk  # noqa: F401  (importing registers the scheme)
