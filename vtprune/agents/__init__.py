"""Agent loops on top of the public API: GUI agents (screenshot histories) and synthetic screens for tests."""

from .gui import INSTRUCTIONS, StepResult, parse_action, run_episode, run_step, step_messages
from .screens import Screen, draw_screen, synthetic_episode

__all__ = [
    "INSTRUCTIONS", "Screen", "StepResult", "draw_screen", "parse_action", "run_episode", "run_step", "step_messages",
    "synthetic_episode",
]
