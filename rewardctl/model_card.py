"""The model card (``README.md``) ``rewardctl export`` writes beside the exported weights.

Someone who finds the directory (or its copy on the Hugging Face Hub) must learn what the model is,
how it was trained and on what, how well it did, and how to score text with it *exactly* as training
did, using stock transformers only. Everything comes from the run's own records (``config.yaml``,
``summary.json`` / ``metrics.jsonl``, the exported ``config.json``), gathered by ``rewardctl.export``;
this module is pure: facts in, markdown out, so every method's card is unit-tested without a model.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import yaml

from rewardctl import __version__
from rewardctl.config.schema import RunConfig

#: Keys of an eval record that describe it rather than measure the model.
RECORD_KEYS = ("step", "split", "epoch", "eval_seconds")
#: Suffixes of local data files: a name ending so is never taken for a hub id.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
PIPELINE_TAGS = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForCausalLM": "text-generation",
}


@dataclass
class CardFacts:
    """What the card is written from (``rewardctl.export`` reads it from the run directory)."""

    run: RunConfig
    #: The exported ``config.json``: ``architectures``, ``id2label`` and rewardctl's facts under ``rewardctl``.
    saved_config: dict[str, Any]
    #: The eval record of the exported weights: ``summary.json``'s ``final_eval`` for the final
    #: model, the checkpoint's step in ``metrics.jsonl`` for a checkpoint; None when there is none.
    metrics: dict[str, Any] | None = None
    #: The run's first eval record (the "before" column), when it differs from ``metrics``.
    first_metrics: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    #: None: the run's final model/; else the checkpoint exported (``step-N`` or a path).
    checkpoint: str | None = None
    dtype: str | None = None
    #: Which names (``model.name_or_path``, data sources, a reference) are hub ids, not local paths.
    hub_ids: frozenset[str] = field(default_factory=frozenset)
    #: The directory name the usage snippet loads (``path/to/<name>``).
    model_dir_name: str = "model-merged"

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.saved_config.get("rewardctl") or {})

    @property
    def architecture(self) -> str:
        return (self.saved_config.get("architectures") or ["?"])[0]

    def hub(self, name: str | None) -> str | None:
        return name if name and name in self.hub_ids else None


def looks_like_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a hub repository id (``org/name`` or ``name``) rather than a file;
    the caller also checks that no local path of that name exists."""
    return bool(name) and bool(HUB_ID.match(name)) and not name.lower().endswith(DATA_SUFFIXES)


# ---- small formatting helpers ------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A config value as YAML / the command line writes it (null, true, 1e-05, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def format_number(value: Any) -> str:
    """A metric for a table: whole numbers as such, others to 6 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_value(value)
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def flat_settings(config: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of a config dataclass, nested dataclasses flattened (``method.udm.l2``)."""
    rows: list[tuple[str, Any]] = []
    for f in dataclasses.fields(config):
        if f.name in ("_target_", "name"):
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows += flat_settings(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value))
    return rows


def method_description(run: RunConfig) -> str:
    """The method config's docstring: where each method writes its loss (``PairwiseConfig``'s
    ``L = -mean log sigma(r_c - r_r - m) + ...``). A docstring dataclasses generated says nothing."""
    doc = inspect.getdoc(type(run.method)) or ""
    return "" if doc.startswith(f"{type(run.method).__name__}(") else doc


def model_kind(facts: CardFacts) -> str:
    """``sequence``, ``token`` or ``causal``: what the exported transformers class is."""
    for suffix, kind in (("ForSequenceClassification", "sequence"), ("ForTokenClassification", "token")):
        if facts.architecture.endswith(suffix):
            return kind
    return "causal" if facts.architecture.endswith("ForCausalLM") else "other"


# ---- sections ---------------------------------------------------------------------------------------------
def front_matter(facts: CardFacts) -> str:
    run = facts.run
    header: dict[str, Any] = {"library_name": "transformers"}
    tag = next((t for suffix, t in PIPELINE_TAGS.items() if facts.architecture.endswith(suffix)), None)
    if tag:
        header["pipeline_tag"] = tag
    base = facts.hub(run.model.name_or_path)
    if base and not run.model.from_scratch:
        header["base_model"] = base
    datasets = [d for d in dict.fromkeys((run.data.train, run.data.eval)) if facts.hub(d)]
    if datasets:
        header["datasets"] = datasets
    header["tags"] = ["reward-model", "rewardctl", run.method.name]
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n"


def title(facts: CardFacts) -> str:
    run = facts.run
    what = {
        "sequence": "a stock `AutoModelForSequenceClassification`",
        "token": "a stock `AutoModelForTokenClassification` (2 labels, 1 = step correct)",
        "causal": "a stock `AutoModelForCausalLM` policy whose implicit reward scores completions",
    }.get(model_kind(facts), f"a `{facts.architecture}`")
    base = "randomly initialised weights" if run.model.from_scratch else f"`{run.model.name_or_path}`"
    return (
        f"# {run.method.name} reward model\n\n"
        f"A `{run.method.name}` reward model trained with rewardctl {facts.meta.get('version', __version__)} "
        f"from {base}: {what} (`{facts.architecture}`), usable without rewardctl.\n"
    )


def method_section(facts: CardFacts) -> str:
    run = facts.run
    lines = ["## Method and loss", "", f"`method={run.method.name}`."]
    description = method_description(run)
    if description:
        lines += ["", "```text", description, "```"]
    settings = flat_settings(run.method, "method.") if dataclasses.is_dataclass(run.method) else []
    if settings:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| `{key}` | `{format_value(value)}` |" for key, value in settings]
    return "\n".join(lines) + "\n"


def base_model_section(facts: CardFacts) -> str:
    run, meta = facts.run, facts.meta
    model = run.model
    revision = f" (revision `{model.revision}`)" if model.revision else ""
    lines = ["## Base model", "", f"- `model.name_or_path`: `{model.name_or_path}`{revision}"]
    if model.from_scratch:
        lines.append("- built from that config with randomly initialised weights (`model.from_scratch=true`)")
    lines.append(f"- architecture: `{facts.architecture}`")
    if meta.get("pooling"):
        read = "the last attended token" if meta["pooling"] == "last_token" else "the model's own pooling"
        lines.append(f"- the reward is read at {read} (`pooling: {meta['pooling']}`)")
    peft = run.peft
    if getattr(peft, "name", None) is not None and peft.name.value != "none":
        lines.append(
            f"- fine-tuning: {peft.name.value} (r={peft.r}, alpha={peft.alpha}, target modules "
            f"{format_value(list(peft.target_modules))}), merged into the base by `rewardctl export`"
        )
    else:
        lines.append("- fine-tuning: every parameter (no adapter)")
    dtype = facts.dtype or model.dtype.value
    lines.append(f"- weights: {dtype}" + (" (cast by `rewardctl export`)" if facts.dtype else ""))
    source = "the run's final `model/`" if facts.checkpoint is None else f"checkpoint `{facts.checkpoint}`"
    lines.append(f"- exported from {source}")
    return "\n".join(lines) + "\n"


def _source(name: str, split: str, subset: str | None, rows: int | None) -> str:
    parts = [f"split `{split}`"]
    if subset:
        parts.append(f"subset `{subset}`")
    if rows:
        parts.append(f"first {rows} rows")
    return f"`{name}` ({', '.join(parts)})"


def data_section(facts: CardFacts) -> str:
    data = facts.run.data
    lines = ["## Data", "", f"- train: {_source(data.train, data.train_split, data.subset, data.max_train_rows)}"]
    if data.eval:
        lines.append(f"- eval: {_source(data.eval, data.eval_split, data.subset, data.max_eval_rows)}")
    elif data.holdout_fraction > 0:
        lines.append(f"- eval: {data.holdout_fraction:g} of the train rows held out (seed {facts.run.train.seed})")
    else:
        lines.append("- eval: none")
    if data.columns:
        lines.append(f"- columns renamed: {format_value(dict(data.columns))}")
    if data.layout.value != "auto":
        lines.append(f"- layout: `{data.layout.value}`")
    lines.append(f"- malformed rows: `data.bad_rows={data.bad_rows.value}`")
    return "\n".join(lines) + "\n"


def truncation_rule(facts: CardFacts) -> str:
    """How an over-long row was cut, in the words of the method family."""
    run = facts.run
    if run.data.overlength.value == "drop":
        return "over-long rows were dropped (`data.overlength=drop`), so none was trained on cut"
    if not hasattr(run.method, "max_completion_length") and run.method.name == "regression":
        return "an over-long text keeps its end (the response and its EOS) and a leading BOS / [CLS]"
    if not hasattr(run.method, "max_completion_length"):  # pairs and lists: data.truncation
        if run.data.truncation.value == "sequence_end":
            return "each over-long sequence keeps its end and a leading BOS / [CLS] (`data.truncation=sequence_end`)"
        return (
            "`data.truncation=prompt_end`: the shared prompt keeps its end (down to half the budget), each "
            "answer its start and its final token, where the reward is read"
        )
    prompt_cap = getattr(run.method, "max_prompt_length", None)
    completion_cap = getattr(run.method, "max_completion_length", None)
    mode = getattr(run.method, "truncation_mode", None)
    keep = "its start" if mode is not None and format_value(mode) == "keep_start" else "its end"
    return (
        f"the completion is cut to `max_completion_length={format_value(completion_cap)}` (its start kept), the "
        f"prompt to `max_prompt_length={format_value(prompt_cap)}` (null: half the budget) keeping {keep} and "
        "a leading BOS, then the completion to the room left"
    )


def budget_section(facts: CardFacts) -> str:
    run = facts.run
    own = getattr(run.method, "max_length", None)
    key, tokens = ("method.max_length", own) if own else ("model.max_length", run.model.max_length)
    lines = [
        "## Budget",
        "",
        f"- `{key}={tokens}` tokens per sequence, special tokens included",
        f"- truncation: {truncation_rule(facts)}",
    ]
    return "\n".join(lines) + "\n"


def training_section(facts: CardFacts) -> str:
    run, summary = facts.run, facts.summary or {}
    train, hardware = run.train, run.hardware
    processes = summary.get("processes") or hardware.num_processes * hardware.num_machines
    effective = train.per_device_batch_size * processes * train.grad_accum
    steps = f"{train.max_steps}" if train.max_steps > 0 else f"{train.epochs:g} epoch(s)"
    steps = f"{summary['step']} of {summary['max_steps']}" if "step" in summary else steps
    warmup = f"{train.warmup_steps} steps" if train.warmup_steps > 0 else f"ratio {train.warmup_ratio:g}"
    rows = [
        ("optimizer steps", steps + (f" ({summary['status']})" if summary.get("status") else "")),
        ("learning rate", f"{train.lr:g}, {train.scheduler.value} schedule, warmup {warmup}"),
        ("optimizer", f"AdamW (betas {train.adam_beta1:g}, {train.adam_beta2:g}; weight decay {train.weight_decay:g})"),
        (
            "batch",
            f"{train.per_device_batch_size} per device x {processes} process(es) x {train.grad_accum} "
            f"accumulation = {effective} per step",
        ),
        ("gradient clipping", f"max norm {train.max_grad_norm:g}" if train.max_grad_norm > 0 else "off"),
        ("seed", str(train.seed)),
        ("precision", f"{format_value(summary.get('mixed_precision') or hardware.mixed_precision)} mixed precision"),
    ]
    if summary.get("train_seconds") is not None:
        rows.append(("training time", f"{summary['train_seconds']:.1f} s on {hardware.device.value}"))
    lines = ["## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def metrics_section(facts: CardFacts) -> str:
    lines = ["## Final metrics", ""]
    final = facts.metrics
    if not final:
        return "\n".join([*lines, "No eval set was scored for these weights.", ""])
    where = f"step {final.get('step')}" + (f", epoch {final['epoch']:g}" if "epoch" in final else "")
    primary = (facts.summary or {}).get("primary_metric")
    lines.append(
        f"On the eval set ({where})" + (f"; the primary metric is `{primary}`" if primary else "") + ". "
        "`rewardctl eval run_dir=...` recomputes them."
    )
    first = facts.first_metrics
    first = first if first and first.get("step") != final.get("step") else None  # a start column, if any
    header = f"| metric | step {final.get('step')} |" + (
        "" if first is None else f" start (step {first.get('step')}) |"
    )
    lines += ["", header, "|---|---|" + ("" if first is None else "---|")]
    for key, value in final.items():
        if key in RECORD_KEYS:
            continue
        start = "" if first is None else f" {format_number(first[key]) if key in first else ''} |"
        lines.append(f"| `{key}` | {format_number(value)} |{start}")
    return "\n".join(lines) + "\n"


def normalisation_section(facts: CardFacts) -> str:
    meta = facts.meta
    lines = ["## Reward normalisation", ""]
    if meta.get("reward_mean") is not None and meta.get("reward_std") is not None:
        reward = "r − δ" if model_kind(facts) == "causal" else "reward"
        lines.append(
            f"The last eval's reward mean and standard deviation are saved in `config.json` under `rewardctl`: "
            f"`reward_mean = {meta['reward_mean']!r}`, `reward_std = {meta['reward_std']!r}`. A normalised "
            f"reward is `({reward} − reward_mean) / reward_std` (what `rewardctl score normalize=true` returns)."
        )
    else:
        lines.append("No reward statistics were saved with this model: rewards are reported as the model gives them.")
    if meta.get("score_mean") is not None:
        lines.append(
            "\nThe model learned standardised targets (`method.standardize=true`): `output * score_std + "
            f"score_mean` is on the data's scale (`score_mean = {meta['score_mean']}`, `score_std = "
            f"{meta['score_std']}`, per output; the snippet below applies it)."
        )
    return "\n".join(lines) + "\n"


# ---- the usage snippets: stock transformers, the sequence exactly as training built it -----------------
SEQUENCE_SNIPPET = '''\
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir = "path/to/{name}"  # this directory, or its hub id
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
MAX_LENGTH = {max_length}  # model.max_length of the run
LABELS = [model.config.id2label[i] for i in range(model.config.num_labels)]
SAVED = getattr(model.config, "rewardctl", None) or {{}}


def token_ids(prompt, response):
    """The sequence training scored: chat messages through the chat template; text as one piece with
    the tokenizer's special tokens and an EOS appended (a tokenizer without one, e.g. BERT's, ends
    with [SEP] itself); an over-long sequence keeps its end and a leading BOS / [CLS]."""
    if isinstance(response, list):  # [{{"role": "assistant", "content": ...}}], prompt a message list or None
        text = tokenizer.apply_chat_template(list(prompt or []) + response, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer((prompt or "") + response)["input_ids"]
        if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
    if len(ids) > MAX_LENGTH:
        keep = 1 if ids[0] in {{tokenizer.bos_token_id, tokenizer.cls_token_id}} - {{None}} else 0
        ids = ids[:keep] + ids[len(ids) - (MAX_LENGTH - keep) :]
    return ids


def scores(prompt, response):
    """Every output of the head, by its label (one output, `reward`, for pairwise and ranklist)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([token_ids(prompt, response)])).logits[0].double()
    if SAVED.get("score_mean") is not None:  # standardised training targets: back on the data's scale
        out = out * torch.tensor(SAVED["score_std"]) + torch.tensor(SAVED["score_mean"])
    return dict(zip(LABELS, out.tolist()))
'''

REWARD_SNIPPET = """

def reward(prompt, response):
    return scores(prompt, response)["reward"]
{normalized}

prompt = {prompt}
a, b = reward(prompt, " Spread a layer of mulch."), reward(prompt, " Weeds are fine.")
print(a, b, "P(first preferred) =", torch.sigmoid(torch.tensor(a - b)).item())
"""

NORMALIZED = '''

def normalized_reward(prompt, response):
    """(reward - reward_mean) / reward_std, the statistics of the last eval saved in config.json."""
    return (reward(prompt, response) - SAVED["reward_mean"]) / SAVED["reward_std"]
'''

SCORES_EXAMPLE = """
print(scores({prompt}, " Spread a layer of mulch."))
"""

TOKEN_SNIPPET = '''\
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

model_dir = "path/to/{name}"  # this directory, or its hub id
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
SEPARATOR = model.config.rewardctl["step_separator"]  # {separator!r}, after every step (the last one too)


def step_probabilities(prompt, steps):
    """P(step correct) for each step, the sequence built as training built it: BOS (or [CLS]) + the
    prompt (a chat prompt: its template with the generation prompt), then each step followed by the
    separator; a step is read at its separator's last token. For rows longer than {max_length}
    tokens use rewardctl.methods.prm.score_steps(..., max_length={max_length}), which cuts as training did."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        ids = ([first] if first is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    separator = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids = ids + tokenizer(step, add_special_tokens=False)["input_ids"] + separator
        ends.append(len(ids) - 1)
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([ids])).logits[0].float().softmax(-1)[:, 1]
    return [probs[i].item() for i in ends]


print(step_probabilities("Start from 5, then -1, then +3.", ["5-1=4.", "4+3=8.", "answer=8."]))
'''

CAUSAL_SNIPPET = '''\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = "path/to/{name}"  # this directory, or its hub id
REFERENCE = {reference}  # {reference_note}
tokenizer = AutoTokenizer.from_pretrained(model_dir)
policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
reference = AutoModelForCausalLM.from_pretrained(REFERENCE).eval()
BETA, DELTA = policy.config.rewardctl["beta"], policy.config.rewardctl["delta"]


def split_ids(prompt, completion):
    """(prompt ids, completion ids) as training built them: the prompt and prompt + completion
    tokenised whole and split where they differ; text gets BOS before and EOS after, chat messages
    go through the template. Rows over {max_length} tokens were cut in training: rewardctl eval scores them."""
    if isinstance(completion, list):
        def render(messages, generation_prompt):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        prompt_ids = render(prompt, True) if prompt else []
        full = render(list(prompt or []) + completion, False)
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        full = tokenizer((prompt or "") + completion, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            prompt_ids, full = [tokenizer.bos_token_id, *prompt_ids], [tokenizer.bos_token_id, *full]
        if tokenizer.eos_token_id is not None and full[-1] != tokenizer.eos_token_id:
            full.append(tokenizer.eos_token_id)
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    return full[:n], full[n:]


def completion_logp(model, prompt_ids, completion_ids):
    """Sum of log p(token) over the completion; token t is predicted by the logits at t - 1."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return picked[max(len(prompt_ids), 1) - 1 :].sum().item()


def reward(prompt, completion):
    """r - delta with r = beta * (log pi(y|x) - log pi_ref(y|x)): > 0 reads as desirable;
    sigmoid(reward) is the classifier's P(desirable)."""
    p, c = split_ids(prompt, completion)
    return BETA * (completion_logp(policy, p, c) - completion_logp(reference, p, c)) - DELTA


r = reward({prompt}, " Spread a layer of mulch.")
print(r, "P(desirable) =", torch.sigmoid(torch.tensor(r)).item())
'''

EXAMPLE_PROMPT = json.dumps("User: How do I keep weeds out?\nAssistant:")  # a Python literal too


def reference_of(facts: CardFacts) -> tuple[str, str]:
    """The reference a policy's rewards were measured against, as a path or hub id, and in words."""
    run = facts.run
    ref = getattr(run.method, "ref_model", None)
    if ref:
        return ref, "the reference model of training (method.ref_model)"
    name = run.model.name_or_path
    adapter = getattr(run.peft, "name", None) is not None and run.peft.name.value != "none"
    what = "the base model under the LoRA adapter (the adapter disabled)" if adapter else "the starting weights"
    if run.model.from_scratch:
        return name, (
            f"reference: {what}, randomly initialised from this config with train.seed={run.train.seed}; no "
            "stock directory holds them, so only rewardctl eval / score reproduces these rewards"
        )
    return name, f"reference: {what} of training (model.name_or_path)"


def usage_snippet(facts: CardFacts) -> str | None:
    run, kind = facts.run, model_kind(facts)
    own = getattr(run.method, "max_length", None)
    budget = own or run.model.max_length
    name = facts.model_dir_name
    if kind == "sequence":
        labels = list((facts.saved_config.get("id2label") or {}).values())
        normalized = NORMALIZED if facts.meta.get("reward_std") else ""
        tail = REWARD_SNIPPET if labels == ["reward"] else SCORES_EXAMPLE
        return SEQUENCE_SNIPPET.format(name=name, max_length=budget) + tail.format(
            prompt=EXAMPLE_PROMPT, normalized=normalized
        )
    if kind == "token":
        separator = facts.meta.get("step_separator", getattr(run.method, "step_separator", "\n"))
        return TOKEN_SNIPPET.format(name=name, separator=separator, max_length=budget)
    if kind == "causal":
        reference, note = reference_of(facts)
        return CAUSAL_SNIPPET.format(
            name=name, reference=json.dumps(reference), reference_note=note, max_length=budget, prompt=EXAMPLE_PROMPT
        )
    return None


def usage_section(facts: CardFacts) -> str:
    snippet = usage_snippet(facts)
    lines = ["## Usage", ""]
    if snippet is None:
        lines.append(f"`{facts.architecture}` has no stock usage example here; `rewardctl eval` scores it.")
        return "\n".join(lines) + "\n"
    kind = model_kind(facts)
    intro = {
        "sequence": "Stock transformers, scoring exactly as training did (same tokens, same truncation within "
        "the budget; `data.truncation=prompt_end` cuts an over-long *pair* by its longer answer, which one text "
        "alone cannot know: score such rows with `rewardctl score` or `rewardctl eval`).",
        "token": "Stock transformers, building the sequence exactly as training did.",
        "causal": "Stock transformers: the implicit reward against the reference, exactly as training computed it.",
    }[kind]
    lines += [intro, "", "```python", snippet.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def render_model_card(facts: CardFacts) -> str:
    """The whole card: Hub front matter, then what a reader needs, most important first."""
    sections = [
        title(facts),
        method_section(facts),
        base_model_section(facts),
        data_section(facts),
        budget_section(facts),
        training_section(facts),
        metrics_section(facts),
        normalisation_section(facts),
        usage_section(facts),
    ]
    return front_matter(facts) + "\n" + "\n".join(sections)


def python_blocks(card: str) -> list[str]:
    """The ``python`` code blocks of a card (tests run them)."""
    return re.findall(r"```python\n(.*?)\n```", card, flags=re.DOTALL)
