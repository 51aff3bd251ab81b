"""The vtprune demo as a script: `python demos/app.py` (the same page as `vtprune demo`).

Settings from the environment: VTPRUNE_MODEL ('toy', a local folder or a hub id), VTPRUNE_DEVICE, HOST, PORT.
Importing this file builds the page as `demo` (what `gradio demos/app.py` and Spaces look for).
"""

import os

from vtprune.demo import EXAMPLES_DIR, launch
from vtprune.demo.ui import build_demo

demo = build_demo(model=os.environ.get("VTPRUNE_MODEL", "toy"), device=os.environ.get("VTPRUNE_DEVICE"))

if __name__ == "__main__":
    launch(demo, EXAMPLES_DIR, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "7860")))
