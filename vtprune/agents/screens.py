"""Synthetic GUI screenshots drawn with pillow: a desktop, a window with a title bar, a text field, buttons, a list.

Deterministic for a given state, so tests and benchmarks get GUI-like histories where most of every screenshot repeats
the previous one (the redundancy GUI-KV's temporal term targets) without any downloaded data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class Screen:
    """What a synthetic screenshot shows."""

    size: tuple[int, int] = (256, 160)  # (width, height) in pixels
    title: str = "Settings"
    field_text: str = ""  # content of the search field
    items: tuple[str, ...] = ("Display", "Sound", "Network", "Privacy")
    selected: int | None = None  # highlighted list item
    pressed: str | None = None  # label of a button drawn pressed
    dialog: str | None = None  # text of a modal dialog, if open
    cursor: tuple[int, int] | None = None  # mouse pointer (x, y)
    buttons: tuple[str, ...] = field(default=("OK", "Cancel"))


def draw_screen(screen: Screen) -> Image.Image:
    """Render `screen` as an RGB image."""
    width, height = screen.size
    image = Image.new("RGB", screen.size, (46, 84, 128))  # desktop
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    margin = max(4, width // 32)
    window = (margin, margin, width - margin, height - 2 * margin)
    draw.rectangle(window, fill=(236, 236, 236), outline=(40, 40, 40))
    bar = max(6, height // 10)
    draw.rectangle((window[0], window[1], window[2], window[1] + bar), fill=(60, 90, 160))
    draw.text((window[0] + 4, window[1] + 1), screen.title, fill="white", font=font)
    draw.rectangle((window[2] - bar, window[1] + 2, window[2] - 3, window[1] + bar - 2), fill=(200, 60, 60))
    field_top = window[1] + bar + 4
    field_box = (window[0] + 6, field_top, window[2] - 6, field_top + bar)
    draw.rectangle(field_box, fill="white", outline=(120, 120, 120))
    draw.text((field_box[0] + 3, field_box[1]), screen.field_text or "Search", fill=(0, 0, 0) if screen.field_text else (150, 150, 150), font=font)
    row = field_box[3] + 4
    for index, item in enumerate(screen.items):
        box = (window[0] + 6, row, (window[0] + window[2]) // 2, row + bar - 2)
        if index == screen.selected:
            draw.rectangle(box, fill=(180, 205, 250))
        draw.text((box[0] + 3, box[1]), item, fill=(20, 20, 20), font=font)
        row += bar
    button_width = (window[2] - window[0]) // 5
    x = window[2] - 6
    for label in reversed(screen.buttons):
        box = (x - button_width, window[3] - bar - 4, x, window[3] - 4)
        pressed = label == screen.pressed
        draw.rectangle(box, fill=(150, 150, 150) if pressed else (210, 210, 210), outline=(60, 60, 60))
        draw.text((box[0] + 4, box[1]), label, fill=(0, 0, 0), font=font)
        x -= button_width + 6
    if screen.dialog:
        box = (width // 4, height // 3, 3 * width // 4, 2 * height // 3)
        draw.rectangle(box, fill=(255, 250, 220), outline=(0, 0, 0), width=2)
        draw.text((box[0] + 6, box[1] + 6), screen.dialog, fill=(0, 0, 0), font=font)
    if screen.cursor:
        cx, cy = screen.cursor
        draw.polygon([(cx, cy), (cx, cy + 10), (cx + 3, cy + 7), (cx + 7, cy + 7)], fill="white", outline="black")
    return image


def synthetic_episode(steps: int = 5, size: tuple[int, int] = (256, 160)) -> tuple[str, list[Image.Image], list[str]]:
    """A scripted episode: (task, screenshots, the action taken on each screenshot).

    Type a query, select a result, press OK, confirm a dialog, ...; each step changes a small part of the screen.
    """
    task = "Open the sound settings and confirm"
    script = [
        (lambda s: s, "click(start_box='(128,30)')"),
        (lambda s: replace(s, field_text="sou", cursor=(128, 30)), "type(content='sound')"),
        (lambda s: replace(s, field_text="sound"), "click(start_box='(60,62)')"),
        (lambda s: replace(s, selected=1, cursor=(60, 62)), "click(start_box='(200,130)')"),
        (lambda s: replace(s, pressed="OK", dialog="Apply changes?", cursor=(200, 130)), "hotkey(key='enter')"),
        (lambda s: replace(s, pressed=None, dialog=None, title="Sound"), "finished()"),
    ]
    screen, screenshots, actions = Screen(size=size), [], []
    for step in range(steps):
        change, action = script[min(step, len(script) - 1)]
        screen = change(screen)
        screenshots.append(draw_screen(screen))
        actions.append(action)
    return task, screenshots, actions
