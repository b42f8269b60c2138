"""An ADK agent with one tool, served over Samvad's WebSocket (see README.md)."""

from . import agent as agent
