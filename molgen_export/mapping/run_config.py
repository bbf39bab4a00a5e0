"""Find and read a run's config (`<checkpoint_root>/config.json`, else the run's `job_config.json`) into a RunConfig.

Understands TorchTitan 0.3 dumps (`Trainer.Config.to_dict()`), 0.2-style dicts (`job`/`model`/`training`
sections, a flavor and no dims), and the `config.json` the runner writes into the checkpoint folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from molgen_export.errors import ConfigError

logger = logging.getLogger(__name__)

RUNNER_CONFIG_FORMAT = "molgen_export.mapping.run_config/1"
"""`format` value of the checkpoint-folder config.json the runner writes."""

JOB_CONFIG_NAME = "job_config.json"
CHECKPOINT_CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelDims:
    """Dense Qwen3 dimensions as a run config states them (any may be None when the source is silent)."""

    vocab_size: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None
    tie_word_embeddings: bool | None = None
    fused_qkv: bool | None = None
    moe: bool = False
    num_experts: int | None = None
    top_k: int | None = None
    moe_hidden_dim: int | None = None
    route_norm: bool | None = None
    score_func: str | None = None
    moe_layers: tuple[int, ...] | None = None
    """Indices of the layers whose FFN is a mixture of experts (None: not stated)."""


@dataclass(frozen=True)
class RunConfig:
    """What the export needs to know about the training run, normalized from whichever file held it."""

    source: Path
    """The config file that was read."""
    kind: str
    """`titan-0.3`, `titan-0.2` or `runner` (the checkpoint-folder config.json)."""
    model_name: str | None
    flavor: str | None
    dims: ModelDims
    seq_len: int | None
    training_dtype: str | None
    mixed_precision_param: str | None
    hf_assets_path: Path | None
    tokenizer_path: Path | None
    keep_latest_k: int | None
    checkpoint_folder: str | None
    launch_dir: Path | None
    job_config_path: Path | None
    custom_import: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    titan_model: dict | None = field(default=None, compare=False)
    """The run's own `model_spec.model` (TorchTitan 0.3 `to_dict()`): the verifier's reference is built from it."""

    @property
    def compute_dtype(self) -> str:
        """The dtype training computed in: `training.dtype` when bf16, else `mixed_precision_param`."""
        if self.training_dtype == "bfloat16":
            return "bfloat16"
        return self.mixed_precision_param or "bfloat16"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("titan_model", None)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        data["warnings"] = list(self.warnings)
        return data


def _get(data: dict, *path: str, default=None):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _launch_dir_for(job_config: Path, dump_folder: str | None, inside: tuple[str | None, ...] = ()) -> Path | None:
    """The directory training was launched from, derived from where TorchTitan put this file.

    TorchTitan writes its dump to `<launch>/<dump_folder>/<debug.save_config_file>` (often `logs/job_config.json`),
    and runners copy it to `<launch>/<dump_folder>/<checkpoint.folder>/config.json`; `inside` lists those places
    relative to the dump folder. The first one that matches the file's own path gives the launch dir.
    With an absolute dump folder the launch dir cannot be told from the file; a dump folder reaching up with
    `..` leaves it known only when nothing below the shared ancestor is needed. None when unknown.
    """
    import os

    folder = job_config.resolve()
    if not dump_folder:
        return folder.parent
    dump = Path(os.path.normpath(dump_folder))
    for place in [p for p in inside if p] + [job_config.name]:
        inner = Path(os.path.normpath(place))
        if inner.is_absolute() or ".." in inner.parts:
            continue
        if dump.is_absolute():
            if Path(os.path.normpath(dump / inner)) == folder:
                return None
            continue
        parts = [p for p in (dump / inner).parts if p not in (".", "")]
        ups = 0
        while parts and parts[0] == "..":
            parts.pop(0)
            ups += 1
        if not parts or len(parts) >= len(folder.parts) or list(folder.parts[-len(parts):]) != parts:
            continue
        if ups:
            return None  # `<launch>/..` is known, the launch dir itself is not
        return Path(*folder.parts[:-len(parts)])
    return folder.parent


def _resolve(path_text: str | None, launch_dir: Path | None, source: Path | None = None) -> Path | None:
    if not path_text:
        return None
    if not isinstance(path_text, str):
        raise ConfigError(f"a path (hf_assets_path or tokenizer path) is {type(path_text).__name__} {path_text!r}, "
                          "not a string",
                          hint="fix hf_assets_path / tokenizer path in the run config, or pass --hf-assets")
    path = Path(path_text).expanduser()
    if path.is_absolute():
        return path
    if launch_dir is None:
        logger.warning("%s: %r is relative to the launch directory, which cannot be told from this file (its "
                       "dump_folder is absolute or climbs with ..); pass --hf-assets", source, path_text)
        return None
    return (launch_dir / path).resolve()


def _dims_from_titan03_model(model: dict) -> ModelDims:
    layers = model.get("layers") or []
    first = layers[0] if layers else {}
    attention = first.get("attention") or {}
    qkv = attention.get("qkv_linear") or {}
    rope = attention.get("rope") or {}
    ffn = next(((layer or {}).get("feed_forward") for layer in layers if (layer or {}).get("feed_forward")), None) or {}
    moe_layers = tuple(i for i, layer in enumerate(layers) if (layer or {}).get("moe"))
    moe_config = (layers[moe_layers[0]].get("moe") or {}) if moe_layers else {}
    router = moe_config.get("router") or {}
    experts = _get(moe_config, "routed_experts", "inner_experts") or moe_config.get("experts") or {}
    moe_dims = dict(
        num_experts=moe_config.get("num_experts"), top_k=router.get("top_k"),
        moe_hidden_dim=experts.get("hidden_dim"), route_norm=router.get("route_norm"),
        score_func=router.get("score_func"), moe_layers=moe_layers) if moe_layers else {}
    return ModelDims(
        vocab_size=model.get("vocab_size"),
        dim=model.get("dim"),
        n_layers=len(layers) or None,
        n_heads=attention.get("n_heads"),
        n_kv_heads=attention.get("n_kv_heads") or attention.get("n_heads"),
        head_dim=attention.get("head_dim") or qkv.get("head_dim"),
        hidden_dim=_get(ffn, "w1", "out_features"),
        norm_eps=_get(model, "norm", "eps"),
        rope_theta=rope.get("theta"),
        max_seq_len=rope.get("max_seq_len"),
        tie_word_embeddings=model.get("enable_weight_tying"),
        fused_qkv="wqkv" in qkv if qkv else None,
        moe=bool(moe_layers),
        **moe_dims,
    )


_INT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len",
               "num_experts", "top_k", "moe_hidden_dim")
_DTYPES = ("bfloat16", "float16", "float32")


def _validate(config: RunConfig) -> RunConfig:
    """Refuse values of the wrong type or range, naming the field and the file."""
    def fail(field_name: str, value, expected: str):
        raise ConfigError(f"{config.source}: `{field_name}` is {value!r}, expected {expected}", path=config.source,
                          hint="fix the run config, or pass the right one with --config")

    for name in _INT_FIELDS:
        value = getattr(config.dims, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            fail(f"model {name}", value, "a positive integer")
    for name in ("norm_eps", "rope_theta"):
        value = getattr(config.dims, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            fail(f"model {name}", value, "a positive number")
    for name in ("tie_word_embeddings", "route_norm"):
        value = getattr(config.dims, name)
        if value is not None and not isinstance(value, bool):
            fail(f"model {name}", value, "true or false")
    if config.seq_len is not None and (isinstance(config.seq_len, bool) or not isinstance(config.seq_len, int)
                                       or config.seq_len <= 0):
        fail("training.seq_len", config.seq_len, "a positive integer")
    for name in ("training_dtype", "mixed_precision_param"):
        value = getattr(config, name)
        if value is not None and value not in _DTYPES:
            fail(name, value, f"one of {', '.join(_DTYPES)}")
    if config.keep_latest_k is not None and (isinstance(config.keep_latest_k, bool)
                                             or not isinstance(config.keep_latest_k, int) or config.keep_latest_k < 0):
        fail("checkpoint.keep_latest_k", config.keep_latest_k, "a non-negative integer")
    for name in ("model_name", "flavor"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            fail(name, value, "a string")
    return config


def parse_run_config(data: dict, source: Path) -> RunConfig:
    """Normalize a config dict read from `source` into a RunConfig, checking types and ranges.

    Raises:
        ConfigError: the dict is none of the understood shapes, or a field has the wrong type.
    """
    try:
        config = _parse_run_config(data, source)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            if exc.path is not None:
                raise
            raise ConfigError(f"{source}: {exc.args[0]}", path=source, hint=exc.hint) from exc
        # a section that should be a mapping is a number, a list where a dict belongs, ...
        raise ConfigError(f"{source} has an unexpected structure ({type(exc).__name__}: {exc})", path=source,
                          hint="pass the run's job_config.json as TorchTitan wrote it, with --config") from exc
    return _validate(config)


def _parse_run_config(data: dict, source: Path) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} does not hold a JSON object", path=source)
    if data.get("format") == RUNNER_CONFIG_FORMAT:
        launch_dir = Path(data["launch_dir"]) if data.get("launch_dir") else source.parent
        dims_data = {k: v for k, v in (data.get("dims") or {}).items() if k in ModelDims.__dataclass_fields__}
        if dims_data.get("moe_layers") is not None:
            dims_data["moe_layers"] = tuple(dims_data["moe_layers"])
        dims = ModelDims(**dims_data)
        return RunConfig(
            source=source, kind="runner", model_name=data.get("model_name"), flavor=data.get("flavor"), dims=dims,
            seq_len=data.get("seq_len"), training_dtype=data.get("training_dtype"),
            mixed_precision_param=data.get("mixed_precision_param"),
            hf_assets_path=_resolve(data.get("hf_assets_path"), launch_dir, source),
            tokenizer_path=_resolve(data.get("tokenizer_path"), launch_dir, source),
            keep_latest_k=data.get("keep_latest_k"), checkpoint_folder=data.get("checkpoint_folder"),
            launch_dir=launch_dir, job_config_path=_resolve(data.get("job_config_path"), launch_dir, source),
            custom_import=data.get("custom_import"))
    if "model_spec" in data:  # TorchTitan 0.3 Trainer.Config.to_dict()
        spec = data.get("model_spec") or {}
        launch_dir = _launch_dir_for(source, data.get("dump_folder"), (
            _get(data, "debug", "save_config_file"), f"{_get(data, 'checkpoint', 'folder') or 'checkpoint'}/config.json"))
        hf_assets = data.get("hf_assets_path")
        return RunConfig(
            source=source, kind="titan-0.3", model_name=spec.get("name"), flavor=spec.get("flavor"),
            dims=_dims_from_titan03_model(spec.get("model") or {}),
            seq_len=_get(data, "training", "seq_len"), training_dtype=_get(data, "training", "dtype"),
            mixed_precision_param=_get(data, "training", "mixed_precision_param"),
            hf_assets_path=_resolve(hf_assets, launch_dir, source),
            tokenizer_path=_resolve(_get(data, "tokenizer", "path") or hf_assets, launch_dir, source),
            keep_latest_k=_get(data, "checkpoint", "keep_latest_k"),
            checkpoint_folder=_get(data, "checkpoint", "folder"), launch_dir=launch_dir, job_config_path=source,
            titan_model=spec.get("model") if isinstance(spec.get("model"), dict) else None)
    if "model" in data and isinstance(data["model"], dict) and ("name" in data["model"] or "flavor" in data["model"]):
        model = data["model"]
        launch_dir = _launch_dir_for(source, _get(data, "job", "dump_folder"), (
            _get(data, "job", "save_config_file"), f"{_get(data, 'checkpoint', 'folder') or 'checkpoint'}/config.json"))
        hf_assets = model.get("hf_assets_path")
        tokenizer = model.get("tokenizer_path") or hf_assets
        return RunConfig(
            source=source, kind="titan-0.2", model_name=model.get("name"), flavor=model.get("flavor"),
            dims=ModelDims(), seq_len=_get(data, "training", "seq_len"),
            training_dtype=_get(data, "training", "dtype"),
            mixed_precision_param=_get(data, "training", "mixed_precision_param"),
            hf_assets_path=_resolve(hf_assets or tokenizer, launch_dir, source),
            tokenizer_path=_resolve(tokenizer, launch_dir, source),
            keep_latest_k=_get(data, "checkpoint", "keep_latest_k"),
            checkpoint_folder=_get(data, "checkpoint", "folder"), launch_dir=launch_dir, job_config_path=source,
            custom_import=_get(data, "experimental", "custom_import"))
    raise ConfigError(f"{source} is not a TorchTitan job config (no `model_spec` nor `model.name`) "
                      "and not a molgen_export run config", path=source,
                      hint="pass the run's job_config.json with --config")


def read_config_file(path: Path) -> RunConfig:
    """Read one config file (JSON, or TOML for TorchTitan 0.2 job files).

    Raises:
        ConfigError: unreadable or not understood.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read run config {path}: {exc.strerror or exc}", path=path) from exc
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"run config {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}", path=path,
                          hint="fix the file or point --config at the run's job_config.json") from exc
    return parse_run_config(data, path)


def find_run_config(checkpoint_root: Path) -> Path | None:
    """`<checkpoint_root>/config.json`, else a `job_config.json` in the run's dump folder above it."""
    own = checkpoint_root / CHECKPOINT_CONFIG_NAME
    if own.is_file():
        return own
    folder = checkpoint_root.resolve()
    for _ in range(3):
        folder = folder.parent
        # TorchTitan writes `<dump_folder>/<debug.save_config_file>`, usually `job_config.json` or
        # `logs/job_config.json`; any one folder down from the dump folder is looked at too
        candidates = [folder / JOB_CONFIG_NAME, folder / "logs" / JOB_CONFIG_NAME,
                      *sorted(folder.glob(f"*/{JOB_CONFIG_NAME}"))]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def load_run_config(checkpoint_root: Path, explicit: Path | None = None) -> RunConfig:
    """Load the run config for a checkpoint root.

    Args:
        checkpoint_root: the folder holding `step-N` folders.
        explicit: a config file given by the user (`--config`), used instead of the search.

    Raises:
        ConfigError: no config found, or it cannot be read.
    """
    path = explicit or find_run_config(checkpoint_root)
    if path is None:
        raise ConfigError(
            f"no run config for {checkpoint_root}: looked for {checkpoint_root / CHECKPOINT_CONFIG_NAME} "
            f"and a {JOB_CONFIG_NAME} in the run's folders above it", path=checkpoint_root,
            hint="launch training through `python -m molgen_export.runner.launch` (it writes both), "
                 "or pass the run's job config with --config")
    config = read_config_file(path)
    if config.kind == "runner" and config.job_config_path and config.job_config_path.is_file():
        # the runner's file points at the full job config: the run's model config (and dims) come from there
        job = read_config_file(config.job_config_path)
        config = RunConfig(**{**config.__dict__, "dims": config.dims if config.dims.dim else job.dims,
                              "titan_model": job.titan_model})
    return config


def write_checkpoint_config(checkpoint_root: Path, job_config: Path, *, launch_dir: Path | None = None) -> Path:
    """Write `<checkpoint_root>/config.json`: what the export needs, normalized, and where job_config.json is.

    Written to a temporary name and renamed into place, so readers never see half a file.

    Returns:
        The path written.
    """
    import os

    job = read_config_file(job_config)
    launch = launch_dir or job.launch_dir
    data = {
        "format": RUNNER_CONFIG_FORMAT,
        "job_config_path": str(job_config.resolve()),
        "launch_dir": str(launch.resolve()) if launch else None,
        "source_kind": job.kind,
        "model_name": job.model_name,
        "flavor": job.flavor,
        "dims": asdict(job.dims),
        "seq_len": job.seq_len,
        "training_dtype": job.training_dtype,
        "mixed_precision_param": job.mixed_precision_param,
        "hf_assets_path": str(job.hf_assets_path) if job.hf_assets_path else None,
        "tokenizer_path": str(job.tokenizer_path) if job.tokenizer_path else None,
        "keep_latest_k": job.keep_latest_k,
        "checkpoint_folder": job.checkpoint_folder,
        "custom_import": job.custom_import,
    }
    target = checkpoint_root / CHECKPOINT_CONFIG_NAME
    temp = checkpoint_root / f".{CHECKPOINT_CONFIG_NAME}.tmp-{os.getpid()}"
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, target)
    return target
