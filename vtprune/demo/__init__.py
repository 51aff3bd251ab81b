"""`vtprune demo`: a Gradio page that shows which visual tokens each method keeps, the dense and pruned answers, and
what pruning saves (prefill time, peak memory, visual tokens) measured against the dense model in the same request.

    vtprune demo                        # the embedded model, http://127.0.0.1:7860
    vtprune demo --model llava-hf/llava-1.5-7b-hf --device cuda

Gradio is imported only when the page is built (`pip install 'vtprune[demo]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .examples import EXAMPLES_DIR


def launch(
    page: Any, examples_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any
) -> Any:
    """Serve `page` (blocking unless prevent_thread_lock=True), with its examples folder, no fonts from the web."""
    from .ui import CSS, THEME

    return page.launch(
        server_name=host, server_port=port, ssr_mode=False, allowed_paths=[str(examples_dir)], theme=THEME, css=CSS, **kwargs
    )


def serve(args: argparse.Namespace) -> int:
    import gradio  # noqa: F401  (a missing extra fails here: pip install 'vtprune[demo]')

    from ..loading import check_device, check_model
    from .ui import build_demo

    args.examples_dir = args.examples_dir or str(EXAMPLES_DIR)
    check_device(args.device)
    check_model(args.model)  # a typo or an unreachable hub fails before the server starts
    page = build_demo(
        model=args.model, device=args.device, examples_dir=args.examples_dir, max_new_tokens=args.max_new_tokens,
        repeats=args.repeats, frames=args.frames, allow_hub=args.allow_hub, preload=True,
    )
    launch(page, args.examples_dir, host=args.host, port=args.port)
    return 0
