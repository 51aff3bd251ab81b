"""The lmms-eval plugin: `python -m lmms_eval --model vtprune ...` on the offline task, alone and across 2 processes;
bad model_args refused before any sample; loglikelihood through the plugin."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.model import lmms

from tests.eval.lmms_setup import (
    DATA_FILE,
    TASK_DIR,
    lmms_eval_command,
    plugin_env,
    results_of,
    run,
    save_tiny_model,
)
from tests.helpers import GRID
from vtprune import VTPruneError
from vtprune.core import method_class
from vtprune.eval.toy_vqa import QTYPES
from vtprune.toy import is_correct

KEEP, LIMIT = 4, 32
METHOD = f"method=vtc-cls,keep={KEEP},start_layer=0"  # the tiny tower has 3 layers: start the [CLS] ensemble at 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return plugin_env(tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="module")
def one_process(tiny, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    done = run([sys.executable, *lmms_eval_command(tiny, out, METHOD, limit=LIMIT)], env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return results_of(out)


def response(sample: dict) -> str:
    resps = sample["filtered_resps"]
    return resps[0] if isinstance(resps, list) else resps


def test_plugin_scores_the_task_and_logs_token_counts_per_sample(one_process):
    results, samples = one_process
    metrics = results["results"]["vtprune_toy_vqa"]
    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(LIMIT))
    for s in samples:
        assert s["exact_match"] == float(is_correct(response(s), s["target"]))
        assert s[f"exact_match_{rows[s['doc_id']]['qtype']}"] == s["exact_match"]
        counts = s["token_counts"][0]
        assert (counts["visual_tokens_before"], counts["visual_tokens_after"]) == (GRID * GRID, KEEP)
        assert 0 < counts["prefill_seconds"] <= counts["seconds"]
        assert counts["output_tokens"] == 1
        assert counts["peak_memory_bytes"] >= 0
    assert metrics["exact_match,none"] == pytest.approx(statistics.fmean(s["exact_match"] for s in samples))
    for qtype in QTYPES:
        scores = [s[f"exact_match_{qtype}"] for s in samples if f"exact_match_{qtype}" in s]
        assert len(scores) == LIMIT // len(QTYPES)
        assert metrics[f"exact_match_{qtype},none"] == pytest.approx(statistics.fmean(scores))
    summary = results["throughput"]
    assert summary["avg_vtprune_visual_tokens_before"] == GRID * GRID
    assert summary["avg_vtprune_visual_tokens_after"] == KEEP
    assert summary["avg_vtprune_processes"] == 1
    assert summary["avg_vtprune_prefill_seconds"] == pytest.approx(
        statistics.fmean(s["token_counts"][0]["prefill_seconds"] for s in samples)
    )
    assert METHOD in results["config"]["model_args"]


def test_two_processes_give_the_same_answers_and_accuracy(one_process, tiny, env, tmp_path):
    launch = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
    ]
    # ACCELERATE_USE_CPU: two CPU processes talking over gloo; each loads the model on the CPU (device_map=cpu)
    done = run([*launch, *lmms_eval_command(tiny, tmp_path, METHOD, limit=LIMIT)], env | {"ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (results, samples), (alone, alone_samples) = results_of(tmp_path), one_process
    assert results["throughput"]["avg_vtprune_processes"] == 2
    answers = {s["doc_id"]: (response(s), s["token_counts"][0]["visual_tokens_after"]) for s in samples}
    assert answers == {s["doc_id"]: (response(s), s["token_counts"][0]["visual_tokens_after"]) for s in alone_samples}
    assert len({answer for answer, _ in answers.values()}) > 1  # the answers depend on the input
    scores = {k: v for k, v in results["results"]["vtprune_toy_vqa"].items() if k.startswith("exact_match")}
    assert scores == {k: v for k, v in alone["results"]["vtprune_toy_vqa"].items() if k.startswith("exact_match")}


@pytest.fixture(scope="module")
def lmms_eval_session():
    """simple_evaluate, its task manager (vtprune's tasks included), and `vtprune` registered as the entry point does."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from vtprune.eval import lmms

    for manifest in lmms.manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    return simple_evaluate, TaskManager(include_path=str(TASK_DIR), include_defaults=False)


VTC_CLS_OPTIONS = ", ".join(sorted({"preset", *(f.name for f in dataclasses.fields(method_class("vtc-cls")))}))
BAD_ARGS = [
    ("method=nope,keep=4", "unknown method 'nope'; available: dense, "),
    (f"method=vtc-cls,keep={GRID * GRID + 1},start_layer=0", f"keep=17 is more than the {GRID * GRID} visual tokens"),
    ("method=vtc-cls,keep=0,start_layer=0", "keep=0: keep at least one visual token"),
    ("method=fastv,keep=1.5", "keep=1.5: a ratio must lie in"),
    ("method=vtc-cls,keep=4,start_layr=0", f"neither method 'vtc-cls' (options: {VTC_CLS_OPTIONS})"),
    ("method=dense,keep=4", "method=dense prunes nothing"),
    ("base=llava_onevision,method=fastv,keep=4", "unsupported base model 'llava_onevision'; supported: llava_hf"),
]


@pytest.mark.parametrize("arguments, message", BAD_ARGS)
def test_bad_model_args_fail_before_any_sample(lmms_eval_session, tiny, monkeypatch, arguments, message):
    from vtprune.eval.lmms import VTPrune

    simple_evaluate, tasks = lmms_eval_session
    started = []
    monkeypatch.setattr(VTPrune, "run", lambda self, kind, requests: started.append(kind))
    with pytest.raises(VTPruneError) as error:
        simple_evaluate(
            model="vtprune", model_args=f"pretrained={tiny},device_map=cpu,dtype=float32,{arguments}",
            tasks=["vtprune_toy_vqa"], task_manager=tasks, device="cpu", limit=2,
        )
    assert message in str(error.value)
    assert started == []


class ScoringLlava(lmms):
    """A minimal lmms-eval model scoring continuations with a transformers LLaVA (lmms-eval 0.7.3's own llava_hf
    cannot: its context-length call passes `<image>` text without images, which transformers 5 refuses)."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int = 1) -> None:
        from accelerate import Accelerator
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        super().__init__()
        self.model = LlavaForConditionalGeneration.from_pretrained(pretrained).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.tokenizer, self.accelerator, self.device = self.processor.tokenizer, Accelerator(), torch.device(device)

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        out = []
        for context, continuation, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            images = doc_to_visual(self.task_dict[task][split][doc_id])
            prompt = f"USER: <image>\n{context} ASSISTANT: {continuation}"
            inputs = self.processor(images=images, text=prompt, return_tensors="pt")
            n = len(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = self.model(**inputs).logits[0, -n - 1 : -1].log_softmax(-1)
            target = inputs["input_ids"][0, -n:]
            out.append((float(logits.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
        return out

    def generate_until(self, requests: list) -> list[str]:
        raise NotImplementedError

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError("no multi-round generation")


def test_loglikelihood_through_the_plugin_keeps_dense_scores_when_keeping_everything(tiny, monkeypatch):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from vtprune.eval import lmms as plugin

    monkeypatch.setitem(plugin.BASES, "scoring_llava", plugin.Base(f"{__name__}.ScoringLlava", None, "processor"))
    doc = {"question": "what color is the circle ?", "answer": "red"}
    image = Image.linear_gradient("L").convert("RGB")
    arguments = (doc["question"], doc["answer"], lambda d: [image], 0, "toy", "test")
    request = Instance("loglikelihood", arguments, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})
    scores = {}
    for args in ({"method": "dense"}, {"method": "random", "keep": 1.0}, {"method": "random", "keep": 2}):
        lm = plugin.VTPrune(base="scoring_llava", pretrained=str(tiny), **args)
        lm.task_dict["toy"] = {"test": [doc]}
        (result,) = lm.loglikelihood([request])
        logprob, greedy = result.text  # (logprob, is_greedy) survives lmms-eval's unwrapping inside GenerationResult
        assert isinstance(logprob, float) and isinstance(greedy, bool)
        scores[args.get("keep")] = (logprob, result.token_counts.visual_tokens_after)
        with pytest.raises(NotImplementedError, match="no multi-round"):  # delegated as is
            lm.generate_until_multi_round([request])
    assert scores[1.0] == (pytest.approx(scores[None][0], abs=1e-5), GRID * GRID)
    assert scores[2][1] == 2 and scores[2][0] != pytest.approx(scores[None][0], abs=1e-5)


@pytest.mark.parametrize("kind, base, chat", [("qwen2-vl", "qwen2_vl", False), ("qwen2.5-vl", "qwen2_5_vl", True),
                                              ("qwen3-vl", "qwen3_vl", False), ("qwen3-vl", "qwen3_vl", True)])
def test_qwen_bases_run_through_lmms_evals_own_classes(tmp_path, kind, base, chat):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from tests.adapters.qwen3_builders import build_qwen3_processor, build_tiny_qwen3
    from tests.adapters.qwen_builders import build_qwen_processor, build_tiny_qwen
    from vtprune.eval.lmms import VTPrune, VTPruneChat

    qwen3 = kind == "qwen3-vl"
    (build_tiny_qwen3() if qwen3 else build_tiny_qwen(kind)).save_pretrained(tmp_path)
    (build_qwen3_processor() if qwen3 else build_qwen_processor(kind)).save_pretrained(tmp_path)
    image = Image.linear_gradient("L").convert("RGB").resize((64, 48))
    question, generation = "what is it?", {"max_new_tokens": 2}
    if chat:
        messages = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": question}]}]
        arguments = (question, lambda doc: messages, generation, 0, "t", "test")
    else:
        arguments = (question, generation, lambda doc: [image], 0, "t", "test")
    request = Instance("generate_until", arguments, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
    # min_pixels / max_pixels go to lmms-eval's class, keep to the method
    lm = (VTPruneChat if chat else VTPrune)(
        base=base, pretrained=str(tmp_path), device="cpu", device_map="cpu", min_pixels=32 * 32, max_pixels=64 * 64,
        method="random", keep=4,
    )
    lm.task_dict["t"] = {"test": [{}]}
    (result,) = lm.generate_until([request])
    assert isinstance(result.text, str)
    counts = result.token_counts
    # lmms-eval resizes the image first (qwen_vl_utils: 28 px multiples): some dozens of visual tokens, 4 kept
    assert counts.visual_tokens_before > 16 and (counts.visual_tokens_after, counts.output_tokens) == (4, 2)


def test_pretrained_toy_names_the_embedded_model_folder():
    import vtprune
    from vtprune.eval.lmms import resolve_pretrained

    folder = Path(vtprune.__file__).resolve().parent / "toy" / "model"
    if (folder / "config.json").is_file():
        assert resolve_pretrained("toy") == str(folder)
    else:
        with pytest.raises(VTPruneError, match="pretrained=toy: the embedded model is missing"):
            resolve_pretrained("toy")
    assert resolve_pretrained("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_the_internvl_hf_base_runs_through_lmms_evals_chat_class(tmp_path):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from tests.adapters.internvl_builders import build_internvl_processor, build_tiny_internvl
    from vtprune.eval.lmms import VTPrune, VTPruneChat

    build_tiny_internvl().save_pretrained(tmp_path)
    build_internvl_processor().save_pretrained(tmp_path)
    image = Image.linear_gradient("L").convert("RGB").resize((64, 48))
    messages = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": "what?"}]}]
    request = Instance("generate_until", ("what?", lambda doc: messages, {"max_new_tokens": 2}, 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    lm = VTPruneChat(base="internvl_hf", pretrained=str(tmp_path), device="cpu", device_map="cpu", method="random",
                     keep=4)
    lm.task_dict["t"] = {"test": [{}]}
    (result,) = lm.generate_until([request])
    counts = result.token_counts
    assert isinstance(result.text, str) and counts.visual_tokens_before > 4
    assert (counts.visual_tokens_after, counts.output_tokens) == (4, 2)
    with pytest.raises(VTPruneError, match="no simple implementation of internvl_hf; drop --force_simple"):
        VTPrune(base="internvl_hf", pretrained=str(tmp_path), method="random", keep=4)
