"""Typed schemas for every config group.

Hydra composes YAML files from ``conf/``; these dataclasses, registered in the ConfigStore, are the
contract those files are validated against. OmegaConf refuses an unknown key, a value of the wrong
type or an unset mandatory value (``???``) and names the full key, so a typo fails in milliseconds,
before any model or dataset is touched. OmegaConf 2.3 cannot validate ``Literal``; choices are
``Enum`` classes instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Overlength(str, Enum):
    """What to do with a row whose token sequence exceeds ``model.max_length``."""

    truncate = "truncate"  # keep the end of the sequence (the response and its EOS)
    drop = "drop"  # remove the row, counted in the data report


class Truncation(str, Enum):
    """Which tokens of an over-long pair or list (pairwise, ranklist) survive the budget."""

    # The shared prompt keeps its end (down to half the budget at most), each response its start and
    # its final token (EOS, or the chat template's last token): every response stays distinct and
    # still shares the prompt (what bco, prm, OpenRLHF and LLaMA-Factory do).
    prompt_end = "prompt_end"
    # Each sequence keeps its own end (a leading BOS / [CLS] survives): the earlier rule. Two long
    # responses that differ only near their start can become identical.
    sequence_end = "sequence_end"


class BadRows(str, Enum):
    """What to do with a malformed row (missing field, empty list, wrong type...)."""

    error = "error"  # stop before any expensive work, naming file, row and field
    skip = "skip"  # leave the row out and count it in the data report


class Layout(str, Enum):
    """How a local file is read into rows."""

    auto = "auto"  # by suffix: jsonl/json/csv/tsv (with a header row)/parquet
    # One ranked list per line, responses separated by tabs, best first, no header (the RLHF_GLM
    # article's files); gives rows with a `responses` column.
    ranked_tsv = "ranked_tsv"


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class PaddingSide(str, Enum):
    right = "right"
    left = "left"


class DType(str, Enum):
    """Dtype of the weights as loaded. Keep float32 for training with mixed precision."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    cpu = "cpu"
    gpu = "gpu"
    auto = "auto"


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"
    # bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 / AMX),
    # else no. Resolved once before the run starts (validate.resolve_precision): config.yaml, the
    # summary and the launcher record the value actually used, never "auto".
    auto = "auto"


class PeftKind(str, Enum):
    none = "none"
    lora = "lora"
    qlora = "qlora"


@dataclass
class ModelConfig:
    """The backbone, its tokenizer, and how sequences are fed to it."""

    # A hub id or a local directory (config.json + tokenizer files, weights unless from_scratch).
    name_or_path: str = MISSING
    # Build randomly initialised weights from the config alone (the offline tiny model).
    from_scratch: bool = False
    # Tokenizer location when it differs from name_or_path.
    tokenizer: Optional[str] = None
    # Hub revision (branch, tag or commit) of the model.
    revision: Optional[str] = None
    # Run the model repository's own Python code (only for repositories you trust).
    trust_remote_code: bool = False
    # Weights dtype at load time; float32 master weights + hardware.mixed_precision is the safe default.
    dtype: DType = DType.float32
    # e.g. sdpa, eager, flash_attention_2; null lets transformers choose.
    attn_implementation: Optional[str] = None
    # Token budget per sequence (prompt + response, special tokens included).
    max_length: int = 512
    # Decoder models read the reward at the last attended token, so both sides are correct.
    padding_side: PaddingSide = PaddingSide.right
    # Reward models train more stably without dropout (TRL and OpenRLHF do the same).
    disable_dropout: bool = True
    # Compute the last layer only where the reward is read (keys/values everywhere): decoders at the
    # reward tokens (Llama/Mistral/Qwen2 layers; a PRM's token classifier at its labelled tokens and a
    # BCO policy and its reference at their completion-predicting positions, head included),
    # BERT-family encoders at the pooled first token; exact, ~1/7 less work on a 6-layer model;
    # sdpa/eager attention.
    final_layer_at_reads: bool = True
    # Run the layers on the real tokens of a padded CPU batch only (gathered once): a BERT-family
    # encoder's (attention per sequence) and a Llama/Mistral/Qwen2 decoder's at least 256 wide, a PRM's
    # token classifier and a BCO policy and its reference included (attention in the padded layout);
    # exact; as much less work as the batch held padding (15% / 8% on HH-RLHF pairs).
    skip_padding: bool = True
    # Extra attributes set on the transformers config before the model is built.
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # Path to a Jinja chat template replacing the tokenizer's own.
    chat_template: Optional[str] = None


@dataclass
class DataConfig:
    """Where rows come from and how malformed or over-long rows are handled."""

    # A local file (jsonl/json/csv/tsv/parquet), a folder of such files, or a hub dataset id.
    train: str = MISSING
    # Same forms as train; null means no held-out set unless holdout_fraction > 0.
    eval: Optional[str] = None
    # Split names used for folders and hub datasets (slices such as "train[:1000]" work).
    train_split: str = "train"
    # Split name of the eval set (folders and hub datasets).
    eval_split: str = "test"
    # Hub dataset configuration name (the second argument of datasets.load_dataset).
    subset: Optional[str] = None
    # Hub revision of the dataset.
    revision: Optional[str] = None
    # auto reads files by suffix; ranked_tsv reads .tsv/.txt files (and folders of <split>.tsv) as tab-separated
    # ranked lists, best first; other files (e.g. a .jsonl eval set) are still read by their suffix.
    layout: Layout = Layout.auto
    # Canonical column name -> column name in the data, e.g. {chosen: response_a}.
    columns: Dict[str, str] = field(default_factory=dict)
    # Fraction of train rows held out for eval when data.eval is null.
    holdout_fraction: float = 0.0
    # Use only the first N rows of each split (null: all).
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    # Over-long rows: truncate (counted in the data report) or drop.
    overlength: Overlength = Overlength.truncate
    # pairwise/ranklist: how an over-long row is cut (prompt_end or sequence_end, see Truncation).
    truncation: Truncation = Truncation.prompt_end
    # pairwise/ranklist on causal decoders: one packed sequence per row, the shared prompt computed once
    # and seen by every response through a 4-D attention mask (exact). auto: on where it is exact
    # (decoder with eager/sdpa attention), off elsewhere; true: required (a config error where it
    # cannot be exact); false: one padded sequence per response.
    share_prefix: str = "auto"
    # GPUs: rows concatenated without padding (position ids restart per sequence) for
    # flash_attention_2 / flex_attention. auto: on where the device and attention support it; CPU
    # always keeps length-grouped padded batches (dense masks would grow with the packed length).
    padding_free: str = "auto"
    # A malformed row: error (one line naming file, row, field) or skip (counted in the data report).
    bad_rows: BadRows = BadRows.error
    # Processes for tokenisation (datasets.map num_proc); null tokenises in-process.
    num_proc: Optional[int] = None
    # Pad batches to a multiple of this many tokens (tensor-core friendly on GPUs).
    pad_to_multiple_of: Optional[int] = None
    # Batch widths come in this many lengths per doubling (at most 1/N extra padding), so the
    # allocator reuses buffers instead of fragmenting the heap (benchmark decoder: peak memory -10%);
    # 0: pad to the longest row exactly.
    pad_buckets: int = 8
    # Batch rows of similar length together (within shuffled mega-batches): far less padding.
    group_by_length: bool = True
    # Mega-batch size, in batches, for group_by_length; larger groups pad less but shuffle less.
    length_group_batches: int = 50


@dataclass
class TrainConfig:
    """The shared loop's settings; identical for every method."""

    # > 0 fixes the number of optimizer steps and overrides epochs.
    max_steps: int = -1
    # Passes over the train set (fractions work) when max_steps is not set.
    epochs: float = 1.0
    # Rows (pairs, lists, ...) per micro-batch on each process.
    per_device_batch_size: int = 8
    # null: same as per_device_batch_size.
    per_device_eval_batch_size: Optional[int] = None
    # Micro-batches per optimizer step; the loss is normalised over the whole window.
    grad_accum: int = 1
    # Peak learning rate of AdamW.
    lr: float = 1e-5
    # AdamW weight decay (not on biases and norms).
    weight_decay: float = 0.01
    # AdamW betas and epsilon.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Learning-rate schedule after warmup: linear, cosine or constant.
    scheduler: Scheduler = Scheduler.linear
    # warmup_steps > 0 wins over warmup_ratio.
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    # 0 disables clipping (the norm is still logged).
    max_grad_norm: float = 1.0
    # Seeds the head's initialisation, the data order and dropout.
    seed: int = 42
    # Evaluate every N optimizer steps (0: only at the end); eval_at_start gives the baseline.
    eval_every: int = 0
    eval_at_start: bool = True
    # Redraw curves.png after an eval only when this many seconds of wall time have passed since the
    # last drawing or the start of training (0: after every eval); the final curves are drawn when the
    # run ends, and when it fails with an error.
    curves_every_s: float = 60.0
    # Save a resumable checkpoint every N optimizer steps (0: none until the end).
    save_every: int = 0
    # How many checkpoints to keep (oldest deleted first); <= 0 keeps all.
    keep_checkpoints: int = 2
    # Log train metrics (metrics.jsonl, trackers, the console) every N optimizer steps.
    log_every: int = 10
    # auto: continue from the run directory's latest checkpoint; off; or a checkpoint path.
    resume: str = "auto"
    # Stop after this many optimizer steps of this invocation, as if interrupted (checkpoint first);
    # the schedule still follows max_steps/epochs. Rerunning the same command continues: chunked
    # cluster jobs and resume tests.
    stop_after_steps: Optional[int] = None
    # Divergence guard. An update whose loss or gradient norm is non-finite is skipped (no optimizer
    # or scheduler step); this many skipped updates in a row stop the run as `diverged` (exit 3).
    # 0: skip bad updates but never stop on them.
    max_bad_steps: int = 3
    # Stop as `diverged` when a logged train loss exceeds this many times the median of the recent
    # logged losses (the last 20, once 10 were logged; only while that median is > 0). 0 disables.
    divergence_factor: float = 100.0
    # Recompute activations in the backward pass: less memory, about 30% more compute.
    gradient_checkpointing: bool = False
    gradient_checkpointing_reentrant: bool = False
    # accelerate trackers, e.g. [tensorboard] or [wandb]; metrics.jsonl is always written.
    report_to: List[str] = field(default_factory=list)
    # DataLoader worker processes (0: collate in the training process).
    num_workers: int = 0
    # A tqdm bar on a terminal; elsewhere a plain line per logged step either way.
    progress_bar: bool = True
    # torch.compile the model (inductor). Shapes vary per batch, so it compiles with dynamic shapes.
    compile: bool = False


class Strategy(str, Enum):
    """How several processes share the work (through accelerate; never a home-made launcher)."""

    none = "none"  # one process, or whatever an outer accelerate launch / torchrun configured (DDP)
    ddp = "ddp"
    fsdp = "fsdp"  # FSDP2 through accelerate, transformer-layer auto-wrap
    deepspeed = "deepspeed"  # ZeRO stage hardware.zero_stage (optional dependency)


@dataclass
class HardwareConfig:
    """Device, precision and distribution. ``rewardctl train`` with num_processes x num_machines > 1
    starts its workers itself through accelerate's launcher, on one run directory."""

    # The preset's name (cpu, gpu, ddp, fsdp, deepspeed, ...).
    name: str = MISSING
    # cpu, gpu or auto (a GPU when torch sees one).
    device: Device = Device.auto
    # no, bf16, fp16 or auto (bf16 where this machine computes it natively and it pays off).
    mixed_precision: MixedPrecision = MixedPrecision.no
    # Allow TF32 matmuls on Ampere+ GPUs.
    tf32: bool = False
    # On CPU, compute bf16/fp16 sdpa attention in fp32: PyTorch's CPU flash-attention kernels are 1.5-7x
    # slower in bf16 (rewardctl/modeling/cpu_attention.py); more precise too. No effect on GPUs or in fp32.
    cpu_attention_fp32: bool = True
    # Under bf16/fp16 autocast, rotary cos/sin tables in that dtype, so q/k rotate in bf16 as in a bf16
    # model instead of being promoted to fp32 (rewardctl/modeling/rotary.py); 6-9% faster on CPU.
    rotary_in_autocast_dtype: bool = True
    # One-process CPU runs: the input embedding's gradient goes into one warm buffer, zeroed on the rows
    # the last step touched, instead of a fresh zero-filled vocab x hidden tensor per step (15 ms a step
    # for a 30522 x 384 vocabulary; rewardctl/modeling/embedding_grad.py). Same gradient, bit for bit.
    cpu_warm_embedding_grad: bool = True
    # CPU runs: SwiGLU, the RMS norms and the rotary rotation of Llama / Mistral / Qwen2 decoders (on
    # their real tokens) in rewardctl's fused C++ kernels, one pass each instead of 2-6 operators
    # (rewardctl/kernels; SwiGLU and the rotation bit for bit, the norm within fp32 rounding). auto: when
    # built (`rewardctl kernels build`, once per machine); true: build them at the start of the run if
    # missing; false: never.
    cpu_fused_kernels: str = "auto"
    # How several processes share the work: none (DDP when there are several), fsdp, deepspeed.
    strategy: Strategy = Strategy.none
    # Processes per machine; 0: one per visible GPU.
    num_processes: int = 1
    # Machines of a multi-node run, and this machine's rank among them.
    num_machines: int = 1
    machine_rank: int = 0
    # Rendezvous of multi-machine runs (rank 0's address).
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500
    # Seconds a process waits in a collective (gradient all-reduce, barrier) for the others before
    # it gives up: a peer that died or hangs then ends the run with one line naming the checkpoint to
    # resume from, instead of a silent hang. 30 min, like torch's and transformers' ddp_timeout.
    collective_timeout_s: int = 1800
    # FSDP: FULL_SHARD (ZeRO-3 like), SHARD_GRAD_OP (ZeRO-2 like), NO_SHARD, HYBRID_SHARD.
    fsdp_sharding_strategy: str = "FULL_SHARD"
    fsdp_cpu_offload: bool = False
    # DeepSpeed ZeRO stage (1, 2 or 3) and optimizer-state offload to CPU.
    zero_stage: int = 2
    offload_optimizer: bool = False


@dataclass
class NoPeftConfig:
    """Full fine-tuning: every parameter trains."""

    name: PeftKind = PeftKind.none


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the backbone; the method's head always trains and is saved with them."""

    name: PeftKind = PeftKind.lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names or suffixes; ["all-linear"] adapts every linear layer except the output head.
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # Extra modules trained in full and saved with the adapter (the method's head is always added).
    modules_to_save: List[str] = field(default_factory=list)
    # Also write <run>/model-merged/: adapter merged into the base, a stock transformers directory.
    save_merged: bool = True


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA over a 4-bit base (bitsandbytes, CUDA only): the base is quantised at load time."""

    name: PeftKind = PeftKind.qlora
    # nf4 or fp4
    quant_type: str = "nf4"
    double_quant: bool = True
    # Dtype of the matmuls on dequantised weights.
    compute_dtype: DType = DType.bfloat16
    # A merged copy would be dequantised; off by default.
    save_merged: bool = False


PEFT_SCHEMAS: Dict[str, type] = {
    PeftKind.none.value: NoPeftConfig,
    PeftKind.lora.value: LoraConfig,
    PeftKind.qlora.value: QLoraConfig,
}


@dataclass
class MethodConfig:
    """Fields every method shares; a method's own schema extends this."""

    # The class implementing rewardctl.methods.base.Method; a user's own method plugs in here.
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class RunConfig:
    """One training run: the five groups plus the loop settings and the output directory."""

    method: Any = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    peft: Any = MISSING
    hardware: HardwareConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where the run writes; in a multirun sweep each job gets <output_dir>/<job number>.
    output_dir: str = MISSING


@dataclass
class SavedModelRef:
    """Which trained model a command reads: a run's final model/ or one of its checkpoints."""

    # A training run directory; its config.yaml decides method, tokenisation and format.
    run_dir: str = MISSING
    # null: the run's final model/; or a checkpoint name (step-N) or a checkpoint path.
    checkpoint: Optional[str] = None


@dataclass
class EvalConfig(SavedModelRef):
    """`rewardctl eval`: score a finished (or checkpointed) run on a dataset."""

    # null: the run's data.eval; else a file, folder or hub id. On the command line `data=` works too
    # (the CLI passes it on as dataset=: `data` is also the name of a config group, which Hydra would
    # read `data=<path>` as).
    dataset: Optional[str] = None
    split: Optional[str] = None
    # How to read ``data``: null keeps the run's data.layout (e.g. ranked_tsv for RLHF_GLM files).
    layout: Optional[Layout] = None
    max_rows: Optional[int] = None
    batch_size: Optional[int] = None
    # null: <run_dir>/eval/<data name>; metrics.json and predictions.jsonl go there.
    output_dir: Optional[str] = None
    write_predictions: bool = True
    # null: the run's own hardware.device / hardware.mixed_precision, so its eval is reproduced.
    device: Optional[Device] = None
    mixed_precision: Optional[MixedPrecision] = None
    # Every metric also per value of this column (metrics.json "groups", groups.csv). null: the
    # data's `subset` column when it has one (e.g. RewardBench's categories), else no groups.
    group_by: Optional[str] = None
    # reward_bench: the RewardBench format (prompt/chosen/rejected/subset; data defaults to the hub's
    # allenai/reward-bench, split filtered) with its section scores (Chat, Chat Hard, Safety, Reasoning).
    benchmark: Optional[str] = None
    # With benchmark=reward_bench: render each row as a user turn (prompt) and an assistant turn
    # (answer) through the tokenizer's chat template, as RewardBench's own script does. null: when
    # the tokenizer has a chat template; false: the run's plain `prompt + answer` text.
    chat_template: Optional[bool] = None


@dataclass
class TrainedModelSource:
    """Which trained model `rewardctl score` and `serve` load, and where they run it."""

    # A training run directory (its final model/, or checkpoint=); or model_dir instead.
    run_dir: Optional[str] = None
    # Any saved model directory: a run's model/ or model-merged/, an export, a PEFT adapter of a run,
    # or a stock single-output sequence classifier (scored as a pairwise reward model).
    model_dir: Optional[str] = None
    # With run_dir: a checkpoint name (step-N) or path; null: the run's final model/.
    checkpoint: Optional[str] = None
    # Token budget of a stock model (null: its tokenizer's model_max_length); a run's model uses the run's.
    max_length: Optional[int] = None
    # null: the run's own hardware.device / hardware.mixed_precision.
    device: Optional[Device] = None
    mixed_precision: Optional[MixedPrecision] = None


@dataclass
class ScoreConfig(TrainedModelSource):
    """`rewardctl score`: score rows with a trained reward model, as training built its sequences."""

    # The rows: a file or folder (jsonl/json/csv/tsv/parquet), a hub dataset id, or - for JSON lines on
    # stdin. On the command line `data=` works too (passed on as dataset=).
    dataset: str = MISSING
    # Split of a folder or hub dataset.
    split: str = "train"
    # How to read the rows: null keeps the run's data.layout.
    layout: Optional[Layout] = None
    max_rows: Optional[int] = None
    # A .jsonl or .parquet path, or - for JSON lines on stdout; null: scores/<data name>.jsonl beside
    # the run (or the current directory for a model outside a run).
    output: Optional[str] = None
    # Report (r - mean) / std, by the reward statistics saved with the model at its last eval.
    normalize: bool = False
    # Bad rows: error stops with the row named; skip writes them with null scores. null: the run's.
    bad_rows: Optional[BadRows] = None
    batch_size: Optional[int] = None


@dataclass
class ServeConfig(TrainedModelSource):
    """`rewardctl serve`: an HTTP scoring server (POST /score, /get_reward; GET /health, /info)."""

    # 127.0.0.1: this machine only; 0.0.0.0 listens on every interface (put it behind your own auth).
    host: str = "127.0.0.1"
    port: int = 8000
    # Rows of concurrent requests scored in one pass, and how long a request waits for company.
    max_batch_rows: int = 32
    max_wait_ms: float = 5.0
    # Larger requests are refused with 413.
    max_request_rows: int = 1024
    max_body_bytes: int = 16777216


@dataclass
class ExportConfig(SavedModelRef):
    """`rewardctl export`: a run's model (adapter merged) as one stock transformers directory."""

    # null: <run_dir>/model-merged (or <run_dir>/model-merged-step-N for a checkpoint).
    output_dir: Optional[str] = None
    # null: the dtype the weights were trained in; bfloat16 / float16 halve the size for serving.
    dtype: Optional[DType] = None
    # An existing output_dir is only replaced when this is true.
    overwrite: bool = False
