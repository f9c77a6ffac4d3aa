"""Every runtime setting of the endpoint, resolved argument → environment variable → default.

Read at call time (not import time), so a test or a server can set the environment and build a new
``Settings``. This table holds the one default of each setting: the CDK stacks set a variable only
when the operator chose a value, and README.md lists them. A bad value is a ``SettingsError``, raised
when the endpoint starts (and when the archive is built, ``check_against``): never a 400 to a caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .errors import SettingsError

TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
ENCODINGS = ("float", "base64", "binary", "ubinary")
# Work caps of one request, on every runtime (protocol.Limits): over any of them is 413 before compute.
MAX_TEXTS = 2048  # texts of one JSON request: OpenAI's own cap on inputs, and 2,048 is a few seconds of a GPU
MAX_RECORDS = 65536  # records of one JSON Lines or CSV body: 1 MB of 16-byte records (a small mini-batch)
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # the least default; a response may be ~10 × its request (floats of short texts)

# variable name, default, help (README.md is generated from the same words)
ENV = {
    "default_task": ("JV3_DEFAULT_TASK", "text-matching", "task adapter used when a request names none"),
    "default_dimensions": ("JV3_DEFAULT_DIMENSIONS", "", "Matryoshka size used when a request names none (empty: full 1024)"),
    "default_encoding": ("JV3_DEFAULT_ENCODING", "float", "embedding encoding when a request names none: float, base64, binary, ubinary"),
    "tasks": ("JV3_TASKS", ",".join(TASKS), "comma-separated task adapters to prepare weights for (fewer tasks, less GPU memory)"),
    "max_batch_tokens": ("JV3_MAX_BATCH_TOKENS", "", "token budget of one forward pass (empty: 65536 on GPU, 8192 on CPU)"),
    "max_seq_length": ("JV3_MAX_SEQ_LENGTH", "8192", "longest text in tokens; longer ones are truncated or refused"),
    "late_chunking_overlap": ("JV3_LATE_CHUNKING_OVERLAP", "512", "token overlap of the windows of long late chunking"),
    "device": ("JV3_DEVICE", "auto", "torch device: auto (cuda when present), cuda, cuda:1, cpu"),
    "dtype": ("JV3_DTYPE", "auto", "weights and activations: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32"),
    "batch_wait_ms": ("JV3_BATCH_WAIT_MS", "2", "local/BYOC server: how long a free batcher gathers requests to share its next forward pass (a request that finds it idle starts at once)"),
    "max_request_bytes": ("JV3_MAX_REQUEST_BYTES", str(6 * 1024 * 1024), "largest request body (SageMaker's real-time limit is 6 MB)"),
    "request_timeout_s": ("JV3_REQUEST_TIMEOUT_S", "60", "local/BYOC server: seconds before a request is answered 503"),
    "max_texts": ("JV3_MAX_TEXTS_PER_REQUEST", str(MAX_TEXTS), "texts (or late-chunking chunks) of one JSON request; more is 413"),
    "max_records": ("JV3_MAX_RECORDS_PER_REQUEST", str(MAX_RECORDS), "records of one JSON Lines or CSV body; more is 413"),
    "max_response_bytes": ("JV3_MAX_RESPONSE_BYTES", "", "estimated response size at most; more is 413 "
                           "(empty: 64 MiB or 10 × JV3_MAX_REQUEST_BYTES, the larger)"),
    "log_level": ("JV3_LOG_LEVEL", "INFO", "log level of the endpoint's loggers"),
}


@dataclass(frozen=True)
class Settings:
    default_task: str
    default_dimensions: int | None
    default_encoding: str
    tasks: tuple[str, ...]
    max_batch_tokens: int | None
    max_seq_length: int
    late_chunking_overlap: int
    device: str
    dtype: str
    batch_wait_ms: float
    max_request_bytes: int
    request_timeout_s: float
    max_texts: int
    max_records: int
    max_response_bytes: int
    log_level: str

    @classmethod
    def resolve(cls, **overrides) -> Settings:
        """Arguments win over ``JV3_*`` environment variables, which win over the defaults."""
        unknown = set(overrides) - set(ENV)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; expected one of {sorted(ENV)}")
        raw = {}
        for f in fields(cls):
            var, default, _ = ENV[f.name]
            value = overrides.get(f.name)
            raw[f.name] = value if value is not None else os.environ.get(var, default)
        request_bytes = _int(raw["max_request_bytes"], "JV3_MAX_REQUEST_BYTES")
        return cls(
            default_task=_choice(raw["default_task"], TASKS, "JV3_DEFAULT_TASK"),
            default_dimensions=_optional_int(raw["default_dimensions"], "JV3_DEFAULT_DIMENSIONS"),
            default_encoding=_choice(raw["default_encoding"], ENCODINGS, "JV3_DEFAULT_ENCODING"),
            tasks=_tasks(raw["tasks"]),
            max_batch_tokens=_optional_int(raw["max_batch_tokens"], "JV3_MAX_BATCH_TOKENS"),
            max_seq_length=_int(raw["max_seq_length"], "JV3_MAX_SEQ_LENGTH"),
            late_chunking_overlap=_int(raw["late_chunking_overlap"], "JV3_LATE_CHUNKING_OVERLAP", minimum=0),
            device=str(raw["device"]),
            dtype=_choice(raw["dtype"], ("auto", "bfloat16", "float16", "float32"), "JV3_DTYPE"),
            batch_wait_ms=_float(raw["batch_wait_ms"], "JV3_BATCH_WAIT_MS", minimum=0),
            max_request_bytes=request_bytes,
            request_timeout_s=_float(raw["request_timeout_s"], "JV3_REQUEST_TIMEOUT_S", minimum=0.001),
            max_texts=_int(raw["max_texts"], "JV3_MAX_TEXTS_PER_REQUEST"),
            max_records=_int(raw["max_records"], "JV3_MAX_RECORDS_PER_REQUEST"),
            max_response_bytes=_optional_int(raw["max_response_bytes"], "JV3_MAX_RESPONSE_BYTES", minimum=1024)
            or max(MAX_RESPONSE_BYTES, 10 * request_bytes),
            log_level=str(raw["log_level"]).upper(),
        )


def _choice(value, choices, name):
    if isinstance(value, (tuple, list)):
        raise SettingsError(f"{name} must be one value, got {value!r}")
    if value not in choices:
        raise SettingsError(f"{name}={value!r} is not valid; expected one of {', '.join(choices)}")
    return value


def _int(value, name, minimum=1):
    try:
        number = int(str(value).strip())  # str(): int() of a float would silently drop its fraction
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise SettingsError(f"{name}={number} must be at least {minimum}")
    return number


def _float(value, name, minimum):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r} is not a number") from None
    if not number >= minimum:  # also refuses NaN
        raise SettingsError(f"{name}={value!r} must be at least {minimum:g}")
    return number


def _optional_int(value, name, minimum=1):
    if value in ("", None):
        return None
    return _int(value, name, minimum)


def _tasks(value) -> tuple[str, ...]:
    names = value if isinstance(value, (tuple, list)) else [t.strip() for t in str(value).split(",") if t.strip()]
    for name in names:
        _choice(name, TASKS, "JV3_TASKS")
    if not names:
        raise SettingsError("JV3_TASKS names no task; expected some of " + ", ".join(TASKS))
    return tuple(names)


def check_against(settings: Settings, *, hidden_size: int, tasks: tuple[str, ...] | list[str]) -> None:
    """Refuse settings this checkpoint cannot serve (the endpoint would fail every request or not start).

    Called when the engine loads and when model_package builds the archive; infra repeats the same two
    checks at ``cdk synth`` from the archive's manifest.json.
    """
    problems = []
    if settings.default_dimensions is not None and settings.default_dimensions > hidden_size:
        problems.append(f"JV3_DEFAULT_DIMENSIONS={settings.default_dimensions} exceeds the model's {hidden_size} dimensions")
    missing = [t for t in settings.tasks if t not in tasks]
    if missing:
        problems.append(
            f"JV3_TASKS names {', '.join(missing)}, which the checkpoint lacks (it has {', '.join(tasks) or 'no adapters'})"
        )
    elif settings.default_task not in settings.tasks:
        problems.append(f"JV3_DEFAULT_TASK={settings.default_task!r} is not among JV3_TASKS ({', '.join(settings.tasks)})")
    if problems:
        raise SettingsError("; ".join(problems))
