"""Parameter Golf training script: Parcae-looped GPT with gates and layered windows.

One file in pipeline order: hyperparameters -> data -> model -> optimizers -> training ->
quantization/packing -> evaluation -> main. Configured only by environment variables.
Launch: torchrun --standalone --nproc_per_node=N train_gpt.py (N in 1..8), or plain python.
"""
from __future__ import annotations

import base64
import contextlib
import difflib
import functools
import glob
import hashlib
import inspect
import io
import json
import lzma
import math
import os
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without triton
    triton = None

# ---------------------------------------------------------------------------------------
# Hyperparameters: every environment variable is read and validated here, and nowhere else.
# ---------------------------------------------------------------------------------------

# PR #1728 per-layer QK-gain init (layers 0..10).
PARC_QK_GAINS = (2.3495, 2.8818, 2.7627, 2.8148, 2.7893, 2.8762, 2.5657, 2.7206, 2.6426, 2.2737, 1.9741)
# PR #1728 xIELU coefficients (ap, an, bp, bn) per layer 0..10, found by a convergence loop.
PARC_XIELU = (
    (0.103, 0.39, 0.126, 0.785), (0.196, 0.578, 0.07, 0.638), (1.415, 0.363, 0.0, 0.405),
    (1.196, 0.491, 0.0, 0.377), (1.485, 0.536, 0.0, 0.314), (1.546, 0.548, 0.002, 0.289),
    (1.337, 0.579, 0.017, 0.313), (1.727, 0.983, 0.067, 0.571), (1.495, 1.058, 0.005, 0.42),
    (0.988, 0.935, 0.058, 0.286), (0.917, 0.845, 0.568, 0.52),
)
# LeakyReLU(0.5)^2 (PR #493) is the xIELU form with these constants.
LEAKY_RELU2 = (1.0, 0.25, 0.0, 0.0)


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


class DataError(ValueError):
    """A bad input file (shard, sidecar, tokenizer); the message names it."""


def _env_int_list(text):
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def _env_float_list(text):
    return tuple(float(v) for v in text.replace(" ", "").split(",") if v)


@dataclass
class Hyperparameters:
    # run and data
    run_id: str = ""
    seed: int = 1337
    data_path: str = "./data/datasets/fineweb10B_sp8192"
    tokenizer_path: str = "./data/tokenizers/fineweb_8192_bpe.model"
    vocab_size: int = 8192
    caseops_enabled: bool = False
    log_dir: str = "logs"
    # training length and batch
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0
    warmup_steps: int = 20
    train_batch_tokens: int = 786432
    micro_batches: int = 8
    train_seq_len: int = 4096
    train_log_every: int = 500
    val_loss_every: int = 0
    eval_seq_len: int = 4096
    val_batch_tokens: int = 262144
    checkpoint_every: str = ""  # N steps, or Ns of training time; "" = no checkpoints
    resume: str = ""  # a checkpoint to continue from
    # model shape
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 4
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    global_rope_dims: int = 16
    qk_gain_init: tuple = ()
    global_attn_layers: tuple = (4, 9, 10)
    local_window_size_early: int = 512
    local_window_size_late: int = 1024
    local_window_split: int = 6
    xsa_last_n: int = 11
    parallel_start_layer: int = 8
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35
    loop_trunc_bwd: int = 1
    parcae: bool = True
    smear_gate: bool = True
    residual_bf16: bool = True  # the residual stream (x, x0, lanes) in autocast's bf16 instead of fp32
    attn_gate: str = "out"
    sparse_attn_gate_scale: float = 0.5
    gate_width: int = 12
    mlp_act: str = "xielu"
    xielu_learnable: bool = False
    fused_mlp: str = "auto"  # 1: training's MLP as xielu_mlp (xIELU in GEMM epilogues); auto: fused_mlp_on
    kv_repeat: str = "auto"  # 1: K and V repeated to the query heads before attention; auto: kv_repeat_on
    attn_backend: str = "auto"
    compile: bool = True
    train_cuda_graph: str = "auto"  # 1: micro-batches replayed as CUDA graphs (MicroStepGraphs); auto: where they pay
    bench_steps: int = 0
    # optimisation
    matrix_lr: float = 0.026
    tied_embed_lr: float = 0.03
    scalar_lr: float = 0.02
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_compile: bool = False  # the orthogonalisations compiled (with COMPILE=1 on CUDA)
    gram_ns_ratio: float = 3.0
    muon_wd: float = 0.095
    embed_wd: float = 0.085
    adam_wd: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    warmdown_frac: float = 0.85
    min_lr: float = 0.1
    ema_decay: float = 0.9965
    # quantization and artifact
    matrix_bits: int = 6
    embed_bits: int = 7
    attn_clip_sigmas: float = 13.0
    mlp_clip_sigmas: float = 12.5
    embed_clip_sigmas: float = 14.0
    gptq_calibration_tokens: int = 1572864
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    gptq_reserve_seconds: float = -1.0
    lqer_enabled: bool = True
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_group: int = 64
    artifact_path: str = ""  # default: beside the run's log, LOG_DIR/RUN_ID.pgq
    allow_over_cap: bool = False
    # evaluation and test-time training
    eval_stride: int = 64
    sliding_eval: bool = True
    sliding_mode: str = "attention"  # windows: strided (compiled); attention: documents whole, attention capped (eager)
    eval_budget_seconds: float = 600.0
    ttt_enabled: bool = True
    ttt_compile: bool = True  # 0: TTT eager (the fallback if its compiled graphs fail)
    ttt_cuda_graph: bool = True  # TTT chunk steps replayed as CUDA graphs (StepGraphs)
    ttt_autotune: bool = False  # 1: inductor autotunes TTT's pointwise kernels (more cold compile in the eval timer)
    ttt_batch_size: int = 64
    ttt_batch_grow: int = 1  # short documents' batches up to this many times TTT_BATCH_SIZE (ttt_plan)
    ttt_chunk_size: int = 48
    ttt_long_chunk_size: int = 80  # chunks that start past TTT_EVAL_SEQ_LEN (0: TTT_CHUNK_SIZE; ttt_chunk_span)
    ttt_eval_seq_len: int = 2048
    ttt_max_doc_tokens: int = 16384
    ttt_tail_chunk_size: int = 256  # longer documents: 0 scored by sliding windows; > 0 adapted too (ttt_chunk_bounds)
    ttt_lora_rank: int = 80
    ttt_lora_targets: str = "q,k,v,o,mlp,head"  # the adapted projections (PR #1953's no_qv: k,o,mlp,head)
    ttt_lora_alpha: float = 144.0
    ttt_lora_lr: float = 3e-4
    ttt_beta2: float = 0.99
    ttt_weight_decay: float = 0.5
    ttt_warm_start_a: bool = True
    phased_ttt_prefix_docs: int = 2500
    phased_ttt_num_phases: int = 3
    global_ttt_lr: float = 0.001
    global_ttt_momentum: float = 0.9
    global_ttt_epochs: int = 1
    global_ttt_chunk_tokens: int = 32768
    global_ttt_seq_len: int = 2048
    global_ttt_grad_clip: float = 1.0
    global_ttt_doc_tokens: int = 4096  # each document's first N tokens in global SGD's stream (0: all; long ones lead it)
    global_ttt_cuda_graph: bool = True  # global SGD's forward + backward replayed as CUDA graphs
    global_ttt_compile: bool = False  # 1: global SGD compiled (~80 s of compile for ~2x faster kernels)
    # distributed (set by torchrun)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        h = cls()
        known = [f.name.upper() for f in fields(cls)]
        for key in environ:  # a typo (MATRX_LR) or lower case (matrix_lr) would be silently ignored
            close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.85)
            if key not in known and close and environ.get("RANK", "0") == "0":
                print(f"warning: {key} is not a variable of train_gpt.py and is ignored; did you mean {close[0]}?",
                      file=sys.stderr)
        for f in fields(cls):
            key = f.name.upper()
            if key not in environ:
                continue
            raw = environ[key]
            try:
                if f.type == "bool":
                    if raw not in ("0", "1"):
                        raise ValueError("expected 0 or 1")
                    value = raw == "1"
                elif f.name in ("global_attn_layers",):
                    value = _env_int_list(raw)
                elif f.name == "qk_gain_init":
                    value = _env_float_list(raw)
                else:
                    value = {"int": int, "float": float, "str": str}[f.type](raw)
            except ValueError as e:
                raise ConfigError(f"{key}={raw!r}: {e}") from None
            setattr(h, f.name, value)
        if not h.run_id:
            h.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        h.artifact_path = h.artifact_path or os.path.join(h.log_dir, f"{h.run_id}.pgq")
        h.validate()
        return h

    def validate(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key.lower())!r}: {msg}")

        for key in ("VOCAB_SIZE MICRO_BATCHES TRAIN_SEQ_LEN EVAL_SEQ_LEN VAL_BATCH_TOKENS NUM_LAYERS MODEL_DIM NUM_HEADS "
                    "NUM_KV_HEADS MLP_MULT TRAIN_LOG_EVERY WORLD_SIZE TTT_CHUNK_SIZE TTT_EVAL_SEQ_LEN TTT_LORA_RANK "
                    "TTT_LORA_ALPHA GLOBAL_TTT_CHUNK_TOKENS GLOBAL_TTT_SEQ_LEN GLOBAL_TTT_GRAD_CLIP GPTQ_BLOCK_SIZE "
                    "GATE_WIDTH LOGIT_SOFTCAP ROPE_BASE MUON_BACKEND_STEPS GRAM_NS_RATIO ADAM_EPS ATTN_CLIP_SIGMAS "
                    "MLP_CLIP_SIGMAS EMBED_CLIP_SIGMAS LQER_RANK EVAL_BUDGET_SECONDS ITERATIONS TTT_BATCH_SIZE TTT_BATCH_GROW").split():
            need(getattr(self, key.lower()) > 0, key, "must be positive")
        for key in ("LOCAL_WINDOW_SIZE_EARLY LOCAL_WINDOW_SIZE_LATE LOCAL_WINDOW_SPLIT NUM_LOOPS WARMUP_STEPS VAL_LOSS_EVERY "
                    "MAX_WALLCLOCK_SECONDS XSA_LAST_N LOOP_TRUNC_BWD ENABLE_LOOPING_AT SPARSE_ATTN_GATE_SCALE MATRIX_LR "
                    "TIED_EMBED_LR SCALAR_LR MUON_MOMENTUM_WARMUP_STEPS MUON_WD EMBED_WD ADAM_WD GRAD_CLIP_NORM GPTQ_DAMP "
                    "LQER_TOP_K TTT_MAX_DOC_TOKENS TTT_LONG_CHUNK_SIZE TTT_LORA_LR TTT_WEIGHT_DECAY PHASED_TTT_PREFIX_DOCS "
                    "PHASED_TTT_NUM_PHASES GLOBAL_TTT_LR GLOBAL_TTT_EPOCHS MIN_LR BENCH_STEPS").split():
            need(getattr(self, key.lower()) >= 0, key, "must not be negative")  # NaN fails too
        for key in "MUON_MOMENTUM MUON_MOMENTUM_WARMUP_START BETA1 BETA2 TTT_BETA2 GLOBAL_TTT_MOMENTUM EMA_DECAY".split():
            need(0.0 <= getattr(self, key.lower()) < 1.0, key, "must lie in [0, 1)")
        need(self.min_lr <= 1.0, "MIN_LR", "must lie in [0, 1]")
        need(self.attn_gate in ("out", "sparse", "none"), "ATTN_GATE", "expected out, sparse or none")
        need(self.mlp_act in ("xielu", "leaky_relu2"), "MLP_ACT", "expected xielu or leaky_relu2")
        need(self.attn_backend in ("auto", "fa3", "varlen", "sdpa"), "ATTN_BACKEND", "expected auto, fa3, varlen or sdpa")
        need(self.train_cuda_graph in ("auto", "0", "1"), "TRAIN_CUDA_GRAPH", "expected auto, 0 or 1")
        need(self.fused_mlp in ("auto", "0", "1"), "FUSED_MLP", "expected auto, 0 or 1")
        need(self.kv_repeat in ("auto", "0", "1"), "KV_REPEAT", "expected auto, 0 or 1")
        need(self.fused_mlp != "1" or not self.xielu_learnable, "FUSED_MLP", "needs XIELU_LEARNABLE=0 (its backward "
             "gives the coefficients no gradient)")
        targets = self.ttt_lora_targets.split(",")
        need(set(targets) <= {"q", "k", "v", "o", "mlp", "head"} and len(set(targets)) == len(targets),
             "TTT_LORA_TARGETS", "expected distinct names from q, k, v, o, mlp, head, comma-separated")
        need(self.world_size >= 1 and 0 <= self.rank < self.world_size, "RANK", "must lie in [0, WORLD_SIZE)")
        need(self.micro_batches % self.world_size == 0, "MICRO_BATCHES", f"must be divisible by WORLD_SIZE={self.world_size}")
        need(self.train_batch_tokens % self.micro_batches == 0, "TRAIN_BATCH_TOKENS",
             f"must be divisible by MICRO_BATCHES={self.micro_batches}")
        need(self.train_seq_len > 0 and self.micro_tokens % self.train_seq_len == 0, "TRAIN_BATCH_TOKENS",
             f"tokens per micro-batch ({self.micro_tokens}) must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        need(self.val_batch_tokens % self.eval_seq_len == 0, "VAL_BATCH_TOKENS",
             f"must be a multiple of EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.model_dim % self.num_heads == 0, "MODEL_DIM", f"must be divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_HEADS", f"must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0 and 0 < self.global_rope_dims <= head_dim and self.global_rope_dims % 2 == 0,
             "GLOBAL_ROPE_DIMS", f"must be even and in (0, head_dim={head_dim}]")
        need(self.gate_width <= self.model_dim, "GATE_WIDTH", "must not exceed MODEL_DIM")
        need(all(0 <= i < self.num_layers for i in self.global_attn_layers), "GLOBAL_ATTN_LAYERS",
             f"layer indices must lie in [0, {self.num_layers})")
        need(len(self.qk_gain_init) in (0, 1, self.num_layers), "QK_GAIN_INIT", "give one value or one per layer")
        if self.num_loops > 0:
            need(0 <= self.loop_start <= self.loop_end < self.num_layers, "LOOP_START",
                 f"need 0 <= LOOP_START <= LOOP_END={self.loop_end} < NUM_LAYERS")
            need(self.loop_end < self.parallel_start_layer, "LOOP_END", "the loop must lie below PARALLEL_START_LAYER")
        every = self.checkpoint_every.removesuffix("s")
        need(not self.checkpoint_every or every.isdecimal() and int(every) > 0, "CHECKPOINT_EVERY",
             "expected a positive step count (1000) or seconds of training (600s)")
        need(0.0 <= self.warmdown_frac <= 1.0, "WARMDOWN_FRAC", "must lie in [0, 1]")
        for looping in (False, True):  # parallel lanes are a decoder feature
            need(all(i < self.parallel_start_layer for i in self.layer_plan(looping)[0]), "PARALLEL_START_LAYER",
                 "parallel layers must all lie in the decoder half")
        need(2 <= self.matrix_bits <= 8, "MATRIX_BITS", "must lie in [2, 8]")
        need(2 <= self.embed_bits <= 8, "EMBED_BITS", "must lie in [2, 8]")
        need(self.lqer_group > 0 and self.model_dim % self.lqer_group == 0, "LQER_GROUP", "must divide MODEL_DIM")
        need(self.gptq_calibration_tokens >= self.world_size, "GPTQ_CALIBRATION_TOKENS", "too few for the ranks")
        need(0 < self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", "must lie in (0, EVAL_SEQ_LEN]")
        need(self.sliding_mode in ("windows", "attention"), "SLIDING_MODE", "expected windows or attention")
        sliding = self.sliding_eval or self.ttt_enabled  # TTT's leftovers get sliding windows
        need(not sliding or self.sliding_mode == "windows" or self.val_batch_tokens > self.eval_seq_len, "VAL_BATCH_TOKENS",
             f"SLIDING_MODE=attention needs rows longer than EVAL_SEQ_LEN={self.eval_seq_len} (or SLIDING_MODE=windows)")
        need(self.ttt_chunk_size <= self.ttt_eval_seq_len, "TTT_CHUNK_SIZE", "must not exceed TTT_EVAL_SEQ_LEN")
        need(self.ttt_long_chunk_size <= self.ttt_eval_seq_len, "TTT_LONG_CHUNK_SIZE", "must not exceed TTT_EVAL_SEQ_LEN")
        need(0 <= self.ttt_tail_chunk_size <= self.ttt_eval_seq_len, "TTT_TAIL_CHUNK_SIZE", "must lie in [0, TTT_EVAL_SEQ_LEN]")
        need(self.global_ttt_doc_tokens >= 0, "GLOBAL_TTT_DOC_TOKENS", "must be >= 0 (0: whole documents)")
        need(self.global_ttt_chunk_tokens % self.world_size == 0, "GLOBAL_TTT_CHUNK_TOKENS",
             "must be divisible by WORLD_SIZE")

    def layer_plan(self, looping):
        """(encoder, decoder) physical layer indices; with looping the segment
        [loop_start, loop_end] runs num_loops+1 times (PR #1344/#1523)."""
        order = list(range(self.num_layers))
        if looping and self.num_loops > 0:
            seg = order[self.loop_start:self.loop_end + 1]
            order = order[:self.loop_start] + seg * (self.num_loops + 1) + order[self.loop_end + 1:]
        n_enc = len(order) // 2
        return order[:n_enc], order[n_enc:]

    @property
    def ttt_long_chunk(self):
        return self.ttt_long_chunk_size or self.ttt_chunk_size

    @property
    def ttt_chunking(self):
        """(C, W, C2, tail) as the TTT chunk functions take them (ttt_chunk_bounds)."""
        tail = (self.ttt_max_doc_tokens, self.ttt_tail_chunk_size)
        return self.ttt_chunk_size, self.ttt_eval_seq_len, self.ttt_long_chunk, tail

    @property
    def changed(self):
        """NAME=value of each setting that differs from its default (run_id, artifact_path aside)."""
        return [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                if getattr(self, f.name) != f.default and f.name not in ("run_id", "artifact_path")]

    @property
    def micro_tokens(self):
        return self.train_batch_tokens // self.micro_batches

    @property
    def grad_accum_steps(self):
        return self.micro_batches // self.world_size

    def _per_layer(self, table, i):
        """Row i of an 11-layer table, stretched by relative depth for other layer counts."""
        return table[round(i * (len(table) - 1) / max(self.num_layers - 1, 1))]

    def layer_qk_gain(self, i):
        if len(self.qk_gain_init) == 1:
            return self.qk_gain_init[0]
        return self.qk_gain_init[i] if self.qk_gain_init else self._per_layer(PARC_QK_GAINS, i)

    def layer_xielu(self, i):
        return LEAKY_RELU2 if self.mlp_act == "leaky_relu2" else self._per_layer(PARC_XIELU, i)

    def layer_window(self, i):
        """Sliding window for local layers (each query sees W previous tokens); None = full causal."""
        if i in self.global_attn_layers:
            return None
        # 512 below the split: attention cost there is paid up to three times by the loop.
        return self.local_window_size_early if i < self.local_window_split else self.local_window_size_late


# ---------------------------------------------------------------------------------------
# Distributed runtime and logging
# ---------------------------------------------------------------------------------------


class Runtime:
    """Process group, device, rank-0 logging, and every device decision (attention, compile, fused
    MLP, TF32, seed): made once here for main, tools and tests."""

    def __init__(self, h: Hyperparameters, new_log=False):
        self.rank, self.world_size = h.rank, h.world_size
        self.device = torch.device("cuda", h.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.distributed = h.world_size > 1
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", device_id=self.device
                                    if self.device.type == "cuda" else None)
        self.master = self.rank == 0
        self.log_path = os.path.join(h.log_dir, f"{h.run_id}.txt") if self.master else None
        if self.master and new_log and os.path.exists(self.log_path):  # a second run would append to it
            raise ConfigError(f"RUN_ID={h.run_id!r}: {self.log_path} exists; pick a new RUN_ID (unset: a fresh one)")
        if self.master:
            os.makedirs(h.log_dir, exist_ok=True)
        try:
            self.attn_backend = use_attention_backend(h.attn_backend, self.device)
        except ConfigError as e:
            self.log(f"config error: {e}", console=False)  # main prints it
            raise
        self.compile = h.compile and self.device.type == "cuda"
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls outside GPTQ
        torch.manual_seed(h.seed)

    def place(self, model):
        """The model on this device, its blocks compiled if COMPILE=1 on CUDA."""
        model = model.to(self.device)
        if self.compile:
            model.compile_regions()
        return model

    def log(self, msg, console=True):
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            print(msg, file=f)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def all_reduce(self, t, op="sum"):
        """SUM or MAX over ranks in place (gloo has no AVG, so callers divide)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any: one decision that all ranks follow."""
        return bool(self.all_reduce(torch.tensor(float(flag), device=self.device), "max").item())

    def close(self, ok=False):
        """ok: every rank got here; else (an error) no barrier that the failed rank would never reach."""
        if self.distributed and dist.is_initialized():
            if ok and dist.get_backend() == "gloo":
                dist.barrier()  # no rank tears gloo down while another still uses it (an abort at exit in CPU CI)
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Data: shards, the document-packing train loader, validation tokens and byte accounting
# ---------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
BOS_ID = 1


def load_data_shard(path, mmap=False) -> np.ndarray:
    """Read (or memory-map) one challenge shard: 256 int32 header words (magic, version, n) + n uint16 ids."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path}: bad shard header (magic {header[0]}, version {header[1]}; "
                         f"expected {SHARD_MAGIC}, {SHARD_VERSION})")
    n = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * n:
        raise DataError(f"{path}: header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes) but the file has {size} bytes")
    if mmap and n:
        return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)


def check_shards(files, vocab_size):
    """Every shard's header, size and token range, memory-mapped: a bad shard must stop the run
    before compile, not when the loader reaches it minutes into training."""
    for f in files:
        top = int(load_data_shard(f, mmap=True).max(initial=0))
        if top >= vocab_size:
            raise ConfigError(f"VOCAB_SIZE={vocab_size}: {f} holds token id {top}")


def shard_files(data_path, split):
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(f for f in glob.glob(pattern) if "_bytes_" not in os.path.basename(f))
    if not files:
        raise FileNotFoundError(f"no {split} shards match {pattern} (set DATA_PATH)")
    return files


def tiles(n):
    """n tokens rounded up to whole 64-token tiles (attention's block; TTT rows and FA3's bound)."""
    return -(-n // 64) * 64


def packed_cu_seqlens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Sequence starts for one packed row: 0, every BOS, and a cut every seq_len tokens inside
    long documents, so no token attends across documents or further back than seq_len."""
    n = len(tokens)
    starts = np.union1d([0], np.flatnonzero(tokens == BOS_ID))
    lengths = np.diff(np.append(starts, n))
    extra = [s + np.arange(seq_len, l, seq_len) for s, l in zip(starts[lengths > seq_len], lengths[lengths > seq_len])]
    starts = np.sort(np.concatenate([starts, *extra])) if extra else starts
    return np.append(starts, n).astype(np.int32)


def packed_batch(piece: np.ndarray, seq_len, device):
    """(inputs [1, T], targets [1, T], cu_seqlens, longest sequence) of piece[:-1] -> piece[1:]."""
    cu = packed_cu_seqlens(piece[:-1], seq_len)
    x, y, cu_t = (to_device(a, device) for a in (piece[:-1], piece[1:], cu))
    return x.view(1, -1), y.view(1, -1), cu_t, int(np.diff(cu).max())


class DocumentPackingLoader:
    """Streams the train shards in order as one token stream (documents run across shards,
    the stream wraps at the end). Each call consumes world*(local+1) tokens; rank r takes the
    r-th piece, so micro-step m on rank r reads piece m*world+r: any world size sees the same
    pieces in the same optimizer step. Half way through a shard the next one is read in a
    thread: read in the step, a 100M-token shard stalled it ~1 s on a 2-core host, every 127
    steps of an 8-GPU run."""

    def __init__(self, files, local_tokens, seq_len, rank, world_size, device, vocab_size=None):
        self.files, self.local, self.seq_len = files, local_tokens, seq_len
        self.rank, self.world_size, self.device, self.vocab_size = rank, world_size, device, vocab_size
        self.next = None  # (shard index, its read) once started
        self._open(0, 0)
        self.taken = 0

    def _open(self, i, pos):
        """Shard i from token pos: the thread's read if it was this shard's."""
        self.buf = self.next[1].result() if self.next and self.next[0] == i else self._load(i)
        self.idx, self.pos, self.next = i, pos, None

    def _load(self, i):
        """Shard i, checked against the vocabulary here rather than as a device assert mid-run."""
        shard = load_data_shard(self.files[i])
        if self.vocab_size is not None and shard.max(initial=0) >= self.vocab_size:
            raise ConfigError(f"VOCAB_SIZE={self.vocab_size}: {self.files[i]} holds token id {shard.max()}")
        return shard

    def _take(self, n):
        parts = []
        self.taken += n
        while n:
            if self.next is None and 2 * self.pos >= len(self.buf):  # half way: GPTQ's few batches read no more
                j, reader = (self.idx + 1) % len(self.files), ThreadPoolExecutor(1)
                self.next = (j, reader.submit(self._load, j))
                reader.shutdown(wait=False)  # its thread ends with the read: none is left idle at exit
            if self.pos == len(self.buf):
                self._open(self.next[0], 0)
                continue
            part = self.buf[self.pos:self.pos + n]
            parts.append(part)
            self.pos, n = self.pos + len(part), n - len(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def seek(self, taken):
        """Continue after `taken` tokens of the stream (the shards in a cycle), as if they had been read."""
        ends = np.cumsum([len(load_data_shard(f, mmap=True)) for f in self.files])
        pos = taken % int(ends[-1])
        i = int(np.searchsorted(ends, pos, side="right"))
        self._open(i, pos - (int(ends[i - 1]) if i else 0))
        self.taken = taken

    def next_batch(self):
        """This rank's packed_batch."""
        span = self._take(self.world_size * (self.local + 1))
        piece = span[self.rank * (self.local + 1):(self.rank + 1) * (self.local + 1)].astype(np.int64)
        return packed_batch(piece, self.seq_len, self.device)


def to_device(a: np.ndarray, device):
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class ValSet:
    """The val stream and the bytes credited to each target position (entry j: predicting
    tokens[j]; entry 0 is never a target)."""

    tokens: np.ndarray
    target_bytes: np.ndarray


def load_val_set(h: Hyperparameters, luts) -> ValSet:
    """All val shards in order. Bytes come from the challenge's LUT formula, or with CaseOps
    from the fineweb_val_bytes_* sidecar of each shard, which must exist and align exactly."""
    files = shard_files(h.data_path, "val")
    shards = [load_data_shard(f) for f in files]
    tokens = np.concatenate(shards)
    if tokens.max(initial=0) >= h.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={h.vocab_size}: val shards hold token id {tokens.max()}")
    sidecars = [os.path.join(os.path.dirname(f), os.path.basename(f).replace("fineweb_val_", "fineweb_val_bytes_", 1))
                for f in files]
    if not h.caseops_enabled:
        if any(os.path.isfile(p) for p in sidecars):
            # LUT bytes on CaseOps text count every case operator as bytes: bpb ~9% too low.
            raise ConfigError(f"CASEOPS_ENABLED=0: {h.data_path} holds fineweb_val_bytes_* sidecars (CaseOps data)")
        return ValSet(tokens, stream_target_bytes(tokens, luts))
    counts = []
    for f, side, shard in zip(files, sidecars, shards):
        if not os.path.isfile(side):
            raise FileNotFoundError(f"CASEOPS_ENABLED=1 but the byte sidecar {side} of {f} is missing")
        c = load_data_shard(side)
        if len(c) != len(shard):
            raise DataError(f"{side}: {len(c)} byte counts for {len(shard)} tokens in {f}")
        counts.append(c)
    return ValSet(tokens, np.concatenate(counts).astype(np.int64))


def stream_target_bytes(tokens: np.ndarray, luts) -> np.ndarray:
    """Bytes credited to each target tokens[j]: base_bytes[y] + (has_space[y] and the previous
    token is not a boundary), so a document's leading space is not counted."""
    base_bytes, has_space, is_boundary = luts
    out = np.zeros(len(tokens), dtype=np.int64)
    prev, tgt = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    out[1:] = base_bytes[tgt] + (has_space[tgt] & ~is_boundary[prev])
    return out


def build_sentencepiece_luts(sp, vocab_size):
    """Per-token byte tables of the challenge's accounting (SPEC 1.4): bytes credited to target
    y after token x are base_bytes[y] + (has_space[y] and not is_boundary[x])."""
    n = max(sp.vocab_size(), vocab_size)
    base_bytes = np.zeros(n, dtype=np.int16)
    has_space = np.zeros(n, dtype=bool)
    is_boundary = np.ones(n, dtype=bool)
    for t in range(sp.vocab_size()):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        is_boundary[t] = False
        if sp.is_byte(t):
            base_bytes[t] = 1
            continue
        piece = sp.id_to_piece(t)
        has_space[t] = piece.startswith("\u2581")
        base_bytes[t] = len(piece[1:].encode("utf-8")) if has_space[t] else len(piece.encode("utf-8"))
    return base_bytes.astype(np.int64), has_space, is_boundary


def load_tokenizer(h: Hyperparameters):
    import sentencepiece as spm

    if not os.path.isfile(h.tokenizer_path):
        raise FileNotFoundError(f"tokenizer {h.tokenizer_path} not found (set TOKENIZER_PATH)")
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    if sp.vocab_size() != h.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={h.vocab_size}: tokenizer {h.tokenizer_path} has {sp.vocab_size()} pieces")
    if sp.bos_id() != BOS_ID:
        raise ConfigError(f"TOKENIZER_PATH={h.tokenizer_path}: BOS id is {sp.bos_id()}, the shards use {BOS_ID}")
    return sp


def check_tokenizer_matches(sp, tokens: np.ndarray, h: Hyperparameters, n_docs=64):
    """The val shards must come from this tokenizer: one of the right size with other pieces
    (FineWeb's SP8192 on other shards) gives another byte count, so a wrong val_bpb, silently.
    Decoding and re-encoding a document reproduces its ids only with the tokenizer that made them."""
    starts = np.flatnonzero(tokens == BOS_ID)[:n_docs + 1]
    docs = [tokens[s + 1:e].tolist() for s, e in zip(starts[:-1], starts[1:])]
    same = sum(sp.encode(sp.decode(d)) == d for d in docs)
    if 2 * same < len(docs):
        raise ConfigError(f"TOKENIZER_PATH={h.tokenizer_path}: only {same} of {len(docs)} val documents decode and "
                          f"re-encode to their ids: the shards in {h.data_path} were made by another tokenizer")


# ---------------------------------------------------------------------------------------
# Model: attention backends, the fused xIELU kernel, blocks and the looped GPT
# ---------------------------------------------------------------------------------------


def use_attention_backend(requested, device):
    """Set (and return) the attention backend: FA3 where importable (the competition image), else
    torch's varlen flash attention (torch >= 2.10, CUDA), else SDPA with an explicit mask (CPU)."""
    global ATTENTION_BACKEND
    available = ["sdpa"]
    if device.type == "cuda":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            available.insert(0, "varlen")
        except ImportError:
            pass
        try:
            import flash_attn_interface  # noqa: F401
            available.insert(0, "fa3")
        except ImportError:
            pass
    if requested not in available + ["auto"]:
        raise ConfigError(f"ATTN_BACKEND={requested!r}: not available here (available: {', '.join(available)})")
    ATTENTION_BACKEND = available[0] if requested == "auto" else requested
    return ATTENTION_BACKEND


ATTENTION_BACKEND = "sdpa"  # written only by use_attention_backend


def _attention_sdpa(q, k, v, cu_seqlens, window):
    """Reference path: SDPA with an explicit causal (+ window) mask, one packed sequence at a
    time (a mask over the whole row would cost rows^2), windowed ones in blocks of queries with
    only the keys they can see (capped attention reads documents of up to VAL_BATCH_TOKENS)."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        if window is None:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
            continue
        step = max(window + 1, 256)
        for q0 in range(0, e - s, step):
            q1, k0 = min(q0 + step, e - s), max(0, q0 - window)
            delta = torch.arange(q0, q1, device=q.device)[:, None] - torch.arange(k0, q1, device=q.device)[None, :]
            mask = (delta >= 0) & (delta <= window)
            outs.append(F.scaled_dot_product_attention(qs[:, q0:q1], ks[:, k0:q1], vs[:, k0:q1],
                                                       attn_mask=mask).transpose(0, 1))
    return torch.cat(outs)


# torch's flash kernels (FA2) as one opaque op pair, so attention sits inside the compiled block
# graphs: no graph break, and the longest sequence arrives as a host tensor, read at run time,
# so a new packing never recompiles (flash launches max_seqlen/128 tiles per sequence: an
# upper bound of 4096 over ~300-token documents cost 23% of GPU time on the H100).
@torch.library.custom_op("pgolf::flash_attn", mutates_args=())
def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal (window >= 0: windowed; a host tensor, as max_len) attention over packed sequences;
    returns (out, lse)."""
    m = int(max_len)
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, m, m, 0.0, True, False, window_size_left=int(window), window_size_right=0)[:2]
    return out, lse


@flash_attn.register_fake
def _(q, k, v, cu_seqlens, max_len, window):
    return torch.empty_like(q), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("pgolf::flash_attn_backward", mutates_args=())
def flash_attn_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, cu_seqlens: torch.Tensor, max_len: torch.Tensor,
                        window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = int(max_len)
    no_dropout = q.new_zeros(2, dtype=torch.uint64), q.new_empty(0)  # philox state, unused at p=0
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, m, m, 0.0, True, *no_dropout,
        window_size_left=int(window), window_size_right=0)
    return dq, dk, dv


@flash_attn_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_len, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_len, window = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, max_len, window)


def _flash_attn_grad(ctx, grad_out, grad_lse):
    return (*flash_attn_backward(grad_out, *ctx.saved_tensors), None, None, None)


flash_attn.register_autograd(_flash_attn_grad, setup_context=_flash_attn_setup)


@functools.lru_cache(maxsize=None)
def host_int(value):
    """A 1-element int32 host tensor, made once per value (read only): on the CPU and a normal
    tensor whatever the context of the first call (an inference tensor could not be saved for
    backward, a CUDA one would sync every read)."""
    with torch.inference_mode(False):
        return torch.tensor([value], dtype=torch.int32, device="cpu")


def window_arg(window):
    """A layer's window (None: full causal) as attention() takes it, -1 for none: a 1-element host
    tensor read at run time, like max_len, so layers that differ only in their window share one
    compiled block graph (the default model's 5 block graphs became 2, in training and TTT); an int
    under FA3, whose op takes one (a graph per window there)."""
    left = -1 if window is None else window
    return left if ATTENTION_BACKEND == "fa3" else host_int(left)


def kv_repeat_on(setting):
    """KV_REPEAT: 1 on, 0 off; auto on under varlen, whose FA2 backward sums the grouped heads' dK and dV
    in two unfused aten reductions a layer (2.4% of the kernel time at 98K micro-batches): repeated in the
    graph, that sum fuses into the block's backward. FA3 takes grouped heads natively. Only where a
    backward runs (CausalSelfAttention): a forward alone would just copy."""
    return setting == "1" or (setting == "auto" and ATTENTION_BACKEND == "varlen")


def attention(q, k, v, cu_seqlens, max_len, window, fa3_max_seqlen):
    """Causal attention over packed sequences (cu_seqlens, int32 on the device; max_len, the longest,
    a 1-element host tensor), q [N, H, D], k/v [N, Hkv, D]: no token sees another sequence, and a
    query sees at most `window` (window_arg; -1: no limit) earlier tokens. FA3 runs in the graph
    through its own ops with a fixed bound on the sequence length (an int there would recompile per
    packing); None (eager only: capped_attention) gives it the row's longest."""
    if ATTENTION_BACKEND == "fa3":
        from flash_attn_interface import flash_attn_varlen_func

        bound = fa3_max_seqlen or int(max_len)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, bound, bound, causal=True, window_size=(window, 0))
        return out[0] if isinstance(out, tuple) else out
    if ATTENTION_BACKEND == "varlen":
        return flash_attn(q, k, v, cu_seqlens, max_len, window)[0]
    left = int(window)
    return _attention_sdpa(q, k, v, cu_seqlens, None if left < 0 else left)


def xielu(h, coeffs):
    """f(h) = ap h^2 + bp h for h > 0, an h^2 + bn h otherwise (the square is inside f)."""
    ap, an, bp, bn = coeffs.to(h.dtype).unbind()
    return torch.where(h > 0, (ap * h + bp) * h, (an * h + bn) * h)


if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _xielu_epilogue(acc, c_desc, aux_desc, om, on, ap, an, bp, bn, FORWARD: tl.constexpr):
        # acc rounds to bf16 first, as cuBLAS's output would, so the activation sees what it saw unfused
        h = acc.to(tl.bfloat16)
        if FORWARD:
            c_desc.store([om, on], h)
            x = h.to(tl.float32)
            aux_desc.store([om, on], tl.where(x > 0, (ap * x + bp) * x, (an * x + bn) * x).to(tl.bfloat16))
        else:
            x = aux_desc.load([om, on]).to(tl.float32)
            slope = tl.where(x > 0, 2 * ap * x + bp, 2 * an * x + bn)
            c_desc.store([om, on], (h.to(tl.float32) * slope).to(tl.bfloat16))

    @triton.jit
    def _xielu_gemm_kernel(a_desc, b_desc, c_desc, aux_desc, coeffs_ptr, M, N, K, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, SMS: tl.constexpr, FORWARD: tl.constexpr):
        # Persistent TMA GEMM a b^T (a [M, K], b [N, K]) with xIELU in the epilogue; each output tile
        # leaves in two column halves (half the staging shared memory).
        ap = tl.load(coeffs_ptr).to(tl.bfloat16).to(tl.float32)  # rounded to bf16, as xielu's
        an = tl.load(coeffs_ptr + 1).to(tl.bfloat16).to(tl.float32)
        bp = tl.load(coeffs_ptr + 2).to(tl.bfloat16).to(tl.float32)
        bn = tl.load(coeffs_ptr + 3).to(tl.bfloat16).to(tl.float32)
        tiles_n = tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tiles_n, SMS, flatten=True):
            om, on = (tile // tiles_n) * BM, (tile % tiles_n) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(a_desc.load([om, k]), b_desc.load([on, k]).T, acc)
            left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            _xielu_epilogue(left, c_desc, aux_desc, om, on, ap, an, bp, bn, FORWARD)
            _xielu_epilogue(right, c_desc, aux_desc, om, on + BN // 2, ap, an, bp, bn, FORWARD)


def xielu_gemm(a, b, coeffs, pre=None):
    """a b^T for a [M, K], b [N, K] with xIELU fused: (pre, xielu(pre)) when pre is None, else the
    gradient through the activation (a b^T) * xielu'(pre). Triton on CUDA (bf16), torch elsewhere."""
    if not a.is_cuda:
        h = a @ b.t()
        if pre is None:
            return h, xielu(h, coeffs)
        ap, an, bp, bn = coeffs.to(h.dtype).unbind()
        return h * torch.where(pre > 0, 2 * ap * pre + bp, 2 * an * pre + bn)
    a, b = a.contiguous(), b.contiguous()
    (M, K), N = a.shape, b.size(0)
    BM, BN, BK = 128, 256, 64  # the fastest of 4 tiles at 98K tokens (records/speed/2026-12-02e_fused_mlp)
    c = a.new_empty(M, N)
    aux = a.new_empty(M, N) if pre is None else pre.contiguous()
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    descs = [TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BN, BK]),
             TensorDescriptor.from_tensor(c, [BM, BN // 2]), TensorDescriptor.from_tensor(aux, [BM, BN // 2])]
    grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    _xielu_gemm_kernel[grid](*descs, coeffs.float().contiguous(), M, N, K, BM=BM, BN=BN, BK=BK, SMS=sms,
                             FORWARD=pre is None, num_warps=8, num_stages=4 if pre is None else 3)
    return (c, aux) if pre is None else c


@torch.library.custom_op("pgolf::xielu_mlp", mutates_args=())
def xielu_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
              coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FUSED_MLP: proj(xielu(fc(x))) for x [M, d], xIELU in the up-projection's epilogue (and its
    derivative in the backward's); returns (out, pre, post), the last two kept for the backward."""
    pre, post = xielu_gemm(x, w_fc, coeffs)
    return post @ w_proj.t(), pre, post


@xielu_mlp.register_fake
def _(x, w_fc, w_proj, coeffs):
    m, hidden = x.size(0), w_fc.size(0)
    return x.new_empty(m, w_proj.size(0)), x.new_empty(m, hidden), x.new_empty(m, hidden)


@torch.library.custom_op("pgolf::xielu_mlp_backward", mutates_args=())
def xielu_mlp_backward(grad: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                       coeffs: torch.Tensor, pre: torch.Tensor,
                       post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    grad_pre = xielu_gemm(grad, w_proj.t(), coeffs, pre)
    return grad_pre @ w_fc, grad_pre.t() @ x, grad.t() @ post


@xielu_mlp_backward.register_fake
def _(grad, x, w_fc, w_proj, coeffs, pre, post):
    return x.new_empty(x.shape), w_fc.new_empty(w_fc.shape), w_proj.new_empty(w_proj.shape)


def _xielu_mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output[1:])


def _xielu_mlp_grad(ctx, grad_out, grad_pre, grad_post):
    return (*xielu_mlp_backward(grad_out, *ctx.saved_tensors), None)


xielu_mlp.register_autograd(_xielu_mlp_grad, setup_context=_xielu_mlp_setup)


def bf16_autocast(device, cache=True):
    """bf16 autocast on CUDA; CPU runs (tests, the embedded job) stay in fp32. cache=False: no cast
    cache, which a CUDA graph capture needs to record every cast (same values)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache)


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def with_role(p: nn.Parameter, role: str, quant=None) -> nn.Parameter:
    """Tag a parameter with its optimizer role (OPTIMIZER_ROLES) and, if a matrix, its QUANT_PLANS tag."""
    p.role, p.quant = role, quant
    return p


class CastedLinear(nn.Module):
    """y = x W^T with an fp32 master weight cast to the activation dtype (Muon's 'matrix' role)."""

    def __init__(self, in_features, out_features, quant, init="orthogonal"):
        super().__init__()
        w = torch.empty(out_features, in_features)
        nn.init.orthogonal_(w) if init == "orthogonal" else nn.init.zeros_(w)
        self.weight = with_role(nn.Parameter(w), "matrix", quant)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Adapters(NamedTuple):
    """One virtual layer slot's TTT LoRA adapters, each an (A, B) pair for add_lora."""

    q: tuple
    k: tuple
    v: tuple
    o: tuple
    mlp: tuple

    @property
    def attn(self):
        return self.q, self.k, self.v, self.o


def add_lora(y, u, adapter):
    """y + per-document low-rank update (u A^T) B^T, u [B, T, in], A [B, r, in], B [B, out, r]."""
    if adapter is None:
        return y
    a, b = adapter
    return y + torch.bmm(torch.bmm(u.to(y.dtype), a.to(y.dtype).transpose(1, 2)), b.to(y.dtype).transpose(1, 2))


def rope_tables(T, head_dim, dims, base, device):
    """(cos, sin, pair) rotating the first `dims` of head_dim channels, rotate-half pairs (j, j+dims/2):
    cos, sin [T, head_dim] in fp32 (1 and 0 past dims, sin negated on each pair's second channel)
    and pair [head_dim], each channel's partner. Every width is then the same code, so local and
    global layers share a compiled graph. Positions are indices in the row, which is harmless
    since RoPE is relative. Made once per forward and passed to every block: computed inside the
    block graphs, pow/cos/sin ran per element of q and k (~25 ms of a 342 ms proxy step)."""
    half = dims // 2
    pos = torch.arange(T, device=device, dtype=torch.float32)
    angles = torch.outer(pos, base ** (-torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims))
    c, s = angles.cos(), angles.sin()
    rest = head_dim - dims
    cos = torch.cat([c, c, c.new_ones(T, rest)], dim=1)
    sin = torch.cat([s, -s, s.new_zeros(T, rest)], dim=1)
    idx = torch.arange(head_dim, device=device)
    pair = torch.where(idx < half, idx + half, torch.where(idx < dims, idx - half, idx))
    return cos, sin, pair


class PairSwap(torch.autograd.Function):
    """x[..., pair] for a pairing (an involution, so the backward is the same gather; indexing's own
    backward scatters, which inductor compiles to atomic adds)."""

    @staticmethod
    def forward(ctx, x, pair):
        ctx.save_for_backward(pair)
        return x[..., pair]

    @staticmethod
    def backward(ctx, grad):
        (pair,) = ctx.saved_tensors
        return grad[..., pair], None


def apply_rotary(x, cos, sin, pair):
    """Rotate x [B, T, H, D] by rope_tables of its row length: x*cos + x[pair]*sin, which is
    a*cos + b*sin, b*cos - a*sin on each pair (a, b) and x past the rotated width, the same values."""
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return x * cos + PairSwap.apply(x, pair) * sin


class CausalSelfAttention(nn.Module):
    """GQA attention with QK-norm, per-head QK gain, partial (global) or full (local) RoPE,
    sliding windows on local layers, XSA and an output gate."""

    def __init__(self, h: Hyperparameters, i: int):
        super().__init__()
        d, self.num_heads, self.num_kv_heads = h.model_dim, h.num_heads, h.num_kv_heads
        self.head_dim = d // h.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q, self.c_k, self.c_v = (CastedLinear(d, n, "attn") for n in (d, kv_dim, kv_dim))
        self.proj = CastedLinear(d, d, "attn", init="zeros")
        self.q_gain = with_role(nn.Parameter(torch.full((h.num_heads,), h.layer_qk_gain(i))), "scalar")
        self.window, self.kv_repeat = h.layer_window(i), h.kv_repeat
        self.is_global = self.window is None  # its RoPE tables; capped_attention may give it a window
        self.xsa = i >= h.num_layers - h.xsa_last_n
        self.gate, self.gate_width, self.gate_scale = h.attn_gate, h.gate_width, h.sparse_attn_gate_scale
        # FA3's static bound: no packed sequence is longer than the longest length any stage cuts at.
        # TTT rows are rounded up to multiples of 64, hence the rounding.
        self.fa3_max_seqlen = tiles(max(h.train_seq_len, h.eval_seq_len, h.ttt_eval_seq_len, h.global_ttt_seq_len))
        if self.gate != "none":
            self.gate_w = with_role(nn.Parameter(torch.zeros(h.num_heads, h.gate_width)), "scalar", "gate")

    def forward(self, u, x_in, cu_seqlens, max_len, rope, window, lora=None):
        B, T, _ = u.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        lq, lk, lv, lo = lora if lora is not None else (None,) * 4
        q = add_lora(self.c_q(u), u, lq).view(B, T, H, D)
        k = add_lora(self.c_k(u), u, lk).view(B, T, Hkv, D)
        v = add_lora(self.c_v(u), u, lv).view(B, T, Hkv, D)
        q, k = rms_norm(q), rms_norm(k)
        # Gemma-style: global layers rotate GLOBAL_ROPE_DIMS (16 of 64), local layers every dim (GPT.rope)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q = q * self.q_gain.to(q.dtype)[:, None]
        repeat = torch.is_grad_enabled() and kv_repeat_on(self.kv_repeat)
        ka, va = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v)) if repeat else (k, v)
        y = attention(q.reshape(B * T, H, D), ka.reshape(B * T, -1, D), va.reshape(B * T, -1, D), cu_seqlens,
                      max_len, window, self.fa3_max_seqlen).view(B, T, H, D)
        if self.xsa:
            # XSA (arXiv 2603.09078): drop the component along the token's own value vector.
            vn = F.normalize(v, dim=-1).unsqueeze(3)
            y = y.view(B, T, Hkv, H // Hkv, D)
            y = (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)
        if self.gate == "out":
            # AttnOutGate (PR #1667): 2*sigmoid of the pre-norm residual, identity at init.
            y = y * (2 * torch.sigmoid(F.linear(x_in[..., :self.gate_width], self.gate_w.to(x_in.dtype))))[..., None]
        elif self.gate == "sparse":
            # SparseAttnGate (PR #1787): sigmoid of the normed input, 0.5 at init.
            y = y * torch.sigmoid(self.gate_scale * F.linear(u[..., :self.gate_width], self.gate_w.to(u.dtype)))[..., None]
        y = y.reshape(B, T, H * D)
        return add_lora(self.proj(y), u, lo)


def fused_mlp_on(h: Hyperparameters):
    """FUSED_MLP: 1 on, 0 off; auto on unless XIELU_LEARNABLE (the fused backward gives the coefficients
    no gradient) or on a GPU before Hopper (the kernel loads through TMA). The CPU runs the reference."""
    if h.fused_mlp != "auto":
        return h.fused_mlp == "1"
    return not h.xielu_learnable and (not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (9, 0))


class MLP(nn.Module):
    """up -> xIELU (per-layer frozen coefficients, or LeakyReLU(0.5)^2) -> down."""

    def __init__(self, h: Hyperparameters, i: int):
        super().__init__()
        hidden = h.mlp_mult * h.model_dim
        self.fc, self.proj = CastedLinear(h.model_dim, hidden, "mlp"), CastedLinear(hidden, h.model_dim, "mlp", "zeros")
        coeffs = torch.tensor(h.layer_xielu(i), dtype=torch.float32)
        if h.xielu_learnable:
            self.act_coeffs = with_role(nn.Parameter(coeffs), "scalar")
        else:
            self.register_buffer("act_coeffs", coeffs, persistent=False)  # rebuilt from config
        self.fused = fused_mlp_on(h)

    def forward(self, u, lora=None):
        if self.fused:
            x = u.reshape(-1, u.size(-1))
            if x.is_cuda or torch.is_autocast_enabled("cpu"):  # (CUDA always runs under bf16 autocast)
                x = x.to(torch.bfloat16)  # autocast's dtype for a linear: the op's inputs share one dtype
            y = xielu_mlp(x, self.fc.weight.to(x.dtype), self.proj.weight.to(x.dtype), self.act_coeffs)[0]
            y = y.view(*u.shape[:-1], -1)
        else:
            y = self.proj(xielu(self.fc(u), self.act_coeffs))
        return add_lora(y, u, lora)


class Block(nn.Module):
    """Sequential block: x_in = m0*x + m1*x0; x += a*Attn(norm(x_in)*s); x += m*MLP(norm(x)*s),
    with s = 1/sqrt(i+1) (LN scale, PR #315) on every loop pass."""

    parallel = False

    def __init__(self, h: Hyperparameters, i: int):
        super().__init__()
        d = h.model_dim
        self.attn, self.mlp = CausalSelfAttention(h, i), MLP(h, i)
        self.attn_scale = with_role(nn.Parameter(torch.ones(d)), "scalar")
        self.mlp_scale = with_role(nn.Parameter(torch.ones(d)), "scalar")
        self.resid_mix = with_role(nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)])), "scalar", "fp16")
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(i + 1)), persistent=False)

    def forward(self, x, x0, cu_seqlens, max_len, rope, window, lora=None):
        la, lm = (lora.attn, lora.mlp) if lora is not None else (None, None)
        # control vectors cast to the stream's dtype: an fp32 one would promote a bf16 stream
        mix, dt = self.resid_mix.to(x.dtype), x.dtype
        x_in = mix[0] * x + mix[1] * x0
        x = x_in + self.attn_scale.to(dt) * self.attn(rms_norm(x_in) * self.ln_scale, x_in, cu_seqlens, max_len, rope,
                                                      window, la)
        return x + self.mlp_scale.to(dt) * self.mlp(rms_norm(x) * self.ln_scale, lm)


class ParallelBlock(Block):
    """Two-lane parallel residual (PR #1529/#1530): attention reads lane0 (mixed with x0), the MLP
    reads lane1, both run on the same inputs and write to both lanes through learned weights."""

    parallel = True

    def __init__(self, h: Hyperparameters, i: int):
        super().__init__(h, i)
        self.resid_lambdas = with_role(nn.Parameter(torch.full((2,), 1.1)), "scalar")
        self.post_lambdas = with_role(nn.Parameter(torch.ones(2, 2)), "scalar", "fp16")

    def forward(self, lanes, x0, cu_seqlens, max_len, rope, window, lora=None):
        la, lm = (lora.attn, lora.mlp) if lora is not None else (None, None)
        lane0, lane1 = lanes
        mix, dt = self.resid_mix.to(lane0.dtype), lane0.dtype
        a_in = mix[0] * lane0 + mix[1] * x0
        a = self.attn_scale.to(dt) * self.attn(rms_norm(a_in) * self.ln_scale, a_in, cu_seqlens, max_len, rope, window, la)
        m = self.mlp_scale.to(dt) * self.mlp(rms_norm(lane1) * self.ln_scale, lm)
        r, p = self.resid_lambdas, self.post_lambdas
        return r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m


def merge_skip(x, skip, weight, gate):
    """U-Net skip: sigmoid(g)*x + (1-sigmoid(g))*w*skip, 0.5x + 0.5skip at init."""
    return torch.lerp(weight.to(x.dtype) * skip, x, torch.sigmoid(gate).to(x.dtype))


def parcae_inject(x, x0, log_a, delta, b):
    """Parcae constrained loop injection: x <- A*x + B*x0 with A = exp(-softplus(delta)*exp(log_a))
    in (0, 1), so the looped map stays contractive."""
    dt = F.softplus(delta)
    return torch.exp(-dt * torch.exp(log_a)).to(x.dtype) * x + (dt * b).to(x.dtype) * x0


def softcap_logits(z, cap):
    return cap * torch.tanh(z / cap)


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _softcap_ce_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, V, stride, cap, BLOCK: tl.constexpr):
        # One row per program, online logsumexp over BLOCK-wide slices of bf16 logits: the fp32
        # softcapped logits exist only in registers.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for off in range(0, V, BLOCK):
            idx = off + cols
            z = cap * _tanh(tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32) / cap)
            z = tl.where(idx < V, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(targets_ptr + row)
        zt = cap * _tanh(tl.load(base + tl.maximum(t, 0)).to(tl.float32) / cap)
        tl.store(loss_ptr + row, tl.where(t >= 0, lse - zt, 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _softcap_ce_bwd_kernel(logits_ptr, grad_ptr, targets_ptr, lse_ptr, gloss_ptr, V, stride, cap,
                               BLOCK: tl.constexpr):
        # d loss / d logit = g (softmax(z) - onehot) (1 - tanh^2), z = cap tanh(logit / cap)
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(targets_ptr + row)
        g = tl.where(t >= 0, tl.load(gloss_ptr + row), 0.0)
        lse = tl.load(lse_ptr + row)
        cols = tl.arange(0, BLOCK)
        for off in range(0, V, BLOCK):
            idx = off + cols
            th = _tanh(tl.load(logits_ptr + row * stride + idx, mask=idx < V, other=0.0).to(tl.float32) / cap)
            d = tl.exp(cap * th - lse) - (idx == t).to(tl.float32)
            tl.store(grad_ptr + row * stride + idx, (g * d * (1.0 - th * th)).to(grad_ptr.dtype.element_ty),
                     mask=idx < V)


@torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
def softcap_ce(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row softcapped CE of bf16 logits [N, V] (0 where the target is -1) and the row logsumexp."""
    logits = logits.contiguous()
    n, vocab = logits.shape
    loss, lse = logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)
    _softcap_ce_fwd_kernel[(n,)](logits, targets, loss, lse, vocab, logits.stride(0), cap,
                                 BLOCK=min(4096, triton.next_power_of_2(vocab)), num_warps=8)
    return loss, lse


@softcap_ce.register_fake
def _(logits, targets, cap):
    return tuple(logits.new_empty(logits.size(0), dtype=torch.float32) for _ in range(2))


@torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=())
def softcap_ce_backward(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        cap: float) -> torch.Tensor:
    grad = torch.empty_like(logits)
    _softcap_ce_bwd_kernel[(logits.size(0),)](logits, grad, targets, lse, grad_loss.contiguous(), logits.size(1),
                                              logits.stride(0), cap, BLOCK=min(4096, triton.next_power_of_2(
                                                  logits.size(1))), num_warps=8)
    return grad


@softcap_ce_backward.register_fake
def _(grad_loss, logits, targets, lse, cap):
    return torch.empty_like(logits)


def _softcap_ce_setup(ctx, inputs, output):
    logits, targets, ctx.cap = inputs
    ctx.save_for_backward(logits.contiguous(), targets, output[1])


def _softcap_ce_grad(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return softcap_ce_backward(grad_loss, logits, targets, lse, ctx.cap), None, None


softcap_ce.register_autograd(_softcap_ce_grad, setup_context=_softcap_ce_setup)


def softcap_cross_entropy(h, weight, targets, cap, reduction="mean"):
    """Tied-head logits, softcap, CE; targets of -1 (padding) are ignored. On CUDA in bf16 the
    fused kernels never hold fp32 logits for the whole batch; elsewhere the fp32 reference."""
    z = F.linear(h, weight.to(h.dtype))
    z, targets = z.view(-1, z.size(-1)), targets.reshape(-1)
    if z.is_cuda and z.dtype == torch.bfloat16 and triton is not None:
        losses = softcap_ce(z, targets, float(cap))[0]
    else:
        losses = F.cross_entropy(softcap_logits(z.float(), cap), targets, ignore_index=-1, reduction="none")
    return losses.sum() / (targets >= 0).sum().clamp_min(1) if reduction == "mean" else losses


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.h = h
        d = h.model_dim
        self.tok_emb = nn.Embedding(h.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        with_role(self.tok_emb.weight, "token", "embed")
        if h.smear_gate:
            self.smear_w = with_role(nn.Parameter(torch.zeros(1, h.gate_width)), "scalar", "gate")
            self.smear_lambda = with_role(nn.Parameter(torch.zeros(1)), "scalar")
        self.blocks = nn.ModuleList(
            (ParallelBlock if i >= h.parallel_start_layer else Block)(h, i) for i in range(h.num_layers))
        n_skip = max(min(len(e), len(dd)) for e, dd in (self.layer_plan(False), self.layer_plan(True)))
        self.skip_weights = with_role(nn.Parameter(torch.ones(n_skip, d)), "scalar", "fp16")
        self.skip_gates = with_role(nn.Parameter(torch.zeros(n_skip, d)), "scalar", "fp16")
        if h.num_loops > 0 and h.parcae:
            self.loop_log_a = with_role(nn.Parameter(torch.full((d,), -0.5)), "scalar")
            self.loop_delta = with_role(nn.Parameter(torch.ones(d)), "scalar")
            self.loop_b = with_role(nn.Parameter(torch.full((d,), 0.1)), "scalar")
        self.merge_skip, self.parcae_inject, self.loss_fn = merge_skip, parcae_inject, softcap_cross_entropy

    def layer_plan(self, looping):
        return self.h.layer_plan(looping)

    def rope(self, T, device):
        """rope_tables of a row, (local, global): local layers rotate every head dim, global ones
        GLOBAL_ROPE_DIMS."""
        D = self.h.model_dim // self.h.num_heads
        return tuple(rope_tables(T, D, dims, self.h.rope_base, device) for dims in (D, self.h.global_rope_dims))

    def unfuse_mlp(self):
        """The eval's MLPs, modules (FUSED_MLP is training's: with it TTT took 8.6 GiB more, unchecked under
        79 GiB); GPTQ's Hessian hooks read mlp.proj's input, which the fused op never passes. Returns self."""
        for block in self.blocks:
            block.mlp.fused = False
        return self

    def compile_regions(self):
        """Regional compilation: one graph per distinct block shape, shared by every layer and
        loop pass of that shape, instead of tracing the unrolled 17-pass model."""
        import torch._functorch.config  # not imported by `import torch` on 2.11

        torch._functorch.config.enable_autograd_cache = False  # segfaulted pickling entries (torch 2.11)
        torch._dynamo.config.cache_size_limit = 64
        torch._dynamo.config.accumulated_cache_size_limit = 512
        for block in self.blocks:
            block.compile(dynamic=False)
        self.merge_skip = torch.compile(merge_skip, dynamic=False)
        self.parcae_inject = torch.compile(parcae_inject, dynamic=False)
        self.loss_fn = torch.compile(softcap_cross_entropy, dynamic=False)

    def embed(self, ids, cu_seqlens):
        e = self.tok_emb(ids)
        if self.h.smear_gate:
            # SmearGate (PR #1667): e_t += lambda*sigmoid(w.e_t[:12])*e_{t-1}, off at every sequence
            # start of the packing. Every BOS starts one, so this contains the BOS fix (PR #1851), and
            # it also stops leaks between sliding windows or TTT rows packed side by side.
            gate = torch.sigmoid(F.linear(e[..., :self.h.gate_width], self.smear_w))
            prev = F.pad(e[:, :-1], (0, 0, 1, 0))
            # Sequence starts by index_fill, not a boolean mask, which would sync the host; one slot past
            # the end takes the starts of empty padding sequences (sgd_step_graphs).
            keep = torch.ones(ids.numel() + 1, device=ids.device, dtype=e.dtype).index_fill_(0, cu_seqlens[:-1].long(), 0)
            e = e + self.smear_lambda * gate * prev * keep[:-1].view(*ids.shape, 1)
        return e

    def hidden(self, ids, cu_seqlens, max_seqlen, lora=None, looping=True):
        """Final-normed hidden states [B, T, d]. lora, if given, maps a virtual layer slot to its
        (q, k, v, o, mlp) adapters; training, eval and TTT all run through here. looping=False
        (early training) skips the loop passes: a choice made here, outside the compiled blocks."""
        h = self.h
        # The packing changes every batch: its length is a dynamic dim and the longest sequence a
        # host tensor, so neither recompiles the block graphs.
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        max_len, rope = torch.tensor([max_seqlen], dtype=torch.int32), self.rope(ids.size(1), ids.device)

        def pack(block):  # a layer's data: its RoPE tables and window are inputs of its block's graph, not constants
            return cu_seqlens, max_len, rope[block.attn.is_global], window_arg(block.attn.window)

        x0 = rms_norm(self.embed(ids, cu_seqlens))
        if h.residual_bf16 and torch.is_autocast_enabled(ids.device.type):
            # RESIDUAL_BF16: the stream in the matmuls' dtype (fp32 control vectors cast to it in the blocks),
            # half the bytes of every elementwise kernel and gradient sum between the compiled blocks
            x0 = x0.to(torch.get_autocast_dtype(ids.device.type))
        if lora is not None and any(a is not None for slot in lora for a in slot):
            # TTT: the frozen embedding would give the first block an input without grad, and a
            # graph of its own (compiled graphs are specialized on requires_grad). With the head's
            # adapter alone (TTT_LORA_TARGETS=head) no backward needs to reach the blocks.
            x0.requires_grad_()
        x = x0.clone()  # distinct from x0, else the first block compiles its own aliased graph
        enc, dec = self.layer_plan(looping)
        skips, lanes, loop_entries = [], None, 0
        for slot, i in enumerate(enc + dec):
            adapters = lora[slot] if lora is not None else None
            if looping and i == h.loop_start:
                loop_entries += 1
                if loop_entries >= 2:
                    if loop_entries <= h.loop_trunc_bwd + 1:
                        x = x.detach()  # truncated backward through earlier passes (PR #1728)
                    if h.parcae:
                        x = self.parcae_inject(x, x0, self.loop_log_a, self.loop_delta, self.loop_b)
            block = self.blocks[i]
            if slot < len(enc):
                x = block(x, x0, *pack(block), adapters)
                skips.append(x)
                continue
            k = slot - len(enc)
            skip = skips.pop() if k < self.skip_weights.size(0) and skips else None
            if block.parallel:
                lane0, lane1 = lanes if lanes is not None else (x, x)
                if skip is not None:
                    lane0 = self.merge_skip(lane0, skip, self.skip_weights[k], self.skip_gates[k])
                lanes = block((lane0, lane1), x0, *pack(block), adapters)
            else:
                if skip is not None:
                    x = self.merge_skip(x, skip, self.skip_weights[k], self.skip_gates[k])
                x = block(x, x0, *pack(block), adapters)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x)

    def forward(self, ids, targets, cu_seqlens, max_seqlen, looping=True):
        """Mean training loss over the packed row."""
        return self.loss_fn(self.hidden(ids, cu_seqlens, max_seqlen, looping=looping), self.tok_emb.weight, targets,
                            self.h.logit_softcap)

    def head_logits(self, hid, head_lora=None):
        """Softcapped fp32 logits of the tied head (+ a TTT adapter) for hidden states [B, T, d]."""
        z = add_lora(F.linear(hid, self.tok_emb.weight.to(hid.dtype)), hid, head_lora)
        return softcap_logits(z.float(), self.h.logit_softcap)

    def token_losses(self, ids, targets, cu_seqlens, max_seqlen):
        """Per-token CE [B, T] in fp32 (0 where target is -1)."""
        hid = self.hidden(ids, cu_seqlens, max_seqlen)
        return self.loss_fn(hid, self.tok_emb.weight, targets, self.h.logit_softcap, "none").view(targets.shape)


# ---------------------------------------------------------------------------------------
# Optimizers: Muon (Polar-Express / Gram Newton-Schulz, MuonEq-R) for matrices, AdamW else
# ---------------------------------------------------------------------------------------

# Polar Express coefficients (PR #1344 -> #1787), one triple per iteration.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(g, steps):
    """Approximate the orthogonal polar factor of each matrix in g [n, r, c] (bf16 iteration)."""
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps]:
        m = x @ x.mT
        x = a * x + (b * m + c * (m @ m)) @ x
    return x.mT if tall else x


def gram_newton_schulz(g, steps):
    """Same iteration in Gram form for strongly rectangular matrices (PR #1728): every product
    is n x n with n = min(r, c); fp32, with a restart at step 2 to drop spurious negative
    eigenvalues."""
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    eye = torch.eye(x.size(-2), device=x.device, dtype=x.dtype).expand(x.size(0), -1, -1)
    r, q = x @ x.mT, eye
    for i, (a, b, c) in enumerate(POLAR_EXPRESS[:steps]):
        if i == 2:
            x = q @ x
            r, q = x @ x.mT, eye
        z = a * eye + b * r + c * (r @ r)
        q, r = q @ z, z @ r @ z
    x = (q @ x).bfloat16()
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan) with Nesterov momentum, MuonEq-R row normalisation (PR #1217),
    decoupled weight decay and update scale sqrt(max(1, rows/cols)). Same-shape matrices are
    stacked so the orthogonalisation runs batched; ranks split that work and all-gather."""

    def __init__(self, params, lr, momentum, weight_decay, backend_steps, gram_ratio, rank=0, world_size=1,
                 compile_ortho=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.gram_ratio = min(backend_steps, len(POLAR_EXPRESS)), gram_ratio
        self.rank, self.world_size = rank, world_size
        # Eager, each orthogonalisation is ~50 small kernels per shape; compiled, fewer fused ones
        # (Muon's step took 12.0 ms of GPU time against the leader's 8.0, whose iteration is compiled).
        # A second optimizer (training's, after the compile warm-up's) reuses the graphs dynamo cached.
        self.ortho = [torch.compile(f, dynamic=False, fullgraph=True) if compile_ortho else f
                      for f in (newton_schulz, gram_newton_schulz)]
        self.buckets = {}
        for p in self.param_groups[0]["params"]:
            self.buckets.setdefault(tuple(p.shape), []).append(p)

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for shape, params in self.buckets.items():
            grads = torch.stack([p.grad for p in params])
            state = self.state[params[0]]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(grads)
            buf = state["momentum"]
            buf.mul_(mu).add_(grads)
            u = grads.add(buf, alpha=mu)
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
            per_rank = -(-len(params) // self.world_size)
            mine = u[self.rank * per_rank:(self.rank + 1) * per_rank]
            if mine.size(0) < per_rank:
                mine = torch.cat([mine, mine.new_zeros(per_rank - mine.size(0), *shape)])
            rows, cols = shape
            ortho = self.ortho[max(rows, cols) >= self.gram_ratio * min(rows, cols)]
            out = ortho(mine, self.backend_steps)
            if self.world_size > 1:
                gathered = [torch.empty_like(out) for _ in range(self.world_size)]
                dist.all_gather(gathered, out.contiguous())
                out = torch.cat(gathered)
            out = out[:len(params)].to(params[0].dtype)
            torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, list(out.unbind()), alpha=-lr * math.sqrt(max(1.0, rows / cols)))


# Optimizer of each parameter role: matrices -> Muon, the tied embedding and every small
# control tensor -> AdamW, each with its own lr and weight decay.
OPTIMIZER_ROLES = {
    "matrix": ("muon", "matrix_lr", "muon_wd"),
    "token": ("adamw", "tied_embed_lr", "embed_wd"),
    "scalar": ("adamw", "scalar_lr", "adam_wd"),
}


def build_optimizers(model: nn.Module, h: Hyperparameters, rank, world_size):
    by_role = {role: [] for role in OPTIMIZER_ROLES}
    for name, p in model.named_parameters():
        role = getattr(p, "role", None)
        if role not in by_role:
            raise RuntimeError(f"parameter {name} has no optimizer role")
        by_role[role].append(p)
    on_cuda = next(model.parameters()).is_cuda
    muon = Muon(by_role["matrix"], h.matrix_lr, h.muon_momentum, h.muon_wd, h.muon_backend_steps,
                h.gram_ns_ratio, rank, world_size, compile_ortho=h.muon_compile and h.compile and on_cuda)
    adam_groups = [dict(params=by_role[r], lr=getattr(h, lr), base_lr=getattr(h, lr), weight_decay=getattr(h, wd))
                   for r, (kind, lr, wd) in OPTIMIZER_ROLES.items() if kind == "adamw" and by_role[r]]
    adamw = torch.optim.AdamW(adam_groups, betas=(h.beta1, h.beta2), eps=h.adam_eps,
                              fused=on_cuda)
    muon.param_groups[0]["base_lr"] = h.matrix_lr
    return [muon, adamw]


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def lr_multiplier(frac, h: Hyperparameters):
    """Constant, then a linear warmdown over the last WARMDOWN_FRAC of the budget to MIN_LR."""
    if h.warmdown_frac <= 0 or frac < 1.0 - h.warmdown_frac:
        return 1.0
    return max((1.0 - frac) / h.warmdown_frac, h.min_lr)


def all_reduce_grads(params, rt: Runtime):
    """Average gradients over ranks in one flat buffer."""
    if not rt.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]  # loop params have none before looping
    flat = torch.cat([g.reshape(-1) for g in grads])
    rt.all_reduce(flat)
    flat /= rt.world_size
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def optimizer_step(optimizers, params, rt: Runtime, clip_norm):
    """Average the gradients over ranks, clip their norm (0: no clipping), step every optimizer and
    drop the gradients: the step of training and of TTT's global SGD."""
    all_reduce_grads(params, rt)
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    for opt in optimizers:
        opt.step()
    for p in params:
        p.grad = None


def micro_step(model, h: Hyperparameters, x, y, cu, max_len, looping, cache=True):
    """One micro-batch's forward + backward, its loss scaled to its share of the step's mean; returns
    the loss. cache=False: no autocast cast cache (a captured step)."""
    with bf16_autocast(x.device, cache):
        loss = model(x, y, cu, max_len, looping)
    (loss / h.grad_accum_steps).backward()
    return loss.detach()


class MicroStepGraphs:
    """TRAIN_CUDA_GRAPH: a micro-batch's forward + backward replayed as a CUDA graph, one per loop phase
    and packing shape. At 32K-token micro-batches the host bounds the compiled step without the loop
    (~25 compiled calls each way per micro-batch); a replay launches them at once. Fixed addresses:
    cu_seqlens padded with empty sequences to a power of two (>= 64), the longest sequence rounded up to
    a power of two (attention's grid reads it at capture), gradients summed in place into buffers kept
    across steps (the sums of plain steps). One pool: graphs replay one at a time and each loss is read
    before the next. capture=False (CPU, SDPA): the same padded inputs and buffers through plain steps."""

    def __init__(self, model, h: Hyperparameters, capture):
        self.model, self.h, self.capture, self.graphs, self.used = model, h, capture, {}, {}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bufs = [None] * len(self.params)
        if capture:
            self.pool, self.side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()

    def fwd_bwd(self, x, y, cu, max_len, looping):
        return micro_step(self.model, self.h, x, y, cu, max_len, looping, cache=False)

    def point_grads(self, looping):
        """.grad = the kept buffer where this phase trains the parameter, None elsewhere (as in plain
        steps: loop parameters get no update before the loop is on)."""
        for i, (p, used) in enumerate(zip(self.params, self.used[looping])):
            if used and self.bufs[i] is None:
                self.bufs[i] = torch.zeros_like(p)
            p.grad = self.bufs[i] if used else None

    def add(self, key, static, looping):
        """A new shape: a plain step first (on a side stream before a capture; its gradients dropped)
        says which parameters this phase trains, then the capture."""
        saved = [p.grad for p in self.params]  # this step's sums so far
        for p in self.params:
            p.grad = None
        graph = loss = None
        if self.capture:
            self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side) if self.capture else contextlib.nullcontext():
            self.fwd_bwd(*static, looping)
        self.used.setdefault(looping, [p.grad is not None for p in self.params])
        if self.capture:
            torch.cuda.current_stream().wait_stream(self.side)
            self.point_grads(looping)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.side):  # the warm-up's stream: its cuBLAS workspace
                loss = self.fwd_bwd(*static, looping)
        self.graphs[key] = graph, static, loss
        for p, g in zip(self.params, saved):
            p.grad = g

    def summary(self):
        """How many shapes (captured graphs) each loop phase has so far: a shape first met in a timed
        step costs a plain step and a capture there."""
        n = [sum(k[0] == looping for k in self.graphs) for looping in (False, True)]
        return f"micro-step shapes {'captured' if self.capture else 'padded'}: {n[0]} unlooped, {n[1]} looped"

    def run(self, x, y, cu, max_len, looping, first):
        """One micro-batch (first: of a step, whose gradients start at zero); returns its loss, valid
        until the next call."""
        n_cu, m = max(64, 1 << (cu.numel() - 1).bit_length()), 1 << (max_len - 1).bit_length()
        key = looping, x.shape, n_cu, m
        if key not in self.graphs:
            self.add(key, (x.clone(), y.clone(), F.pad(cu, (0, n_cu - cu.numel()), value=x.numel()), m), looping)
        if first:
            self.point_grads(looping)
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        graph, (sx, sy, scu, _), loss = self.graphs[key]
        sx.copy_(x)
        sy.copy_(y)
        scu[:cu.numel()].copy_(cu)
        scu[cu.numel():].fill_(x.numel())
        if graph is None:
            return self.fwd_bwd(sx, sy, scu, m, looping)
        graph.replay()
        return loss


# TRAIN_CUDA_GRAPH=auto's largest micro-batch (2026-12-02, H200, in-process A/B): at 32K tokens graphs gave
# 1.12x tok/s without the loop and 1.02x looped; at 98K (an 8-GPU run's per GPU) 1.00x, and under a 79 GiB
# cap (an H100's) a new shape's warm-up beside the captured pool ran out of memory.
TRAIN_GRAPH_AUTO_TOKENS = 32768


def train_cuda_graph_on(h: Hyperparameters, rt: Runtime):
    """TRAIN_CUDA_GRAPH: 1 on, 0 off; auto on where graphs capture, on one GPU (not yet run on NCCL), with
    micro-batches of at most TRAIN_GRAPH_AUTO_TOKENS."""
    if h.train_cuda_graph != "auto":
        return h.train_cuda_graph == "1"
    return can_capture(rt) and rt.world_size == 1 and h.micro_tokens <= TRAIN_GRAPH_AUTO_TOKENS


def micro_step_graphs(model, h: Hyperparameters, rt: Runtime):
    """The model's MicroStepGraphs where train_cuda_graph_on (made once per model, so the compile warm-up's
    captures serve training; train_model drops them before GPTQ), else None."""
    if not train_cuda_graph_on(h, rt):
        return None
    if getattr(model, "step_graphs", None) is None:
        model.step_graphs = MicroStepGraphs(model, h, can_capture(rt))
        if not model.step_graphs.capture:
            rt.log("train_cuda_graph: no CUDA graphs here (CPU or SDPA): plain steps on the padded shapes")
    return model.step_graphs


class Trainer:
    """One optimizer step = MICRO_BATCHES micro-batches split over ranks; the gradient is
    averaged over all of them, so any world size computes the same step."""

    def __init__(self, model, h: Hyperparameters, rt: Runtime):
        self.model, self.h, self.rt = model, h, rt
        self.params = [p for p in model.parameters()]
        self.optimizers = build_optimizers(model, h, rt.rank, rt.world_size)
        self.graphs = micro_step_graphs(model, h, rt)

    def step(self, loader, step, frac, looping):
        h = self.h
        mult = lr_multiplier(frac, h)
        muon = self.optimizers[0]
        momentum_frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
        muon.param_groups[0]["momentum"] = (1 - momentum_frac) * h.muon_momentum_warmup_start + momentum_frac * h.muon_momentum
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
        loss_sum = torch.zeros((), device=self.rt.device)
        for m in range(h.grad_accum_steps):
            x, y, cu, max_len = loader.next_batch()
            if self.graphs is not None:
                loss_sum += self.graphs.run(x, y, cu, max_len, looping, m == 0)
            else:
                loss_sum += micro_step(self.model, h, x, y, cu, max_len, looping)
        optimizer_step(self.optimizers, self.params, self.rt, h.grad_clip_norm)
        return self.rt.all_reduce(loss_sum) / h.micro_batches


class EMA:
    """fp32 exponential moving average of the parameters, updated after every step. The decay
    ramps as min(decay, (1+t)/(10+t)): with 0.9965 from step 0, a 360-step run kept 28% of the
    random init in the average; from step ~2560 on the ramp no longer binds."""

    def __init__(self, model, decay):
        self.params = list(model.parameters())
        self.decay, self.updates = decay, 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def apply(self):
        torch._foreach_copy_(self.params, self.shadow)


def new_train_loader(h: Hyperparameters, rt: Runtime, train_files):
    return DocumentPackingLoader(train_files, h.micro_tokens, h.train_seq_len, rt.rank, rt.world_size, rt.device,
                                 h.vocab_size)


def compile_warmup(model, h: Hyperparameters, rt: Runtime, train_files):
    """WARMUP_STEPS real steps (looping off, then on) to compile every graph, then the initial
    weights are restored (optimizers are rebuilt by the caller). Returns the seconds it took."""
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    trainer, loader = Trainer(model, h, rt), new_train_loader(h, rt, train_files)
    loop_phases = [False, True] if h.num_loops > 0 else [False]
    loss = torch.zeros(())
    for i in range(h.warmup_steps):
        loss = trainer.step(loader, i, 0.0, loop_phases[i * len(loop_phases) // h.warmup_steps])
    rt.sync()
    seconds = time.perf_counter() - t0
    rt.log(f"compile_warmup: {h.warmup_steps} steps ({len(loop_phases)} loop phases) in {seconds:.1f}s, "
           f"last loss {float(loss):.4f}{', ' + trainer.graphs.summary() if trainer.graphs else ''}")
    model.load_state_dict(initial_state)
    return seconds


def training_budget(model, h: Hyperparameters, rt: Runtime, train_files):
    """Training seconds (0 = no cap): the cap less the final GPTQ's reserve, GPTQ_RESERVE_SECONDS or
    one Hessian + GPTQ pass timed on the initial weights (same shapes, same cost)."""
    reserve = h.gptq_reserve_seconds
    if reserve < 0:
        _, _, t_hess, t_quant = run_gptq(model, h, rt, train_files)
        reserve = rt.all_reduce(torch.tensor(t_hess + t_quant, device=rt.device), "max").item()
        rt.log(f"gptq:measured {reserve:.3f}s for Hessians + quantization; reserving it from the training budget")
    budget_s = h.max_wallclock_seconds - reserve if h.max_wallclock_seconds > 0 else 0.0
    if h.max_wallclock_seconds > 0 and budget_s <= 0:  # 0 would read as "no cap"
        raise ConfigError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds}: nothing left after the "
                          f"{reserve:.1f}s GPTQ reserve")
    rt.log(f"gptq:reserving {reserve:.3f}s, training budget {budget_s:.3f}s")
    return budget_s


H200_BF16_FLOPS = 790e12  # dense bf16 matmul rate measured on an H200 (8192^3 products): the MFU denominator


def attention_pairs(cu_seqlens: np.ndarray, window) -> int:
    """(query, key) pairs causal attention scores over packed sequences (window: earlier tokens seen)."""
    lengths = np.diff(cu_seqlens).astype(np.int64)
    if window is None:
        return int((lengths * (lengths + 1) // 2).sum())
    full = np.minimum(lengths, window + 1)
    return int((full * (full + 1) // 2 + (lengths - full) * (window + 1)).sum())


def flops_per_token(model, h: Hyperparameters, train_files, n_rows=8):
    """Model FLOPs per trained token, {looping: flops}, forward + backward = 3x forward: every
    matmul of every layer pass (loop passes included) and the tied head, plus attention's scores
    and values (4 d per (query, key) pair) over the packing of the first train rows."""
    stream = load_data_shard(train_files[0], mmap=True)[:n_rows * h.micro_tokens]  # 8 rows, not the shard
    rows = [packed_cu_seqlens(stream[i:i + h.micro_tokens], h.train_seq_len)
            for i in range(0, len(stream) - h.micro_tokens + 1, h.micro_tokens)]
    per_layer = [(sum(p.numel() for p in b.parameters() if getattr(p, "role", "") == "matrix"),
                  sum(attention_pairs(cu, b.attn.window) for cu in rows) / max(sum(int(cu[-1]) for cu in rows), 1))
                 for b in model.blocks]
    out = {}
    for looping in (False, True):
        passes = sum(h.layer_plan(looping), [])
        matmul = sum(per_layer[i][0] for i in passes) + h.vocab_size * h.model_dim
        out[looping] = 3 * (2 * matmul + 4 * h.model_dim * sum(per_layer[i][1] for i in passes))
    return out


def benchmark(model, h: Hyperparameters, rt: Runtime, train_files, compile_s):
    """BENCH_STEPS steady-state steps with looping off, then on (after the compile warm-up): speed,
    model FLOPs, MFU and memory; no GPTQ, no evaluation."""
    trainer, loader = Trainer(model, h, rt), new_train_loader(h, rt, train_files)
    flops = flops_per_token(model, h, train_files)
    for looping in [False, True] if h.num_loops > 0 else [False]:
        trainer.step(loader, 0, 0.0, looping)
        rt.sync()
        t0 = time.perf_counter()
        for i in range(h.bench_steps):
            trainer.step(loader, i, 0.0, looping)
        rt.sync()
        seconds = float(rt.all_reduce(torch.tensor(time.perf_counter() - t0, device=rt.device), "max"))
        tok_s = h.bench_steps * h.train_batch_tokens / seconds
        achieved = tok_s / rt.world_size * flops[looping]
        rt.log(f"bench: looping:{int(looping)} steps:{h.bench_steps} ms/step:{1000 * seconds / h.bench_steps:.2f} "
               f"tok/s:{tok_s:.0f} tok/s/gpu:{tok_s / rt.world_size:.0f} flops/token:{flops[looping]:.4g} "
               f"TFLOP/s/gpu:{achieved / 1e12:.1f} mfu:{100 * achieved / H200_BF16_FLOPS:.1f}%")
    cuda = rt.device.type == "cuda"  # reserved: with TRAIN_CUDA_GRAPH its pool too (82,544 MiB in all at 98K)
    peak, reserved = (torch.cuda.max_memory_allocated() // 2**20, torch.cuda.max_memory_reserved() // 2**20) if cuda else (0, 0)
    rt.log(f"bench: compile_warmup_s:{compile_s:.1f} peak_mem_mib:{peak} reserved_mib:{reserved} world_size:{rt.world_size} "
           f"micro_tokens:{h.micro_tokens} attention_backend:{rt.attn_backend}")


CHECKPOINT_MAGIC = b"PGCK"


def checkpoint_due(h: Hyperparameters, step, train_ms, saved_ms):
    """CHECKPOINT_EVERY: every N steps, or every N seconds of training time since the last one."""
    every = h.checkpoint_every
    if every.endswith("s"):
        return train_ms - saved_ms >= 1000 * int(every[:-1])
    return bool(every) and step % int(every) == 0


def save_checkpoint(h: Hyperparameters, rt: Runtime, step, train_ms, looping, model, trainer, loader, ema):
    """Rank 0 writes all the next step depends on to LOG_DIR/RUN_ID.ckpt: a temp file, then
    os.replace, so a crash mid-write leaves the previous checkpoint; a length + sha256 footer
    lets RESUME refuse a truncated or corrupt file. Gradients are all-reduced, so every rank
    holds these same states, and each rank's loader position follows from the shared stream's."""
    if not rt.master:
        return
    t0, path = time.perf_counter(), os.path.join(h.log_dir, f"{h.run_id}.ckpt")
    state = dict(step=step, train_ms=train_ms, looping=looping, stream_pos=loader.taken,
                 model=model.state_dict(), optimizers=[o.state_dict() for o in trainer.optimizers],
                 ema_shadow=ema.shadow, ema_updates=ema.updates, rng_cpu=torch.get_rng_state(),
                 rng_cuda=torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
                 hparams={f.name: getattr(h, f.name) for f in fields(h)})
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    with open(path + ".tmp", "wb") as f:
        f.write(payload)
        f.write(struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + CHECKPOINT_MAGIC)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    rt.log(f"checkpoint: step {step} train_time {train_ms:.0f}ms -> {path} ({len(payload) + 44} bytes, "
           f"{time.perf_counter() - t0:.1f}s)")


def load_checkpoint(path):
    """A checkpoint's contents, read whole and checked against its length + sha256 footer first:
    a truncated or corrupt file is refused before anything is loaded."""
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[-44:-36])[0] if len(blob) >= 44 and blob[-4:] == CHECKPOINT_MAGIC else -1
    if n != len(blob) - 44 or hashlib.sha256(blob[:n]).digest() != blob[-36:-4]:
        raise DataError(f"RESUME={path}: truncated or corrupt checkpoint ({len(blob)} bytes, its length + sha256 "
                        f"footer does not match); nothing was loaded")
    return torch.load(io.BytesIO(blob[:n]), map_location="cpu", weights_only=True)


def restore_checkpoint(ck, h: Hyperparameters, rt: Runtime, model, trainer, loader, ema):
    """Every rank takes the checkpoint's states; returns (step, train_ms, looping) to continue from."""
    model.load_state_dict(ck["model"])
    for opt, state in zip(trainer.optimizers, ck["optimizers"]):
        opt.load_state_dict(state)
    torch._foreach_copy_(ema.shadow, [t.to(rt.device) for t in ck["ema_shadow"]])
    ema.updates = ck["ema_updates"]
    loader.seek(ck["stream_pos"])
    torch.set_rng_state(ck["rng_cpu"])
    if ck["rng_cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(ck["rng_cuda"], rt.device)
    old = ck["hparams"]
    changed = [f"{k}={old[k]}->{getattr(h, k)}" for k in old if hasattr(h, k) and getattr(h, k) != old[k]
               and k not in ("run_id", "resume", "artifact_path")]
    rt.log(f"resume: {h.resume} (run {old['run_id']}) at step {ck['step']}, train_time {ck['train_ms']:.0f}ms; "
           f"settings changed since: {' '.join(changed) or 'none'}")
    return ck["step"], ck["train_ms"], ck["looping"]


def train_model(model, h: Hyperparameters, rt: Runtime, train_files, val: ValSet, budget_s, ckpt=None):
    """Train until ITERATIONS, or until the next step would overrun the wallclock budget
    (seconds, 0 = none), predicted from the last step's duration."""
    trainer, loader, ema = Trainer(model, h, rt), new_train_loader(h, rt, train_files), EMA(model, h.ema_decay)
    flops = flops_per_token(model, h, train_files)
    rt.log(f"flops_per_token: {flops[False]:.4g} ({flops[True]:.4g} looping); mfu against {H200_BF16_FLOPS / 1e12:.0f} "
           f"TFLOP/s per GPU")
    budget_ms = 1000.0 * budget_s
    train_ms, step, t_start, looping = 0.0, 0, time.perf_counter(), False
    if ckpt is not None:
        step, train_ms, looping = restore_checkpoint(ckpt, h, rt, model, trainer, loader, ema)
        t_start -= train_ms / 1000.0
    logged, saved_ms = (step, train_ms), train_ms  # (step, train_ms) of the last log line: MFU over the interval since
    while step < h.iterations:
        frac = step / h.iterations
        if budget_ms > 0:
            frac = max(frac, train_ms / budget_ms)
        if h.num_loops > 0 and not looping and frac >= h.enable_looping_at:
            looping = True
            enc, dec = model.layer_plan(True)
            rt.log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{enc} decoder:{dec}")
        loss = trainer.step(loader, step, frac, looping)
        ema.update()
        step += 1
        rt.sync()
        elapsed = torch.tensor(1000.0 * (time.perf_counter() - t_start), device=rt.device)
        previous_ms, train_ms = train_ms, float(rt.all_reduce(elapsed, "max"))  # ranks agree on the clock
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite train loss {loss_value} at step {step}; stopping")
        if step <= 5 or step % h.train_log_every == 0:
            tok_s = step * h.train_batch_tokens / (train_ms / 1000.0)
            recent = (step - logged[0]) * h.train_batch_tokens / max(train_ms - logged[1], 1e-6) * 1000.0
            mfu = recent / rt.world_size * flops[looping] / H200_BF16_FLOPS
            left_ms = budget_ms - train_ms if budget_ms > 0 else float("inf")
            eta_s = min(left_ms, (h.iterations - step) * train_ms / step) / 1000.0
            rt.log(f"{step}/{h.iterations} train_loss: {loss_value:.4f} train_time: {train_ms / 60000:.1f}m "
                   f"step_avg: {train_ms / step:.2f}ms tok/s: {tok_s:.0f} mfu: {100 * mfu:.1f}% eta: {eta_s:.0f}s")
            logged = (step, train_ms)
        if h.val_loss_every > 0 and step % h.val_loss_every == 0:
            t_val = time.perf_counter()
            vl, vb, _ = eval_val(model, h, rt, val)
            rt.log(f"{step}/{h.iterations} val_loss: {vl:.4f} val_bpb: {vb:.4f}")
            t_start += time.perf_counter() - t_val  # validation time is not training time
        stop = budget_ms > 0 and train_ms + (train_ms - previous_ms) > budget_ms
        if checkpoint_due(h, step, train_ms, saved_ms) or h.checkpoint_every and (stop or step == h.iterations):
            t_ck = time.perf_counter()
            save_checkpoint(h, rt, step, train_ms, looping, model, trainer, loader, ema)  # its time counts as training
            saved_ms = train_ms
            if stop or step == h.iterations:  # the last save comes after the last clock reading
                train_ms += float(rt.all_reduce(torch.tensor(1000.0 * (time.perf_counter() - t_ck), device=rt.device), "max"))
        if stop:
            rt.log(f"stopping_early: wallclock_cap train_time: {train_ms:.0f}ms step: {step}/{h.iterations}")
            break
    rt.log(f"training: {step} steps in {train_ms / 1000:.1f}s, step_avg: {train_ms / max(step, 1):.2f}ms, "
           f"tok/s: {step * h.train_batch_tokens / max(train_ms / 1000, 1e-9):.0f}")
    if rt.device.type == "cuda":
        rt.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
               f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    rt.log("ema:applying EMA weights")
    ema.apply()
    if getattr(model, "step_graphs", None):
        rt.log(f"train_cuda_graph: {model.step_graphs.summary()}")
    model.step_graphs = None  # TRAIN_CUDA_GRAPH's memory pool, freed before GPTQ and evaluation
    return step, train_ms


# ---------------------------------------------------------------------------------------
# Quantization and packing: Hessians on train data, GPTQ + SDClip, LQER, rANS + brotli container
# ---------------------------------------------------------------------------------------

SUBMISSION_CAP_BYTES = 16_000_000
ARTIFACT_MAGIC = b"PGQ2"
CODE_WRAPPER_MARKER = b"# pgolf self-extracting wrapper"


# Storage of each quantization tag: GPTQ at the config's (bits, clip sigmas), int8 per row, or fp16.
QUANT_PLANS = {
    "embed": ("gptq", "embed_bits", "embed_clip_sigmas"),
    "attn": ("gptq", "matrix_bits", "attn_clip_sigmas"),
    "mlp": ("gptq", "matrix_bits", "mlp_clip_sigmas"),
    "gate": ("int8row",),  # gate matrices are too small for GPTQ, too sensitive for int6
    "fp16": ("fp16",),
}


def quant_plans(model, h: Hyperparameters):
    """{name: ('gptq', bits, clip_sigmas), ('int8row',) or ('fp16',)} by parameter tag; vectors are
    fp16 untagged, an untagged matrix is an error (not fp16 unseen)."""
    plans = {}
    for name, p in model.named_parameters():
        tag = p.quant or ("fp16" if p.dim() < 2 else None)
        if not tag:
            raise RuntimeError(f"matrix {name} {tuple(p.shape)} has no quantization tag")
        kind, *keys = QUANT_PLANS[tag]
        plans[name] = kind, *(getattr(h, k) for k in keys)
    return plans


@torch.no_grad()
def collect_hessians(model, h: Hyperparameters, rt: Runtime, train_files):
    """H = sum X^T X / n over GPTQ_CALIBRATION_TOKENS train tokens (never validation data) for
    every GPTQ matrix, from the eager eval forward with looping on: each loop pass adds its
    inputs. q/k/v share the attention input; the tied embedding uses the final-norm output."""
    sums, counts, hooks = {}, {}, []

    def accumulate(key, x):
        x = x.detach().reshape(-1, x.size(-1)).float()
        with torch.autocast(x.device.type, enabled=False):  # the forward runs under bf16 autocast
            if key not in sums:
                sums[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
            sums[key].addmm_(x.t(), x)
        counts[key] = counts.get(key, 0) + x.size(0)

    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        hooks += [block.attn.register_forward_pre_hook(lambda m, a, k=p + "attn.in": accumulate(k, a[0])),
                  block.attn.proj.register_forward_pre_hook(lambda m, a, k=p + "attn.proj.weight": accumulate(k, a[0])),
                  block.mlp.register_forward_pre_hook(lambda m, a, k=p + "mlp.fc.weight": accumulate(k, a[0])),
                  block.mlp.proj.register_forward_pre_hook(lambda m, a, k=p + "mlp.proj.weight": accumulate(k, a[0]))]
    local = min(h.micro_tokens, h.gptq_calibration_tokens // rt.world_size)
    loader = DocumentPackingLoader(train_files, local, h.train_seq_len, rt.rank, rt.world_size, rt.device, h.vocab_size)
    autocast = bf16_autocast(rt.device)
    fused = [block.mlp.fused for block in model.blocks]  # the GPTQ reserve's pass meets training's MLPs
    model.unfuse_mlp()
    try:
        with torch.compiler.set_stance("force_eager"), autocast:
            for _ in range(max(1, h.gptq_calibration_tokens // (local * rt.world_size))):
                x, _, cu, max_len = loader.next_batch()
                accumulate("tok_emb.weight", model.hidden(x, cu, max_len))
    finally:
        for hook in hooks:
            hook.remove()
        for block, on in zip(model.blocks, fused):
            block.mlp.fused = on
    hessians = {}
    for key, s in sums.items():
        rt.all_reduce(s)
        if not torch.isfinite(s).all():
            raise FloatingPointError(f"GPTQ: non-finite Hessian for {key} (the model's activations overflowed)")
        n = torch.tensor(float(counts[key]), device=s.device)
        s /= rt.all_reduce(n)
        if key.endswith("attn.in"):
            for proj in ("c_q", "c_k", "c_v"):
                hessians[key.replace("attn.in", f"attn.{proj}.weight")] = s
        else:
            hessians[key] = s
    return hessians


def fp16_scale(s):
    """Scales as stored (fp16), floored after the cast: a floor below fp16's range rounds to 0,
    and an all-zero row (every zero-initialised projection) would then divide 0 by 0."""
    return s.half().clamp_min(torch.finfo(torch.float16).tiny)


def damped_cholesky(m, log, upper=False):
    """Batched Cholesky that adds 10x more diagonal damping (from 1e-6 of the mean diagonal) to
    the matrices that fail; one that still fails at ~1e3x falls back to its diagonal (GPTQ then
    reduces to rounding with error feedback), with a warning, instead of aborting the artifact."""
    jitter = 1e-6 * m.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1e-12)
    eye = torch.eye(m.size(-1), device=m.device, dtype=m.dtype)
    for _ in range(11):
        factor, info = torch.linalg.cholesky_ex(m, upper=upper)
        if not info.any():
            return factor
        bad = (info > 0).to(m.dtype)[:, None, None]
        m = m + bad * jitter[:, None, None] * eye
        jitter = jitter * 10
    log(f"warning: GPTQ Cholesky failed for {int(bad.sum())} matrices; using their diagonal")
    m = torch.where(bad > 0, torch.diag_embed(m.diagonal(dim1=-2, dim2=-1)), m)
    return torch.linalg.cholesky(m, upper=upper)


def gptq_quantize(w, hessian, bits, clip_sigmas, log, block_size=128, damp=0.01):
    """Full-Hessian GPTQ (PR #1019/#1060) with act-order and SDClip row scales (PR #1394):
    s_r = k*std(W_r)/(2^(bits-1)-1), no clip search. Batched over a leading dim: w [n, r, c],
    hessian [n, c, c] (inputs along c). Returns int8 codes [n, r, c] and fp16 scales [n, r]."""
    w, hessian = w.float().clone(), hessian.float().clone()
    n, r, c = w.shape
    top = 2 ** (bits - 1) - 1
    scale = fp16_scale(clip_sigmas * w.std(dim=-1) / top)
    s = scale.float()
    diag = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    perm = torch.argsort(diag, dim=-1, descending=True)  # act-order: most informative columns first
    w = torch.gather(w, 2, perm[:, None, :].expand(n, r, c))
    hessian = torch.gather(torch.gather(hessian, 1, perm[:, :, None].expand(n, c, c)), 2, perm[:, None, :].expand(n, c, c))
    u = damped_cholesky(torch.cholesky_inverse(damped_cholesky(hessian, log)), log, True)
    codes = torch.empty_like(w)
    for b0 in range(0, c, block_size):
        b1 = min(b0 + block_size, c)
        wb, err = w[:, :, b0:b1].clone(), torch.empty(n, r, b1 - b0, device=w.device)
        for j in range(b1 - b0):
            q = torch.clamp(torch.round(wb[:, :, j] / s), -top, top)
            codes[:, :, b0 + j] = q
            err[:, :, j] = (wb[:, :, j] - q * s) / u[:, b0 + j, b0 + j, None]
            wb[:, :, j:] -= err[:, :, j, None] * u[:, None, b0 + j, b0 + j:b1]
        w[:, :, b1:] -= err @ u[:, b0:b1, b1:]
    codes = torch.gather(codes, 2, torch.argsort(perm, dim=-1)[:, None, :].expand(n, r, c))
    return codes.to(torch.int8), scale


LQER_A_GRID = torch.linspace(0.3, 1.2, 31)  # candidate A scales, in units of max|A column|/1.5


def lqer_factors(err, hessian, rank, group):
    """LQER asymmetric (PR #1797 storage): E ~ (qA sA)(qB sB) with A 2-bit (one scale per column,
    best of a grid) and B int4 (one scale per `group` consecutive values), fitted in the layer's
    output metric tr((E - AB) H (E - AB)^T): B from the SVD of E L (H = L L^T, lightly damped),
    then A refitted by least squares in H for the quantized B. GPTQ leaves its error where H is
    small, so the SPEC's SVD of E alone spends the factors there: on synthetic GPTQ tensors it
    raised this error by ~20%, where this form lowers it by 9-18% (rank 4)."""
    h = hessian.double()
    eye = torch.eye(h.size(0), dtype=h.dtype, device=h.device)
    chol = torch.linalg.cholesky(h + 1e-4 * h.diagonal().mean().clamp_min(1e-12) * eye)
    _, _, vt = torch.linalg.svd(err.double() @ chol, full_matrices=False)
    b = torch.linalg.solve_triangular(chol.T, vt[:rank].T, upper=True).T  # V^T L^-1, scales as H^-1/2
    b = (b / b.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)).float()  # unit rows: fp16 scales in range
    groups = b.reshape(-1, group)
    b_scale = fp16_scale(groups.abs().amax(dim=1) / 7.5)
    qb = torch.clamp(torch.round(groups / b_scale.float()[:, None]), -8, 7).to(torch.int8).view_as(b)
    bq = lqer_b(qb, b_scale, group).double()
    a = (err.double() @ h @ bq.T @ torch.linalg.pinv(bq @ h @ bq.T, hermitian=True)).float()
    scales = fp16_scale(a.abs().amax(dim=0)[None] / 1.5 * LQER_A_GRID.to(a.device)[:, None]).float()  # (grid, rank)
    codes = torch.clamp(torch.round(a[None] / scales[:, None]), -2, 1)
    best = ((codes * scales[:, None] - a[None]) ** 2).sum(1).argmin(0)  # per column
    cols = torch.arange(rank, device=a.device)
    return codes[best, :, cols].T.to(torch.int8), scales[best, cols].half(), qb, b_scale


def lqer_b(qb, b_scale, group):
    return (qb.float().reshape(-1, group) * b_scale.float()[:, None]).view(qb.shape)


def lqer_product(qa, a_scale, qb, b_scale, group):
    return (qa.float() * a_scale.float()) @ lqer_b(qb, b_scale, group)


@contextlib.contextmanager
def exact_fp32():
    """True fp32 matmul precision for GPTQ: with TF32 on, X^T X is not positive definite enough
    for the Cholesky."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def run_gptq(model, h: Hyperparameters, rt: Runtime, train_files):
    """(Hessians, quantized contents, Hessian seconds, quantization seconds), in exact fp32."""
    with exact_fp32():
        t0 = time.perf_counter()
        hessians = collect_hessians(model, h, rt, train_files)
        rt.sync()
        t1 = time.perf_counter()
        qstate = quantize_state(model.state_dict(), quant_plans(model, h), hessians, h, rt.log)
        rt.sync()
    return hessians, qstate, t1 - t0, time.perf_counter() - t1


@dataclass
class QuantEntry:
    """An artifact tensor: fp16 values (kind fp16), or int8 codes (gptq at `bits`, int8row) with
    fp16 row scales and LQER factors (qA, sA, qB, sB) or ()."""
    kind: str
    data: torch.Tensor
    scale: torch.Tensor = None
    bits: int = 8
    lqer: tuple = ()

    def dequantize(self, group):
        w = self.data.float()
        if self.kind != "fp16":
            w = w.reshape(w.size(0), -1) * self.scale.float()[:, None]
            if self.lqer:
                w = w + lqer_product(*self.lqer, group).to(w.device)
        return w


def quantize_state(state, plans, hessians, h: Hyperparameters, log):
    """Quantized artifact contents {name: QuantEntry}; same-shape GPTQ tensors of one role are
    quantized in one batched call."""
    out, batches = {}, {}
    for name, t in state.items():
        plan = plans[name]
        if plan[0] == "gptq":
            batches.setdefault((name.split(".")[-2], tuple(t.shape), plan[1:]), []).append(name)
        elif plan[0] == "int8row":
            t2 = t.float().reshape(t.size(0), -1)
            scale = fp16_scale(t2.abs().amax(dim=1) / 127)
            codes = torch.clamp(torch.round(t2 / scale.float()[:, None]), -127, 127).to(torch.int8)
            out[name] = QuantEntry("int8row", codes.view(t.shape), scale)
        else:
            out[name] = QuantEntry("fp16", t.half())
    errors = {}
    for (role, shape, (bits, sigmas)), names in batches.items():
        w = torch.stack([state[nm].float() for nm in names])
        codes, scale = gptq_quantize(w, torch.stack([hessians[nm] for nm in names]), bits, sigmas, log,
                                     h.gptq_block_size, h.gptq_damp)
        for nm, q, s, wi in zip(names, codes, scale, w):
            out[nm] = QuantEntry("gptq", q, s, bits)
            errors[nm] = wi - out[nm].dequantize(h.lqer_group)
    if h.lqer_enabled:
        for nm, e in errors.items():
            e[:, hessians[nm].diagonal() == 0] = 0  # dead inputs: GPTQ zeroed W there, the output never sees it
        for nm in sorted(errors, key=lambda k: -errors[k].norm().item())[:h.lqer_top_k]:
            factors = lqer_factors(errors[nm], hessians[nm], h.lqer_rank, h.lqer_group)
            rest = errors[nm] - lqer_product(*factors, h.lqer_group)
            if output_error(rest, hessians[nm]) < output_error(errors[nm], hessians[nm]):
                out[nm].lqer = factors
    return out


def output_error(err, hessian):
    """tr(E H E^T): the squared output error of a linear layer's weight error on its inputs."""
    return torch.einsum("rc,cd,rd->", err.double(), hessian.double(), err.double()).item()


def dequantize_state(qstate, like, group):
    """Float state dict from the artifact contents, dtypes taken from `like`."""
    return {n: e.dequantize(group).view(like[n].shape).to(like[n].dtype) for n, e in qstate.items()}


def _shuffle_bytes(b: bytes, stride: int) -> bytes:
    """Group byte k of every stride-wide element together (better for brotli on fp16)."""
    return b"".join(b[i::stride] for i in range(stride))


def _unshuffle_bytes(b: bytes, stride: int) -> bytes:
    return np.frombuffer(b, np.uint8).reshape(stride, -1).T.tobytes()


# Static rANS for the large code arrays: brotli codes i.i.d. int6 symbols about 1% above their
# entropy, rANS with exact per-tensor frequencies about 0.1%.
RANS_PROB_BITS = 15  # frequencies of one table sum to 2**15
RANS_LANES = 2048  # interleaved states: each numpy step codes 2048 symbols; 8 KB of final states
RANS_MIN_VALUES = 16384  # smaller arrays go to brotli: their frequency table would cost more than it saves
RANS_LOW = 1 << 16  # states live in [2**16, 2**32) and move 16-bit words in and out
# (changing any of these changes the artifact format: change ARTIFACT_MAGIC with them)


def rans_frequencies(symbols: np.ndarray) -> np.ndarray:
    """Counts of the byte values in `symbols` scaled to sum to 2**RANS_PROB_BITS, every present
    value at least 1; the rounding remainder goes to the most frequent value."""
    counts = np.bincount(symbols, minlength=256).astype(np.int64)
    freqs = np.where(counts > 0, np.maximum(1, (counts << RANS_PROB_BITS) // max(counts.sum(), 1)), 0)
    freqs[np.argmax(counts)] += (1 << RANS_PROB_BITS) - freqs.sum()
    return freqs


def _rans_lookup(freqs: np.ndarray):
    """(frequency, cumulative frequency) keyed by table * 256 + symbol; one extra table gives
    symbol 0 all the probability, so padding symbols leave the states unchanged."""
    identity = np.zeros((1, 256), np.int64)
    identity[0, 0] = 1 << RANS_PROB_BITS
    freqs = np.concatenate([freqs.reshape(-1, 256).astype(np.int64), identity])
    return freqs.ravel().astype(np.uint64), (np.cumsum(freqs, axis=1) - freqs).ravel().astype(np.uint64)


def _rans_steps(table_ids: np.ndarray, n_tables: int) -> np.ndarray:
    """Table id of every symbol, padded to whole steps of RANS_LANES with the identity table."""
    steps = -(-len(table_ids) // RANS_LANES)
    ids = np.full(steps * RANS_LANES, n_tables, np.int64)
    ids[:len(table_ids)] = table_ids
    return ids.reshape(steps, RANS_LANES)


def rans_encode(symbols: np.ndarray, table_ids: np.ndarray, freqs: np.ndarray):
    """Symbol i (uint8) is coded by lane i % RANS_LANES with frequency table table_ids[i].
    Returns (final states <u4, words <u2); the decoder reads the words front to back."""
    f_of, c_of = _rans_lookup(freqs)
    keys = _rans_steps(table_ids, len(freqs)) * 256
    keys.reshape(-1)[:len(symbols)] += symbols
    x, chunks = np.full(RANS_LANES, RANS_LOW, np.uint64), []
    for key in keys[::-1]:  # last in, first out: encode backwards so decoding runs forwards
        f, c = f_of[key], c_of[key]
        full = x >= f << np.uint64(32 - RANS_PROB_BITS)
        chunks.append(x[full] & np.uint64(0xFFFF))
        x[full] >>= np.uint64(16)
        x = ((x // f) << np.uint64(RANS_PROB_BITS)) + x % f + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint64)
    return x.astype("<u4"), words.astype("<u2")


def rans_decode(states: np.ndarray, words: np.ndarray, table_ids: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Inverse of rans_encode. A stream that does not end in the initial states with every word
    read is corrupt."""
    f_of, c_of = _rans_lookup(freqs)
    slot_symbol = np.repeat(np.tile(np.arange(256, dtype=np.int64), len(freqs) + 1), f_of.astype(np.int64))
    steps = _rans_steps(table_ids, len(freqs))
    x, words, pos = states.astype(np.uint64), words.astype(np.uint64), 0
    out = np.empty(steps.shape, np.uint8)
    for t, ids in enumerate(steps):
        slot = x & np.uint64((1 << RANS_PROB_BITS) - 1)
        key = ids * 256 + slot_symbol[(ids << RANS_PROB_BITS) + slot.astype(np.int64)]
        x = f_of[key] * (x >> np.uint64(RANS_PROB_BITS)) + slot - c_of[key]
        low = x < np.uint64(RANS_LOW)
        n = int(np.count_nonzero(low))
        if pos + n > len(words):
            raise ValueError("corrupt rANS stream: it ends early")
        x[low] = (x[low] << np.uint64(16)) | words[pos:pos + n]
        pos += n
        out[t] = key & 255
    if pos != len(words) or (x != RANS_LOW).any():
        raise ValueError("corrupt rANS stream: it does not end where it began")
    return out.reshape(-1)[:len(table_ids)]


def pack_artifact(qstate) -> bytes:
    """Container: magic, stream count, stream lengths (u32), streams. Brotli streams: a JSON
    manifest, all fp16 data (byte-shuffled), the small code arrays, and the rANS frequency
    tables (per table: first symbol, count, frequencies; u16). Last, raw: the rANS states and
    words of every code array of >= RANS_MIN_VALUES values (symbol = code + 128), one table each.
    No pickled objects."""
    import brotli

    manifest, halves, small, large = [], [], [], []

    def add_half(t):
        halves.append(t.detach().cpu().contiguous().view(torch.int16).numpy().tobytes())
        return list(t.shape)

    def add_codes(t):
        codes = t.detach().cpu().contiguous().numpy().reshape(-1)
        (large if codes.size >= RANS_MIN_VALUES else small).append(codes)
        return list(t.shape)

    for name, e in qstate.items():
        if e.kind == "fp16":
            manifest.append(dict(name=name, kind="fp16", shape=add_half(e.data)))
            continue
        entry = dict(name=name, kind=e.kind, bits=e.bits, shape=add_codes(e.data), scale=add_half(e.scale))
        if e.lqer:
            qa, sa, qb, sb = e.lqer
            entry["lqer"] = [add_codes(qa), add_half(sa), add_codes(qb), add_half(sb)]
        manifest.append(entry)
    symbols = [(c.astype(np.int16) + 128).astype(np.uint8) for c in large]
    freqs = np.stack([rans_frequencies(s) for s in symbols]) if symbols else np.zeros((0, 256), np.int64)
    tables = []
    for f in freqs:
        present = np.flatnonzero(f)
        lo, hi = present[0], present[-1]
        tables += [lo, hi - lo + 1, *f[lo:hi + 1]]
    table_ids = np.repeat(np.arange(len(symbols)), [s.size for s in symbols])
    states, words = rans_encode(np.concatenate(symbols or [np.zeros(0, np.uint8)]), table_ids, freqs)
    streams = [brotli.compress(b, quality=11, lgwin=24) for b in (
        json.dumps(manifest, separators=(",", ":")).encode(), _shuffle_bytes(b"".join(halves), 2),
        b"".join(c.tobytes() for c in small), np.array(tables, "<u2").tobytes())]
    streams.append(states.tobytes() + words.tobytes() if symbols else b"")
    return ARTIFACT_MAGIC + struct.pack(f"<I{len(streams)}I", len(streams), *map(len, streams)) + b"".join(streams)


def unpack_artifact(blob: bytes):
    """Inverse of pack_artifact: the artifact contents on the CPU."""
    import brotli

    if blob[:4] != ARTIFACT_MAGIC:
        raise ValueError(f"not a quantized artifact (magic {blob[:4]!r}, expected {ARTIFACT_MAGIC!r})")
    count = struct.unpack_from("<I", blob, 4)[0] if len(blob) >= 28 else 0
    lengths = struct.unpack_from("<5I", blob, 8) if count == 5 else ()
    if not lengths or sum(lengths) + 28 != len(blob):
        raise ValueError(f"damaged artifact: {len(blob)} bytes do not match its header")
    pos, streams = 28, []
    for n in lengths:
        streams.append(blob[pos:pos + n])
        pos += n
    manifest, halves, small, tables = (brotli.decompress(s) for s in streams[:4])
    manifest = json.loads(manifest)
    halves = np.frombuffer(_unshuffle_bytes(halves, 2), dtype=np.float16)
    small, tables = np.frombuffer(small, dtype=np.int8), np.frombuffer(tables, dtype="<u2").astype(np.int64)
    sizes = [math.prod(s) for m in manifest if m["kind"] != "fp16" for s in [m["shape"], *m.get("lqer", [])[::2]]]
    large = [n for n in sizes if n >= RANS_MIN_VALUES]  # in pack_artifact's order
    freqs, t = np.zeros((len(large), 256), np.int64), 0
    for f in freqs:
        lo, n = tables[t:t + 2]
        f[lo:lo + n], t = tables[t + 2:t + 2 + n], t + 2 + n
    if t != len(tables) or (freqs.sum(1) != 1 << RANS_PROB_BITS).any() or (len(streams[4]) > 0) != bool(large):
        raise ValueError("damaged artifact: the rANS tables or stream do not match the manifest")
    large_codes = iter(())
    if large:
        states = np.frombuffer(streams[4][:4 * RANS_LANES], dtype="<u4")
        words = np.frombuffer(streams[4][4 * RANS_LANES:], dtype="<u2")
        symbols = rans_decode(states, words, np.repeat(np.arange(len(large)), large), freqs)
        large_codes = iter(np.split((symbols.astype(np.int16) - 128).astype(np.int8), np.cumsum(large)[:-1]))
    half_pos = small_pos = 0

    def take_half(shape):
        nonlocal half_pos
        n = math.prod(shape)
        t = torch.from_numpy(halves[half_pos:half_pos + n].copy()).view(shape)
        half_pos += n
        return t

    def take_codes(shape):
        nonlocal small_pos
        n = math.prod(shape)
        if n >= RANS_MIN_VALUES:
            return torch.from_numpy(next(large_codes).copy()).view(shape)
        small_pos += n
        return torch.from_numpy(small[small_pos - n:small_pos].copy()).view(shape)

    qstate = {}
    for m in manifest:
        if m["kind"] == "fp16":
            qstate[m["name"]] = QuantEntry("fp16", take_half(m["shape"]))
            continue
        qa, sa, qb, sb = m.get("lqer") or [None] * 4
        qstate[m["name"]] = QuantEntry(m["kind"], take_codes(m["shape"]), take_half(m["scale"]), m["bits"],
                                       (take_codes(qa), take_half(sa), take_codes(qb), take_half(sb)) if qa else ())
    if half_pos != len(halves) or small_pos != len(small):
        raise ValueError("damaged artifact: the fp16 or small-code streams do not match the manifest")
    return qstate


def build_code_wrapper(source: bytes) -> bytes:
    """Self-extracting form of the script (LZMA + base85 in a short stub), the way records count
    code bytes. The stub writes the source to a temp file before running it, because Triton
    reads kernel source from the file."""
    payload = base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)).decode()
    return (CODE_WRAPPER_MARKER + b"\nimport base64,lzma,os,runpy,sys,tempfile\n"
            b"p=os.path.join(tempfile.mkdtemp(),'train_gpt.py')\n"
            b"open(p,'wb').write(lzma.decompress(base64.b85decode('" + payload.encode() + b"')))\n"
            b"sys.argv[0]=p;runpy.run_path(p,run_name='__main__')\n")


def counted_code_bytes(path) -> tuple[int, int]:
    """(raw bytes of the running file, bytes the submission counts): a wrapper counts as is,
    plain source as the wrapper built from it."""
    with open(path, "rb") as f:
        raw = f.read()
    return len(raw), len(raw) if raw.startswith(CODE_WRAPPER_MARKER) else len(build_code_wrapper(raw))


class ArtifactTooLarge(RuntimeError):
    pass


def quantize_model(model, h: Hyperparameters, rt: Runtime, train_files, train_ms):
    """Hessians + GPTQ on the EMA weights; their time counts against the training cap."""
    rt.log(f"gptq:calibration {h.gptq_calibration_tokens} tokens from {len(train_files)} train shards "
           f"({os.path.join(h.data_path, 'fineweb_train_*.bin')}), then quantizing")
    hessians, qstate, t_hess, t_quant = run_gptq(model, h, rt, train_files)
    rt.log(f"GPTQ:collected {len(hessians)} Hessians in {t_hess:.1f}s, quantized in {t_quant:.1f}s; "
           f"training + GPTQ = {train_ms / 1000 + t_hess + t_quant:.3f}s (cap {h.max_wallclock_seconds:.0f}s)")
    kinds = {}
    for name, e in qstate.items():
        key = e.kind + (str(e.bits) if e.kind == "gptq" else "") + ("+lqer" if e.lqer else "")
        kinds.setdefault(key, []).append(name)
    rt.log("Quantized weights:")
    for key, names in sorted(kinds.items()):
        rt.log(f"  {key}: {len(names)} tensors, {sum(qstate[n].data.numel() for n in names)} values")
    return qstate


def check_writable(path):
    """ARTIFACT_PATH must be writable before training: failing after training and GPTQ loses the model."""
    existed = os.path.exists(path)
    try:
        open(path, "ab").close()
    except OSError as e:
        raise ConfigError(f"ARTIFACT_PATH={path!r}: cannot be written ({e.strerror})") from None
    if not existed:
        os.remove(path)


def write_artifact(qstate, h: Hyperparameters, rt: Runtime):
    """Rank 0 packs and writes the artifact, logs exact sizes and enforces the 16 MB cap. If
    ARTIFACT_PATH cannot be written after all, the artifact goes beside the log (or to the temp
    directory) and the log says where: the trained model is never lost."""
    if rt.master:
        t0 = time.perf_counter()
        blob = pack_artifact(qstate)
        for path in dict.fromkeys((h.artifact_path, os.path.join(h.log_dir, f"{h.run_id}.pgq"),
                                   os.path.join(tempfile.gettempdir(), f"{h.run_id}.pgq"))):
            try:
                with open(path, "wb") as f:
                    f.write(blob)
                break
            except OSError as e:
                rt.log(f"error: cannot write the artifact to {path}: {e}")
        if path != h.artifact_path:
            rt.log(f"artifact: saved to {path} instead of ARTIFACT_PATH={h.artifact_path}")
            h.artifact_path = path  # the eval below reads it there
        model_bytes = os.path.getsize(h.artifact_path)
        raw_code, code = counted_code_bytes(os.path.abspath(sys.argv[0]))
        total = model_bytes + code
        rt.log(f"Serialized model quantized+brotli: {model_bytes} bytes ({h.artifact_path}, "
               f"compressed in {time.perf_counter() - t0:.1f}s)")
        rt.log(f"Code size (uncompressed): {raw_code} bytes")
        rt.log(f"Code size (compressed): {code} bytes")
        rt.log(f"Total submission size quantized+brotli: {total} bytes")
        over = total > SUBMISSION_CAP_BYTES
        if over:
            rt.log(f"!!! OVER THE CAP: {total} bytes > {SUBMISSION_CAP_BYTES} by {total - SUBMISSION_CAP_BYTES} bytes !!!")
    else:
        over = False
    if rt.distributed:  # every rank reads the artifact from where rank 0 put it
        where = [h.artifact_path]
        dist.broadcast_object_list(where, src=0)
        h.artifact_path = where[0]
    if rt.any_rank(over) and not h.allow_over_cap:
        raise ArtifactTooLarge(f"submission exceeds {SUBMISSION_CAP_BYTES} bytes (set ALLOW_OVER_CAP=1 for research runs)")


def load_artifact_model(h: Hyperparameters, rt: Runtime):
    """A fresh model built from the artifact file alone: unpack, dequantize, load strictly."""
    if rt.distributed:
        dist.barrier()
    t = [time.perf_counter()]
    with open(h.artifact_path, "rb") as f:
        qstate = unpack_artifact(f.read())
    t.append(time.perf_counter())
    # Built where it runs: its random init is overwritten (on the device's host its CPU QRs took ~13 s),
    # and draws nothing from the device's RNG, which TTT's LoRA draws then find as before.
    with rt.device, torch.random.fork_rng([rt.device]) if rt.device.type == "cuda" else contextlib.nullcontext():
        model = GPT(h)
    model.unfuse_mlp()
    t.append(time.perf_counter())
    model.load_state_dict(dequantize_state(qstate, model.state_dict(), h.lqer_group), strict=True)
    model = rt.place(model)
    rt.sync()
    t.append(time.perf_counter())
    rt.log(f"artifact:loaded {h.artifact_path} into a fresh model in {t[-1] - t[0]:.1f}s (read and unpack "
           f"{t[1] - t[0]:.1f}s, build {t[2] - t[1]:.1f}s, dequantize and place {t[3] - t[2]:.1f}s)")
    return model


# ---------------------------------------------------------------------------------------
# Evaluation: document-aware windows (plain and sliding) and phased TTT
# ---------------------------------------------------------------------------------------


PROGRESS_EVERY_S = 30.0


class Progress:
    """`progress:` lines (rank 0, console and log) through a long silent stage: done/total, elapsed
    and an ETA at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, rt: Runtime, label, total):
        self.rt, self.label, self.total = rt, label, total
        self.t0 = self.last = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S and 0 < done < self.total:
            self.last = now
            self.rt.log(f"progress: {self.label} {done}/{self.total} ({100 * done / self.total:.0f}%) "
                        f"elapsed:{now - self.t0:.0f}s eta:{(now - self.t0) * (self.total - done) / done:.0f}s")


def document_spans(tokens: np.ndarray):
    """(start, n_targets) per document: inputs tokens[s:s+n], targets tokens[s+1:s+n+1]. A
    document's last target is the next document's BOS (0 bytes; its loss counts, as in LEAD)."""
    starts = np.union1d([0], np.flatnonzero(tokens == BOS_ID))
    ends = np.append(starts[1:], len(tokens) - 1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends) if e > s]


def scoring_windows(spans, seq_len, stride):
    """(input start, length, first scored offset) windows in which every target is scored
    exactly once with up to seq_len tokens of context from its own document; after the first
    window of a long document, each window scores only its last `stride` targets."""
    windows = []
    for s, n in spans:
        windows.append((s, min(n, seq_len), 0))
        end = seq_len
        while end < n:
            new_end = min(end + stride, n)
            windows.append((s + new_end - seq_len, seq_len, seq_len - (new_end - end)))
            end = new_end
    return windows


def window_tokens(n, seq_len, stride):
    """Input tokens in the scoring windows of a document of n targets (scoring_windows): the work
    of scoring it, n with disjoint windows, up to ~n*seq_len/stride with sliding ones."""
    return min(n, seq_len) + seq_len * max(0, -(-(n - seq_len) // stride))


def pack_rows(windows, row_tokens):
    """Greedy packing of whole windows into rows of row_tokens (a fixed shape for the graphs)."""
    rows, cur, used = [], [], 0
    for w in windows:
        if used + w[1] > row_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur.append(w)
        used += w[1]
    return rows + [cur] if cur else rows


def build_row(val: ValSet, row, row_tokens):
    """Inputs, targets (-1 = not scored here), their bytes and cu_seqlens for one packed row of
    windows; the unused tail is padding, cut like the longest window so that no packed sequence
    is longer than the sequence-length bound FA3 is given."""
    x = np.zeros(row_tokens, dtype=np.int64)
    y = np.full(row_tokens, -1, dtype=np.int64)
    b = np.zeros(row_tokens, dtype=np.int64)
    starts, pos = [], 0
    for ws, n, first in row:
        x[pos:pos + n] = val.tokens[ws:ws + n]
        y[pos + first:pos + n] = val.tokens[ws + first + 1:ws + n + 1]
        b[pos + first:pos + n] = val.target_bytes[ws + first + 1:ws + n + 1]
        starts.append(pos)
        pos += n
    starts.extend(range(pos, row_tokens, max(n for _, n, _ in row)))
    return x, y, b, np.array(starts + [row_tokens], dtype=np.int32)


class TTTChunk(NamedTuple):
    rows: np.ndarray  # [R] documents (batch indices)
    x: np.ndarray  # [R, T] each one's last <= TTT_EVAL_SEQ_LEN tokens up to the chunk's end
    pos: np.ndarray  # [R, K] where the chunk's K targets (ttt_chunk_span) are predicted in the row
    targets: np.ndarray  # [R, K]
    valid: np.ndarray  # [R, K] 1 = scored
    weight: np.ndarray  # [R, K] the training loss: the chunk's mean, for documents with a later chunk
    nbytes: np.ndarray  # [R, K]


def ttt_chunk_bounds(C, W, C2, tail):
    """(m, k, f, C3): a document's first m chunks hold C targets each while the window still grows;
    past the first window every chunk re-reads a whole one (W row tokens per chunk), so the next k
    are C2 (TTT_LONG_CHUNK_SIZE) long, up to target f; from there on C3. tail = (TTT_MAX_DOC_TOKENS,
    TTT_TAIL_CHUNK_SIZE): f is the first C2 boundary at or past TTT_MAX_DOC_TOKENS, where only longer
    documents reach (C3 = 0: none do, k and f are infinite)."""
    m = -(-W // C)
    t0, C3 = tail
    k = max(0, -(-(t0 - m * C) // C2)) if C3 else math.inf
    return m, k, m * C + k * C2, C3


def ttt_chunk_span(ci, C, W, C2, tail=(0, 0)):
    """(start, end): chunk ci holds a document's targets start+1 .. end (ttt_chunk_bounds)."""
    m, k, f, C3 = ttt_chunk_bounds(C, W, C2, tail)
    if ci < m:
        return ci * C, (ci + 1) * C
    if ci < m + k:
        return m * C + (ci - m) * C2, m * C + (ci - m + 1) * C2
    return f + (ci - m - k) * C3, f + (ci - m - k + 1) * C3


def ttt_n_chunks(n, C, W, C2, tail=(0, 0)):
    m, k, f, C3 = ttt_chunk_bounds(C, W, C2, tail)
    if n <= m * C:
        return -(-n // C)
    return m + -(-(n - m * C) // C2) if n <= f else m + k + -(-(n - f) // C3)


def ttt_chunk(val: ValSet, batch, ci, C, W, C2, tail=(0, 0)) -> TTTChunk:
    """Chunk ci (ttt_chunk_span) of the documents of a TTT batch that have one, on the host. A
    lone document's row gets an unscored, untrained copy: a batch of 1 would specialize the
    compiled graphs (0/1 specialization) and recompile them."""
    c0, c1 = ttt_chunk_span(ci, C, W, C2, tail)
    active = [b for b, (_, n) in enumerate(batch) if c0 < n]
    rows = active * 2 if len(active) == 1 else active
    ends = [min(c1, batch[b][1]) for b in rows]
    T = tiles(max(min(e, W) for e in ends))
    x, pos, targets, nbytes = (np.zeros((len(rows), n), dtype=np.int64) for n in (T, c1 - c0, c1 - c0, c1 - c0))
    valid, weight = (np.zeros((len(rows), c1 - c0), dtype=np.float32) for _ in range(2))
    for r, (b, e) in enumerate(zip(rows, ends)):
        (s, n), w0, k = batch[b], max(0, e - W), e - c0
        x[r, :e - w0], pos[r, :k] = val.tokens[s + w0:s + e], np.arange(c0 - w0, e - w0)
        if r < len(active):
            targets[r, :k], nbytes[r, :k] = val.tokens[s + c0 + 1:s + e + 1], val.target_bytes[s + c0 + 1:s + e + 1]
            valid[r, :k], weight[r, :k] = 1.0, 1.0 / k if e < n else 0.0
    return TTTChunk(np.array(rows, dtype=np.int64), x, pos, targets, valid, weight, nbytes)


@torch.no_grad()
def eval_windows(model, h: Hyperparameters, rt: Runtime, val: ValSet, windows, split_ranks=True):
    """Sum of (loss nats, scored targets, bytes) over the windows; rows are split over ranks
    unless this rank owns the windows. Not reduced over ranks."""
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    rows = pack_rows(windows, h.val_batch_tokens)
    autocast = bf16_autocast(rt.device)
    mine = rows[rt.rank::rt.world_size] if split_ranks else rows
    progress = Progress(rt, "eval rows", len(mine))
    for i, row in enumerate(mine):
        progress.update(i)
        x, y, b, cu = build_row(val, row, h.val_batch_tokens)
        max_len = int(np.diff(cu).max())
        x, y, b, cu = (to_device(a, rt.device) for a in (x, y, b, cu))
        with autocast:
            losses = model.token_losses(x.view(1, -1), y.view(1, -1), cu, max_len).view(-1)
        valid = y >= 0
        sums += torch.stack([losses[valid].double().sum(), valid.sum().double(), b.sum().double()])
    return sums


def summarize(sums, rt: Runtime):
    """(val_loss nats/token, val_bpb, scored targets) from summed (loss, targets, bytes)."""
    loss, count, nbytes = rt.all_reduce(sums.clone()).tolist()
    return loss / count, loss / (math.log(2) * nbytes), int(count)


@contextlib.contextmanager
def capped_attention(model, h: Hyperparameters):
    """SLIDING_MODE=attention: no layer's query sees more than EVAL_SEQ_LEN-1 earlier tokens (the
    global layers' too), and FA3 is given each row's longest sequence, up to VAL_BATCH_TOKENS (a
    static bound that long would launch its tiles for every short document). Eager: a compile for
    these row lengths inside the eval timer costs more than it saves (and under FA3 the compiled
    graphs hold the uncapped windows and a static bound)."""
    attns = [b.attn for b in model.blocks]
    saved = [(a.window, a.fa3_max_seqlen) for a in attns]
    for a in attns:
        a.window = min(a.window if a.window is not None else h.eval_seq_len, h.eval_seq_len - 1)
        a.fa3_max_seqlen = None
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for a, (window, bound) in zip(attns, saved):
            a.window, a.fa3_max_seqlen = window, bound


def sliding_shape(h: Hyperparameters):
    """(length, stride) of the sliding eval's windows. windows: EVAL_SEQ_LEN long, EVAL_STRIDE apart
    (each target has EVAL_SEQ_LEN-EVAL_STRIDE to EVAL_SEQ_LEN-1 earlier tokens). attention: every
    document whole, or in VAL_BATCH_TOKENS pieces overlapping by EVAL_SEQ_LEN; with capped_attention
    each target sees up to EVAL_SEQ_LEN-1 earlier tokens (stride 1) for one forward over the document."""
    if h.sliding_mode == "attention":
        return h.val_batch_tokens, h.val_batch_tokens - h.eval_seq_len
    return h.eval_seq_len, h.eval_stride


def sliding_work(spans, h: Hyperparameters):
    """Predicted cost of the sliding eval of spans in window tokens of the compiled eval graphs;
    SLIDING_MODE=attention's eager forward is counted 3x (measured 2.2x on a FineWeb-shaped rank)."""
    return (3 if h.sliding_mode == "attention" else 1) * sum(window_tokens(n, *sliding_shape(h)) for _, n in spans)


def eval_spans(model, h: Hyperparameters, rt: Runtime, val: ValSet, spans, sliding, split_ranks=True):
    """eval_windows over the documents spans: disjoint EVAL_SEQ_LEN windows, or sliding ones (SLIDING_MODE)."""
    if not sliding:
        return eval_windows(model, h, rt, val, scoring_windows(spans, h.eval_seq_len, h.eval_seq_len), split_ranks)
    with capped_attention(model, h) if h.sliding_mode == "attention" else contextlib.nullcontext():
        return eval_windows(model, h, rt, val, scoring_windows(spans, *sliding_shape(h)), split_ranks)


def eval_val(model, h: Hyperparameters, rt: Runtime, val: ValSet, sliding=False):
    """Score every val target once in windows that never cross a BOS (eval_spans). Returns
    (val_loss, val_bpb, targets)."""
    return summarize(eval_spans(model, h, rt, val, document_spans(val.tokens), sliding), rt)


class LoRABank(nn.Module):
    """Per-document LoRA adapters, by name: q, k, v, o and mlp of every virtual layer slot
    ("{slot}_{name}") plus the tied head ("head", PR #1530), those of TTT_LORA_TARGETS, stacked
    over the documents of a TTT batch. Every adapter reads a model_dim input (the block's normed
    input, or the final hidden state). Output scale alpha/rank."""

    def __init__(self, n_docs, n_slots, h: Hyperparameters, device=None):
        super().__init__()
        d, r = h.model_dim, h.ttt_lora_rank
        kv = h.num_kv_heads * (d // h.num_heads)
        targets = h.ttt_lora_targets.split(",")
        outs = {f"{s}_{name}": n for s in range(n_slots) for name, n in zip(Adapters._fields, (d, kv, kv, d, d))
                if name in targets}
        if "head" in targets:
            outs["head"] = h.vocab_size
        self.n_docs, self.n_slots, self.scale = n_docs, n_slots, h.ttt_lora_alpha / r
        # Built where it runs: ~470M values, 2.5 s to draw on the CPU and copy over.
        self.a = nn.ParameterDict({k: nn.Parameter(torch.empty(n_docs, r, d, device=device)) for k in outs})
        self.b = nn.ParameterDict({k: nn.Parameter(torch.zeros(n_docs, n, r, device=device)) for k, n in outs.items()})
        self.reset(warm_a=False)

    @torch.no_grad()
    def reset(self, warm_a):
        """B = 0 (no change to the model); A re-drawn unless warm-started (PR #1767)."""
        for a, b in zip(self.a.values(), self.b.values()):
            b.zero_()
            if not warm_a:
                a.uniform_(-a.size(-1) ** -0.5, a.size(-1) ** -0.5)

    def adapter(self, key, idx):
        if key not in self.a:
            return None  # not a TTT_LORA_TARGETS projection: add_lora leaves it as it is
        a, b = self.a[key], self.b[key]
        # All documents: a view, not a gather (whose backward is a zero fill and a scatter per adapter);
        # a plain tensor like the gather's, so the compiled graphs see the same input type.
        return (a.view(a.shape), b * self.scale) if idx is None else (a[idx], b[idx] * self.scale)

    def select(self, idx):
        """(per-slot Adapters, head adapter) of the documents idx (None: all, in order)."""
        slots = [Adapters(*(self.adapter(f"{s}_{name}", idx) for name in Adapters._fields)) for s in range(self.n_slots)]
        return slots, self.adapter("head", idx)


def ttt_optimizer(bank, h: Hyperparameters, rt: Runtime):
    """AdamW over a LoRA bank: phased TTT's, its warm-up's (same settings) and the profiler's."""
    fused = rt.device.type == "cuda"
    return torch.optim.AdamW(bank.parameters(), lr=h.ttt_lora_lr, betas=(0.0, h.ttt_beta2), eps=1e-10,
                             weight_decay=h.ttt_weight_decay, fused=fused,
                             capturable=fused and h.ttt_cuda_graph and can_capture(rt))


@torch.no_grad()
def ttt_reset(bank, opt, warm_a):
    """A new batch on the same bank: adapters reset (LoRABank.reset) and the optimizer's state zeroed
    in place, which is a fresh optimizer's first step; tensors keep their addresses (StepGraphs)."""
    bank.reset(warm_a)
    for state in opt.state.values():
        for t in state.values():
            t.zero_()


def ttt_row_bucket(T, W):
    """TTT_CUDA_GRAPH's row lengths: 64, 128, 192, 256, 384, 512, 768, ... (<= 1.5x the length),
    at most W rounded up to whole 64-token tiles: few shapes, so few graphs."""
    b = 1 << max(6, (T - 1).bit_length())
    return min(3 * b // 4 if b >= 256 and 3 * b // 4 >= T else b, tiles(W))


def pad_chunk(chunk: TTTChunk, n_rows, T) -> TTTChunk:
    """The chunk with n_rows rows of T tokens: rows padded at the end (causal: no real token sees
    them), extra rows copy the first document's index with nothing scored or trained."""
    extra = n_rows - len(chunk.rows)
    rows, x = np.r_[chunk.rows, np.full(extra, chunk.rows[0])], np.pad(chunk.x, ((0, extra), (0, T - chunk.x.shape[1])))
    return TTTChunk(rows, x, *(np.pad(a, ((0, extra), (0, 0))) for a in chunk[2:]))


def ttt_step(model, bank, opt, inputs, view, train, sums):
    """One TTT chunk step on the device: score the chunk (into sums) with the documents' adapters
    (view: the whole bank in order), then, if train, one AdamW step on its training loss."""
    rows, x, pos, targets, valid, weight, nbytes = inputs
    n, T = x.shape
    cu = torch.arange(n + 1, device=x.device, dtype=torch.int32) * T
    lora, head = bank.select(None if view else rows)
    with bf16_autocast(x.device, cache=False):  # the step may be captured (StepGraphs)
        hid = model.hidden(x, cu, T, lora)[torch.arange(n, device=x.device)[:, None], pos]
        logits = model.head_logits(hid, head)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    with torch.no_grad():
        sums += torch.stack([(ce.double() * valid).sum(), valid.sum().double(), nbytes.sum().double()])
    if train:
        (ce * weight).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def can_capture(rt: Runtime):
    """CUDA graphs need CUDA and an attention backend that never reads cu_seqlens on the host (SDPA does)."""
    return rt.device.type == "cuda" and ATTENTION_BACKEND in ("varlen", "fa3")


def ttt_step_graphs(h: Hyperparameters, rt: Runtime):
    """A new bank's StepGraphs (TTT_CUDA_GRAPH=1 where it can capture), or None: plain steps."""
    return StepGraphs(capture=True) if h.ttt_cuda_graph and can_capture(rt) else None


class StepGraphs:
    """TTT_CUDA_GRAPH=1: chunk steps of one bank replayed as CUDA graphs, one per (view, train,
    shapes) of the padded chunk (pad_chunk; ttt_row_bucket), captured when a shape comes the
    second time (the first runs plain: a shape seen once costs no capture). A chunk step of short
    documents is bound by the host (~2,200 launches for ~40 ms of kernels); replayed, it is not.
    One memory pool: no graph's output outlives its replay (scores add into sums in place,
    gradients are freed inside, optimizer state was made by a plain step). capture=False (CPU, the
    SDPA backend, which reads cu_seqlens on the host): plain steps on the same padded shapes."""

    # Larger steps (64 rows past 512 tokens) are bound by the GPU, not the host, and their graphs' pool
    # (45 GB at 64 x 2048) beside the plain steps' memory overflowed an H100's 80 GB: they run plain.
    max_tokens = 32768

    def __init__(self, capture):
        self.capture, self.graphs, self.seen, self.warm = capture, {}, Counter(), False
        if capture:
            self.pool, self.side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()

    def on_side(self, fn):
        # Capture is on a side stream, warmed by the bank's first (plain) step there: cuBLAS keeps a
        # workspace per handle and stream (the autograd thread's too), better made outside a capture.
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            fn()
        torch.cuda.current_stream().wait_stream(self.side)

    def run(self, key, chunk: TTTChunk, step, device):
        if key in self.graphs:
            graph, static = self.graphs[key]
            for t, a in zip(static, chunk):
                t.copy_(torch.from_numpy(a).pin_memory(), non_blocking=True)
            graph.replay()
            return
        inputs = tuple(to_device(a, device) for a in chunk)
        self.seen[key] += 1
        if not self.capture or chunk.x.size > self.max_tokens or self.seen[key] == 1 and self.warm:
            step(inputs)
        elif self.seen[key] == 1:
            self.warm = True
            self.on_side(lambda: step(inputs))
        else:
            graph = torch.cuda.CUDAGraph()

            def capture():
                graph.capture_begin(pool=self.pool)
                try:
                    step(inputs)
                finally:
                    graph.capture_end()
            self.on_side(capture)
            self.graphs[key] = graph, inputs
            graph.replay()


def ttt_batch(model, batch, val: ValSet, bank, opt, h: Hyperparameters, sums, graphs=None):
    """Score-first LoRA TTT over one batch of documents, chunk by chunk: chunk ci of every
    document is scored with adapters trained on that document's chunks < ci only, then (if not
    its last chunk) the adapters take one step on it. No host sync: whether a step follows is
    known on the host. graphs (StepGraphs): the steps on padded shapes, replayed."""
    device, chunking = sums.device, h.ttt_chunking
    for ci in range(max(ttt_n_chunks(n, *chunking) for _, n in batch)):
        chunk = ttt_chunk(val, batch, ci, *chunking)
        view = np.array_equal(chunk.rows, np.arange(bank.n_docs))
        train = bool(chunk.weight.any())

        def step(inputs):
            ttt_step(model, bank, opt, inputs, view, train, sums)
        if graphs is None:
            step(tuple(to_device(a, device) for a in chunk))
            continue
        n, T = chunk.x.shape
        chunk = pad_chunk(chunk, n if view else max(n, min(bank.n_docs, 1 << (n - 1).bit_length())),
                          ttt_row_bucket(T, h.ttt_eval_seq_len))
        graphs.run((chunk.x.shape, chunk.pos.shape, view, train, sums.data_ptr()), chunk, step, device)


def sgd_step_graphs(model, params, h: Hyperparameters):
    """GLOBAL_TTT_CUDA_GRAPH=1: global SGD's forward + backward as one CUDA graph per packing size.
    Its steps (4,096 tokens a rank on 8 GPUs) are bound by the host: ~62 ms each for ~5-10 ms of
    kernels. Fixed addresses: cu_seqlens padded with empty sequences to a power of two (>= 64),
    attention's longest sequence bounded by GLOBAL_TTT_SEQ_LEN, gradients in kept buffers (None
    for parameters the forward does not reach, as without graphs). Returns run(x, y, cu)."""
    graphs, bufs, pool = {}, [torch.zeros_like(p) for p in params], torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()  # capture wants a warm-up on a side stream (one: one cuBLAS workspace)

    def fwd_bwd(x, y, cu):
        # No autocast cast cache (captured); backward outside autocast, as unrolled.
        with bf16_autocast(x.device, cache=False):
            loss = model(x, y, cu, h.global_ttt_seq_len)
        loss.backward()

    def point_grads(used):
        for p, b, u in zip(params, bufs, used):
            p.grad = b if u else None

    def run(x, y, cu):
        n = max(64, 1 << (cu.numel() - 1).bit_length())
        if n not in graphs:
            static = x.clone(), y.clone(), F.pad(cu, (0, n - cu.numel()), value=x.numel())
            for p in params:
                p.grad = None
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fwd_bwd(*static)  # its gradients are dropped
            torch.cuda.current_stream().wait_stream(side)
            used = [p.grad is not None for p in params]
            point_grads(used)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                fwd_bwd(*static)
            graphs[n] = graph, static, used
        graph, (sx, sy, scu), used = graphs[n]
        point_grads(used)
        torch._foreach_zero_([b for b, u in zip(bufs, used) if u])
        sx.copy_(x)
        sy.copy_(y)
        scu[:cu.numel()].copy_(cu)
        scu[cu.numel():].fill_(x.numel())
        graph.replay()

    return run


def global_sgd(model, stream: np.ndarray, h: Hyperparameters, rt: Runtime):
    """Phase step of phased TTT (PR #1610/#1626): SGD on all base weights over already-scored
    documents, GLOBAL_TTT_CHUNK_TOKENS per step split over ranks, cosine LR per chunk,
    sequences cut at every BOS; the final partial chunk is dropped."""
    chunk = h.global_ttt_chunk_tokens
    per_rank, n = chunk // rt.world_size, (len(stream) - 1) // chunk
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=h.global_ttt_lr, momentum=h.global_ttt_momentum)
    autocast = bf16_autocast(rt.device)
    graphed = sgd_step_graphs(model, params, h) if h.global_ttt_cuda_graph and can_capture(rt) else None
    # GLOBAL_TTT_COMPILE=0: no compile of SGD's own graphs (~80 s on the H200); replayed, no host cost either.
    with contextlib.nullcontext() if h.global_ttt_compile else torch.compiler.set_stance("force_eager"):
        for _ in range(h.global_ttt_epochs):
            for ci in range(n):
                for g in opt.param_groups:
                    g["lr"] = h.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(n - 1, 1)))
                piece = stream[ci * chunk + rt.rank * per_rank:ci * chunk + (rt.rank + 1) * per_rank + 1]
                x, y, cu, max_len = packed_batch(piece.astype(np.int64), h.global_ttt_seq_len, rt.device)
                if graphed:
                    graphed(x, y, cu)
                else:
                    with autocast:
                        loss = model(x, y, cu, max_len)
                    loss.backward()
                optimizer_step([opt], params, rt, h.global_ttt_grad_clip)
    for p in params:
        p.requires_grad_(False)


@dataclass
class TTTPlan:
    """Phased TTT's schedule (ttt_plan)."""

    docs: list  # the adapted documents (up to TTT_MAX_DOC_TOKENS targets, or all with a tail), longest first
    batches: list  # docs in slices of TTT_BATCH_SIZE (up to x TTT_BATCH_GROW for short ones), in processing order
    mine: list  # per batch: this rank runs it (ttt_batch_ranks)
    leftover: list  # this rank's share of the longer documents (none with a tail), scored by windows at the end
    boundaries: list  # global SGD phase k trains on docs[:boundaries[k]] (cut), once those are scored
    work: list  # per batch: its row tokens (ttt_batch_work), the cost model of phased_ttt and ttt_batch_ranks


def ttt_batch_work(batch, C, W, C2, tail=(0, 0)):
    """Row tokens of a TTT batch (longest first): chunk ci runs its documents' rows (at least 2) at
    the longest's length, whole 64-token tiles up to W (ttt_chunk)."""
    ns = np.array([n for _, n in batch])
    spans = np.array([ttt_chunk_span(ci, C, W, C2, tail) for ci in range(ttt_n_chunks(ns[0], C, W, C2, tail))])
    rows = np.maximum(2, (ns[None, :] > spans[:, :1]).sum(1))
    return int((rows * tiles(np.minimum(spans[:, 1], min(ns[0], W)))).sum())


def ttt_batch_ranks(costs, world_size):
    """Each TTT batch's rank, in order: the one with the least predicted cost so far. Batches come
    longest first, so the slowest rank ends near the mean; dealt round-robin, rank 0 got the longest
    batch of every round (FineWeb's 8 ranks: 15% over the mean, 2026-12-01d rank_balance_model)."""
    load, ranks = [0] * world_size, []
    for c in costs:
        ranks.append(load.index(min(load)))
        load[ranks[-1]] += c
    return ranks


def ttt_plan(spans, h: Hyperparameters, rank, world_size) -> TTTPlan:
    adapted = lambda sp: h.ttt_tail_chunk_size > 0 or sp[1] <= h.ttt_max_doc_tokens  # noqa: E731
    docs = sorted((sp for sp in spans if adapted(sp)), key=lambda sp: (-sp[1], sp[0]))
    # A chunk step of short documents is bound by the host, not the GPU: batch k <= TTT_BATCH_GROW
    # times as many while documents x row length stay within TTT_BATCH_SIZE x TTT_EVAL_SEQ_LEN (the
    # longest rows' memory). A document's updates do not depend on the others in its batch, but a
    # new batch size means a new bank: no warm-started A there.
    batches, i = [], 0
    while i < len(docs):
        row = tiles(min(docs[i][1], h.ttt_eval_seq_len))
        n = h.ttt_batch_size * max(1, min(h.ttt_batch_grow, h.ttt_eval_seq_len // row))
        batches.append(docs[i:i + n])
        i += n
    prefix = min(h.phased_ttt_prefix_docs, len(docs))
    # Distinct, non-empty prefixes: with fewer documents than phases some would repeat or be 0.
    boundaries = sorted({prefix * k // h.phased_ttt_num_phases for k in range(1, h.phased_ttt_num_phases + 1)} - {0})
    work = [ttt_batch_work(b, *h.ttt_chunking) for b in batches]
    # A chunk step's host time is about W row tokens' GPU time (H200, fitted in 2026-12-01d).
    steps = [max(ttt_n_chunks(n, *h.ttt_chunking) for _, n in b) for b in batches]
    ranks = ttt_batch_ranks([w + h.ttt_eval_seq_len * k for w, k in zip(work, steps)], world_size)
    return TTTPlan(docs, batches, [r == rank for r in ranks],
                   [sp for sp in spans if not adapted(sp)][rank::world_size], boundaries, work)


def phased_ttt(model, h: Hyperparameters, rt: Runtime, val: ValSet, deadline, token_s=0.0, stats=None):
    """Phased TTT (LEAD, SPEC 5.3) run by ttt_plan: documents up to TTT_MAX_DOC_TOKENS targets (all
    of them with TTT_TAIL_CHUNK_SIZE > 0), longest first, in batches dealt to ranks by work, get
    per-document LoRA TTT; after the first b_k documents are scored (b_k = PREFIX*k/PHASES) the base
    model takes a global SGD pass over exactly those (each one's first GLOBAL_TTT_DOC_TOKENS). Longer
    documents with TTT_TAIL_CHUNK_SIZE=0, and every batch not started in time, are scored by windows
    on the adapted base model at the end: every target is still scored exactly once. A batch or phase
    starts only if it and then disjoint windows (the cheapest legal scoring) over this rank's unscored
    documents are predicted to end by the deadline, at token_s seconds per window token (measured by
    the disjoint eval, whose graphs score them); the leftovers get sliding windows if those are
    predicted to fit. stats, if given, gets the documents scored by TTT and by windows (all ranks) and
    the windows' seconds."""
    model.requires_grad_(False)
    spans = document_spans(val.tokens)
    plan = ttt_plan(spans, h, rt.rank, rt.world_size)
    docs, batches, leftover, boundaries = plan.docs, plan.batches, list(plan.leftover), plan.boundaries
    rt.log(f"ttt_phased: total_docs:{len(spans)} ttt_docs:{len(docs)} long_docs_sliding:{len(spans) - len(docs)} "
           f"prefix_docs:{min(h.phased_ttt_prefix_docs, len(docs))} num_phases:{h.phased_ttt_num_phases} "
           f"boundaries:{boundaries}")
    # Targets of this rank's later batches after batch bi, and of its documents left to the windows.
    mine = [sum(n for _, n in b) if m else 0 for b, m in zip(batches, plan.mine)]
    after, left = np.cumsum([0] + mine[:0:-1])[::-1], sum(n for _, n in leftover)
    # First estimates (forward + backward ~ 3 forwards), then the measured durations.
    batch_s = 3 * token_s * sum(window_tokens(n, h.ttt_eval_seq_len, h.ttt_long_chunk) for _, n in batches[0]) \
        if batches else 0.0
    # TTT's own first predictions (a batch, a global SGD phase) run at ttt_token_s, the eval rate
    # rescaled once by the first batch; the windows that may follow are the eval's, at token_s.
    sgd_token_s, calibrated, prev_work, ttt_token_s = None, False, 0, token_s
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    bank, phase, done, t0, stopped, n_ttt, fresh_a = None, 0, 0, time.perf_counter(), False, 0, False
    if (h.ttt_cuda_graph or h.global_ttt_cuda_graph) and not can_capture(rt):
        rt.log(f"ttt: no CUDA graphs on {rt.device.type} with {ATTENTION_BACKEND} attention (TTT_CUDA_GRAPH, "
               "GLOBAL_TTT_CUDA_GRAPH): plain steps")
    n_slots = len(sum(model.layer_plan(True), []))
    progress = Progress(rt, "ttt batches", len(batches))
    for bi, batch in enumerate(batches):
        progress.update(bi)
        if plan.mine[bi]:
            t1 = time.perf_counter()
            # Longest first, the next batch costs at most the last, unless it has more row tokens
            # (TTT_BATCH_GROW: twice the documents at about the same length).
            work = plan.work[bi]
            cost = batch_s * max(1.0, work / prev_work) if prev_work else batch_s
            if stopped or t1 + cost + token_s * (after[bi] + left) > deadline:
                stopped = True
                leftover += batch
                left += mine[bi]
            else:
                if bank is None or bank.n_docs != len(batch):
                    bank = opt = graphs = None  # the old bank, its optimizer state and graphs go first
                    bank = LoRABank(len(batch), n_slots, h, rt.device)
                    opt = ttt_optimizer(bank, h, rt)
                    graphs = ttt_step_graphs(h, rt)
                else:
                    ttt_reset(bank, opt, h.ttt_warm_start_a and not fresh_a)
                fresh_a = False
                ttt_batch(model, batch, val, bank, opt, h, sums, graphs)
                n_ttt += len(batch)
                rt.sync()  # the batch's device time: ttt_batch itself never waits for the device
                elapsed = time.perf_counter() - t1
                if not calibrated and batch_s > 0:
                    # token_s came from the eval graphs, and TTT (forward + backward with adapters, or
                    # eager with TTT_COMPILE=0) runs others: rescale it once by the first batch's
                    # measured/predicted time (the proxy, eager: 2-3x).
                    ttt_token_s *= max(1.0, elapsed / batch_s)
                calibrated, batch_s, prev_work = True, elapsed, work
        done += len(batch)
        if bi % 10 == 0 or bi == len(batches) - 1:
            rt.log(f"ttp: b{bi + 1}/{len(batches)} docs:{done} dl:{batch[-1][1]}-{batch[0][1]} t:{time.perf_counter() - t0:.1f}s")
        while phase < len(boundaries) and done >= boundaries[phase]:
            # The prefix is the longest documents: on FineWeb half of it lies past 4,096 tokens. A cut one's
            # last token is trained to predict the next BOS: one false end per long document and phase.
            cut = h.global_ttt_doc_tokens
            stream = np.concatenate([val.tokens[s:s + min(n, cut or n)] for s, n in docs[:boundaries[phase]]])
            t1 = time.perf_counter()
            # A stopped batch left documents of this prefix unscored: SGD on them would see them first.
            sgd_s = (sgd_token_s or 3 * ttt_token_s / rt.world_size) * len(stream)  # the stream is split over ranks
            if not rt.any_rank(stopped or t1 + sgd_s + token_s * (after[bi] + left) > deadline):
                global_sgd(model, stream, h, rt)
                sgd_token_s = (time.perf_counter() - t1) / len(stream)
                fresh_a = True  # fresh adapters on the adapted base: A re-drawn, as in a new bank
                rt.log(f"ttpp: phase:{phase + 1}/{len(boundaries)} pd:{done} gd:{boundaries[phase]} "
                       f"sgd:{time.perf_counter() - t1:.1f}s t:{time.perf_counter() - t0:.1f}s")
            else:
                rt.log(f"ttpp: phase:{phase + 1}/{len(boundaries)} skipped: eval budget spent")
            phase += 1
    leftover.sort()
    t1 = time.perf_counter()
    # The eval graphs guard requires_grad (also under no_grad): as in the diagnostics, whose graphs
    # the pre-quantization diagnostic compiled before the eval timer started, so none compiles here.
    model.requires_grad_(True)
    sliding = t1 + token_s * sliding_work(leftover, h) <= deadline
    # TTT_COMPILE=0 made TTT eager (ttt_compile_mode's force_eager), not these: they run the eval graphs
    with torch.compiler.set_stance("default") if rt.compile and not h.ttt_compile else contextlib.nullcontext():
        sums += eval_spans(model, h, rt, val, leftover, sliding, split_ranks=False)
    how = f"sliding windows ({h.sliding_mode})" if sliding else "disjoint windows"
    rt.log(f"ttt_leftover: {len(leftover)} documents scored by {how} (too long, or past the deadline: "
           f"{'yes' if stopped else 'no'})")
    if stats is not None:
        rt.sync()
        leftover_s = time.perf_counter() - t1  # this rank's, before waiting for the others in all_reduce
        n_docs = rt.all_reduce(torch.tensor([n_ttt, len(leftover)], device=rt.device))
        stats.update(zip(("ttt_docs", "fallback_docs"), n_docs.tolist()), leftover_s=leftover_s)
    return summarize(sums, rt)


# TTT's shapes change every chunk (documents x window) and the block graphs are compiled
# dynamic=False. Static buckets would compile every block graph once per bucket; instead, while
# TTT runs, the tensors entering a compiled region have dynamic sizes (model_dim and global SGD's
# one row stay specialized), so one graph per block serves every chunk. They are named by Dynamo
# source (the regions' argument names; exact names, as torch 2.10 reads them): maybe_mark_dynamic
# on TTT's inputs would not reach the blocks, whose inputs come from eager code or other graphs.
TTT_DYNAMIC_SOURCES = ",".join(["L['x']", "L['x0']", "L['skip']", "L['lanes'][0]", "L['lanes'][1]"] +
                               [f"L['rope'][{i}]" for i in range(2)] +
                               [f"L['lora'].{name}[{i}]" for name in Adapters._fields for i in (0, 1)])


@contextlib.contextmanager
def ttt_compile_mode(h: Hyperparameters, rt: Runtime):
    """Phased TTT through the compiled graphs with those dims dynamic, or eager (TTT_COMPILE=0).
    TTT_AUTOTUNE=0: inductor compiles each pointwise kernel once instead of once per candidate
    configuration; TTT's graphs compile cold inside the eval timer."""
    if not rt.compile:
        yield
    elif not h.ttt_compile:
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        import torch._inductor.config as inductor_config

        with torch.compiler.config.patch(dynamic_sources=TTT_DYNAMIC_SOURCES), \
                inductor_config.patch({"triton.autotune_pointwise": h.ttt_autotune}):
            yield


def ttt_warmup(model, h: Hyperparameters, rt: Runtime):
    """Compile phased TTT's graphs on random tokens (never val data), so that no TTT batch pays
    for a compile and the first one calibrates the cost predictions: a full TTT batch of two-chunk
    documents (the kernels are tuned on its sizes; a step) with a throwaway bank and optimizer, and
    (GLOBAL_TTT_COMPILE=1) a global SGD step whose update is undone bit for bit. The RNG (LoRA
    draws) is restored too: the run after it is the run without it."""
    C, n = h.ttt_chunk_size, h.ttt_batch_size
    tokens = np.random.default_rng(0).integers(0, h.vocab_size, max(n * (2 * C + 1), h.global_ttt_chunk_tokens) + 1)
    noise = ValSet(tokens, np.zeros(len(tokens), dtype=np.int64))
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        bank = LoRABank(n, len(sum(model.layer_plan(True), [])), h, rt.device)
    opt = ttt_optimizer(bank, h, rt)
    batch = [(i * (2 * C + 1), 2 * C) for i in range(n)]
    ttt_batch(model, batch, noise, bank, opt, h, torch.zeros(3, dtype=torch.float64, device=rt.device))
    del bank, opt
    if h.global_ttt_compile and h.phased_ttt_prefix_docs * h.phased_ttt_num_phases > 0:  # eager: nothing to compile
        saved = [p.detach().clone() for p in model.parameters()]
        global_sgd(model, tokens[:h.global_ttt_chunk_tokens + 1], h, rt)
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
    rt.sync()


def timed_eval(label, fn, rt: Runtime):
    """Run an eval returning (val_loss, val_bpb, scored targets) and log it in the records' format."""
    rt.log(f"eval: {label} running")
    rt.sync()
    t0 = time.perf_counter()
    val_loss, val_bpb, scored = fn()
    rt.sync()
    rt.log(f"{label} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{1000 * (time.perf_counter() - t0):.0f}ms "
           f"scored_targets:{scored}")
    return val_loss, val_bpb


def evaluate_artifact(h: Hyperparameters, rt: Runtime, val: ValSet):
    """The scored evaluation, timed from reading the artifact: the quantized model (diagnostic),
    then the score. Without TTT the score is the sliding-window eval. With TTT, phased TTT gets
    EVAL_BUDGET_SECONDS (its compile warm-up included) and the sliding-window diagnostic runs after
    it, on a fresh copy (TTT adapts the base weights), only if it is predicted to end within the
    budget: on FineWeb it would otherwise take ~100 s from TTT. Logs the seconds of each stage."""
    rt.sync()
    t0 = time.perf_counter()
    stages, stats = {}, {}

    def stage(name, fn):
        t = time.perf_counter()
        fn()
        rt.sync()
        stages[name] = time.perf_counter() - t

    model = load_artifact_model(h, rt)
    stages["load"] = time.perf_counter() - t0
    stage("quantized", lambda: timed_eval("diagnostic quantized", lambda: eval_val(model, h, rt, val), rt))

    def sliding(m):
        timed_eval("diagnostic quantized_sliding_window", lambda: eval_val(m, h, rt, val, sliding=True), rt)

    if not h.ttt_enabled:
        if h.sliding_eval:
            stage("sliding", lambda: sliding(model))
    else:
        # 5% of the budget is slack for the predictions' errors.
        deadline = t0 + 0.95 * h.eval_budget_seconds
        # Seconds per window token on one rank: costs scale with the tokens of the windows scored.
        token_s = stages["quantized"] * rt.world_size / (len(val.tokens) - 1)
        with ttt_compile_mode(h, rt):
            if rt.compile and h.ttt_compile:
                stage("ttt_warmup", lambda: ttt_warmup(model, h, rt))
            stage("ttt", lambda: timed_eval("quantized_ttt_phased",
                                            lambda: phased_ttt(model, h, rt, val, deadline, token_s, stats), rt))
        stages["ttt"] -= stats["leftover_s"]
        stages["leftover"] = stats["leftover_s"]
        if h.sliding_eval:
            predicted = stages["load"] + token_s / rt.world_size * sliding_work(document_spans(val.tokens), h)  # reload + windows
            if rt.any_rank(time.perf_counter() + predicted > deadline):
                rt.log(f"diagnostic quantized_sliding_window skipped: predicted {predicted:.0f}s would end past "
                       f"EVAL_BUDGET_SECONDS={h.eval_budget_seconds:.0f}")
            else:
                del model  # the TTT-adapted weights
                stage("sliding", lambda: sliding(load_artifact_model(h, rt)))
    total = time.perf_counter() - t0
    rt.log("eval_stages: " + " ".join(f"{k}:{v:.1f}s" for k, v in stages.items()) + f" total:{total:.1f}s" +
           "".join(f" {k}:{stats[k]}" for k in ("ttt_docs", "fallback_docs") if k in stats))
    rt.log(f"total_eval_time:{total:.1f}s")
    if rt.device.type == "cuda":
        # reserved too: CUDA-graph pools and the allocator's cache decide whether TTT fits an H100's 80 GB
        rt.log(f"peak memory allocated (whole run): {torch.cuda.max_memory_allocated() // 2**20} MiB "
               f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main():
    try:
        h = Hyperparameters.from_env()
        rt = Runtime(h, new_log=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)

    def fail(msg, code):
        """One line on stderr and in the log, no traceback: the input, not the code, is wrong."""
        rt.log(msg, console=False)
        if rt.master:
            print(msg, file=sys.stderr, flush=True)
        sys.exit(code)

    try:
        rt.log("hyperparameters:", console=False)
        for f in fields(h):
            rt.log(f"  {f.name}: {getattr(h, f.name)}", console=False)
        changed = h.changed
        if rt.master:
            print(f"run_id: {h.run_id} log: {rt.log_path} artifact: {h.artifact_path}; {len(changed)} settings differ "
                  f"from the defaults (all in the log): {' '.join(changed)}", flush=True)
        with open(__file__, encoding="utf-8") as src:
            rt.log(src.read(), console=False)
        if rt.master:
            check_writable(h.artifact_path)
        ckpt = load_checkpoint(h.resume) if h.resume else None  # refused here, not after compiling
        train_files = shard_files(h.data_path, "train")
        sp = load_tokenizer(h)
        val = load_val_set(h, build_sentencepiece_luts(sp, h.vocab_size))
        check_tokenizer_matches(sp, val.tokens, h)
        t0 = time.perf_counter()
        check_shards(train_files, h.vocab_size)
        rt.log(f"shards_checked: {len(train_files)} train shards (header, size, token ids) in {time.perf_counter() - t0:.1f}s")
        rt.log(f"device: {rt.device} world_size: {rt.world_size} grad_accum_steps: {h.grad_accum_steps} "
               f"attention_backend: {rt.attn_backend} compile: {rt.compile} "
               f"train_cuda_graph: {h.train_cuda_graph} ({'on' if train_cuda_graph_on(h, rt) else 'off'}) "
               f"fused_mlp: {h.fused_mlp} ({'on' if fused_mlp_on(h) else 'off'}) "
               f"kv_repeat: {h.kv_repeat} ({'on' if kv_repeat_on(h.kv_repeat) else 'off'})")
        gpu = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "none"
        rt.log(f"runtime: torch {torch.__version__} cuda {torch.version.cuda} gpu {gpu} x {rt.world_size}")
        rt.log(f"train_shards: {len(train_files)} val_tokens: {len(val.tokens)} val_bytes: {val.target_bytes.sum()} "
               f"({'CaseOps sidecar' if h.caseops_enabled else 'LUT accounting'})")
        model = rt.place(GPT(h))  # built on the CPU first: identical init on every rank
        rt.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
        compile_s = compile_warmup(model, h, rt, train_files)
        if h.bench_steps > 0:
            benchmark(model, h, rt, train_files, compile_s)
            return rt.close(ok=True)
        _, train_ms = train_model(model, h, rt, train_files, val, training_budget(model, h, rt, train_files), ckpt)
        model.unfuse_mlp()  # the eval's MLP from here: the pre-quant diagnostic compiles the eval's graphs
        qstate = quantize_model(model, h, rt, train_files, train_ms)
        timed_eval("diagnostic pre-quantization post-ema", lambda: eval_val(model, h, rt, val), rt)
        write_artifact(qstate, h, rt)
        del model, qstate
        evaluate_artifact(h, rt, val)
        rt.close(ok=True)
    except ConfigError as e:
        fail(f"config error: {e}", 2)
    except (DataError, FileNotFoundError) as e:
        fail(f"error: {e}", 1)
    except ArtifactTooLarge as e:
        fail(f"ERROR: {e}", 3)
    finally:
        rt.close()


if __name__ == "__main__":
    main()
