"""lmms-eval loads this file by path; the task's logic lives in `vtprune.eval.toy_vqa`."""

from vtprune.eval.toy_vqa import doc_to_target, doc_to_text, doc_to_visual, process_results  # noqa: F401
