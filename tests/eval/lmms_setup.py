"""Running lmms-eval with the vtprune plugin in tests: a tiny saved LLaVA whose processor knows the toy task's words,
and an environment whose entry points include the plugin as pyproject.toml declares it."""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import tomllib
import torch

from tests.helpers import IMAGE_TOKEN, build_tiny_llava, build_tiny_processor
from vtprune.eval.toy_vqa import DATA_FILE, TASK_DIR

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = (  # LLaVA-1.5: "USER: <image>\n{question} ASSISTANT:"
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def task_words() -> list[str]:
    """Every word of the task's questions and answers, lower case, punctuation split off."""
    words = set()
    for line in DATA_FILE.read_text().splitlines():
        row = json.loads(line)
        words |= set((row["question"] + " " + row["answer"]).replace("?", " ? ").split())
    return sorted(words)


def build_task_processor():
    """The tiny model's offline processor (32 px images, `<image>` = 99), its tokenizer speaking the task's words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"] + task_words()
    assert len(words) < IMAGE_TOKEN
    vocab = {word: i for i, word in enumerate(words)} | {"<image>": IMAGE_TOKEN}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    return build_tiny_processor(backend, CHAT_TEMPLATE)


def save_tiny_model(folder: Path) -> Path:
    """The tiny random LLaVA, its output head cut down to the task's answer words (so its answers are words of the
    task, right by chance), saved with `build_task_processor()`. Seed 4 gets a few of the first documents right, so
    comparing accuracies across runs does not compare zeros."""
    model, processor = build_tiny_llava(seed=4), build_task_processor()
    answers = {json.loads(line)["answer"] for line in DATA_FILE.read_text().splitlines()}
    speaks = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    speaks[processor.tokenizer.convert_tokens_to_ids(sorted(answers))] = True
    with torch.no_grad():
        model.lm_head.weight[~speaks] = 0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def plugin_env(tmp: Path) -> dict[str, str]:
    """Environment for a subprocess running lmms-eval offline on this checkout. Where the installed vtprune predates the
    plugin's entry point, a metadata-only distribution declaring it exactly as pyproject.toml does is put on the path."""
    paths = [str(ROOT)]
    if not any(ep.name == "vtprune" for ep in entry_points(group="lmms_eval.models")):
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
        dist = tmp / "entry-points" / "vtprune_lmms_plugin-0.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vtprune-lmms-plugin\nVersion: 0.0\n")
        lines = "".join(f"{name} = {target}\n" for name, target in declared.items())
        (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\n{lines}")
        paths.append(str(dist.parent))
    return os.environ | {
        "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
    }


def lmms_eval_command(model: Path, out: Path, model_args: str = "", limit: int = 24) -> list[str]:
    args = f"base=llava_hf,pretrained={model},device_map=cpu,dtype=float32" + (f",{model_args}" if model_args else "")
    return [
        "-m", "lmms_eval", "--model", "vtprune", "--model_args", args, "--tasks", "vtprune_toy_vqa",
        "--include_path", str(TASK_DIR), "--limit", str(limit), "--device", "cpu", "--batch_size", "1",
        "--gen_kwargs", "max_new_tokens=1", "--log_samples", "--output_path", str(out), "--verbosity", "WARNING",
    ]


def run(command: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def results_of(out: Path) -> tuple[dict, list[dict]]:
    """(results json, logged samples) of one lmms-eval run written under `out`."""
    (results,) = out.rglob("*_results.json")
    (samples,) = out.rglob("*_samples_vtprune_toy_vqa.jsonl")
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]
