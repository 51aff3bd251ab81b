"""Train the embedded toy LLaVA-1.5 model from scratch, as LLaVA is trained.

Stage 1 pretrains the CLIP vision tower contrastively on (image, caption) pairs, CLIP style, with
a small caption encoder of our own. Each batch is made of groups of near-duplicate scenes that
differ in one object (usually a small one), so the tower has to see every object, and its [CLS]
token learns to attend to the objects. Two auxiliary losses on the penultimate-layer features (the ones LLaVA feeds
its projector) teach the tower what the questions ask about: each patch's object (`PatchHead`) and each object's
colour, shape and size read from the mean of its patches (`ObjectHead`, kept at a low weight in stage 2).

Stage 2 trains the whole model on visual question answering, LLaVA's projector and the Llama language model at the
full learning rate and the tower at a fifth of it (as LLaVA-OneVision does), with the contrastive loss kept as an
auxiliary term so that [CLS] stays tied to the image. Each image comes with 16 questions packed as independent single
turns (see `QABuilder`); the loss is on the answer tokens only.

    python -m vtprune.toy.train            # about 80 minutes on 2 CPU cores; writes out/toy-model/ (--out, --force)
"""


from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from vtprune.toy import world
from vtprune.toy.modeling import (
    MODEL_DIR,
    answer,
    build_config,
    build_processor,
    is_correct,
)
from vtprune.toy.recipe import Recipe, minutes, start_clock
from vtprune.toy.stage1 import (
    ContrastiveHead,
    ObjectHead,
    PatchHead,
    evaluate_tower,
    train_tower,
)
from vtprune.toy.stage2 import evaluate_qa, train_qa


def save_example(model, processor, out_dir: Path, seed: int, accuracy: dict[str, float]) -> dict:
    """Ship the first small-object test question (beyond the benchmark's seed) that the model gets right, of the
    single-object question type it answers best on validation (`accuracy`), so that the right answer is no luck."""
    qtype = max(("color", "shape", "position"), key=lambda t: accuracy.get(t, 0.0))
    items = world.make_dataset("test", 64, seed=seed)
    candidates = [i for i in items if i.target_size == "small" and i.qtype == qtype]
    predictions = answer(model, processor, [i.image for i in candidates], [i.question for i in candidates])
    for item, prediction in zip(candidates, predictions):
        if is_correct(prediction, item.answer):
            out_dir.mkdir(parents=True, exist_ok=True)
            item.image.save(out_dir / "small_object.png")
            record = {
                "image": "small_object.png",
                "question": item.question,
                "answer": item.answer,
                "qtype": item.qtype,
                "target_size": item.target_size,
                "source": f"vtprune.toy.make_dataset('test', 64, seed={seed}) item {item.index}",
            }
            (out_dir / "small_object.json").write_text(json.dumps(record, indent=2) + "\n")
            return record
    raise RuntimeError("the model answered none of the small-object candidates correctly")


def directory_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@torch.no_grad()
def reinitialize(modules: list[nn.Module], std: float) -> None:
    """Normal(0, std) linear and embedding weights, zero biases (transformers' init with another scale)."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Embedding)):
                layer.weight.normal_(0.0, std)
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.zero_()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/toy-model"),
                        help=f"new folder for the model and processor (default: %(default)s; the shipped model is {MODEL_DIR})")
    parser.add_argument("--examples", type=Path, help="where to save the example (default: OUT/examples)")
    parser.add_argument("--force", action="store_true", help="replace --out / --examples if they exist and are not empty")
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--save-stage1", type=Path, help="also save the stage-1 tower and head here")
    parser.add_argument("--load-stage1", type=Path, help="skip stage 1 and start from a saved one")
    args = parser.parse_args(argv)
    args.examples = args.examples or args.out / "examples"
    for folder in (args.out, args.examples):  # before hours of training, not after
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not args.force:
            parser.exit(2, f"{parser.prog}: {folder} exists and is not empty; choose another --out / --examples, "
                           "or add --force to replace it\n")
    recipe = Recipe(**{k: v for k, v in vars(args).items() if hasattr(defaults, k)})

    start_clock()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, recipe.size))
    model.set_attn_implementation("sdpa")
    reinitialize([model.model.language_model, model.lm_head, model.model.multi_modal_projector], recipe.init_std)
    tower = model.model.vision_tower
    head = ContrastiveHead(tower.config.hidden_size, len(processor.tokenizer), recipe.caption_dim)
    object_head = ObjectHead(tower.config.hidden_size)
    report: dict = {"recipe": asdict(recipe)}

    if args.load_stage1:
        stage1 = torch.load(args.load_stage1 / "stage1.pt")
        tower.load_state_dict(stage1["tower"])
        head.load_state_dict(stage1["head"])
        object_head.load_state_dict(stage1["object_head"])
        report["stage1_loaded_from"] = str(args.load_stage1)
    else:
        train_tower(recipe, processor, tower, head, PatchHead(tower.config.hidden_size), object_head)
        if args.save_stage1:
            args.save_stage1.mkdir(parents=True, exist_ok=True)
            stage1 = {"tower": tower.state_dict(), "head": head.state_dict(), "object_head": object_head.state_dict()}
            torch.save(stage1, args.save_stage1 / "stage1.pt")
    report["tower_after_stage1"] = evaluate_tower(tower, head, object_head, processor, recipe)
    print(f"stage 1 done in {minutes():.1f} min: {report['tower_after_stage1']}", flush=True)

    report["val_accuracy"] = train_qa(recipe, processor, model, head, object_head)
    report["tower_after_stage2"] = evaluate_tower(tower, head, object_head, processor, recipe)
    print(f"stage 2 done in {minutes():.1f} min; val accuracy {report['val_accuracy']}", flush=True)

    if args.out.exists() and args.force:  # checked at the start: without --force it is new or empty
        shutil.rmtree(args.out)
    model.to(torch.float16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    # From here on, use the model as users get it: float16 weights loaded back as float32.
    model = LlavaForConditionalGeneration.from_pretrained(
        args.out, dtype=torch.float32, local_files_only=True, attn_implementation="sdpa"
    ).eval()
    val_items = world.make_dataset("val", recipe.val_items, recipe.seed)
    report["val_accuracy_after_reload"] = evaluate_qa(model, processor, val_items)
    report["example"] = save_example(
        model, processor, args.examples, seed=recipe.seed + 1, accuracy=report["val_accuracy_after_reload"]
    )
    report["train_minutes"] = round(minutes(), 1)
    report["model_mb"] = round(directory_size_mb(args.out), 1)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
