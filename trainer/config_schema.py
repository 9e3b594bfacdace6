"""The run configuration's sections as typed dataclasses; each field's docstring is its reference entry.

docs/config.md is generated from these docstrings (`make docs`); trainer/config.py loads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from trainer.models.families import FAMILIES

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

BACKENDS = ("fsdp", "deepspeed")
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")
PRECISIONS = ("bf16", "fp32", "fp16")
WANDB_MODES = ("auto", "off", "offline", "online")
NONFINITE_ACTIONS = ("stop", "skip_batch", "rollback")
RESUME_MODES = ("auto", "none")
LOAD_MODES = ("full", "weights_only")


@dataclass
class RunConfig:
    dir: str = MISSING
    """Output folder of the run: config.yaml, metrics.jsonl, logs/, checkpoints/. Required."""
    seed: int = 1234
    """Seed of model init, data shuffle and every RNG stream."""
    name: str | None = None
    """Run name shown in W&B and SLURM; defaults to the folder name."""


@dataclass
class StreamConfig:
    """One prepared dataset of a `data.streams` mixture."""

    path: str = MISSING
    """Its local MDS folder, or with `remote` set the cache folder it is streamed into (as data.path)."""
    remote: str | None = None
    """Optional remote or shared MDS location of this dataset (as data.remote)."""
    proportion: float = MISSING
    """Its share of every training epoch, relative to the other streams' (0.75 and 0.25 = 3:1)."""


@dataclass
class DataConfig:
    path: str = MISSING
    """Local MDS dataset folder made by `llm-train prepare` (train/ and val/ inside). Required.
    With `remote` set, this is the cache folder the shards are streamed into (one sub-folder per node).
    With `streams` set, it still gives the val split, the tokenizer and the model's vocab_size/seq_len."""
    remote: str | None = None
    """Optional remote or shared MDS location (s3://, gs://, or a shared filesystem path)."""
    num_workers: int = 0
    """DataLoader worker processes per rank, for train and val each. They are started on the first batch and kept
    for the whole run (across epochs and evaluations). 0 reads in the training process."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker reads ahead. Used only with data.num_workers > 0."""
    predownload_shards: int = 8
    """With data.remote (or a stream's remote): how far ahead each worker downloads, in shards; turned into
    samples (this x the most samples in one shard of the index) for streaming's `predownload`."""
    num_canonical_nodes: int = 1
    """Pinned so that the global sample order does not depend on the node count (resume on N nodes)."""
    shuffle: bool = True
    """Shuffle the training samples (deterministic, seeded by run.seed)."""
    shuffle_block_size: int | None = None
    """streaming's shuffle block size; None lets streaming choose."""
    streams: list[StreamConfig] = field(default_factory=list)
    """Train on a mixture: a list of {path, remote, proportion}, each a prepared dataset with data.path's
    seq_len, vocab_size and eos_id, sampled in the given proportions (up- or down-sampled by streaming).
    Empty: train on data.path alone. Validation always reads data.path's val split."""
    epoch_size: int | None = None
    """Samples per epoch of a data.streams mixture; None: the streams' samples added up."""
    read_retries: int = 5
    """Times a shard read that failed for a transient reason (an I/O error, a timeout) is tried again before the
    job is requeued. A missing shard or one whose checksum is wrong is never retried: that is a user error."""
    read_retry_wait_s: float = 1.0
    """Seconds before the first retry of a failed shard read; each next wait doubles (at most 30 s)."""

    def problems(self) -> list[str]:
        """What is wrong with the data.streams, data.epoch_size and reading settings, one item per problem."""
        problems = [
            f"data.streams[{index}].proportion={stream.proportion} must be > 0 (remove the stream instead)"
            for index, stream in enumerate(self.streams)
            if not stream.proportion > 0 or stream.proportion == float("inf")
        ]
        paths = [stream.path for stream in self.streams]
        problems += [
            f"data.streams lists '{path}' twice; give each dataset once, with its whole proportion"
            for path in sorted({path for path in paths if paths.count(path) > 1})
        ]
        problems += [
            f"{key}={value} must be >= 1"
            for key, value in (
                ("data.prefetch_factor", self.prefetch_factor),
                ("data.predownload_shards", self.predownload_shards),
            )
            if value < 1
        ]
        if self.read_retries < 0:
            problems.append(f"data.read_retries={self.read_retries} must be >= 0 (0: never retry)")
        if not self.read_retry_wait_s > 0:
            problems.append(f"data.read_retry_wait_s={self.read_retry_wait_s} must be > 0")
        if self.epoch_size is not None and not self.streams:
            problems.append("data.epoch_size needs data.streams; leave it unset for a single data.path")
        elif self.epoch_size is not None and self.epoch_size < 1:
            problems.append(f"data.epoch_size={self.epoch_size} must be >= 1")
        return problems


@dataclass
class ModelConfig:
    arch: str = "gpt2"
    """Model family: gpt2 | llama (RoPE, RMSNorm, SwiGLU, grouped-query attention) | hf (any decoder-only
    transformers causal LM, its architecture from model.hf_config or model.init_from)."""
    size: str | None = None
    """Preset shape of the family. gpt2: tiny | gpt2-124m | gpt2-350m | gpt2-774m | gpt2-1.5b; llama:
    llama-tiny | llama-150m | llama-1b | llama-3b | llama-8b; hf: none. None: the family's first (tiny, llama-tiny)."""
    n_layer: int | None = None
    """Overrides the preset's number of transformer blocks."""
    n_head: int | None = None
    """Overrides the preset's number of attention heads."""
    n_embd: int | None = None
    """Overrides the preset's hidden width."""
    n_kv_head: int | None = None
    """Overrides the preset's key/value heads (grouped-query attention; llama and hf)."""
    intermediate_size: int | None = None
    """Overrides the preset's MLP width (llama and hf)."""
    rope_theta: float | None = None
    """Overrides the preset's RoPE base (llama and hf)."""
    tie_embeddings: bool | None = None
    """Overrides whether the output layer shares the input embedding's weights (gpt2: always by default)."""
    hf_config: str | None = None
    """arch=hf: a folder with a config.json (or a model name in the local Hugging Face cache) whose
    architecture is trained from scratch, with the data's vocabulary. Not needed with model.init_from."""
    trust_remote_code: bool = False
    """Let a model folder's own Python code run (models that transformers does not ship); off by default."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the dataset's prepare.json."""
    seq_len: int | None = None
    """Context length (positions); None takes it from the dataset's prepare.json."""
    init_from: str | None = None
    """Weights to start from (fine-tuning): an exported HF folder, a run or checkpoint folder, or an HF model
    name in the local cache; its architecture must be model.arch's (any with arch=hf)."""
    attn: str = "auto"
    """auto | flash_attention_2 | sdpa | eager. auto: flash-attn on CUDA >= 8.0, else SDPA, else eager."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals (those of them the architecture has)."""

    @property
    def family_name(self) -> str:
        """The family and size for logs: `gpt2 tiny`, `llama llama-1b`, `hf qwen2-folder`."""
        family = FAMILIES[self.arch]
        label = self.size or family.default_size or self.hf_config or self.init_from
        return f"{self.arch} {label}"


@dataclass
class ParallelConfig:
    backend: str = "fsdp"
    """fsdp (FSDP2 fully_shard + DCP) | deepspeed (ZeRO stage 3)."""
    timeout_s: int = 600
    """Collective timeout: a lost or stalled rank fails the job after this many seconds instead of hanging it."""
    straggler_factor: float = 1.5
    """A rank whose step keeps it busy more than this times the median, at several logging steps in a row, is
    logged as a straggler with its host (metrics carry the slowest rank at every logging step)."""
    shard: str = "auto"
    """Ranks one copy of the model state is sharded over: full (every rank) | node (the ranks of a node,
    replicated across nodes: hybrid sharding) | N (groups of N ranks) | auto (node when the job has more than
    one node and the model state fits one node's GPUs, else full). Checkpoints reshard between settings."""


@dataclass
class TrainConfig:
    global_batch_size: int = 8
    """Sequences per optimizer step for the whole job; independent of the node count."""
    micro_batch_size: int = 4
    """Sequences per device per forward pass; accumulation = global / (micro * world size)."""
    max_steps: int = 100
    """Optimizer steps; the learning-rate schedule spans them."""
    stop_at_step: int | None = None
    """Stop (with a checkpoint) after this step although the schedule spans max_steps: staged runs."""
    lr: float = 6e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay to min_lr at max_steps."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, norms or embeddings' positions)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "bf16"
    """bf16 | fp32 | fp16 (fp16 for deepspeed only)."""
    compile: bool = False
    """torch.compile each transformer block."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device for MFU; None uses the known peak of the GPU by its exact name
    (H100 SXM/PCIe/NVL, H200, B200, A100 40/80 GB, L40S, L4, ...; unknown GPUs: no MFU)."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient norm: stop | skip_batch (drop the batch, retry the step with the next one) |
    rollback (reload the newest checkpoint, skip the offending batch, go on). Either way no update is applied."""
    max_nonfinite: int = 3
    """skip_batch/rollback: how many non-finite steps (and loss spikes) a run tolerates before it stops."""
    loss_spike_factor: float = 0.0
    """A loss above this many times the mean of the previous 20 steps' is a spike, handled by on_nonfinite
    (stop, or rollback; skip_batch only logs it: its update is applied); 0 disables."""
    skip_batches: list[int] = field(default_factory=list)
    """Global batch indices (0-based, in the order the run draws them) never trained on, e.g. around a loss spike."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save a checkpoint every this many optimizer steps (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; the newest complete one is never deleted."""
    # `async` is a Python keyword; the YAML key is `async`, mapped in `_rename_keywords`.
    async_save: bool = False
    """YAML key `checkpoint.async`: FSDP saves in the background while training goes on. The state is copied
    into host buffers allocated once per run (a second copy of the weights and optimizer state in host memory;
    pinned on CUDA) while the next step computes, and written by a background thread; only the next optimizer
    update waits for the copy. `latest` and the manifest follow once the files are durable; the final save
    and a save on a stop signal stay synchronous. DeepSpeed saves are always synchronous (docs/checkpoints.md)."""
    resume: str = "auto"
    """auto (newest valid checkpoint in run.dir) | none | a checkpoint folder (or a run folder: its newest)."""
    load: str = "full"
    """full | weights_only: from a checkpoint.resume folder take only the weights, with a new optimizer,
    schedule and data order from step 0 (fine-tuning). The run's own checkpoints always resume in full."""


@dataclass
class EvalConfig:
    every_steps: int = 100
    """Evaluate on the validation split every this many steps (and at the end); 0 disables."""
    batches: int = 20
    """Validation batches per evaluation (per rank)."""


@dataclass
class LogConfig:
    wandb: str = "auto"
    """auto (online with WANDB_API_KEY, else offline) | off | offline | online."""
    wandb_project: str = "llm-training"
    """W&B project name."""
    every_steps: int = 10
    """Write a train line to metrics.jsonl every this many steps."""

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare `off` as false.
        if self.wandb in ("False", "false"):
            self.wandb = "off"


@dataclass
class SlurmConfig:
    max_requeues: int = 10
    """Requeues after preemption or time limit before the run gives up."""
    signal_lead_s: int = 180
    """Seconds before the time limit at which SLURM sends SIGUSR2 (save + requeue)."""


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)
    """[a, b]: a PyTorch profiler trace of steps a to b per rank in RUN_DIR/profiles/rankN/ (Perfetto,
    TensorBoard), and on CUDA a memory snapshot at step b. Empty: no profiler code runs."""

    def problems(self) -> list[str]:
        if not self.steps:
            return []
        if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
            return [f"profile.steps={self.steps} must be two steps [a, b] with 1 <= a <= b, e.g. [10, 12]"]
        return []


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
