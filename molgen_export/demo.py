"""The built-in demo: a tiny TorchTitan Qwen3 run made on the spot (tokenizer, base assets, real AdamW steps,
DCP saves laid out the way TorchTitan lays them out), then exported and verified step by step.

The same builders make the test suite's fixtures, so the demo and the tests exercise one code path.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from molgen_export.mapping.architecture import Qwen3Arch
from molgen_export.mapping.run_config import write_checkpoint_config

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
"""ChatML, the shape of Qwen's chat template (without its tool-calling and thinking parts)."""
_ELEMENTS = ("C", "N", "O", "S", "F", "Cl", "Br", "c", "n", "o", "s")


def synthetic_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """SMILES-like strings and short sentences, generated (no downloads)."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        atoms = "".join(rng.choice(_ELEMENTS) + rng.choice(("", "(=O)", "1", "(C)", "=", "#", "")) for _ in range(rng.randint(4, 14)))
        corpus.append(atoms)
        corpus.append(" ".join(rng.choice(("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "molecule",
                                           "ring", "bond", "atom", "carbon", "oxygen")) for _ in range(rng.randint(5, 12))))
    return corpus


def make_tokenizer(assets_dir: Path, vocab_size: int = 300, seed: int = 0) -> int:
    """Train a byte-level BPE tokenizer on the synthetic corpus; write tokenizer.json and its configs.

    Returns:
        The number of token ids the tokenizer can produce.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    assets_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(assets_dir / "tokenizer.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    # as Qwen3's own tokenizer_config.json says it: the Qwen2 tokenizer class, no token_type_ids, ChatML
    (assets_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
        "errors": "replace",
        "split_special_tokens": False,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }, indent=2) + "\n")
    (assets_dir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")
    return size


def write_base_assets(assets_dir: Path, arch: Qwen3Arch, eos_id: int) -> None:
    """A Qwen3 `config.json` and `generation_config.json` as a released model's assets folder holds them."""
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": arch.vocab_size,
        "hidden_size": arch.dim, "intermediate_size": arch.hidden_dim, "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads, "num_key_value_heads": arch.n_kv_heads, "head_dim": arch.head_dim,
        "hidden_act": "silu", "rms_norm_eps": arch.norm_eps, "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_seq_len, "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "bfloat16", "initializer_range": 0.02,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if arch.moe is not None:
        config.update({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_experts": arch.moe.num_experts, "num_experts_per_tok": arch.moe.top_k,
            "moe_intermediate_size": arch.moe.moe_hidden_dim, "norm_topk_prob": arch.moe.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(arch.n_layers) if i not in arch.moe.moe_layers],
        })
    (assets_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (assets_dir / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n"
                                          "# molgen tiny Qwen3 (demo base assets)\n")
    (assets_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id, "do_sample": False, "max_new_tokens": 32}, indent=2) + "\n")


def tiny_arch(vocab_size: int = 320, *, tie: bool = True, n_layers: int = 2) -> Qwen3Arch:
    """A Qwen3 small enough to train and verify in seconds on 2 CPU cores; head_dim != dim/heads, like 0.6B."""
    return Qwen3Arch(vocab_size=vocab_size, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=32,
                     hidden_dim=160, norm_eps=1e-6, rope_theta=1_000_000.0, max_seq_len=256, tie_word_embeddings=tie)


def tiny_moe_arch(vocab_size: int = 320, *, num_experts: int = 12, top_k: int = 2,
                  moe_layers: tuple[int, ...] = (0, 1)) -> Qwen3Arch:
    """A tiny Qwen3 MoE (more than 10 experts, so numeric expert order matters)."""
    from molgen_export.mapping.architecture import MoeArch

    return replace(tiny_arch(vocab_size, tie=False),
                   moe=MoeArch(num_experts=num_experts, top_k=top_k, moe_hidden_dim=48, norm_topk_prob=True,
                               moe_layers=moe_layers))


def build_model(arch: Qwen3Arch, seed: int = 0, *, fused_qkv: bool = True) -> torch.nn.Module:
    """A real torchtitan Qwen3 model (of the installed version) with TorchTitan's own initialization."""
    from molgen_export.mapping import titan

    config = arch.titan_model_config(fused_qkv=fused_qkv)  # 0.2.1 has no fused QKV (nor does its state dict)
    torch.manual_seed(seed)
    return titan.installed().build_model(config, "cpu")


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, steps: int,
          seq_len: int = 32, batch: int = 4, seed: int = 0) -> float:
    """Real next-token-prediction AdamW steps on the given token stream; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def titan_checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                           rename: Callable[[str], str] | None = None) -> dict:
    """The state dict TorchTitan's CheckpointManager saves: model FQNs at the top level, then optimizer,
    lr_scheduler, dataloader and train_state entries."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from molgen_export.mapping import titan

    model_sd = dict(titan.installed().model_wrapper_class()(model).state_dict())
    if rename is not None:
        model_sd = {rename(k): v for k, v in model_sd.items()}
    return {
        **model_sd,
        "optimizer": get_optimizer_state_dict(model, optimizer,
                                              options=StateDictOptions(flatten_optimizer_state_dict=True)),
        "lr_scheduler": {"lr_scheduler_0": {"last_epoch": step, "_step_count": step + 1}},
        "dataloader": {"dp_rank_0": {"sample_idx": step * 4}},
        "train_state": {"step": step, "ntokens_seen": step * 128},
    }


def save_dcp(state: dict, step_dir: Path) -> None:
    """Save with torch.distributed.checkpoint (shards first, `.metadata` renamed into place last)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(step_dir))


def job_config_dict(arch: Qwen3Arch, *, flavor: str, hf_assets_path: str, dump_folder: str, seq_len: int,
                    checkpoint_folder: str = "checkpoint", keep_latest_k: int = 10, model=None,
                    save_config_file: str | None = None) -> dict:
    """A TorchTitan 0.3 `Trainer.Config.to_dict()` dump for this architecture (built by torchtitan itself).

    Args:
        model: a torchtitan model config to use instead of `arch`'s (tests set RoPE scaling, routing, ...).
        save_config_file: `debug.save_config_file`, where TorchTitan writes this dump inside the dump folder.
    """
    import warnings

    from molgen_export.mapping import titan

    if titan.installed().release < (0, 3, 0):
        if model is not None:
            raise ValueError("a 0.3 model config cannot be written by torchtitan 0.2.1")
        return job_config_dict_titan021(flavor=flavor, hf_assets_path=hf_assets_path, dump_folder=dump_folder,
                                        seq_len=seq_len, checkpoint_folder=checkpoint_folder,
                                        keep_latest_k=keep_latest_k, save_config_file=save_config_file)
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import DebugConfig, TrainingConfig
    from torchtitan.models.qwen3 import Qwen3StateDictAdapter, parallelize_qwen3
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

    spec = ModelSpec(name="qwen3", flavor=flavor, model=model or arch.titan_model_config(fused_qkv=True),
                     parallelize_fn=parallelize_qwen3, pipelining_fn=None, post_optimizer_build_fn=None,
                     state_dict_adapter=Qwen3StateDictAdapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Trainer.Config(
            model_spec=spec, hf_assets_path=hf_assets_path, dump_folder=dump_folder,
            training=TrainingConfig(local_batch_size=4, seq_len=seq_len, steps=20),
            debug=DebugConfig(save_config_file=save_config_file),
            checkpoint=CheckpointManager.Config(interval=10, folder=checkpoint_folder, keep_latest_k=keep_latest_k,
                                                last_save_model_only=False, initial_load_model_only=False))
    return json.loads(json.dumps(config.to_dict(), default=repr))


def job_config_dict_titan021(*, flavor: str, hf_assets_path: str, dump_folder: str, seq_len: int,
                             checkpoint_folder: str = "checkpoint", keep_latest_k: int = 10,
                             save_config_file: str | None = None, custom_import: str = "") -> dict:
    """A TorchTitan 0.2.1 `JobConfig.to_dict()`, what 0.2.1 writes to `<dump_folder>/<job.save_config_file>`:
    a flavor name and no dims (a custom flavor is registered by the `experimental.custom_import` module)."""
    from torchtitan.config import JobConfig

    config = JobConfig()
    config.job.dump_folder, config.job.save_config_file = dump_folder, save_config_file
    config.model.name, config.model.flavor, config.model.hf_assets_path = "qwen3", flavor, hf_assets_path
    config.training.local_batch_size, config.training.seq_len, config.training.steps = 4, seq_len, 20
    config.checkpoint.enable, config.checkpoint.interval, config.checkpoint.folder = True, 10, checkpoint_folder
    config.checkpoint.keep_latest_k, config.checkpoint.last_save_model_only = keep_latest_k, False
    config.experimental.custom_import = custom_import
    return json.loads(json.dumps(config.to_dict(), default=repr))


def write_titan021_flavor(launch_dir: Path, arch: Qwen3Arch) -> tuple[str, str]:
    """Write the module a torchtitan 0.2.1 run names in `experimental.custom_import` to register its custom flavor
    (0.2.1's train.py imports it from the launch directory), for `arch`.

    Returns:
        (module name, flavor name); both carry a digest of the args, so runs of other dims never collide.
    """
    import hashlib

    args = repr(arch.titan_model_config())
    digest = hashlib.sha256(args.encode()).hexdigest()[:10]
    module, flavor = f"molgen_demo_flavor_{digest}", f"molgen_tiny_{digest}"
    (launch_dir / f"{module}.py").write_text(
        '"""The demo run\'s custom Qwen3 flavor for torchtitan 0.2.1 (its experimental.custom_import)."""\n\n'
        "from torchtitan.models.moe import MoEArgs  # noqa: F401 (named in the args' repr)\n"
        "from torchtitan.models.qwen3 import Qwen3ModelArgs, qwen3_args\n\n"
        f"qwen3_args[{flavor!r}] = {args}\n")
    return module, flavor


@dataclass
class DemoRun:
    """Paths of a made-up run, laid out as TorchTitan lays out `dump_folder`."""

    workdir: Path
    """The launch directory (relative paths in the job config resolve against it)."""
    run_dir: Path
    checkpoint_root: Path
    assets_dir: Path
    job_config: Path
    steps: list[Path] = field(default_factory=list)
    tokenizer_size: int = 0
    arch: Qwen3Arch | None = None


def make_demo_run(workdir: Path, *, steps: tuple[int, ...] = (10, 20), arch: Qwen3Arch | None = None,
                  tokenizer_vocab: int = 300, seed: int = 0, write_checkpoint_json: bool = True,
                  write_job_config: bool = True, fused_qkv: bool = True,
                  rename: Callable[[str], str] | None = None,
                  mutate: Callable[[dict], None] | None = None) -> DemoRun:
    """Make a tiny TorchTitan Qwen3 run: assets with a trained tokenizer, real training, DCP saves per step.

    Args:
        workdir: launch directory; the run goes to `workdir/run`, the assets to `workdir/assets`.
        steps: checkpoint steps; training runs between them.
        arch: model dims (default `tiny_arch()`, tied, vocab padded past the tokenizer).
        rename: optional checkpoint-key rewrite (tests use it for old names and wrapper prefixes).
        mutate: optional in-place edit of each saved state dict (tests use it to plant NaN/Inf).
    """
    workdir = Path(workdir)
    assets = workdir / "assets"
    tokenizer_size = make_tokenizer(assets, tokenizer_vocab, seed)
    arch = arch or tiny_arch()
    if arch.vocab_size < tokenizer_size:
        arch = replace(arch, vocab_size=-(-tokenizer_size // 64) * 64)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(assets / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    write_base_assets(assets, arch, eos_id)
    run_dir = workdir / "run"
    checkpoint_root = run_dir / "checkpoint"
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    job_config = run_dir / "job_config.json"
    if write_job_config:
        from molgen_export.mapping import titan

        if titan.installed().release < (0, 3, 0):  # a 0.2.1 run: a flavor its custom_import module registers
            module, flavor = write_titan021_flavor(workdir, arch)
            job = job_config_dict_titan021(flavor=flavor, hf_assets_path="./assets", dump_folder="./run",
                                           seq_len=arch.max_seq_len, save_config_file="job_config.json",
                                           custom_import=module)
        else:
            job = job_config_dict(arch, flavor="molgen_tiny", hf_assets_path="./assets", dump_folder="./run",
                                  seq_len=arch.max_seq_len)
        job_config.write_text(json.dumps(job, indent=2) + "\n")
    ids = [i for line in synthetic_corpus(seed=seed + 1) for i in tokenizer.encode(line).ids + [eos_id]]
    tokens = torch.tensor(ids, dtype=torch.long)
    model = build_model(arch, seed, fused_qkv=fused_qkv)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run = DemoRun(workdir, run_dir, checkpoint_root, assets, job_config, tokenizer_size=tokenizer_size, arch=arch)
    done = 0
    for step in sorted(steps):
        loss = train(model, optimizer, tokens, step - done, seed=seed + step)
        done = step
        state = titan_checkpoint_state(model, optimizer, step, rename)
        if mutate is not None:
            mutate(state)
        step_dir = checkpoint_root / f"step-{step}"
        save_dcp(state, step_dir)
        if write_checkpoint_json and write_job_config and not (checkpoint_root / "config.json").exists():
            write_checkpoint_config(checkpoint_root, job_config, launch_dir=workdir)
        run.steps.append(step_dir)
        logger.info("demo: step %d loss %.3f -> %s", step, loss, step_dir)
    return run
