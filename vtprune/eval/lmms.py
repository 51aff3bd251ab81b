"""lmms-eval plugin: the model `vtprune` runs lmms-eval's own model class for a base model with a vtprune method on.

    python -m lmms_eval --model vtprune --device cuda \
        --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,method=vtc-cls,keep=64,start_layer=16 \
        --tasks textvqa_val --log_samples --output_path out/

Registered through the `lmms_eval.models` entry point (pyproject.toml); lmms-eval is used as released, not forked.
model_args: `base` (a key of `BASES`), `method` (a vtprune method, or `dense` for none), `keep`, `preset` and any option
of the method; every other argument goes to the base class (`pretrained`, `device_map`, `dtype`, ...).
`pretrained=toy` is the embedded model. All of it is checked, and the method runs once on a probe image, before any
sample, so bad arguments (unknown method or base, keep out of range, unsupported model) fail at once (VTPruneError).

On a machine without CUDA the defaults are device=cpu, device_map=cpu, dtype=float32 (each can be given). A document
without images is answered by the base model unpruned. With `--batch_size N` (base llava_hf) up to N consecutive image
requests with the same gen_kwargs run as one left-padded generate() inside the session, each sample pruned to its own
budget (same answers as batch size 1, tested); their times and peak memory are the batch's, divided evenly (times)
or shared (memory). Otherwise requests run one at a time, each inside `with method(model) as trace:`. Each logged sample's
`token_counts` gains visual_tokens_before / visual_tokens_after (first cut to last, from the trace), prefill_seconds
(first module call to the end of the first forward: vision encoder and LLM prefill), seconds (the whole request),
peak_memory_bytes (see `vtprune.eval.memory`); `results["throughput"]` gains their means as `avg_vtprune_*` (and
the number of processes).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, TokenCounts, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, log_metrics
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

import vtprune
from vtprune.core import Method, VTPruneError, method_class

from ..loading import EMBEDDED, prepare
from .measure import RequestMeter

DENSE = "dense"  # method=dense: the base model as is, measured the same way


@dataclass(frozen=True)
class Base:
    """lmms-eval's implementations of one model family and where they keep the transformers processor."""

    simple: str | None
    chat: str | None
    processor: str


BASES = {  # base name -> lmms-eval classes; vtprune's adapters decide which checkpoints of a family are supported
    "llava_hf": Base(
        "lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf", "_image_processor"
    ),
    "qwen2_vl": Base("lmms_eval.models.simple.qwen2_vl.Qwen2_VL", None, "processor"),
    "qwen2_5_vl": Base(
        "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL", "processor"
    ),
    "qwen3_vl": Base(
        "lmms_eval.models.simple.qwen3_vl.Qwen3_VL", "lmms_eval.models.chat.qwen3_vl.Qwen3_VL", "processor"
    ),
    "internvl_hf": Base(None, "lmms_eval.models.chat.internvl_hf.InternVLHf", "processor"),  # transformers-native
}


def manifests() -> list[ModelManifest]:
    """The `lmms_eval.models` entry point: model `vtprune`, chat and simple implementations."""
    return [ModelManifest("vtprune", simple_class_path=f"{__name__}.VTPrune", chat_class_path=f"{__name__}.VTPruneChat")]


@dataclass
class SampleCounts(TokenCounts):
    """lmms-eval's per-request token counts plus what vtprune measured; logged per sample as `token_counts`."""

    visual_tokens_before: int | None = None
    visual_tokens_after: int | None = None
    prefill_seconds: float | None = None
    seconds: float | None = None
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        measured = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TOKEN_FIELDS}
        return super().to_dict() | {k: v for k, v in measured.items() if v is not None}


_TOKEN_FIELDS = {f.name for f in dataclasses.fields(TokenCounts)}


def resolve_pretrained(name: str) -> str:
    """`toy` -> the embedded model's folder; anything else is passed on to `from_pretrained`."""
    if name != EMBEDDED:
        return name
    folder = Path(vtprune.__file__).resolve().parent / "toy" / "model"
    if not (folder / "config.json").is_file():
        raise VTPruneError(f"pretrained=toy: the embedded model is missing ({folder} has no config.json)")
    return str(folder)


def make_method(name: str, keep: Any, options: dict[str, Any]) -> Method | None:
    if name == DENSE:
        if keep is not None or options:
            raise VTPruneError(f"method=dense prunes nothing and takes no keep or options, got {dict(options, keep=keep)}")
        return None
    if keep is not None:
        options = dict(options, keep=keep)
    return vtprune.make(name, **options)


def split_arguments(method: str, base: str, base_class: type, arguments: dict[str, Any]) -> tuple[dict, dict]:
    """model_args -> (method options, base-class arguments); an argument neither takes is an error."""
    if method != DENSE and method not in vtprune.available():
        raise VTPruneError(f"unknown method {method!r}; available: {', '.join([DENSE, *vtprune.available()])}")
    method_options = {"preset", *(f.name for f in dataclasses.fields(method_class(method)))} if method != DENSE else set()
    parameters = inspect.signature(base_class.__init__).parameters.values()
    base_options = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    ours, theirs = {}, {}
    for name, value in arguments.items():
        if name in method_options:
            ours[name] = value
        elif name in base_options:
            theirs[name] = value
        else:
            raise VTPruneError(
                f"model_args {name}={value!r}: neither method {method!r} (options: {', '.join(sorted(method_options))}) "
                f"nor lmms-eval's {base} (arguments: {', '.join(sorted(base_options))}) takes it"
            )
    return ours, theirs


def cpu_defaults(arguments: dict[str, Any], base_class: type) -> dict[str, Any]:
    """Without a CUDA GPU, run on the CPU as the user would expect: device cpu (lmms-eval's classes default to cuda),
    device_map cpu and float32 (the embedded model is stored in float16), unless given."""
    if torch.cuda.is_available():
        return arguments
    takes = set(inspect.signature(base_class.__init__).parameters)  # only what the wrapped class accepts
    arguments = dict(arguments)
    device = str(arguments.get("device") or "cpu")
    if device.startswith("cuda"):
        device = "cpu"
    for name, value in (("device", device), ("device_map", device), ("dtype", "float32")):
        if name in takes:
            arguments[name] = value if name == "device" else arguments.get(name, value)
    return arguments


def request_visuals(lm: Any, request: Any) -> list:
    """The images / videos of one request (simple: doc_to_visual; chat: the media of doc_to_messages)."""
    args = request.args
    doc_id, task, split = args[-3], args[-2], args[-1]
    doc = lm.task_dict[task][split][doc_id]
    if len(args) == 6 and callable(args[2]) and not callable(args[1]):  # simple: (context, gen_kwargs, doc_to_visual, ...)
        return [v for v in (args[2](doc) or []) if v is not None]
    from lmms_eval.protocol import ChatMessages

    images, videos, _ = ChatMessages(messages=args[1](doc)).extract_media()
    return [*images, *videos]


def gen_kwargs_of(request: Any) -> dict:
    args = request.args
    return dict(args[1] if isinstance(args[1], dict) else args[2])


def import_class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


class VTPrune(lmms):
    """lmms-eval model `vtprune` (simple implementation: requests carry doc_to_visual / doc_to_text)."""

    is_simple = True

    def __init__(
        self,
        base: str = "llava_hf",
        method: str = DENSE,
        keep: int | float | None = None,
        pretrained: str = EMBEDDED,
        batch_size: int | str = 1,
        **arguments: Any,
    ) -> None:
        super().__init__()
        if base not in BASES:
            raise VTPruneError(f"unsupported base model {base!r}; supported: {', '.join(BASES)}")
        class_path = BASES[base].chat if not self.is_simple else BASES[base].simple
        if class_path is None:
            kind, fix = ("chat", "add --force_simple") if not self.is_simple else ("simple", "drop --force_simple")
            raise VTPruneError(f"lmms-eval has no {kind} implementation of {base}; {fix}")
        try:
            self.requests_per_batch = int(batch_size)
        except ValueError:
            raise VTPruneError(f"batch_size={batch_size!r}: give a whole number (requests per padded generate)") from None
        if self.requests_per_batch < 1 or (self.requests_per_batch > 1 and base != "llava_hf"):
            raise VTPruneError(f"batch_size={batch_size}: give 1, or any N >= 1 with base=llava_hf")
        base_class = import_class(class_path)
        options, base_arguments = split_arguments(method, base, base_class, cpu_defaults(arguments, base_class))
        pruning = make_method(method, keep, options)
        self.base = base
        self.release_after_run = True  # `clean()` frees the wrapped model, as lmms-eval's classes do
        self.inner = base_class(pretrained=resolve_pretrained(pretrained), batch_size=1, **base_arguments)
        self.processor = getattr(self.inner, BASES[base].processor)
        self.accelerator = getattr(self.inner, "accelerator", None) or Accelerator()  # qwen2_vl keeps none on 1 process
        self._device = torch.device(self.inner.device)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        # on one device per process (e.g. device_map=cpu) lmms-eval's classes take themselves for rank 0 of 1
        self.inner._rank, self.inner._world_size = self._rank, self._world_size
        self.task_dict = self.inner.task_dict  # lmms-eval fills ours; the wrapped class reads its own
        self.use(pruning)

    def use(self, method: Method | None) -> None:
        """Apply `method` (None: dense) from the next request on; checked on the probe image first."""
        self.check_on_probe(method)
        self.method = method
        self.label = f"{self.base} {'dense' if method is None else method.name}"

    def __getattr__(self, name: str) -> Any:  # anything else lmms-eval asks for: the wrapped class's
        if name == "inner" or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def model(self) -> torch.nn.Module:
        return self.inner.model

    @property
    def device(self) -> torch.device:
        return self._device

    def check_on_probe(self, method: Method | None) -> None:
        """Run the method once on a small gray image (the fewest visual tokens the processor makes); any error it
        raises (unsupported model or signal, keep above the tokens of an image) surfaces here, before any sample."""
        if method is None:
            return
        model = self.model
        inputs = prepare(self.processor, [Image.new("RGB", (28, 28), (128, 128, 128))], "probe", device=self.device)
        inputs = {k: v.to(model.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad(), method(model):
            model(**inputs, use_cache=True, logits_to_keep=1)

    # ------------------------------------------------------------------------------------------ requests
    def generate_until(self, requests: list) -> list[GenerationResult]:
        return self.run("generate_until", requests)

    def generate_until_multi_round(self, requests: list) -> list[GenerationResult]:
        return self.run("generate_until_multi_round", requests)

    def loglikelihood(self, requests: list) -> list[GenerationResult]:
        # GenerationResult also carries (logprob, is_greedy) through lmms-eval 0.7's unwrapping intact
        return self.run("loglikelihood", requests)

    def run(self, kind: str, requests: list) -> list[GenerationResult]:
        logged_before = len(get_logged_metrics_history())
        if kind == "generate_until" and self.requests_per_batch > 1:
            results = self.run_batched(requests)
        else:
            results = [self.run_one(kind, request)
                       for request in tqdm(requests, disable=self.rank != 0, desc=f"vtprune {self.label}")]
        padding = [request.metadata and request.metadata.get("__padding_only__") for request in requests]
        counts = [r.token_counts for r, pad in zip(results, padding) if not pad]
        self.log_summary(counts, wrapped_logged=len(get_logged_metrics_history()) > logged_before)
        return results

    def text_only(self, request: Any) -> GenerationResult:
        """A document without images: the base model answers it unpruned (lmms-eval's llava_hf cannot)."""
        args = request.args
        doc = self.task_dict[args[-2]][args[-1]][args[-3]]
        if self.is_simple:
            messages = [{"role": "user", "content": args[0]}]
            gen_kwargs = dict(args[1])
        else:
            from lmms_eval.protocol import ChatMessages

            messages = ChatMessages(messages=args[1](doc)).model_dump()["messages"]
            gen_kwargs = dict(args[2])
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        template = getattr(self.processor, "apply_chat_template", tokenizer.apply_chat_template)
        text = template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt").to(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=int(gen_kwargs.get("max_new_tokens", 1024)),
                pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        counts = SampleCounts(output_tokens=len(new), seconds=time.perf_counter() - start)
        return GenerationResult(text=tokenizer.decode(new, skip_special_tokens=True), token_counts=counts)

    def run_one(self, kind: str, request: Any) -> GenerationResult:
        model = self.model
        if kind == "generate_until" and not request_visuals(self, request):
            return self.text_only(request)
        start = time.perf_counter()
        with (self.method(model) if self.method else nullcontext()) as trace, RequestMeter(model) as meter:
            output = getattr(self.inner, kind)([request])[0]
        seconds = time.perf_counter() - start
        if meter.error is not None or not meter.forwards:  # lmms-eval's classes log a failed generation, answer ""
            cause = repr(meter.error) if meter.error else "see the error lmms-eval logged above"
            raise VTPruneError(f"the model failed on {request.task_name} doc {request.doc_id}: {cause}") from meter.error
        text, counts = (output, None) if kind == "loglikelihood" else unwrap_generation_output(output)
        tokens = {name: getattr(counts, name) for name in _TOKEN_FIELDS} if counts else {}
        if kind != "loglikelihood" and tokens.get("output_tokens") is None:
            tokens["output_tokens"] = meter.forwards  # one forward per generated token
        before, after = trace.visual_tokens(0)[0] if trace is not None and trace.forwards else (None, None)
        sample = SampleCounts(
            **tokens, visual_tokens_before=before, visual_tokens_after=after, prefill_seconds=meter.prefill_seconds,
            seconds=seconds, peak_memory_bytes=meter.peak_memory_bytes,
        )
        return GenerationResult(text=text, token_counts=sample)

    # ------------------------------------------------------------------------------------------ batches
    def run_batched(self, requests: list) -> list[GenerationResult]:
        """Up to `batch_size` consecutive image requests with equal gen_kwargs as one left-padded, pruned generate()
        (each sample its own budget); documents without images or with videos one at a time."""
        results: list[GenerationResult | None] = [None] * len(requests)
        chunk: list[int] = []

        def flush() -> None:
            if chunk:
                for index, result in zip(chunk, self.run_chunk([requests[i] for i in chunk])):
                    results[index] = result
                chunk.clear()

        for index, request in enumerate(tqdm(requests, disable=self.rank != 0, desc=f"vtprune {self.label}")):
            visuals = request_visuals(self, request)
            if not visuals or not all(isinstance(v, Image.Image) for v in visuals):
                flush()
                results[index] = self.run_one("generate_until", request)
                continue
            if chunk and gen_kwargs_of(requests[chunk[0]]) != gen_kwargs_of(request):
                flush()
            chunk.append(index)
            if len(chunk) == self.requests_per_batch:
                flush()
        flush()
        return results

    def prompt_of(self, request: Any) -> tuple[str, list]:
        """(prompt text, images) of one request, built as lmms-eval's llava_hf builds it for batch size 1."""
        args = request.args
        doc = self.task_dict[args[-2]][args[-1]][args[-3]]
        if self.is_simple:
            visuals = [v for v in args[2](doc) if v is not None]
            context = args[0]
            if "<image>" not in context:
                context = " ".join(["<image>"] * len(visuals)) + "\n" + context
            tokenizer = self.inner.tokenizer
            if self.inner.chat_template is not None:
                tokenizer.chat_template = self.inner.chat_template
            elif tokenizer.chat_template is None:
                from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

                tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
            messages = [{"role": "user", "content": context}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), visuals
        from lmms_eval.protocol import ChatMessages

        chat = ChatMessages(messages=args[1](doc))
        images, _, _ = chat.extract_media()
        text = self.processor.apply_chat_template(chat.model_dump()["messages"], tokenize=False, add_generation_prompt=True)
        return text, images

    def run_chunk(self, requests: list) -> list[GenerationResult]:
        model, tokenizer = self.model, self.inner.tokenizer
        prompts = [self.prompt_of(request) for request in requests]
        images = [image for _, visuals in prompts for image in visuals]
        tokenizer.padding_side = "left"
        inputs = self.processor(images=images, text=[text for text, _ in prompts], return_tensors="pt", padding=True)
        inputs = inputs.to(self.device, model.dtype)
        gen = {"max_new_tokens": 1024, "temperature": 0, "top_p": None, "num_beams": 1,
               **{k: v for k, v in gen_kwargs_of(requests[0]).items() if k != "until"}}
        sample = gen["temperature"] > 0
        start = time.perf_counter()
        with (self.method(model) if self.method else nullcontext()) as trace, RequestMeter(model) as meter:
            out = model.generate(
                **inputs, do_sample=sample, temperature=gen["temperature"] if sample else None, top_p=gen["top_p"],
                num_beams=gen["num_beams"], max_new_tokens=gen["max_new_tokens"], use_cache=self.inner.use_cache,
                pad_token_id=self.inner.eot_token_id, eos_token_id=self.inner.eot_token_id,
            )
        seconds = time.perf_counter() - start
        if meter.error is not None:
            raise VTPruneError(f"the model failed on a batch of {len(requests)} requests: {meter.error!r}") from meter.error
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        counts = trace.visual_tokens(0) if trace is not None and trace.forwards else [(None, None)] * len(requests)
        n = len(requests)
        return [  # per sample: its own visual tokens and output tokens; the batch's times and memory shared evenly
            GenerationResult(text=text, token_counts=SampleCounts(
                output_tokens=int((row != self.inner.eot_token_id).sum()), visual_tokens_before=before,
                visual_tokens_after=after, prefill_seconds=meter.prefill_seconds / n if meter.prefill_seconds else None,
                seconds=seconds / n, peak_memory_bytes=meter.peak_memory_bytes,
            ))
            for text, row, (before, after) in zip(texts, new, counts)
        ]

    def log_summary(self, counts: list[SampleCounts], wrapped_logged: bool) -> None:
        """Means over this rank's requests (all ranks' when distributed) into lmms-eval's throughput summary."""
        if self.world_size > 1:
            from accelerate.utils import gather_object

            counts = gather_object(counts)
        if not counts:
            return
        summary = {"vtprune_processes": self.world_size}
        for name in ("visual_tokens_before", "visual_tokens_after", "prefill_seconds", "seconds", "peak_memory_bytes"):
            values = [getattr(c, name) for c in counts if getattr(c, name) is not None]
            if values:
                summary[f"vtprune_{name}"] = statistics.fmean(values)
        # the wrapped class may report its own generation totals; ours then add none, so totals are not counted twice
        seconds = 0.0 if wrapped_logged else sum(c.seconds for c in counts)
        tokens = 0 if wrapped_logged else sum(c.output_tokens or 0 for c in counts)
        log_metrics(seconds, tokens, tokens / seconds if seconds else 0.0, additional_metrics=summary)

    def clean(self) -> None:
        if self.release_after_run:
            self.inner.clean()


class VTPruneChat(VTPrune):
    """lmms-eval model `vtprune` (chat implementation: requests carry doc_to_messages); lmms-eval's default."""

    is_simple = False
